"""Paired data for the avatar estimator: realistic faces from inverted renders, with semantic augmentation.

SwiftAvatar's data engine: every engine render y with vector v is inverted into G_avatar's W+ (invert.py),
and the realistic face x = G_real(w*) (same W+, the twin generator) becomes a training pair (x, v). Semantic
augmentation then re-draws the local codes of parts the vector does not describe (background) or
describes only coarsely (hair colour/texture, eyeglasses tint):

    w_k <- (1 - λ_k)·w_k + λ_k·n     for the shape and texture codes of each chosen part k,

n = G_real.map(fresh z), one n per part and augmented copy; every other code is copied bit for bit.
Defaults: 10 augmentations per latent, λ background 1.0, hair 0.3, eyeglasses 0.06. Augmented copies share
the source render's index as their group, so estimator.paired_set.PairedSet keeps them on one side of a split.

API (for the pipeline)
  PairedConfig, get_config(name, **overrides)                   presets tiny / cpu / paper
  semantic_augment(G, wp, lambdas, n_aug, keys, seed) -> [B, n_aug, n_latent, w_dim]
  blend_part_codes(G, wp, n, lambdas) -> [B, n_aug, n_latent, w_dim]        (the formula, given n)
  synthesize_pairs(g_real, latents_file, dataset_dir, pack, out_dir, cfg, g_avatar=None) -> paired set path
      resumable: chunks of ``cfg.chunk`` source latents in out_dir/.chunks/, skipped when complete; then the
      paired set (estimator.paired_set.write_paired_set: images uint8 [N, S, S, 3], continuous, discrete, groups) and,
      for inspection, out_dir/inspect.npz (render y, G_avatar(w*) when g_avatar is given, G_real(w*),
      augmented faces of the first ``cfg.inspect`` latents) and out_dir/contact_sheet.png.
  renders_to_paired_set(dataset_dir, pack, out, size) -> path      the baseline: renders used directly
  read_vectors(dataset_dir, names, pack) -> (continuous [n, C] float32, discrete [n, K] int64)
  contact_sheet(renders, recons, reals, augs) -> uint8 image       SwiftAvatar Figure 5 layout, one row per
      latent: render | reconstruction G_avatar(w*) | realistic face G_real(w*) | augmented faces
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...backend.errors import UserError
from ..common.presets import pick
from ...backend.progress import Progress
from ...backend.schema import Pack
from ..estimator.paired_set import write_paired_set
from .invert import dataset_names, frozen, generator_fingerprint, load_latents, make_noise
from ..common.parts import PART_IDS

DEFAULT_LAMBDAS = (("background", 1.0), ("hair", 0.3), ("eyeglasses", 0.06))


@dataclass(frozen=True)
class PairedConfig:
    name: str
    size: int = 128                  # side of the stored faces (the estimator's input size)
    n_aug: int = 10                  # augmented copies per latent
    aug_lambdas: tuple = DEFAULT_LAMBDAS   # (part, λ) pairs
    include_original: bool = True    # keep G_real(w*) itself next to its augmentations
    batch: int = 32                  # generator batch
    chunk: int = 256                 # source latents per resumable chunk
    noise: str = "fixed"             # per-image seeded noise maps, or "zero"
    seed: int = 0
    inspect: int = 16                # latents shown in inspect.npz / contact_sheet.png
    sheet_augs: int = 4              # augmented faces per contact-sheet row


CONFIGS = {
    "tiny": PairedConfig("tiny", size=32, n_aug=3, batch=16, chunk=4, inspect=4, sheet_augs=3),
    "cpu": PairedConfig("cpu", size=128, n_aug=10, batch=32, chunk=256),
    "paper": PairedConfig("paper", size=224, n_aug=10, batch=16, chunk=512),
}


def get_config(name, **overrides) -> PairedConfig:
    cfg = pick(CONFIGS, name, overrides, "paired-data")
    lambdas = tuple((str(p), float(l)) for p, l in (cfg.aug_lambdas.items() if isinstance(cfg.aug_lambdas, dict)
                                                     else cfg.aug_lambdas))
    for p, lam in lambdas:
        if p not in PART_IDS:
            raise UserError(f"semantic augmentation: unknown part '{p}' ({', '.join(PART_IDS)})")
        if not 0.0 <= lam <= 1.0:
            raise UserError(f"semantic augmentation: λ for '{p}' must be in [0, 1], got {lam}")
    return replace(cfg, aug_lambdas=lambdas)


# ============================================================================================
# Semantic augmentation
# ============================================================================================

def _lambda_pairs(lambdas) -> list[tuple[int, float]]:
    items = lambdas.items() if isinstance(lambdas, dict) else lambdas
    return [(PART_IDS[p] if isinstance(p, str) else int(p), float(l)) for p, l in items]


def blend_part_codes(G, wp: torch.Tensor, n: torch.Tensor, lambdas) -> torch.Tensor:
    """wp [B, L, D], n [B, A, P, D] (one W code per augmented copy and chosen part) -> [B, A, L, D].

    Copy a of sample b: the shape and texture codes of chosen part j become (1 - λ_j)·wp + λ_j·n[b, a, j];
    every other code is wp's, bit for bit."""
    pairs = _lambda_pairs(lambdas)
    b, a = n.shape[:2]
    if n.shape[2] != len(pairs):
        raise ValueError(f"n has {n.shape[2]} codes per copy for {len(pairs)} parts")
    out = wp[:, None].expand(b, a, -1, -1).clone()
    for j, (k, lam) in enumerate(pairs):
        for idx in (G.shape_index(k), G.texture_index(k)):
            out[:, :, idx] = (1.0 - lam) * wp[:, None, idx] + lam * n[:, :, j]
    return out


@torch.no_grad()
def augmentation_codes(G, keys, n_aug: int, n_parts: int, seed: int = 0) -> torch.Tensor:
    """Fresh W codes [B, n_aug, n_parts, D], sample b's seeded by (seed, keys[b]) (batch-independent)."""
    z = torch.stack([torch.randn(n_aug * n_parts, G.cfg.z_dim,
                                 generator=torch.Generator().manual_seed((seed * 7_919_003 + int(k)) % (2**63 - 1)))
                     for k in keys])                  # drawn on the CPU: the same codes on every device
    z = z.to(next(G.parameters()).device)
    return G.map(z.view(-1, G.cfg.z_dim)).view(len(keys), n_aug, n_parts, -1)


@torch.no_grad()
def semantic_augment(G, wp: torch.Tensor, lambdas=DEFAULT_LAMBDAS, n_aug: int = 10, keys=None,
                     seed: int = 0) -> torch.Tensor:
    """n_aug augmented copies of each W+ code: [B, L, D] -> [B, n_aug, L, D] (see the module docstring)."""
    keys = list(range(len(wp))) if keys is None else list(keys)
    n = augmentation_codes(G, keys, n_aug, len(_lambda_pairs(lambdas)), seed)
    return blend_part_codes(G, wp, n, lambdas)


# ============================================================================================
# Images and vectors
# ============================================================================================

def to_uint8(img: torch.Tensor, size: int) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, size, size, 3] uint8"""
    if img.shape[-1] != size:
        img = F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=img.shape[-1] > size)
    return ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def read_vectors(dataset_dir, names: list[str], pack: Pack) -> tuple[np.ndarray, np.ndarray]:
    """(continuous [n, C] float32 in [0, 1], discrete [n, K] int64) from vectors/<name>.json."""
    root = Path(dataset_dir)
    cont = np.empty((len(names), pack.n_continuous), np.float32)
    disc = np.empty((len(names), len(pack.slots)), np.int64)
    sizes = np.array(pack.slot_sizes)
    for i, n in enumerate(names):
        path = root / "vectors" / f"{n}.json"
        try:
            rec = json.loads(path.read_text())
            c, d = rec["continuous"], rec["discrete"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path}: unreadable vector record ({type(e).__name__}: {e})") from None
        if len(c) != pack.n_continuous or len(d) != len(pack.slots):
            raise UserError(f"{path}: {len(c)} continuous / {len(d)} discrete values, pack '{pack.id}' has "
                            f"{pack.n_continuous} / {len(pack.slots)}")
        cont[i], disc[i] = c, d
    if len(names) and ((disc < 0).any() or (disc >= sizes[None]).any()):
        raise UserError(f"{root}: option indices outside pack '{pack.id}' slots")
    if len(names) and ((cont < 0).any() or (cont > 1).any()):
        raise UserError(f"{root}: continuous values outside [0, 1]")
    return cont, disc


def check_dataset_pack(dataset_dir, pack: Pack):
    man = json.loads((Path(dataset_dir) / "manifest.json").read_text())
    if man.get("pack") not in (None, pack.id):
        raise UserError(f"{dataset_dir} was rendered from pack '{man.get('pack')}', not '{pack.id}'")
    if man.get("schema") not in (None, pack.schema_hash):
        raise UserError(f"{dataset_dir} was rendered for schema {man.get('schema')}; pack '{pack.id}' is "
                        f"now {pack.schema_hash}: render it again")


def _read_rgb(path: Path, size: int) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.LANCZOS)
            return np.asarray(im, np.uint8)
    except Exception as e:
        raise UserError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def read_images(dataset_dir, names: list[str], size: int) -> np.ndarray:
    from concurrent.futures import ThreadPoolExecutor
    root = Path(dataset_dir)
    out = np.empty((len(names), size, size, 3), np.uint8)

    def one(i):
        out[i] = _read_rgb(root / "images" / f"{names[i]}.png", size)

    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(one, range(len(names))))
    return out


def group_ids(names: list[str]) -> np.ndarray:
    return np.array([int(n) if n.isdigit() else i for i, n in enumerate(names)], np.int64)


# ============================================================================================
# The baseline paired set: renders used directly
# ============================================================================================

def renders_to_paired_set(dataset_dir, pack: Pack, out, size: int, chunk: int = 1024) -> Path:
    """Every complete render, resized to ``size``, with its own vector (groups = render index)."""
    check_dataset_pack(dataset_dir, pack)
    names = dataset_names(dataset_dir)
    cont, disc = read_vectors(dataset_dir, names, pack)
    images = np.empty((len(names), size, size, 3), np.uint8)
    for i in range(0, len(names), chunk):
        images[i:i + chunk] = read_images(dataset_dir, names[i:i + chunk], size)
    write_paired_set(out, pack, images, cont, disc, group_ids(names), kind="renders",
                     source=str(Path(dataset_dir).resolve()))
    return Path(out)


# ============================================================================================
# Realistic pairs
# ============================================================================================

@torch.no_grad()


def cached_renders_pairs(renders, pack: Pack, size: int) -> Path:
    """The paired set of an engine render dataset at ``size`` (``renders_to_paired_set``), made once
    under the cache (keyed by the dataset's path, manifest and vector count, the size and the schema)."""
    from ...backend.cache import cache_root
    renders = Path(renders)
    man = renders / "manifest.json"
    sig = hashlib.sha256(f"{renders.resolve()}:{size}:{pack.schema_hash}".encode())
    if man.is_file():
        sig.update(man.read_bytes())
    sig.update(str(sum(1 for _ in (renders / "vectors").glob("*.json"))).encode())
    out = cache_root() / "paired" / f"renders-{size}-{sig.hexdigest()[:16]}"
    if not (out / "manifest.json").is_file():
        print(f"paired set from renders {renders} -> {out}")
        renders_to_paired_set(renders, pack, out, size)
    return out


def realistic_faces(g_real, wp: torch.Tensor, keys, cfg: PairedConfig) -> torch.Tensor:
    """For W+ codes wp [B, L, D] -> images [B, 1 + n_aug (or n_aug), 3, R, R]: G_real(w*) and its
    semantic augmentations, generated in batches of cfg.batch with per-image seeded noise."""
    dev = next(g_real.parameters()).device
    wp = wp.to(dev)
    copies = []
    if cfg.include_original:
        copies.append(wp[:, None])
    if cfg.n_aug:
        copies.append(semantic_augment(g_real, wp, cfg.aug_lambdas, cfg.n_aug, keys, cfg.seed))
    allw = torch.cat(copies, dim=1)                                   # [B, C, L, D]
    b, c = allw.shape[:2]
    flat = allw.reshape(b * c, *allw.shape[2:])
    img_keys = [int(k) * (cfg.n_aug + 1) + j + (0 if cfg.include_original else 1) for k in keys for j in range(c)]
    out = []
    for i in range(0, len(flat), cfg.batch):
        noise = make_noise(g_real, img_keys[i:i + cfg.batch], cfg.seed + 1, cfg.noise)
        noise = None if noise is None else [m.to(dev) for m in noise]
        out.append(g_real(flat[i:i + cfg.batch], noise)["image"].cpu())
    return torch.cat(out).view(b, c, *out[0].shape[1:])


def _chunk_ok(path: Path, names: list[str]) -> bool:
    if not path.is_file():
        return False
    try:
        with np.load(path) as z:
            return json.loads(str(z["names"])) == names
    except Exception:
        return False


def synthesize_pairs(g_real, latents_file, dataset_dir, pack: Pack, out_dir, cfg: PairedConfig,
                     g_avatar=None, progress: bool = True, log=print) -> Path:
    """Realistic paired set from inverted renders (see the module docstring); returns out_dir."""
    lat = load_latents(latents_file)
    wp_all, names = lat["wp"], lat["names"]
    if wp_all.shape[1] != g_real.n_latent or wp_all.shape[2] != g_real.cfg.w_dim:
        raise UserError(f"{latents_file}: latents are {tuple(wp_all.shape[1:])}, G_real takes "
                        f"({g_real.n_latent}, {g_real.cfg.w_dim})")
    check_dataset_pack(dataset_dir, pack)
    cont, disc = read_vectors(dataset_dir, names, pack)
    groups = group_ids(names)
    out = Path(out_dir)
    key = {"generator": generator_fingerprint(g_real), "config": json.loads(json.dumps(asdict(cfg))),
           "latents": hashlib.sha256(wp_all.numpy().tobytes()).hexdigest()[:16], "pack": pack.id,
           "schema": pack.schema_hash, "dataset": str(Path(dataset_dir).resolve())}
    for k in ("batch", "inspect", "sheet_augs"):
        key["config"].pop(k)
    man_path = out / "manifest.json"
    if man_path.is_file():
        man = json.loads(man_path.read_text())
        if man.get("synthesis") == key:
            log(f"{out}: paired set already complete")
            return out
    work = out / ".chunks"
    work.mkdir(parents=True, exist_ok=True)
    key_path = work / "key.json"
    if key_path.is_file() and json.loads(key_path.read_text()) != key:
        raise UserError(f"{out} holds a partial paired set made from other latents, generator or settings; "
                        "use another folder or delete it")
    key_path.write_text(json.dumps(key, indent=1))
    per = (1 if cfg.include_original else 0) + cfg.n_aug
    if per == 0:
        raise UserError("nothing to generate: include_original is off and n_aug is 0")
    n_chunks = (len(names) + cfg.chunk - 1) // cfg.chunk
    bar = Progress(len(names) * per, "pairs", enabled=progress)
    t0, made = time.monotonic(), 0
    with frozen(g_real):
        for c in range(n_chunks):
            sl = slice(c * cfg.chunk, (c + 1) * cfg.chunk)
            path = work / f"chunk_{c:06d}.npz"
            if _chunk_ok(path, names[sl]):
                bar.update(len(names[sl]) * per)
                continue
            imgs = []
            for i in range(sl.start, min(sl.stop, len(names)), max(1, cfg.batch // per)):
                j = min(i + max(1, cfg.batch // per), sl.stop, len(names))
                faces = realistic_faces(g_real, wp_all[i:j], groups[i:j].tolist(), cfg)   # [b, per, 3, R, R]
                imgs.append(to_uint8(faces.flatten(0, 1), cfg.size))
                bar.update((j - i) * per)
                made += (j - i) * per
            tmp = path.with_name(f".tmp-{path.stem}.npz")
            with open(tmp, "wb") as f:
                np.savez(f, images=np.concatenate(imgs), names=json.dumps(names[sl]))
            os.replace(tmp, path)
    bar.close()
    if made:
        log(f"generated {made} faces at {made / (time.monotonic() - t0):.1f} images/s")
    # assemble: a memory-mapped image array, so the set never has to fit in memory
    n_total = len(names) * per
    mm_path = work / "images_all.npy"
    images = np.lib.format.open_memmap(mm_path, mode="w+", dtype=np.uint8, shape=(n_total, cfg.size, cfg.size, 3))
    for c in range(n_chunks):
        with np.load(work / f"chunk_{c:06d}.npz") as z:
            block = z["images"]
        start = c * cfg.chunk * per
        images[start:start + len(block)] = block
    images.flush()
    rep = lambda a: np.repeat(a, per, axis=0)          # noqa: E731  rows: source 0 copies, source 1 copies...
    write_paired_set(out, pack, images, rep(cont), rep(disc), rep(groups), kind="realistic",
                     n_aug=cfg.n_aug, include_original=cfg.include_original,
                     aug_lambdas=[list(p) for p in cfg.aug_lambdas], latents=str(Path(latents_file).resolve()),
                     synthesis=key)
    del images
    try:
        write_inspection(g_real, g_avatar, wp_all, names, groups, dataset_dir, out, cfg,
                         inversion_noise=(lat["meta"].get("noise", "fixed"), int(lat["meta"].get("noise_seed", 0))))
    except UserError as e:
        log(f"inspection sheet skipped: {e}")
    shutil.rmtree(work, ignore_errors=True)
    return out


# ============================================================================================
# Inspection: Figure 5-style contact sheets
# ============================================================================================

def _fit(tiles: np.ndarray, size: int) -> list[np.ndarray]:
    from PIL import Image
    return [t if t.shape[0] == size else np.asarray(Image.fromarray(t).resize((size, size), Image.BILINEAR))
            for t in tiles]


def contact_sheet(renders: np.ndarray, recons: np.ndarray | None, reals: np.ndarray, augs: np.ndarray,
                  tile: int | None = None) -> np.ndarray:
    """One row per latent: render | G_avatar(w*) (if given) | G_real(w*) | augmented faces.
    renders/recons/reals [n, h, w, 3] uint8, augs [n, A, h, w, 3] uint8 -> one uint8 image."""
    from ...backend.visual import grid
    tile = tile or max(renders.shape[1], reals.shape[1])
    tiles = []
    for i in range(len(renders)):
        row = [renders[i]] + ([recons[i]] if recons is not None else []) + [reals[i]] + list(augs[i])
        tiles += _fit(row, tile)
    cols = 2 + (recons is not None) + augs.shape[1]
    return grid(tiles, cols)


@torch.no_grad()
def write_inspection(g_real, g_avatar, wp_all, names, groups, dataset_dir, out: Path, cfg: PairedConfig,
                     inversion_noise=("fixed", 0)):
    """out/inspect.npz and out/contact_sheet.png for the first cfg.inspect latents. ``inversion_noise``:
    (mode, seed) of the noise the inversion used, so G_avatar(w*) is the image the inversion fitted."""
    from PIL import Image
    n = min(cfg.inspect, len(names))
    if n == 0:
        return
    wp, keys = wp_all[:n], groups[:n].tolist()
    renders = read_images(dataset_dir, names[:n], cfg.size)
    faces = realistic_faces(g_real, wp, keys, replace(cfg, include_original=True))   # same images as the set
    k = min(cfg.n_aug, max(cfg.sheet_augs, 0))
    reals = to_uint8(faces[:, 0], cfg.size)
    augs = (to_uint8(faces[:, 1:1 + k].flatten(0, 1), cfg.size).reshape(n, k, cfg.size, cfg.size, 3) if k
            else np.zeros((n, 0, cfg.size, cfg.size, 3), np.uint8))
    recons = None
    if g_avatar is not None:
        with frozen(g_avatar):
            dev = next(g_avatar.parameters()).device
            noise = make_noise(g_avatar, keys, inversion_noise[1], inversion_noise[0])
            noise = None if noise is None else [m.to(dev) for m in noise]
            recons = to_uint8(g_avatar(wp.to(dev), noise)["image"].cpu(), cfg.size)
    arrays = {"renders": renders, "reals": reals, "augs": augs, "names": np.array(names[:n])}
    if recons is not None:
        arrays["recons"] = recons
    np.savez_compressed(out / "inspect.npz", **arrays)
    Image.fromarray(contact_sheet(renders, recons, reals, augs)).save(out / "contact_sheet.png")
