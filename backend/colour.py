"""Colour spaces and colour difference: sRGB <-> linear RGB <-> CIE XYZ (D65) <-> CIELAB, CIEDE2000.

numpy only, vectorised over any leading shape (the last axis holds the three channels).

Conventions
  * sRGB input: integer arrays (uint8 images) are read as 0..255; float arrays as 0..1.
    sRGB output is float 0..1 (``lab_to_srgb`` clips to the gamut unless ``clip=False``).
  * XYZ is relative to Y = 1 for the white point; CIELAB uses the D65 white of the sRGB matrix
    (Xn, Yn, Zn) = (0.95047, 1.0, 1.08883) (the matrix's row sums), so sRGB white is exactly
    L=100, a=b=0.
  * ``ciede2000`` follows Sharma, Wu & Dalal, "The CIEDE2000 color-difference formula:
    implementation notes, supplementary test data, and mathematical observations",
    Color Res. Appl. 30(1), 2005 (tests check it against their 34 published pairs).
"""
from __future__ import annotations

import numpy as np

# IEC 61966-2-1 (sRGB) primaries, D65: linear RGB -> XYZ.
RGB_TO_XYZ = np.array([
    [0.4124564, 0.3575761, 0.1804375],
    [0.2126729, 0.7151522, 0.0721750],
    [0.0193339, 0.1191920, 0.9503041],
])
XYZ_TO_RGB = np.linalg.inv(RGB_TO_XYZ)
# D65 white as the matrix maps it (0.95047, 1.0000001, 1.08883): sRGB white -> exactly L=100, a=b=0.
WHITE_D65 = RGB_TO_XYZ.sum(axis=1)

_HUE_TOL = 1e-9             # radians: hue-difference ties at exactly 180 degrees
_EPS = 216.0 / 24389.0      # CIE epsilon (6/29)^3
_KAPPA = 24389.0 / 27.0     # CIE kappa (29/3)^3


def _as_unit_rgb(rgb) -> np.ndarray:
    a = np.asarray(rgb)
    if a.shape[-1:] != (3,):
        raise ValueError(f"expected colours on the last axis (..., 3), got shape {a.shape}")
    if np.issubdtype(a.dtype, np.integer):
        return a.astype(np.float64) / 255.0
    return a.astype(np.float64)


def srgb_to_linear(rgb) -> np.ndarray:
    """Gamma-encoded sRGB (uint8 0..255 or float 0..1) -> linear RGB (float)."""
    c = _as_unit_rgb(rgb)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(lin, clip: bool = True) -> np.ndarray:
    """Linear RGB -> gamma-encoded sRGB float 0..1."""
    c = np.asarray(lin, dtype=np.float64)
    if clip:
        c = np.clip(c, 0.0, 1.0)
    c_pos = np.maximum(c, 0.0)
    out = np.where(c <= 0.0031308, 12.92 * c, 1.055 * c_pos ** (1.0 / 2.4) - 0.055)
    return out


def linear_to_xyz(lin) -> np.ndarray:
    return np.asarray(lin, dtype=np.float64) @ RGB_TO_XYZ.T


def xyz_to_linear(xyz) -> np.ndarray:
    return np.asarray(xyz, dtype=np.float64) @ XYZ_TO_RGB.T


def xyz_to_lab(xyz, white=WHITE_D65) -> np.ndarray:
    t = np.asarray(xyz, dtype=np.float64) / np.asarray(white, dtype=np.float64)
    f = np.where(t > _EPS, np.cbrt(t), (_KAPPA * t + 16.0) / 116.0)
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    return np.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def lab_to_xyz(lab, white=WHITE_D65) -> np.ndarray:
    lab = np.asarray(lab, dtype=np.float64)
    L, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    fy = (L + 16.0) / 116.0
    fx = fy + a / 500.0
    fz = fy - b / 200.0
    f = np.stack([fx, fy, fz], axis=-1)
    t = np.where(f ** 3 > _EPS, f ** 3, (116.0 * f - 16.0) / _KAPPA)
    # Y uses L directly below the linear threshold (standard CIE inverse).
    t[..., 1] = np.where(L > _KAPPA * _EPS, fy ** 3, L / _KAPPA)
    return t * np.asarray(white, dtype=np.float64)


def srgb_to_lab(rgb) -> np.ndarray:
    """sRGB (uint8 0..255 or float 0..1, shape (..., 3)) -> CIELAB D65."""
    return xyz_to_lab(linear_to_xyz(srgb_to_linear(rgb)))


def lab_to_srgb(lab, clip: bool = True) -> np.ndarray:
    """CIELAB D65 -> sRGB float 0..1."""
    return linear_to_srgb(xyz_to_linear(lab_to_xyz(lab)), clip=clip)


def hex_to_srgb(color: str) -> np.ndarray:
    """'#a0522d' (or 'a0522d') -> float sRGB 0..1."""
    c = color.strip().lstrip("#")
    if len(c) != 6:
        raise ValueError(f"'{color}' is not a hex colour like '#a0522d'")
    try:
        return np.array([int(c[i:i + 2], 16) for i in (0, 2, 4)], dtype=np.float64) / 255.0
    except ValueError:
        raise ValueError(f"'{color}' is not a hex colour like '#a0522d'") from None


def hex_to_lab(color: str) -> tuple[float, float, float]:
    L, a, b = srgb_to_lab(hex_to_srgb(color))
    return float(L), float(a), float(b)


def lab_to_hex(lab) -> str:
    rgb = np.round(lab_to_srgb(np.asarray(lab, dtype=np.float64)) * 255.0).astype(int)
    return "#" + "".join(f"{int(v):02x}" for v in rgb)


def ciede2000(lab1, lab2, kL: float = 1.0, kC: float = 1.0, kH: float = 1.0) -> np.ndarray:
    """CIEDE2000 colour difference between CIELAB colours (broadcasting over leading axes)."""
    lab1 = np.asarray(lab1, dtype=np.float64)
    lab2 = np.asarray(lab2, dtype=np.float64)
    L1, a1, b1 = lab1[..., 0], lab1[..., 1], lab1[..., 2]
    L2, a2, b2 = lab2[..., 0], lab2[..., 1], lab2[..., 2]

    C1 = np.hypot(a1, b1)
    C2 = np.hypot(a2, b2)
    Cbar7 = ((C1 + C2) / 2.0) ** 7
    G = 0.5 * (1.0 - np.sqrt(Cbar7 / (Cbar7 + 25.0 ** 7)))
    a1p = (1.0 + G) * a1
    a2p = (1.0 + G) * a2
    C1p = np.hypot(a1p, b1)
    C2p = np.hypot(a2p, b2)
    # Hue angles in radians, 0..2pi; 0 for achromatic colours (a' = b = 0).
    h1p = np.arctan2(b1, a1p)
    h1p = np.where(h1p < 0, h1p + 2 * np.pi, h1p)
    h1p = np.where((np.abs(a1p) + np.abs(b1)) == 0, 0.0, h1p)
    h2p = np.arctan2(b2, a2p)
    h2p = np.where(h2p < 0, h2p + 2 * np.pi, h2p)
    h2p = np.where((np.abs(a2p) + np.abs(b2)) == 0, 0.0, h2p)

    dLp = L2 - L1
    dCp = C2p - C1p
    chroma_zero = (C1p * C2p) == 0
    dhp = h2p - h1p
    dhp = dhp - 2 * np.pi * (dhp > np.pi)
    dhp = dhp + 2 * np.pi * (dhp < -np.pi)
    dhp = np.where(chroma_zero, 0.0, dhp)
    dHp = 2.0 * np.sqrt(C1p * C2p) * np.sin(dhp / 2.0)

    Lbarp = (L1 + L2) / 2.0
    Cbarp = (C1p + C2p) / 2.0
    hbar = (h1p + h2p) / 2.0
    # Hues exactly 180 degrees apart (Sharma's pairs 10 and 14) take the "<= 180" branch, as in
    # exact arithmetic; without the tolerance, rounding in atan2 picks either branch.
    hbar = hbar - np.pi * (np.abs(h1p - h2p) > np.pi + _HUE_TOL)
    hbar = hbar + 2 * np.pi * (hbar < 0)
    hbar = np.where(chroma_zero, h1p + h2p, hbar)
    hbarp = np.degrees(hbar)

    T = (1.0 - 0.17 * np.cos(np.radians(hbarp - 30.0)) + 0.24 * np.cos(np.radians(2.0 * hbarp))
         + 0.32 * np.cos(np.radians(3.0 * hbarp + 6.0))
         - 0.20 * np.cos(np.radians(4.0 * hbarp - 63.0)))
    dtheta = 30.0 * np.exp(-(((hbarp - 275.0) / 25.0) ** 2))
    Cbarp7 = Cbarp ** 7
    RC = 2.0 * np.sqrt(Cbarp7 / (Cbarp7 + 25.0 ** 7))
    SL = 1.0 + 0.015 * (Lbarp - 50.0) ** 2 / np.sqrt(20.0 + (Lbarp - 50.0) ** 2)
    SC = 1.0 + 0.045 * Cbarp
    SH = 1.0 + 0.015 * Cbarp * T
    RT = -np.sin(np.radians(2.0 * dtheta)) * RC

    tL = dLp / (kL * SL)
    tC = dCp / (kC * SC)
    tH = dHp / (kH * SH)
    return np.sqrt(np.maximum(tL ** 2 + tC ** 2 + tH ** 2 + RT * tC * tH, 0.0))
