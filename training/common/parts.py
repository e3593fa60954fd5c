"""Semantic parts: the 19 CelebAMask-HQ classes merged into the 12 parts the generators model.

One mapping, shared by real photos and engine renders, so that part k means the same region in
G_real, G_avatar, the face parser and the discriminators' segmentation branches.

Choices:
  * left/right pairs merge (eyes, brows, ears): a local generator draws both, and horizontal flips
    stay label-safe;
  * mouth interior + upper lip + lower lip -> ``mouth`` (one region for the colour and shape of the lips);
  * earring -> ``ears`` (tiny, 1-3 pixels at 16x16, hangs from the ear);
  * necklace -> ``neck`` (rare, lies on the neck);
  * eyeglasses and hat stay separate: they are slot options of the avatar engine, and eyeglasses are the
    transparent part that needs the modified mean latent for inversion (see semantic_gan.py).
"""
from __future__ import annotations

import numpy as np

from ...backend.schema import CLASSES, CLASS_IDS

PARTS = ("background", "face", "eyes", "brows", "nose", "mouth", "ears", "hair", "neck", "cloth",
         "eyeglasses", "hat")
PART_IDS = {name: i for i, name in enumerate(PARTS)}
NUM_PARTS = len(PARTS)

# CelebAMask-HQ class name -> part name
CLASS_TO_PART = {
    "background": "background", "skin": "face", "nose": "nose", "eyeglasses": "eyeglasses",
    "l_eye": "eyes", "r_eye": "eyes", "l_brow": "brows", "r_brow": "brows",
    "l_ear": "ears", "r_ear": "ears", "earring": "ears",
    "mouth": "mouth", "u_lip": "mouth", "l_lip": "mouth",
    "hair": "hair", "hat": "hat", "necklace": "neck", "neck": "neck", "cloth": "cloth",
}
assert set(CLASS_TO_PART) == set(CLASSES), "every CelebAMask-HQ class needs a part"

# Lookup table over all 256 uint8 values; ids past the 19 classes map to 255 ("invalid").
INVALID = 255
LUT = np.full(256, INVALID, np.uint8)
for _name, _cid in CLASS_IDS.items():
    LUT[_cid] = PART_IDS[CLASS_TO_PART[_name]]

# Parts whose pixels can show what lies behind them: the inversion starts from a modified mean latent.
TRANSPARENT_PARTS = ("eyeglasses",)

# Parts whose mean colour the colour-matching loss ties between G_real and G_avatar.
COLOR_PARTS = ("hair", "face")

# Display colours: the palette colour of a representative class (backend.visual.CLASS_COLORS).
_REPRESENTATIVE = {"background": "background", "face": "skin", "eyes": "l_eye", "brows": "l_brow",
                   "nose": "nose", "mouth": "u_lip", "ears": "l_ear", "hair": "hair", "neck": "neck",
                   "cloth": "cloth", "eyeglasses": "eyeglasses", "hat": "hat"}


def labels_to_parts(labels):
    """CelebAMask-HQ class ids -> part ids, for numpy arrays or torch tensors of any shape.

    Values outside 0..18 become 255 (INVALID); loaders check for it and refuse the data.
    """
    if isinstance(labels, np.ndarray):
        return LUT[labels.astype(np.uint8, copy=False)]
    import torch
    if isinstance(labels, torch.Tensor):
        lut = torch.from_numpy(LUT).to(labels.device)
        return lut[labels.long()]
    raise TypeError(f"labels_to_parts expects a numpy array or torch tensor, got {type(labels)}")


def part_colors() -> np.ndarray:
    """(NUM_PARTS, 3) uint8 display colours."""
    from ...backend.visual import CLASS_COLORS
    return np.stack([CLASS_COLORS[CLASS_IDS[_REPRESENTATIVE[p]]] for p in PARTS])


def colorize_parts(parts: np.ndarray) -> np.ndarray:
    """HxW part ids -> HxWx3 uint8."""
    pal = np.vstack([part_colors(), np.full((256 - NUM_PARTS, 3), 255, np.uint8)])
    return pal[parts.astype(np.uint8)]
