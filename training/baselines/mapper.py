"""AgileAvatar's parameter mapper as a competing method: W+ code -> avatar vector (issue #6).

Written from the idea of Sang et al., AgileAvatar (SIGGRAPH Asia 2022): a latent code in W+ is read row
by row, one small MLP per W+ row, the row features are concatenated, and two heads read the result: a
continuous head (sigmoid, L1 against the normalised sliders) and one discrete head per slot whose logits
go through a scaled softmax softmax(β·logits). β grows by one per epoch (β = beta0 + epoch), so early
epochs see soft, easy targets and later ones sharp, hard ones; the discrete loss is the cross-entropy of
the scaled softmax. B = batch, L = W+ rows (G.n_latent), D = w_dim, C = continuous parameters, K = slots.
As we read the paper, its mapper learns through a differentiable imitator against image losses; here it is
supervised by known vectors (the engine's), which SwiftAvatar's paired data provide. Options are decoded
from softmax(β_last·logits) by backend.predict.choose_option, as the ONNX estimators are.

Training data: (W+, true vector) pairs from a ``likeness retrain`` work folder (not the baseline mode):
  * work/invert/latents.safetensors: the engine renders inverted into G_avatar's W+ (invert.load_latents),
    each row matched by name to work/render/vectors/<name>.json;
  * optionally, on the fly, the renders' semantic augmentations of parts the vector does not describe
    (paired_data.semantic_augment with G_real's mapping, default: the background codes only), so the
    mapper learns to ignore them. A latent and its augmentations share a group: the held-out split
    (by render) never sees a training render's copy, and is scored on the inverted latents only.

Applied to a real photo, the mapper reads the photo's code in the SHARED latent space: an encoder trained
on G_real's own samples exactly like the inversion encoder (invert.train_encoder, image only: a real photo
has no engine mask), optionally followed by ``opt_steps`` of invert.invert against G_real.

The mapper folder (--out) carries everything ``predict`` needs, so it can move away from the work folder:
    mapper.json               identity (pack, schema, source latents), config, architecture, results
    checkpoint/               model.safetensors (weights + W+ normalisation), optim.pt, state.json
    g_real.safetensors        G_real's EMA weights (metadata: its GAN config)
    parser.safetensors        the work folder's face parser, if any (perceptual term of the optimisation)
    real/encoder/             the G_real encoder (invert.train_encoder's layout)

API
  MapperConfig, get_config(name, **overrides)                 presets tiny / cpu / paper
  Mapper(n_latent, w_dim, n_continuous, slot_sizes, ...)      wp [B, L, D] -> (cont [B, C], [logits [B, n_k]])
  beta_at(cfg, epoch), scaled_softmax(logits, beta), mapper_loss(pred, cont, disc, beta, cfg)
  locate_work(work, pack) -> WorkSources        every check of the inputs, before any training
  load_pairs(sources, pack) -> LatentPairs       latents matched to vectors
  train_mapper(work, out, pack, cfg, resume, ...) -> summary   resumable, exact resume
  load_mapper_method(path, pack, name) -> MapperMethod         .predict(aligned uint8 [S, S, 3]) -> AvatarVector
  cli_train_mapper(args)
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...backend.errors import UserError
from ..common.presets import pick
from ...backend.schema import AvatarVector, Pack
from ..estimator.model import mlp

FORMAT = "agileavatar-mapper/1"


# ============================================================================================
# Configuration
# ============================================================================================

@dataclass(frozen=True)
class MapperConfig:
    name: str
    # --- model ----------------------------------------------------------------------------------
    layer_hidden: int = 128          # width of each W+ row's MLP
    layer_out: int = 32              # features each row contributes to the concatenation
    head_hidden: int = 256
    # --- training -------------------------------------------------------------------------------
    batch: int = 64
    epochs: int = 30
    lr: float = 1e-3                 # Adam, cosine-annealed to 0 over the run
    beta0: float = 1.0               # scaled softmax: β = beta0 + epoch (0-based)
    lambda_c: float = 1.0            # L1 on the continuous head
    lambda_d: float = 1.0            # cross-entropy of the scaled softmax, mean over slots
    val_fraction: float = 0.1        # renders held out (with their augmentations)
    n_aug: int = 4                   # semantic augmentations per latent (0: none)
    aug_prob: float = 0.5            # chance a training latent is replaced by one of its augmentations
    aug_lambdas: tuple = (("background", 1.0),)   # parts the vector does not describe
    checkpoint_every: int = 200      # steps (and after every epoch)
    seed: int = 0
    # --- real photos ----------------------------------------------------------------------------
    invert: str = "cpu"              # inversion config of the G_real encoder (training/pairs/invert.py)
    real_encoder_steps: int | None = None   # None: that config's enc_steps
    opt_steps: int = 0               # predict: optimisation steps against G_real after the encoder


CONFIGS = {
    "tiny": MapperConfig("tiny", layer_hidden=32, layer_out=8, head_hidden=64, batch=16, epochs=8, lr=3e-3,
                         val_fraction=0.25, n_aug=2, checkpoint_every=20, invert="tiny"),
    "cpu": MapperConfig("cpu", layer_hidden=128, layer_out=32, head_hidden=256, batch=128, epochs=30,
                        invert="cpu"),
    "paper": MapperConfig("paper", layer_hidden=256, layer_out=64, head_hidden=512, batch=256, epochs=50,
                          val_fraction=0.05, invert="paper"),
}

# fields that do not change the trained mapper (may differ on resume)
_RUN_FIELDS = frozenset({"checkpoint_every", "real_encoder_steps", "opt_steps"})


def get_config(name, **overrides) -> MapperConfig:
    cfg = pick(CONFIGS, name, overrides, "mapper")
    lambdas = cfg.aug_lambdas.items() if isinstance(cfg.aug_lambdas, dict) else cfg.aug_lambdas
    cfg = replace(cfg, aug_lambdas=tuple((str(p), float(l)) for p, l in lambdas))
    from ..pairs.paired_data import get_config as pair_cfg
    pair_cfg("tiny", aug_lambdas=cfg.aug_lambdas)            # the same part / λ checks as the pairs
    if cfg.epochs < 1 or cfg.batch < 1:
        raise UserError(f"mapper config '{cfg.name}': epochs and batch must be positive")
    if cfg.n_aug < 0 or cfg.opt_steps < 0 or not 0.0 <= cfg.aug_prob <= 1.0:
        raise UserError(f"mapper config '{cfg.name}': n_aug and opt_steps >= 0, aug_prob in [0, 1]")
    return cfg


def _cfg_key(cfg: MapperConfig) -> dict:
    d = json.loads(json.dumps(asdict(cfg)))
    for k in _RUN_FIELDS:
        d.pop(k, None)
    return d


def real_invert_config(cfg: MapperConfig):
    """The inversion config of the G_real encoder: the mapper's preset, image only (no engine mask)."""
    from ..pairs.invert import get_config as inv_cfg
    return inv_cfg(cfg.invert, enc_use_mask=False, enc_steps=cfg.real_encoder_steps)


# ============================================================================================
# The mapper
# ============================================================================================

class RowMLPs(nn.Module):
    """One two-layer MLP per W+ row, all rows at once (batched einsum, own weights per row).

    wp [B, L, D] -> [B, L, out]
    """

    def __init__(self, n_rows: int, in_dim: int, hidden: int, out: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(n_rows, hidden, in_dim) / math.sqrt(in_dim))
        self.b1 = nn.Parameter(torch.zeros(n_rows, hidden))
        self.w2 = nn.Parameter(torch.randn(n_rows, out, hidden) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.zeros(n_rows, out))

    def forward(self, x):
        h = F.leaky_relu(torch.einsum("lhd,bld->blh", self.w1, x) + self.b1, 0.2)   # [B, L, hidden]
        return F.leaky_relu(torch.einsum("loh,blh->blo", self.w2, h) + self.b2, 0.2)  # [B, L, out]


class Mapper(nn.Module):
    """W+ [B, L, D] -> (continuous [B, C] in [0, 1], [logits [B, n_k] per slot]).

    Rows are standardised first (buffers w_mean [L, D], w_std [L, 1], fitted on the training latents and
    saved with the weights): W+ rows of a StyleGAN sit far from zero and differ in spread.
    """

    def __init__(self, n_latent: int, w_dim: int, n_continuous: int, slot_sizes, layer_hidden: int = 128,
                 layer_out: int = 32, head_hidden: int = 256):
        super().__init__()
        self.n_latent, self.w_dim = n_latent, w_dim
        self.register_buffer("w_mean", torch.zeros(n_latent, w_dim))
        self.register_buffer("w_std", torch.ones(n_latent, 1))
        self.rows = RowMLPs(n_latent, w_dim, layer_hidden, layer_out)
        feat = n_latent * layer_out
        self.continuous_head = mlp(feat, head_hidden, n_continuous)
        self.slot_heads = nn.ModuleList(mlp(feat, head_hidden, k) for k in slot_sizes)

    @torch.no_grad()
    def fit_normalisation(self, wp: torch.Tensor):
        """wp [N, L, D] training latents -> per-row mean and (scalar) spread."""
        self.w_mean.copy_(wp.mean(dim=0))
        self.w_std.copy_((wp - self.w_mean).pow(2).mean(dim=(0, 2)).sqrt().clamp_min(1e-6)[:, None])

    def forward(self, wp):
        if wp.shape[1:] != (self.n_latent, self.w_dim):
            raise ValueError(f"W+ codes {tuple(wp.shape[1:])}, the mapper takes ({self.n_latent}, {self.w_dim})")
        f = self.rows((wp - self.w_mean) / self.w_std).flatten(1)            # [B, L * out]
        return torch.sigmoid(self.continuous_head(f)), [h(f) for h in self.slot_heads]


def beta_at(cfg: MapperConfig, epoch: int) -> float:
    """The scaled softmax's β during epoch ``epoch`` (0-based): one more per epoch, easy to hard."""
    return float(cfg.beta0 + epoch)


def scaled_softmax(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """softmax(β·logits) over the last dim: small β spreads the mass, large β approaches the argmax."""
    return torch.softmax(beta * logits, dim=-1)


def mapper_loss(pred, continuous, discrete, beta: float, cfg: MapperConfig):
    """λc·L1(continuous) + λd·mean over slots of CE(softmax(β·logits), option)."""
    cont_pred, logits = pred
    l1 = F.l1_loss(cont_pred, continuous)
    ce = torch.stack([F.cross_entropy(beta * lg, discrete[:, k]) for k, lg in enumerate(logits)]).mean()
    return cfg.lambda_c * l1 + cfg.lambda_d * ce, {"l1": float(l1.detach()), "ce": float(ce.detach())}


def build_mapper(cfg: MapperConfig, pack: Pack, n_latent: int, w_dim: int) -> Mapper:
    return Mapper(n_latent, w_dim, pack.n_continuous, pack.slot_sizes, cfg.layer_hidden, cfg.layer_out,
                  cfg.head_hidden)


# ============================================================================================
# Inputs: a retrain work folder
# ============================================================================================

@dataclass
class WorkSources:
    work: Path
    render: Path                     # the engine dataset (vectors/)
    latents: Path                    # invert/latents.safetensors
    real: Path                       # G_real checkpoint folder
    parser: Path | None              # face parser checkpoint folder (optional)
    identity: dict = field(default_factory=dict)


@dataclass
class LatentPairs:
    wp: torch.Tensor                 # [N, L, D] inverted renders in G_avatar's W+
    continuous: torch.Tensor         # [N, C] float32 in [0, 1]
    discrete: torch.Tensor           # [N, K] int64
    groups: np.ndarray               # [N] render index (augmentation seeds, split unit)
    names: list
    fingerprint: str                 # hash of the latents and vectors

    def __len__(self):
        return len(self.names)


def _record_path(work: Path, stage: str, key: str) -> Path | None:
    from ..pipeline.stages import stage_result
    value = stage_result(work, stage).get(key)
    return Path(value) if isinstance(value, str) and value else None


def locate_work(work, pack: Pack | None = None) -> tuple[WorkSources, Pack]:
    """Find (and check) what the mapper reads in a retrain work folder; the pack defaults to the folder's."""
    from ..pairs.paired_data import check_dataset_pack
    from ..generators.train_gan import find_checkpoint
    root = Path(work).expanduser()
    ident_path = root / "pipeline.json"
    if not ident_path.is_file():
        raise UserError(f"{root}: not a retrain work folder (no pipeline.json); run "
                        f"`likeness retrain --work {root}` first")
    ident = json.loads(ident_path.read_text())
    if pack is None:
        from ...backend.schema import find_pack
        pack = find_pack(ident.get("pack", "default"))
    if ident.get("pack") != pack.id:
        raise UserError(f"{root} is a retrain of pack '{ident.get('pack')}', not '{pack.id}'")
    if ident.get("schema") != pack.schema_hash:
        raise UserError(f"{root} was made for schema {ident.get('schema')} of pack '{pack.id}', which is now "
                        f"{pack.schema_hash}: retrain it")
    if ident.get("mode") == "baseline":
        raise UserError(f"{root} is a --baseline retrain: it has no generators and no inversion latents")
    latents = root / "invert" / "latents.safetensors"
    if not latents.is_file():
        latents = _record_path(root, "invert", "latents") or latents
    if not latents.is_file():
        raise UserError(f"{root}: no inversion latents (invert/latents.safetensors); run the retrain "
                        "through its invert stage first")
    from ..pipeline.stages import render_folder
    render = render_folder(root)
    if not (render / "manifest.json").is_file():
        raise UserError(f"{root}: no rendered dataset ({render}/manifest.json)")
    check_dataset_pack(render, pack)
    real = None
    for cand in (_record_path(root, "real", "checkpoint"), root / "real"):
        if cand is None:
            continue
        try:
            real = find_checkpoint(cand)
            break
        except UserError:
            pass
    if real is None:
        raise UserError(f"{root}: no G_real checkpoint (the real stage's record or {root / 'real'}); the "
                        "mapper reads real photos through G_real")
    parser = None
    for cand in (_record_path(root, "parser", "checkpoint"), root / "parser"):
        if cand is not None:
            try:
                parser = find_checkpoint(cand)
                break
            except UserError:
                pass
    return WorkSources(root, render, latents, real, parser, ident), pack


def load_pairs(src: WorkSources, pack: Pack, n_latent: int | None = None, w_dim: int | None = None
               ) -> LatentPairs:
    """The inversion latents, each matched by name to its render's vector; refuses any mismatch."""
    from ..pairs.invert import load_latents
    from ..pairs.paired_data import group_ids, read_vectors
    try:
        lat = load_latents(src.latents)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{src.latents}: unreadable latents ({type(e).__name__}: {e})") from None
    wp, names = lat["wp"].float(), list(lat["names"])
    if wp.dim() != 3 or len(wp) != len(names) or len(lat["index"]) != len(names):
        raise UserError(f"{src.latents}: {tuple(wp.shape)} latents for {len(names)} names; the file is "
                        "inconsistent")
    if not names:
        raise UserError(f"{src.latents}: no latents")
    if n_latent is not None and tuple(wp.shape[1:]) != (n_latent, w_dim):
        raise UserError(f"{src.latents}: latents are {tuple(wp.shape[1:])}, G_real's W+ is ({n_latent}, {w_dim}); "
                        "they are not in the shared latent space")
    made_from = lat["meta"].get("dataset")
    if made_from and Path(made_from).exists() and Path(made_from).resolve() != src.render.resolve():
        raise UserError(f"{src.latents}: the latents are inversions of {made_from}, not of {src.render}")
    missing = [n for n in names if not (src.render / "vectors" / f"{n}.json").is_file()]
    if missing:
        raise UserError(f"{src.latents}: {len(missing)} latents have no vector in {src.render / 'vectors'} "
                        f"(e.g. {', '.join(missing[:3])}): latents and vectors do not match")
    if not torch.isfinite(wp).all():
        raise UserError(f"{src.latents}: non-finite latents")
    cont, disc = read_vectors(src.render, names, pack)
    h = hashlib.sha256(wp.numpy().tobytes())
    h.update(cont.tobytes())
    h.update(disc.tobytes())
    return LatentPairs(wp, torch.from_numpy(cont), torch.from_numpy(disc), group_ids(names), names,
                       h.hexdigest()[:16])


def split_groups(groups: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train / held-out row indices, split by group (a render and its augmentations stay together)."""
    uniq = np.unique(groups)
    n_val = min(len(uniq) - 1, max(1, int(round(len(uniq) * val_fraction)))) if len(uniq) > 1 else 0
    val = set(np.random.default_rng(seed).permutation(uniq)[:n_val].tolist())
    is_val = np.array([g in val for g in groups.tolist()], bool)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


# ============================================================================================
# Generators stored with the mapper
# ============================================================================================

def _save_module(path: Path, module: nn.Module, meta: dict):
    from ..common.checkpoint import save_weights
    save_weights(module, path, meta)


def load_g_real(folder) -> "torch.nn.Module":
    """G_real as stored in a mapper folder (g_real.safetensors, metadata: its GAN config)."""
    from ..common.checkpoint import load_weights, read_metadata
    from ..generators.gan_configs import config_from_dict
    from ..generators.semantic_gan import Generator
    path = Path(folder) / "g_real.safetensors"
    if not path.is_file():
        raise UserError(f"{folder}: no G_real (g_real.safetensors)")
    G = Generator(config_from_dict(read_metadata(path)["config"]))
    load_weights(G, path, "G_real")
    return G.eval()


def load_stored_parser(folder):
    """The face parser copied into a mapper folder, if any (``face_parser.load_parser``)."""
    from ..readout.face_parser import load_parser
    path = Path(folder) / "parser.safetensors"
    return load_parser(path)[0] if path.is_file() else None


# ============================================================================================
# Training
# ============================================================================================

@torch.no_grad()
def evaluate(model: Mapper, wp, cont, disc, pack: Pack, beta: float, cfg: MapperConfig,
             train: tuple | None = None, batch: int = 256) -> dict:
    """Per-slot accuracy, continuous L1 and loss on (held-out) latents. With ``train`` = (continuous,
    discrete) of the training set, the levels a constant answer reaches: ``chance_mean_slot_accuracy``
    (always the most frequent training option) and ``constant_l1`` (always the training median)."""
    was = model.training
    model.eval()
    n, k = len(wp), len(pack.slots)
    correct, l1, loss = torch.zeros(k, device=wp.device), 0.0, 0.0
    for i in range(0, n, batch):
        cp, logits = model(wp[i:i + batch])
        l1 += float((cp - cont[i:i + batch]).abs().mean(dim=1).sum())
        loss += float(mapper_loss((cp, logits), cont[i:i + batch], disc[i:i + batch], beta, cfg)[0]) * len(cp)
        correct += torch.stack([(lg.argmax(1) == disc[i:i + batch, j]).sum() for j, lg in enumerate(logits)])
    model.train(was)
    acc = (correct / max(n, 1)).cpu().tolist()
    out = {"n": n, "continuous_l1": l1 / max(n, 1), "loss": loss / max(n, 1),
           "slot_accuracy": {s.name: a for s, a in zip(pack.slots, acc)},
           "mean_slot_accuracy": float(np.mean(acc))}
    if train is not None and n:
        train_cont, train_disc = train
        chance = [float((disc[:, j] == torch.bincount(train_disc[:, j], minlength=size).argmax()).float().mean())
                  for j, size in enumerate(pack.slot_sizes)]
        out["chance_mean_slot_accuracy"] = float(np.mean(chance))
        out["constant_l1"] = float((cont - train_cont.median(dim=0).values).abs().mean())
    return out


def _augment_batch(g_real, wp, keys, cfg: MapperConfig, gen: torch.Generator) -> torch.Tensor:
    """Replace each latent, with probability aug_prob, by one of its n_aug semantic augmentations (the
    paired set's own copies: paired_data.semantic_augment seeded by the render index)."""
    from ..pairs.paired_data import semantic_augment
    if not cfg.n_aug or g_real is None or cfg.aug_prob == 0:
        return wp
    use = (torch.rand(len(wp), generator=gen) < cfg.aug_prob).to(wp.device)
    copy = torch.randint(0, cfg.n_aug, (len(wp),), generator=gen).to(wp.device)
    if not use.any():
        return wp
    aug = semantic_augment(g_real, wp[use], cfg.aug_lambdas, cfg.n_aug,
                           [keys[i] for i in use.nonzero()[:, 0].tolist()], cfg.seed)   # [b, n_aug, L, D]
    wp = wp.clone()
    wp[use] = aug[torch.arange(len(aug)), copy[use]]
    return wp


def _manifest(out: Path) -> dict | None:
    path = out / "mapper.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _write_manifest(out: Path, man: dict):
    tmp = out / ".mapper.json.tmp"
    tmp.write_text(json.dumps(man, indent=1, default=str))
    os.replace(tmp, out / "mapper.json")


def train_mapper(work, out, pack: Pack | None = None, cfg: MapperConfig | str = "tiny", resume: bool = False,
                 max_steps: int | None = None, real_encoder: bool = True, progress: bool = True,
                 log=print, device="cpu") -> dict:
    """Train (or resume) the mapper on a retrain work folder's latents, then the G_real encoder; ``out``
    becomes a self-contained mapper folder (module docstring). Returns a summary with the last held-out
    evaluation. ``max_steps``: stop with a checkpoint after that many mapper steps (``stopped_at``).
    ``real_encoder`` False: skip the encoder (a folder that cannot predict photos yet)."""
    from ..common import device as dev_mod
    from ..readout.face_parser import load_parser
    from ..pairs.invert import generator_fingerprint, train_encoder
    from ..common.provenance import licence, machine
    from ..common.trainer import Trainer
    from ..generators.train_gan import load_generator
    device = dev_mod.resolve(device)
    cfg = get_config(cfg)
    src, pack = locate_work(work, pack)
    g_real, gan_cfg = load_generator(src.real)
    data = load_pairs(src, pack, g_real.n_latent, g_real.cfg.w_dim)
    out = Path(out).expanduser()
    identity = {"format": FORMAT, "pack": pack.id, "schema": pack.schema_hash, "config": _cfg_key(cfg),
                "latents": data.fingerprint, "g_real": generator_fingerprint(g_real)}
    have = _manifest(out)
    if have is not None:
        diff = [k for k in identity if have.get("identity", {}).get(k) != identity[k]]
        if diff:
            raise UserError(f"{out} holds a mapper made with another {', '.join(diff)}; use another --out")
        if not resume:
            raise UserError(f"{out} already holds a mapper; pass --resume to continue it or use another --out")
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not a mapper folder; use an empty or new --out")
    out.mkdir(parents=True, exist_ok=True)
    man = have or {"identity": identity, "complete": False,
                   "source": {"work": str(src.work.resolve()), "latents": str(src.latents.resolve()),
                              "render": str(src.render.resolve()), "real": str(src.real), "count": len(data),
                              "parser": str(src.parser) if src.parser else None},
                   "licence": licence(False)}
    man.update(config=asdict(cfg), trained_on=machine(device))
    _write_manifest(out, man)
    if not (out / "g_real.safetensors").is_file():
        _save_module(out / "g_real.safetensors", g_real, {"config": gan_cfg.to_dict()})
    if src.parser is not None and not (out / "parser.safetensors").is_file():
        parser, info = load_parser(src.parser)
        _save_module(out / "parser.safetensors", parser, {"channels": list(info["channels"])})

    # ---- the mapper --------------------------------------------------------------------------------
    train_idx, val_idx = split_groups(data.groups, cfg.val_fraction, cfg.seed)
    if not len(train_idx):
        raise UserError(f"{src.latents}: no latents left for training")
    torch.manual_seed(cfg.seed)
    model = build_mapper(cfg, pack, g_real.n_latent, g_real.cfg.w_dim)
    model.fit_normalisation(data.wp[train_idx])
    model.to(device)
    g_real.to(device)
    # float32 throughout: an MLP on W+ codes gains nothing from mixed precision.
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "history": [],
             "split": {"train": len(train_idx), "held_out": len(val_idx)}}
    steps_per_epoch = max(1, math.ceil(len(train_idx) / cfg.batch))
    total = steps_per_epoch * cfg.epochs
    trainer = Trainer("mapper", out / "checkpoint", state, modules={"model": model}, optimizers={"opt": opt},
                      device=device, total=total, checkpoint_every=cfg.checkpoint_every, log=log,
                      progress=progress)
    if trainer.resume() is not None:
        log(f"resuming the mapper at epoch {state['epoch']} step {state['step_in_epoch']}")
    wp_val, c_val, d_val = (t.to(device) for t in (data.wp[val_idx], data.continuous[val_idx],
                                                   data.discrete[val_idx]))
    t0, run = time.monotonic(), {"seen": 0}
    model.train()
    g_real.requires_grad_(False)

    def epoch_start(epoch: int):
        run["beta"] = beta_at(cfg, epoch)
        run["order"] = train_idx[np.random.default_rng([cfg.seed, epoch]).permutation(len(train_idx))]
        state.setdefault("epoch_sums", {"loss": 0.0, "l1": 0.0, "ce": 0.0, "n": 0})

    def step(t: Trainer) -> dict:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * state["global_step"] / total))
        i = state["step_in_epoch"]
        idx = np.sort(run["order"][i * cfg.batch:(i + 1) * cfg.batch])
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + state["global_step"])
        wp = _augment_batch(g_real, data.wp[idx].to(device), data.groups[idx].tolist(), cfg, gen)
        loss, terms = mapper_loss(model(wp), data.continuous[idx].to(device), data.discrete[idx].to(device),
                                  run["beta"], cfg)
        if not torch.isfinite(loss):
            raise UserError(f"mapper loss became {float(loss)} at step {state['global_step']}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run["seen"] += len(idx)
        sums = state["epoch_sums"]
        for k, v in (("loss", float(loss.detach())), ("l1", terms["l1"]), ("ce", terms["ce"])):
            sums[k] += v * len(idx)
        sums["n"] += len(idx)
        return {}

    def epoch_end(epoch: int):
        beta, sums = run["beta"], state["epoch_sums"]
        ev = (evaluate(model, wp_val, c_val, d_val, pack, beta, cfg,
                       (data.continuous[train_idx].to(device), data.discrete[train_idx].to(device)))
              if len(val_idx) else {})
        n = max(sums.pop("n"), 1)
        ev.update(epoch=epoch + 1, beta=beta, **{f"train_{k}": v / n for k, v in sums.items()},
                  latents_per_s=run["seen"] / max(time.monotonic() - t0, 1e-9))
        state["history"].append(ev)
        state.pop("epoch_sums")
        nan = float("nan")
        log(f"mapper epoch {epoch + 1}/{cfg.epochs} (β {beta:g}): train loss {ev['train_loss']:.4f}; held-out "
            f"slot acc {ev.get('mean_slot_accuracy', nan):.3f} "
            f"(chance {ev.get('chance_mean_slot_accuracy', nan):.3f}) "
            f"L1 {ev.get('continuous_l1', nan):.4f} (constant {ev.get('constant_l1', nan):.4f})")

    result = trainer.run(step, steps_per_epoch=steps_per_epoch, epoch_start=epoch_start, epoch_end=epoch_end,
                         max_steps=max_steps, raise_on_stop=True)
    if result == "max_steps":
        return {"stopped_at": state["global_step"], "folder": str(out)}
    man.update(held_out=state["history"][-1] if state["history"] else None, beta=beta_at(cfg, cfg.epochs - 1),
               arch={"n_latent": g_real.n_latent, "w_dim": g_real.cfg.w_dim})

    # ---- the G_real encoder: real photos into the shared W+ -------------------------------------------
    if real_encoder:
        inv = real_invert_config(cfg)
        G = load_g_real(out)                                   # exactly what predict will load
        train_encoder(G, inv, out / "real", progress=progress, log=log, device=device)
        enc_state = json.loads((out / "real" / "encoder" / "state.json").read_text())
        man["real_encoder"] = {"folder": "real/encoder", "invert_config": inv.name, "steps": enc_state["step"],
                               "last": (enc_state["history"] or [None])[-1]}
    man["complete"] = bool(real_encoder)
    _write_manifest(out, man)
    return {"folder": str(out), "held_out": man["held_out"], "complete": man["complete"],
            "real_encoder": man.get("real_encoder")}


# ============================================================================================
# Applied to photos
# ============================================================================================

class MapperMethod:
    """photo -> G_real encoder (+ optional optimisation against G_real) -> W+ -> mapper -> vector."""

    def __init__(self, folder, pack: Pack, name: str | None = None, opt_steps: int | None = None):
        from ..pairs.invert import load_encoder
        from ..common.checkpoint import load_weights
        self.folder = Path(folder).expanduser()
        man = _manifest(self.folder)
        if man is None or man.get("identity", {}).get("format") != FORMAT:
            raise UserError(f"{self.folder}: not a mapper folder (no mapper.json); train one with "
                            "training.baselines.mapper:cli_train_mapper")
        ident = man["identity"]
        if ident["pack"] != pack.id or ident["schema"] != pack.schema_hash:
            raise UserError(f"{self.folder}: a mapper for pack '{ident['pack']}' (schema {ident['schema']}), "
                            f"not '{pack.id}' ({pack.schema_hash})")
        if not man.get("complete"):
            raise UserError(f"{self.folder}: training is not finished (no G_real encoder yet); resume it")
        self.pack, self.name, self.path, self.manifest = pack, name or self.folder.name, self.folder, man
        self.cfg = get_config(MapperConfig(**man["config"]))
        self.opt_steps = self.cfg.opt_steps if opt_steps is None else int(opt_steps)
        self.g_real = load_g_real(self.folder)
        self.encoder = load_encoder(self.folder / "real", self.g_real)
        self.model = build_mapper(self.cfg, pack, self.g_real.n_latent, self.g_real.cfg.w_dim)
        load_weights(self.model, self.folder / "checkpoint" / "model.safetensors", "the mapper")
        self.model.eval()
        self.beta = float(man.get("beta", beta_at(self.cfg, self.cfg.epochs - 1)))
        self.inv_cfg = real_invert_config(self.cfg)
        self._perceptual = None
        from ...backend.predict import choose_option
        self._choose = choose_option

    def describe(self) -> dict:
        """What produced this method's answers (for reports)."""
        man = self.manifest
        return {"method": "AgileAvatar mapper over W+ (G_real encoder" + (f" + {self.opt_steps} optimisation steps"
                                                                          if self.opt_steps else "") + ")",
                "config": self.cfg.name, "beta": self.beta, "trained_on": man.get("trained_on"),
                "source": man.get("source"), "held_out": man.get("held_out"),
                "real_encoder": man.get("real_encoder"), "g_real": man["identity"]["g_real"],
                "perceptual": self.perceptual()[1] if self.opt_steps else None, "licence": man.get("licence")}

    def perceptual(self):
        """(fn, description) of the optimisation's perceptual term, resolved once (LPIPS, else the parser)."""
        if self._perceptual is None:
            from ..common.perceptual import resolve_perceptual
            fn, desc, _ = resolve_perceptual(self.inv_cfg.perceptual, self.inv_cfg.perceptual_fallback,
                                             load_stored_parser(self.folder), self.inv_cfg.lpips_net)
            self._perceptual = (fn, desc)
        return self._perceptual

    def to_target(self, aligned: np.ndarray) -> torch.Tensor:
        """uint8 [S, S, 3] (CelebA-HQ frame) -> G_real's input [1, 3, R, R] in [-1, 1]."""
        from ...backend.visual import resize_square
        a = np.asarray(aligned)
        if a.ndim != 3 or a.shape[2] != 3 or a.shape[0] != a.shape[1] or a.dtype != np.uint8:
            raise UserError(f"expected an aligned uint8 RGB face [S, S, 3], got {a.dtype} {a.shape}")
        a = resize_square(a, self.g_real.cfg.resolution)
        return torch.from_numpy(np.array(a)).permute(2, 0, 1)[None].float() / 127.5 - 1.0     # own copy

    def encode(self, aligned: np.ndarray) -> torch.Tensor:
        """The photo's code in the shared W+: [1, L, D]."""
        from ..pairs.invert import encode, invert, make_noise
        y = self.to_target(aligned)
        wp = encode(self.encoder, y, None)
        if self.opt_steps > 0:
            fn, _ = self.perceptual()
            noise = make_noise(self.g_real, [0], self.inv_cfg.seed, self.inv_cfg.noise)
            wp = invert(self.g_real, y, None, self.inv_cfg, wp, fn, noise, self.opt_steps, lambda_m=0.0)["wp"]
        return wp

    @torch.no_grad()
    def predict_wplus(self, wp: torch.Tensor) -> tuple[np.ndarray, list[np.ndarray]]:
        """W+ [B, L, D] -> (continuous [B, C] in [0, 1], per slot probabilities softmax(β·logits) [B, n_k])."""
        cont, logits = self.model(wp)
        return cont.numpy(), [scaled_softmax(lg, self.beta).numpy() for lg in logits]

    def predict(self, aligned: np.ndarray) -> AvatarVector:
        cont, probs = self.predict_wplus(self.encode(aligned))
        choice = [self._choose(slot, p[0]) for slot, p in zip(self.pack.slots, probs)]
        return self.pack.vector_from_arrays(cont[0].tolist(), choice)


def load_mapper_method(path, pack: Pack, name: str | None = None) -> MapperMethod:
    """evaluation/methods.py's loader for ``mapper:DIR``."""
    return MapperMethod(path, pack, name)


# ============================================================================================
# CLI
# ============================================================================================

def cli_train_mapper(args) -> int:
    """likeness train mapper --work RETRAIN_WORK --out DIR [--pack P] [--config tiny|cpu|paper] [--epochs N]
    [--resume] [--threads T] [--real-encoder-steps N] [--augment N] [--opt-steps N]"""
    import sys
    threads = getattr(args, "threads", None) or int(os.environ.get("LIKENESS_THREADS", "1"))
    torch.set_num_threads(max(1, int(threads)))
    pack = None
    if getattr(args, "pack", None):
        from ...backend.schema import find_pack
        pack = find_pack(args.pack)
    cfg = get_config(getattr(args, "config", None) or "cpu", epochs=getattr(args, "epochs", None),
                     real_encoder_steps=getattr(args, "real_encoder_steps", None),
                     n_aug=getattr(args, "augment", None), opt_steps=getattr(args, "opt_steps", None))
    summary = train_mapper(args.retrain, args.work, pack, cfg, resume=bool(getattr(args, "resume", False)),
                           log=lambda s: print(s, file=sys.stderr, flush=True),
                           device=getattr(args, "device", None) or "auto")
    print(json.dumps(summary, indent=2, default=str))
    return 0
