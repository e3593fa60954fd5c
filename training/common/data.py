"""Image + segmentation datasets for the generators and the face parser.

Three sources, one in-memory form (uint8 arrays at a chosen resolution, labels in CelebAMask-HQ ids):
  * real faces in the shared 1k layout: ROOT/images/<stem>.jpg + ROOT/masks/<stem>.png (backend.realfaces;
    the validation-split rule is enforced: split="train" by default, never trains on c/d/e/f stems);
  * the official CelebAMask-HQ release: ROOT/CelebA-HQ-img/<n>.jpg + ROOT/CelebAMask-HQ-mask-anno/<folder>/
    <n:05d>_<part>.png per-part binary masks. Each face gets a stable 32-hex stem (md5 of its number) so the
    same split rule applies, and faces matching a validation face of the 1k set (a 32x32 grey fingerprint)
    are dropped from training. ``convert_release`` writes the release in the 1k layout;
  * avatar datasets of our engine: DIR/manifest.json, DIR/images/N.png, DIR/masks/N.png, DIR/vectors/N.json
    (a sample is complete iff its vector JSON exists).

Decoded, resized arrays are cached as .npy under cache_root()/arrays/<source>-<res>-<key>/, keyed by the
source, its files (names, sizes, mtimes), the split and the resolution, so epochs never decode an image.
Every problem with the data (missing or mismatched masks, corrupt images, wrong sizes, unknown class ids)
raises UserError before any training starts.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ...backend.cache import cache_root
from ...backend import realfaces
from ...backend.errors import UserError
from ...backend.schema import CLASSES
from .parts import INVALID, labels_to_parts

CACHE_VERSION = 1
IN_MEMORY_LIMIT = 2 << 30          # arrays above this many bytes stay memory-mapped

# CelebAMask-HQ release part files, in the painting order of the official mask script (later wins);
# class id = position + 1 (background 0).
RELEASE_PARTS = ("skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
                 "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth")
RELEASE_IMAGES, RELEASE_MASKS = "CelebA-HQ-img", "CelebAMask-HQ-mask-anno"
FINGERPRINT_SIDE, FINGERPRINT_MATCH = 32, 0.98




# ============================================================================================
# The dataset
# ============================================================================================

class SegDataset:
    """N images with part maps at one resolution, as torch tensors. Also a torch-style map dataset.

    images: uint8 [N, 3, H, W]; parts: uint8 [N, H, W] part ids (training/common/parts.py).
    ``batch(idx)`` gathers a whole minibatch at once (no per-sample Python, no decoding).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, names: list[str], source: str):
        import torch
        self.names, self.source = list(names), source
        self.resolution = int(images.shape[1])
        parts = labels_to_parts(np.asarray(labels))
        if images.nbytes + labels.nbytes <= IN_MEMORY_LIMIT:
            self.images = torch.from_numpy(np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2)))
            self.parts = torch.from_numpy(np.ascontiguousarray(parts))
            self._mmap = None
        else:                                   # huge avatar sets: gather from the memory map per batch
            self.images = self.parts = None
            self._mmap = (images, labels)

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, keep: list[int], source: str) -> "SegDataset":
        """The samples at ``keep`` (in memory only), e.g. a cross-fitting fold's training part."""
        if self._mmap is not None:
            raise UserError(f"{self.source}: a subset of a memory-mapped dataset is not supported")
        import torch
        out = object.__new__(SegDataset)
        idx = torch.as_tensor(keep, dtype=torch.long)
        out.names, out.source, out.resolution = [self.names[i] for i in keep], source, self.resolution
        out.images, out.parts, out._mmap = self.images[idx], self.parts[idx], None
        return out

    def __getitem__(self, i: int):
        img, parts = self.batch([i])
        return img[0], parts[0]

    def batch(self, idx):
        """idx: ints -> image float [B, 3, H, W] in [-1, 1], parts long [B, H, W]"""
        import torch
        idx = torch.as_tensor(idx, dtype=torch.long)
        if self._mmap is None:
            img, parts = self.images[idx], self.parts[idx]
        else:
            order = np.asarray(idx)
            img = torch.from_numpy(np.ascontiguousarray(self._mmap[0][order].transpose(0, 3, 1, 2)))
            parts = torch.from_numpy(labels_to_parts(np.asarray(self._mmap[1][order])))
        return img.float() / 127.5 - 1.0, parts.long()


# ============================================================================================
# Decoding and caching
# ============================================================================================

def _open_rgb(path: Path, res: int) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.width != im.height:
                raise UserError(f"{path}: image is {im.width}x{im.height}, expected a square aligned face")
            if im.width < res:
                raise UserError(f"{path}: image is {im.width}x{im.height}, smaller than the training "
                                f"resolution {res}")
            im.draft("RGB", (res, res))                # JPEG: decode at a reduced scale when possible
            im = im.convert("RGB")
            if im.size != (res, res):
                im = im.resize((res, res), Image.LANCZOS)
            return np.asarray(im, dtype=np.uint8)
    except UserError:
        raise
    except Exception as e:                             # PIL raises many kinds on corrupt files
        raise UserError(f"{path}: corrupt or unreadable image ({type(e).__name__}: {e})") from None


def _open_label(path: Path, res: int, expect_size: tuple[int, int] | None = None) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise UserError(f"{path}: mask must be a single-channel 8-bit label map, got mode {im.mode}")
            if expect_size is not None and im.size != expect_size:
                raise UserError(f"{path}: mask is {im.width}x{im.height} but its image is "
                                f"{expect_size[0]}x{expect_size[1]}")
            a = np.asarray(im, dtype=np.uint8)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: corrupt or unreadable mask ({type(e).__name__}: {e})") from None
    bad = np.unique(a[a >= len(CLASSES)])
    if bad.size:
        raise UserError(f"{path}: label ids {bad.tolist()[:5]} outside the CelebAMask-HQ classes 0..18 "
                        "(wrong class layout?)")
    return _resize_labels(a, res)


def _resize_labels(a: np.ndarray, res: int) -> np.ndarray:
    from PIL import Image
    if a.shape != (res, res):
        a = np.asarray(Image.fromarray(a).resize((res, res), Image.NEAREST))
    return a


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:
        raise UserError(f"{path}: corrupt or unreadable image ({type(e).__name__}: {e})") from None


def _file_sig(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def _cached_arrays(kind: str, res: int, key: dict, build, cache: bool = True):
    """(images [N,res,res,3] uint8, labels [N,res,res] uint8, names) from the cache, else build() -> save."""
    if not cache:
        return build()
    digest = hashlib.sha256(json.dumps({**key, "v": CACHE_VERSION}, sort_keys=True).encode()).hexdigest()[:20]
    folder = cache_root() / "arrays" / f"{kind}-{res}-{digest}"
    if (folder / "names.json").is_file():
        try:
            names = json.loads((folder / "names.json").read_text())
            images = np.load(folder / "images.npy", mmap_mode="r")
            labels = np.load(folder / "labels.npy", mmap_mode="r")
            if images.shape == (len(names), res, res, 3) and labels.shape == (len(names), res, res):
                if images.nbytes + labels.nbytes <= IN_MEMORY_LIMIT:
                    images, labels = np.array(images), np.array(labels)
                return images, labels, names
        except (OSError, ValueError, json.JSONDecodeError):
            pass                                       # a damaged cache entry is rebuilt
        shutil.rmtree(folder, ignore_errors=True)
    images, labels, names = build()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    np.save(tmp / "images.npy", images)
    np.save(tmp / "labels.npy", labels)
    (tmp / "names.json").write_text(json.dumps(names))
    (tmp / "source.json").write_text(json.dumps({"kind": kind, "resolution": res, **key}, default=str)[:100000])
    try:
        os.replace(tmp, folder)
    except OSError:                                    # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return images, labels, names


def _decode_all(jobs, res: int, what: str):
    """jobs: list of (name, load_fn) where load_fn() -> (rgb, labels). Threads: PIL decodes without the GIL."""
    n = len(jobs)
    images = np.empty((n, res, res, 3), np.uint8)
    labels = np.empty((n, res, res), np.uint8)

    def one(i):
        images[i], labels[i] = jobs[i][1]()

    workers = min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(n)))
    return images, labels, [name for name, _ in jobs]


# ============================================================================================
# Real faces, shared 1k layout
# ============================================================================================

def real_faces(root=None, split: str = "train", resolution: int = 64, cache: bool = True) -> SegDataset:
    """The shared CelebAMask-HQ 1k faces (backend.realfaces), resized to ``resolution``."""
    root = Path(root) if root else realfaces.default_root()
    if not root.is_dir():
        raise UserError(f"real faces not found at {root} (set LIKENESS_CELEBAMASK or pass --data)")
    names = realfaces.stems(root, split)              # raises UserError on a wrong layout
    _check_pairs(root)
    if not names:
        raise UserError(f"{root}: no faces in split '{split}'")
    img_paths = [root / "images" / f"{s}.jpg" for s in names]
    mask_paths = [root / "masks" / f"{s}.png" for s in names]
    key = {"root": str(root.resolve()), "split": split, "files": _file_sig(img_paths + mask_paths)}

    def load(i):
        def f():
            size = _image_size(img_paths[i])
            return _open_rgb(img_paths[i], resolution), _open_label(mask_paths[i], resolution, size)
        return f

    images, labels, names = _cached_arrays(
        "real", resolution, key, lambda: _decode_all([(s, load(i)) for i, s in enumerate(names)],
                                                     resolution, "real faces"), cache)
    return SegDataset(images, labels, names, f"real:{root}:{split}")


def _check_pairs(root: Path):
    imgs = {p.stem for p in (root / "images").glob("*.jpg")}
    masks = {p.stem for p in (root / "masks").glob("*.png")}
    for what, missing in (("mask", sorted(imgs - masks)), ("image", sorted(masks - imgs))):
        if missing:
            raise UserError(f"{root}: {len(missing)} file(s) without a matching {what}, e.g. "
                            f"{', '.join(missing[:3])}")


# ============================================================================================
# CelebAMask-HQ official release layout
# ============================================================================================

def release_stem(n: int) -> str:
    """Stable 32-hex stem of release face n; its first letter decides the split like the 1k stems."""
    return hashlib.md5(f"celebamask-hq:{n}".encode()).hexdigest()


def _release_index(root: Path) -> dict[int, dict]:
    """{n: {"image": path, "parts": {part: path}}} of a release tree, validated."""
    img_dir, anno_dir = root / RELEASE_IMAGES, root / RELEASE_MASKS
    if not img_dir.is_dir() or not anno_dir.is_dir():
        raise UserError(f"{root}: expected {RELEASE_IMAGES}/ and {RELEASE_MASKS}/ (CelebAMask-HQ release)")
    index: dict[int, dict] = {}
    for p in img_dir.glob("*.jpg"):
        if not p.stem.isdigit():
            raise UserError(f"{p}: release image names are numbers (0.jpg ... 29999.jpg)")
        index[int(p.stem)] = {"image": p, "parts": {}}
    for p in anno_dir.glob("*/*.png"):
        num, _, part = p.stem.partition("_")
        if not num.isdigit() or part not in RELEASE_PARTS:
            raise UserError(f"{p}: not a CelebAMask-HQ part mask (<n:05d>_<part>.png, part in "
                            f"{', '.join(RELEASE_PARTS)})")
        n = int(num)
        if n not in index:
            raise UserError(f"{p}: mask of face {n}, which has no image in {RELEASE_IMAGES}/")
        index[n]["parts"][part] = p
    no_mask = sorted(n for n, v in index.items() if not v["parts"])
    if no_mask:
        raise UserError(f"{root}: {len(no_mask)} image(s) without any part mask, e.g. "
                        f"{', '.join(map(str, no_mask[:3]))}")
    if not index:
        raise UserError(f"{root}: no images in {RELEASE_IMAGES}/")
    return index


def compose_release_mask(parts: dict[str, Path]) -> np.ndarray:
    """Per-part binary masks -> one label map in CelebAMask-HQ ids (official painting order)."""
    from PIL import Image
    label = None
    for cid, part in enumerate(RELEASE_PARTS, start=1):
        if part not in parts:
            continue
        try:
            with Image.open(parts[part]) as im:
                m = np.asarray(im.convert("L")) > 127
        except Exception as e:
            raise UserError(f"{parts[part]}: corrupt or unreadable mask ({type(e).__name__}: {e})") from None
        if label is None:
            label = np.zeros(m.shape, np.uint8)
        elif m.shape != label.shape:
            raise UserError(f"{parts[part]}: {m.shape[1]}x{m.shape[0]} differs from the face's other "
                            f"part masks ({label.shape[1]}x{label.shape[0]})")
        label[m] = cid
    return label


def fingerprint(rgb: np.ndarray) -> np.ndarray:
    """Zero-mean unit-norm 32x32 grey thumbnail: a near-duplicate detector for aligned faces."""
    from PIL import Image
    g = np.asarray(Image.fromarray(rgb).convert("L").resize((FINGERPRINT_SIDE,) * 2, Image.BOX), np.float32)
    g = g.ravel() - g.mean()
    return g / (np.linalg.norm(g) + 1e-6)


def validation_fingerprints(root=None) -> np.ndarray:
    """Fingerprints of the 1k set's validation faces ([0, 1024] if the 1k set is absent)."""
    root = Path(root) if root else realfaces.default_root()
    try:
        names = realfaces.stems(root, "val")
    except UserError:
        return np.zeros((0, FINGERPRINT_SIDE ** 2), np.float32)
    return np.stack([fingerprint(_open_rgb(root / "images" / f"{s}.jpg", 128)) for s in names]) \
        if names else np.zeros((0, FINGERPRINT_SIDE ** 2), np.float32)


def release_faces(root, split: str = "train", resolution: int = 64, cache: bool = True,
                  exclude_root=None) -> SegDataset:
    """The official CelebAMask-HQ release, read in place. Training drops faces that match a validation
    face of the 1k set (``exclude_root``, default the shared set) so no validation face leaks in."""
    if split not in realfaces.SPLITS:
        raise UserError(f"unknown split '{split}' (train, val, all)")
    root = Path(root)
    index = _release_index(root)
    nums = sorted(n for n in index if split == "all"
                  or (split == "val") == realfaces.is_validation(release_stem(n)))
    if not nums:
        raise UserError(f"{root}: no faces in split '{split}'")
    files = [index[n]["image"] for n in nums] + [p for n in nums for p in sorted(index[n]["parts"].values())]
    key = {"root": str(root.resolve()), "split": split, "files": _file_sig(files),
           "exclude": str(exclude_root or realfaces.default_root()) if split == "train" else None}

    def build():
        def load(n):
            def f():
                return _open_rgb(index[n]["image"], resolution), \
                    _resize_labels(compose_release_mask(index[n]["parts"]), resolution)
            return f
        images, labels, names = _decode_all([(str(n), load(n)) for n in nums], resolution, "release")
        if split == "train":
            val = validation_fingerprints(exclude_root)
            if len(val):
                fp = np.stack([fingerprint(im) for im in images])
                keep = (fp @ val.T).max(axis=1) < FINGERPRINT_MATCH
                images, labels = images[keep], labels[keep]
                names = [n for n, k in zip(names, keep) if k]
        return images, labels, names

    images, labels, names = _cached_arrays("release", resolution, key, build, cache)
    if not names:
        raise UserError(f"{root}: no faces left in split '{split}'")
    return SegDataset(images, labels, [release_stem(int(n)) for n in names], f"release:{root}:{split}")


def convert_release(src, dst, limit: int | None = None, quality: int = 95) -> int:
    """Write the release (or its first ``limit`` faces) in the shared 1k layout: masks/<stem>.png (composed
    label maps at the part masks' size, 512 in the release) and images/<stem>.jpg (resized to the mask size,
    as in the 1k set), plus sources.json {stem: number}. Returns the number of faces written."""
    from PIL import Image
    src, dst = Path(src), Path(dst)
    index = _release_index(src)
    nums = sorted(index)[:limit] if limit else sorted(index)
    (dst / "images").mkdir(parents=True, exist_ok=True)
    (dst / "masks").mkdir(parents=True, exist_ok=True)
    sources = {}
    for n in nums:
        stem = release_stem(n)
        label = compose_release_mask(index[n]["parts"])
        side = label.shape[0]
        rgb = _open_rgb(index[n]["image"], side)
        Image.fromarray(label, mode="L").save(dst / "masks" / f"{stem}.png")
        Image.fromarray(rgb).save(dst / "images" / f"{stem}.jpg", quality=quality)
        sources[stem] = n
    (dst / "sources.json").write_text(json.dumps(sources, indent=1))
    return len(nums)


# ============================================================================================
# Avatar datasets rendered by our engine
# ============================================================================================

def avatar_dataset(root, resolution: int = 64, cache: bool = True) -> SegDataset:
    """The complete samples of an engine dataset folder (a sample is complete iff its vector JSON exists)."""
    root = Path(root)
    man_path = root / "manifest.json"
    if not man_path.is_file():
        raise UserError(f"{root}: not an avatar dataset (no manifest.json)")
    try:
        manifest = json.loads(man_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{man_path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{man_path}: manifest must be a JSON object")
    classes = manifest.get("classes", "celebamask-hq-19")
    if classes != "celebamask-hq-19":
        raise UserError(f"{man_path}: class layout '{classes}', expected 'celebamask-hq-19'")
    declared = manifest.get("resolution")
    if declared is not None and int(declared) < resolution:
        raise UserError(f"{root}: rendered at {declared} px, smaller than the training resolution {resolution}")
    names = sorted(p.stem for p in (root / "vectors").glob("*.json") if not p.name.startswith("."))
    if not names:
        raise UserError(f"{root}: no complete samples (no vectors/*.json)")
    img_paths = [root / "images" / f"{n}.png" for n in names]
    mask_paths = [root / "masks" / f"{n}.png" for n in names]
    for what, paths in (("image", img_paths), ("mask", mask_paths)):
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise UserError(f"{root}: {len(missing)} complete sample(s) without their {what}, e.g. "
                            f"{', '.join(missing[:3])}")
    key = {"root": str(root.resolve()), "manifest": manifest,
           "files": _file_sig(img_paths + mask_paths + [root / "vectors" / f"{n}.json" for n in names])}

    def load(i):
        def f():
            size = _image_size(img_paths[i])
            if declared is not None and size != (int(declared), int(declared)):
                raise UserError(f"{img_paths[i]}: {size[0]}x{size[1]}, but the manifest says {declared} px")
            return _open_rgb(img_paths[i], resolution), _open_label(mask_paths[i], resolution, size)
        return f

    images, labels, names = _cached_arrays(
        "avatar", resolution, key,
        lambda: _decode_all([(n, load(i)) for i, n in enumerate(names)], resolution, "avatars"), cache)
    return SegDataset(images, labels, names, f"avatar:{root}")


# ============================================================================================
# One entry for the CLI
# ============================================================================================

def detect_kind(path) -> str:
    path = Path(path)
    if (path / "manifest.json").is_file():
        return "avatar"
    if (path / RELEASE_IMAGES).is_dir():
        return "release"
    if (path / "images").is_dir() and (path / "masks").is_dir():
        return "real"
    raise UserError(f"{path}: not a dataset (expected an engine dataset with manifest.json, the 1k layout "
                    f"images/ + masks/, or the CelebAMask-HQ release {RELEASE_IMAGES}/)")


def open_dataset(path=None, resolution: int = 64, split: str = "train", kind: str = "auto",
                 cache: bool = True) -> SegDataset:
    """Open any supported source. ``path`` None: the shared real faces."""
    if path is None:
        return real_faces(None, split, resolution, cache)
    kind = detect_kind(path) if kind == "auto" else kind
    if kind == "avatar":
        return avatar_dataset(path, resolution, cache)
    if kind == "release":
        return release_faces(path, split, resolution, cache)
    if kind == "real":
        return real_faces(path, split, resolution, cache)
    raise UserError(f"unknown dataset kind '{kind}'")


def check_parts(ds: SegDataset):
    """Refuse data whose labels did not map to parts (cannot happen after the loaders' checks)."""
    if ds.parts is not None and bool((ds.parts == INVALID).any()):
        raise UserError(f"{ds.source}: label ids outside the CelebAMask-HQ classes")
