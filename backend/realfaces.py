"""The shared real faces (CelebAMask-HQ subset) and the validation-split rule.

The faces are read in place, never copied: they carry a non-commercial research licence.
Validation split: stems beginning with c, d, e or f (256 of the 1,000). No model behind a reported
figure trains on them; every training loader goes through ``stems(split="train")``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import UserError

VALIDATION_PREFIXES = ("c", "d", "e", "f")
SPLITS = ("train", "val", "all")


def default_root() -> Path:
    """$LIKENESS_CELEBAMASK, else ../shared/data/celebamask-hq-1k beside the repository."""
    env = os.environ.get("LIKENESS_CELEBAMASK")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "celebamask-hq-1k"


def is_validation(stem: str) -> bool:
    return stem[:1].lower() in VALIDATION_PREFIXES


def stems(root: str | os.PathLike | None = None, split: str = "train") -> list[str]:
    """Sorted stems of the image+mask pairs in ``split`` ("train", "val" or "all")."""
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}' (train, val, all)")
    root = Path(root) if root else default_root()
    images, masks = root / "images", root / "masks"
    if not images.is_dir() or not masks.is_dir():
        raise UserError(f"{root}: expected images/ and masks/ folders (CelebAMask-HQ 1k layout)")
    have_mask = {p.stem for p in masks.glob("*.png")}
    out = sorted(p.stem for p in images.glob("*.jpg") if p.stem in have_mask)
    if split == "train":
        out = [s for s in out if not is_validation(s)]
    elif split == "val":
        out = [s for s in out if is_validation(s)]
    return out


def load_pair(stem: str, root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 HxWx3, label map uint8 HxW) of one face."""
    from PIL import Image
    root = Path(root) if root else default_root()
    with Image.open(root / "images" / f"{stem}.jpg") as im:
        rgb = np.asarray(im.convert("RGB"))
    with Image.open(root / "masks" / f"{stem}.png") as im:
        mask = np.asarray(im)
    if mask.ndim != 2:
        raise UserError(f"{stem}: mask must be a single-channel label map, got shape {mask.shape}")
    return rgb, mask
