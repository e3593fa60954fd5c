"""A tiny PNG writer (numpy + zlib), so rendering works in a stock Blender without Pillow."""
from __future__ import annotations

import struct
import zlib

import numpy as np


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png(array: np.ndarray, level: int = 6) -> bytes:
    """PNG bytes of a uint8 array: HxW (greyscale / label map), HxWx3 (RGB) or HxWx4 (RGBA)."""
    a = np.ascontiguousarray(array)
    if a.dtype != np.uint8:
        raise ValueError(f"encode_png needs uint8, got {a.dtype}")
    if a.ndim == 2:
        colour_type, channels = 0, 1
    elif a.ndim == 3 and a.shape[2] in (3, 4):
        colour_type, channels = (2 if a.shape[2] == 3 else 6), a.shape[2]
    else:
        raise ValueError(f"encode_png: unsupported shape {a.shape}")
    h, w = a.shape[:2]
    # Filter type 0 (None) on every row: a leading zero byte per scanline.
    raw = np.zeros((h, w * channels + 1), np.uint8)
    raw[:, 1:] = a.reshape(h, w * channels)
    header = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(raw.tobytes(), level)) + _chunk(b"IEND", b""))
