"""The paired-set format: the estimator's training data on disk, read as memory-mapped arrays so an
epoch never decodes an image file::

    PAIRS/manifest.json     {"pack", "schema", "count", "size", "kind", ...}
    PAIRS/images.npy        uint8 [N, S, S, 3]   aligned faces (realistic or renders)
    PAIRS/continuous.npy    float32 [N, C]       continuous parameters normalised to [0, 1]
    PAIRS/discrete.npy      int64 [N, K]         option index per slot
    PAIRS/groups.npy        int64 [N] (optional) augmented copies of one latent share a group,
                                                 so held-out pairs never leak into training

Written by ``write_paired_set`` (renders: ``pairs.paired_data.renders_to_paired_set``; realistic pairs:
``pairs.paired_data.synthesize_pairs``), checked against the pack and read by ``PairedSet``; the pair
check (``pairs.pair_check``) marks contradicted labels ``UNKNOWN``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ...backend.errors import UserError
from ...backend.schema import Pack

UNKNOWN = -1          # a discrete label left out of the loss (training/pairs/pair_check.py)


class PairedSet:
    """Memory-mapped paired arrays; batches are gathered with one fancy-index per array."""

    def __init__(self, folder: str | os.PathLike, pack: Pack | None = None):
        self.folder = Path(folder)
        man_path = self.folder / "manifest.json"
        if not man_path.is_file():
            raise UserError(f"{folder} is not a paired set (no manifest.json)")
        self.manifest = json.loads(man_path.read_text())
        if pack is not None:
            if self.manifest.get("pack") != pack.id:
                raise UserError(f"paired set {folder} is for pack '{self.manifest.get('pack')}', "
                                f"not '{pack.id}'")
            if self.manifest.get("schema") != pack.schema_hash:
                raise UserError(f"paired set {folder} was made for schema {self.manifest.get('schema')}; "
                                f"pack '{pack.id}' is now {pack.schema_hash}: regenerate it")
        try:
            self.images = np.load(self.folder / "images.npy", mmap_mode="r")
            self.continuous = np.load(self.folder / "continuous.npy")
            self.discrete = np.load(self.folder / "discrete.npy")
        except (OSError, ValueError) as e:
            raise UserError(f"paired set {folder} is incomplete or corrupt: {e}") from None
        groups = self.folder / "groups.npy"
        self.groups = np.load(groups) if groups.is_file() else np.arange(len(self.images))
        n = len(self.images)
        if n == 0:
            raise UserError(f"paired set {folder} is empty")
        if not (len(self.continuous) == len(self.discrete) == len(self.groups) == n):
            raise UserError(f"paired set {folder} is inconsistent: {n} images, {len(self.continuous)} "
                            f"continuous rows, {len(self.discrete)} discrete rows")
        if self.images.ndim != 4 or self.images.shape[3] != 3 or self.images.dtype != np.uint8:
            raise UserError(f"paired set {folder}: images must be uint8 [N, S, S, 3], "
                            f"got {self.images.dtype} {self.images.shape}")
        if pack is not None:
            if self.continuous.shape[1] != pack.n_continuous or self.discrete.shape[1] != len(pack.slots):
                raise UserError(f"paired set {folder} has {self.continuous.shape[1]} continuous and "
                                f"{self.discrete.shape[1]} discrete columns; pack '{pack.id}' has "
                                f"{pack.n_continuous} and {len(pack.slots)}")
            sizes = np.array(pack.slot_sizes)
            if (self.discrete < UNKNOWN).any() or (self.discrete >= sizes[None]).any():
                raise UserError(f"paired set {folder} has option indices outside the pack's slots")

    def __len__(self):
        return len(self.images)

    def split(self, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Train/held-out indices, split by group so augmented copies stay on one side."""
        uniq = np.unique(self.groups)
        rng = np.random.default_rng(seed)
        n_val = max(1, int(round(len(uniq) * val_fraction))) if len(uniq) > 1 else 0
        val_groups = set(rng.permutation(uniq)[:n_val].tolist())
        is_val = np.array([g in val_groups for g in self.groups.tolist()])
        return np.nonzero(~is_val)[0], np.nonzero(is_val)[0]

    def batch(self, idx: np.ndarray):
        idx = np.sort(idx)                      # sequential reads from the memory map
        return (torch.from_numpy(np.ascontiguousarray(self.images[idx])),
                torch.from_numpy(self.continuous[idx].astype(np.float32)),
                torch.from_numpy(self.discrete[idx].astype(np.int64)))


def write_paired_set(folder: str | os.PathLike, pack: Pack, images: np.ndarray,
                     continuous: np.ndarray, discrete: np.ndarray, groups: np.ndarray | None = None,
                     **manifest):
    """Write a paired set atomically enough: arrays first, the manifest (which marks it usable) last."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "images.npy", np.ascontiguousarray(images, dtype=np.uint8))
    np.save(folder / "continuous.npy", np.asarray(continuous, np.float32))
    np.save(folder / "discrete.npy", np.asarray(discrete, np.int64))
    if groups is not None:
        np.save(folder / "groups.npy", np.asarray(groups, np.int64))
    man = {"pack": pack.id, "schema": pack.schema_hash, "count": int(len(images)),
           "size": int(images.shape[1]), **manifest}
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(json.dumps(man, indent=2))
    os.replace(tmp, folder / "manifest.json")
