"""Pictures for people: colourised label maps and image grids (numpy only)."""
from __future__ import annotations

import numpy as np

# One colour per CelebAMask-HQ class id (0..18), the palette used by every sheet and grid.
CLASS_COLORS = np.array([
    [0, 0, 0], [204, 153, 128], [230, 115, 64], [64, 224, 208], [0, 102, 255], [0, 51, 204],
    [153, 51, 0], [102, 34, 0], [255, 204, 0], [204, 163, 0], [255, 0, 102], [204, 0, 0],
    [153, 0, 51], [102, 51, 153], [0, 153, 51], [255, 255, 0], [0, 255, 255], [255, 153, 204],
    [128, 128, 128]], np.uint8)


def colorize_mask(mask: np.ndarray) -> np.ndarray:
    """HxW class ids -> HxWx3 uint8 colours (ids past the palette show white)."""
    palette = np.vstack([CLASS_COLORS, np.full((256 - len(CLASS_COLORS), 3), 255, np.uint8)])
    return palette[mask.astype(np.uint8)]


def grid(tiles: list[np.ndarray], columns: int, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile equally sized HxWx3 uint8 images row-major into one image."""
    if not tiles:
        raise ValueError("grid needs at least one tile")
    h, w = tiles[0].shape[:2]
    rows = (len(tiles) + columns - 1) // columns
    out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), fill, np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, columns)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out[y:y + h, x:x + w] = t if t.ndim == 3 else t[..., None]
    return out


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """An RGB uint8 image resized (bicubic) to size x size; returned as is when already that size."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    from PIL import Image
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))


def image_data_uri(img: np.ndarray, size: int | None = None, jpeg: bool = False) -> str:
    """A small image as an inline ``data:`` URI: PNG (lossless), or JPEG for photos on pages
    that show hundreds of them (a 128 px photo: about 25 kB as PNG, 5 kB as JPEG)."""
    import base64
    import io

    from PIL import Image
    if size:
        img = resize_square(img, size)
    buf = io.BytesIO()
    im = Image.fromarray(np.asarray(img, np.uint8))
    if jpeg:
        im.save(buf, format="JPEG", quality=90)
    else:
        im.save(buf, format="PNG", optimize=True)
    mime = "image/jpeg" if jpeg else "image/png"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")
