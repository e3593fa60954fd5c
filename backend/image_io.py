"""Reading user photos: any file a person may pick, as an 8-bit RGB array, or a clear ``UserError``.

Handles EXIF orientation, greyscale, palette, alpha (composited on a neutral grey), CMYK,
16-bit and float images (PNG/TIFF), embedded ICC profiles (converted to sRGB when Pillow has
LittleCMS), and very large photos: JPEGs are decoded at a reduced scale (``draft``), other formats
are shrunk by integer box reduction (``reduce``) before anything else, so the longest side ends up
at most ``MAX_SIDE`` and a 50 MP photo never costs more than one decode.

Pure numpy + Pillow: runs inside Blender.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UserError

MAX_SIDE = 4096                      # longest side kept for detection and alignment
BACKGROUND = (128, 128, 128)         # neutral grey under transparent pixels
EXIF_ORIENTATION = 0x0112

PhotoSource = Union[str, os.PathLike, bytes, bytearray, memoryview]


def describe(source: PhotoSource) -> str:
    """How to name a photo source in a message."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return str(source)


def _pil_open(fp, name: str) -> Image.Image:
    """Image.open with Pillow's decompression-bomb limit (about 179 MP) as a user error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp)
    except Image.DecompressionBombError:
        raise UserError(f"{name}: the image is too large to open (over "
                        f"{2 * (Image.MAX_IMAGE_PIXELS or 0) // 1_000_000} megapixels)") from None
    except UnidentifiedImageError:
        raise UserError(f"{name}: not an image Likeness can read{_format_hint(fp)}") from None
    except OSError as e:
        raise UserError(f"{name}: cannot read the file ({e})") from None


def _open(source: PhotoSource, name: str) -> Image.Image:
    data = b""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise UserError(f"{name}: the image data is empty")
        fp: object = io.BytesIO(data)
    else:
        path = Path(source)
        if not path.exists():
            raise UserError(f"{name}: no such file")
        if path.is_dir():
            raise UserError(f"{name}: is a folder, not an image file")
        if path.stat().st_size == 0:
            raise UserError(f"{name}: the file is empty (0 bytes)")
        fp = path
    im = _pil_open(fp, name)
    if im.format == "PNG":
        # PNG carries checksums that load() does not test: check them (cheap, no decompression)
        try:
            im.verify()
        except Exception as e:
            raise UserError(f"{name}: the image file is corrupt ({e})") from None
        finally:
            im.close()
        if isinstance(fp, io.BytesIO):
            fp = io.BytesIO(data)
        im = _pil_open(fp, name)
    if im.width < 1 or im.height < 1:
        raise UserError(f"{name}: the image has no pixels")
    return im


def _format_hint(fp: object) -> str:
    """A hint for common formats Pillow cannot open (HEIC from phones, RAW, PDF, video)."""
    try:
        if isinstance(fp, io.BytesIO):
            head = fp.getvalue()[:64]
        else:
            with open(fp, "rb") as f:  # type: ignore[arg-type]
                head = f.read(64)
    except OSError:
        return ""
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif"):
            return " (HEIC/AVIF photo: export it as JPEG or PNG first)"
        return " (a video or ISO media file, not a photo)"
    if head.startswith(b"%PDF"):
        return " (a PDF document; export the photo as JPEG or PNG)"
    return " (expected JPEG, PNG, TIFF, WebP, BMP or GIF)"


def _orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:   # broken EXIF blocks are common; ignore them rather than refuse the photo
        return 1
    return value if 1 <= value <= 8 else 1


_TRANSPOSE = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}


def _to_8bit(im: Image.Image) -> Image.Image:
    """Integer (16/32-bit) and float single-channel images to 8-bit 'L', scaled, not clipped."""
    a = np.asarray(im)
    if a.dtype.kind == "f":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        hi = float(a.max()) if a.size else 0.0
        scale = 255.0 if hi <= 1.0 else (1.0 if hi <= 255.0 else 255.0 / 65535.0)
        a = a * scale
    else:
        a = a.astype(np.int64)
        hi = int(a.max()) if a.size else 0
        if im.mode.startswith("I;16") or hi > 255:
            a = a * 255 / 65535 if hi <= 65535 else a * 255 / max(hi, 1)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def _to_srgb(im: Image.Image) -> Image.Image:
    """Apply an embedded ICC profile (if any) so the pixels are sRGB; ignore broken profiles."""
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "RGBA", "CMYK", "L"):
        return im
    try:
        from PIL import ImageCms
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        desc = ImageCms.getProfileDescription(src) or ""
        if "srgb" in desc.lower().replace(" ", "") and im.mode in ("RGB", "RGBA"):
            return im
        out_mode = "RGBA" if im.mode == "RGBA" else "RGB"
        return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode=out_mode)
    except Exception:
        return im


def _normalise_mode(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 'RGB' (alpha composited over ``BACKGROUND``)."""
    mode = im.mode
    if mode in ("P", "PA"):
        im = im.convert("RGBA" if (mode == "PA" or "transparency" in im.info) else "RGB")
    elif mode == "1":
        im = im.convert("L")
    elif mode.startswith("I") or mode == "F":
        im = _to_8bit(im)
    elif mode in ("RGBa", "La"):
        im = im.convert("RGBA")
    elif mode == "LA":
        im = im.convert("RGBA")
    elif mode in ("CMYK", "L", "RGBA", "RGB"):
        im = _to_srgb(im)
    if im.mode == "RGBA":
        base = Image.new("RGB", im.size, BACKGROUND)
        base.paste(im, mask=im.getchannel("A"))
        return base
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def load_photo(source: PhotoSource, *, max_side: int = MAX_SIDE, name: str | None = None) -> np.ndarray:
    """Read a photo file (path) or encoded bytes as an upright uint8 HxWx3 RGB array.

    The longest side is at most ``max_side`` (large photos are reduced on decode). Raises
    ``UserError`` naming the file for missing, empty, truncated, corrupt or non-image input.
    """
    name = name or describe(source)
    im = src = _open(source, name)
    try:
        orientation = _orientation(im)
        w, h = im.size
        longest = max(w, h)
        if im.format == "JPEG" and longest > max_side:
            # decode at 1/2, 1/4 or 1/8 scale directly: never holds the full-size pixels
            f = max_side / longest
            im.draft(None, (max(1, int(np.ceil(w * f))), max(1, int(np.ceil(h * f)))))
        try:
            im.load()
        except (OSError, SyntaxError, ValueError) as e:
            msg = str(e)
            if "truncated" in msg.lower() or "broken data stream" in msg.lower():
                raise UserError(f"{name}: the image file is truncated (incomplete download or copy?)") from None
            raise UserError(f"{name}: the image file is corrupt ({msg})") from None
        except Image.DecompressionBombError:
            raise UserError(f"{name}: the image is too large to open") from None
        # integer box reduction first (cheap, antialiased), then an exact antialiased resize
        longest = max(im.size)
        if longest > max_side:
            factor = longest // max_side
            if factor >= 2 and im.mode not in ("P", "PA", "1"):
                try:
                    im = im.reduce(factor)
                except (ValueError, NotImplementedError):
                    pass
        im = _normalise_mode(im)
        longest = max(im.size)
        if longest > max_side:
            s = max_side / longest
            im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))),
                           Image.Resampling.LANCZOS)
        for op in _TRANSPOSE.get(orientation, ()):
            im = im.transpose(op)
        rgb = np.asarray(im, dtype=np.uint8)
    except UserError:
        raise
    except MemoryError:
        raise UserError(f"{name}: not enough memory to read this image") from None
    except Exception as e:   # any decoder failure is a bad file, not a crash
        raise UserError(f"{name}: the image file is corrupt or unsupported ({type(e).__name__}: {e})") from None
    finally:
        im.close()
        src.close()
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise UserError(f"{name}: could not convert the image to RGB (got shape {rgb.shape})")
    return np.ascontiguousarray(rgb)
