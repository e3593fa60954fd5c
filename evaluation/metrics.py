"""Measures between a predicted and a true avatar vector, and between their two renders.

Pure numpy except ``make_lpips`` (torch, imported only when asked). The label-free measures
against a photo (presence, colours, shapes) are ``backend.fidelity``'s: not repeated here.

  slot_matches(pred, truth)      slot -> predicted option == true option
  slot_accuracy(preds, truths)   per-slot and mean accuracy over pairs
  continuous_l1(pred, truth)     mean |u_pred - u_true| over the normalised [0, 1] parameters
  mask_iou(a, b)                 per-part IoU of two class-id masks, and their mean over parts
  make_lpips()                   (distance fn or None, note): LPIPS only when its weights are local
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from ..backend.schema import AvatarVector


def _same_pack(pred: AvatarVector, truth: AvatarVector):
    if pred.pack.schema_hash != truth.pack.schema_hash:
        raise ValueError(f"vectors of different packs/schemas ({pred.pack.id} {pred.pack.schema_hash} "
                         f"vs {truth.pack.id} {truth.pack.schema_hash})")


def slot_matches(pred: AvatarVector, truth: AvatarVector) -> dict[str, bool]:
    _same_pack(pred, truth)
    return {s.name: pred.slots[s.name] == truth.slots[s.name] for s in truth.pack.slots}


def slot_accuracy(preds: Sequence[AvatarVector], truths: Sequence[AvatarVector]) -> dict[str, Any]:
    """``per_slot``: slot -> fraction of pairs with the true option; ``mean``: their mean (each slot
    weighs the same however many options it has); ``n`` pairs. None values when there are no pairs."""
    if len(preds) != len(truths):
        raise ValueError(f"{len(preds)} predictions vs {len(truths)} truths")
    if not preds:
        return {"per_slot": {}, "mean": None, "n": 0}
    matches = [slot_matches(p, t) for p, t in zip(preds, truths)]
    per_slot = {s: float(np.mean([m[s] for m in matches])) for s in matches[0]}
    return {"per_slot": per_slot, "mean": float(np.mean(list(per_slot.values()))), "n": len(preds)}


def continuous_l1(pred: AvatarVector, truth: AvatarVector, per_parameter: bool = False):
    """Mean absolute difference of the continuous parameters, each normalised to [0, 1] by its
    range (so a colour ramp and a shape key weigh the same); with ``per_parameter`` also the
    name -> |difference| mapping."""
    _same_pack(pred, truth)
    a = np.asarray(pred.to_arrays()[0], np.float64)
    b = np.asarray(truth.to_arrays()[0], np.float64)
    d = np.abs(a - b)
    mean = float(d.mean()) if d.size else 0.0
    if per_parameter:
        return mean, {p.name: float(v) for p, v in zip(truth.pack.parameters, d)}
    return mean


def mask_iou(a: np.ndarray, b: np.ndarray, parts: bool = True) -> dict[str, Any]:
    """Intersection over union of two class-id masks of the same size, per region.

    ``parts=True`` merges the 19 CelebAMask-HQ classes into the generators' 12 parts first
    (left/right eyes, brows and ears are one part each, lips and mouth one), so a left/right
    swap of labels is not an error. Background is not a part. The mean runs over the parts present
    in either mask (a part absent from both is no evidence); None when no part is present at all.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"masks must be 2-D and of one size, got {a.shape} and {b.shape}")
    if parts:
        from ..training.common.parts import PARTS, labels_to_parts     # numpy only, no torch
        a, b = labels_to_parts(a), labels_to_parts(b)
        names = PARTS
    else:
        from ..backend.schema import CLASSES
        names = CLASSES
    per: dict[str, float] = {}
    for k, name in enumerate(names):
        if k == 0:                                    # background
            continue
        ia, ib = a == k, b == k
        union = int(np.count_nonzero(ia | ib))
        if union:
            per[name] = int(np.count_nonzero(ia & ib)) / union
    return {"per_part": per, "mean": float(np.mean(list(per.values()))) if per else None}


def make_lpips(net: str = "alex", threads: int = 1
               ) -> tuple[Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], np.ndarray] | None, str]:
    """(fn, note): ``fn(images_a, images_b)`` -> LPIPS distances of uint8 HxWx3 image pairs.

    Only when the ``lpips`` package imports and its backbone weights are already on disk
    (``training.common.perceptual``'s rules; nothing is downloaded); else (None, why it was skipped).
    """
    try:
        import torch
    except ImportError as e:
        return None, f"LPIPS skipped: torch is not installed ({e})"
    torch.set_num_threads(threads)
    from ..training.common.perceptual import make_lpips as _make
    fn, note = _make(net)
    if fn is None:
        return None, note

    def distances(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray]) -> np.ndarray:
        def tensor(imgs):
            t = torch.from_numpy(np.stack([np.asarray(i, np.float32) for i in imgs]))
            return t.permute(0, 3, 1, 2) / 127.5 - 1.0      # [B, 3, H, W] in [-1, 1]
        with torch.no_grad():
            return fn(tensor(xs), tensor(ys)).cpu().numpy().astype(np.float64)

    return distances, note
