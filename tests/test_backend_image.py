"""backend/image_io.py on generated awkward inputs: every kind of file a user may pick."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from likeness.backend.errors import UserError
from likeness.backend.image_io import BACKGROUND, MAX_SIDE, load_photo


def _gradient(h=120, w=160) -> np.ndarray:
    """A test picture whose orientation is recognisable: red grows to the right, green downwards."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), np.full_like(x, 60)], -1).astype(np.uint8)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def test_plain_rgb_file_and_bytes(tmp_path):
    rgb = _gradient()
    p = tmp_path / "photo.png"
    Image.fromarray(rgb).save(p)
    out = load_photo(p)
    assert out.dtype == np.uint8 and out.shape == (120, 160, 3)
    np.testing.assert_array_equal(out, rgb)
    np.testing.assert_array_equal(load_photo(p.read_bytes()), rgb)
    np.testing.assert_array_equal(load_photo(str(p)), rgb)


@pytest.mark.parametrize("orientation,expect", [
    (1, lambda a: a), (3, lambda a: a[::-1, ::-1]), (6, lambda a: np.rot90(a, -1)),
    (8, lambda a: np.rot90(a, 1)), (2, lambda a: a[:, ::-1]),
])
def test_exif_orientation(orientation, expect):
    rgb = _gradient()
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(Image.fromarray(rgb), "JPEG", quality=95, exif=exif.tobytes())
    out = load_photo(data)
    want = expect(rgb)
    assert out.shape == want.shape
    assert np.abs(out.astype(int) - want).mean() < 3    # JPEG noise only


def test_broken_exif_is_ignored():
    data = bytearray(_encode(Image.fromarray(_gradient()), "JPEG", exif=b"Exif\x00\x00garbage-not-tiff"))
    out = load_photo(bytes(data))
    assert out.shape == (120, 160, 3)


def test_greyscale_and_bilevel():
    g = _gradient()[..., 0]
    out = load_photo(_encode(Image.fromarray(g), "PNG"))
    assert out.shape == (120, 160, 3)
    np.testing.assert_array_equal(out[..., 0], g)
    np.testing.assert_array_equal(out[..., 1], g)
    bw = Image.fromarray(g).convert("1")
    out = load_photo(_encode(bw, "PNG"))
    assert set(np.unique(out)) <= {0, 255}


def test_palette_with_and_without_transparency():
    rgb = _gradient()
    pal = Image.fromarray(rgb).quantize(16)
    out = load_photo(_encode(pal, "PNG"))
    assert out.shape == (120, 160, 3)
    assert np.abs(out.astype(int) - rgb).mean() < 20
    pal.info["transparency"] = 0
    out = load_photo(_encode(pal, "PNG", transparency=0))
    idx = np.asarray(pal) == 0
    assert idx.any()
    np.testing.assert_array_equal(out[idx][0], BACKGROUND)


def test_rgba_composited_on_neutral_background():
    rgba = np.zeros((50, 60, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :30, 3] = 255          # left half opaque red, right half transparent
    rgba[:, 30:40, 3] = 128        # a half-transparent band
    out = load_photo(_encode(Image.fromarray(rgba), "PNG"))
    np.testing.assert_array_equal(out[0, 0], (255, 0, 0))
    np.testing.assert_array_equal(out[0, 50], BACKGROUND)
    assert 180 < out[0, 35, 0] < 200 and 55 < out[0, 35, 1] < 70   # halfway to grey
    la = Image.merge("LA", [Image.new("L", (60, 50), 255), Image.fromarray(rgba[..., 3])])
    out = load_photo(_encode(la, "PNG"))
    np.testing.assert_array_equal(out[0, 0], (255, 255, 255))
    np.testing.assert_array_equal(out[0, 50], BACKGROUND)


def test_cmyk_jpeg_and_tiff():
    rgb = _gradient()
    cmyk = Image.fromarray(rgb).convert("CMYK")
    for fmt in ("JPEG", "TIFF"):
        out = load_photo(_encode(cmyk, fmt))
        assert out.shape == (120, 160, 3)
        assert np.abs(out.astype(int) - rgb).mean() < 12, fmt


def _png16_rgb(rgb16: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16bit_png_and_tiff_are_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    im16 = Image.fromarray(ramp)
    assert im16.mode.startswith("I;16")
    for fmt in ("PNG", "TIFF"):
        out = load_photo(_encode(im16, fmt))
        want = np.rint(ramp / 257.0)
        assert np.abs(out[..., 0].astype(int) - want).max() <= 1, fmt
    rgb16 = np.zeros((8, 8, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 50000, 1000, 65535
    out = load_photo(_png16_rgb(rgb16))
    assert np.abs(out[0, 0].astype(int) - [195, 4, 255]).max() <= 1
    tifffile = pytest.importorskip("tifffile")
    b = io.BytesIO()
    tifffile.imwrite(b, rgb16, photometric="rgb")
    assert np.abs(load_photo(b.getvalue())[0, 0].astype(int) - [195, 4, 255]).max() <= 1
    f = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    out = load_photo(_encode(Image.fromarray(f), "TIFF"))
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255


def test_50_megapixel_jpeg_is_reduced_on_decode():
    w, h = 8660, 5774                               # 50.0 MP
    im = Image.new("RGB", (w, h), (90, 140, 200))
    im.paste((250, 20, 20), (0, 0, w // 2, h // 2))  # top-left quarter red
    data = _encode(im, "JPEG", quality=70)
    del im
    out = load_photo(data)
    assert max(out.shape[:2]) <= MAX_SIDE
    assert abs(out.shape[1] / out.shape[0] - w / h) < 0.01
    assert np.abs(out[10, 10].astype(int) - [250, 20, 20]).max() < 12
    assert np.abs(out[-10, -10].astype(int) - [90, 140, 200]).max() < 12


def test_large_png_reduced(tmp_path):
    w, h = 9000, 1200                               # not JPEG: integer reduce + resize
    im = Image.new("L", (w, h), 30)
    im.paste(220, (w // 2, 0, w, h))
    p = tmp_path / "wide.png"
    im.save(p, compress_level=1)
    out = load_photo(p)
    assert out.shape[1] == MAX_SIDE and out.shape[0] == round(h * MAX_SIDE / w)
    assert out[5, 5, 0] == 30 and out[5, -5, 0] == 220
    small = load_photo(p, max_side=500)
    assert max(small.shape[:2]) == 500


def test_truncated_jpeg_names_the_file(tmp_path):
    data = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), np.uint8)), "JPEG")
    p = tmp_path / "half.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"half\.jpg.*truncated"):
        load_photo(p)


def test_truncated_png(tmp_path):
    data = _encode(Image.fromarray(_gradient(300, 300)), "PNG")
    p = tmp_path / "cut.png"
    p.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match=r"cut\.png"):
        load_photo(p)


def test_not_an_image_empty_missing_folder(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello, I am not a photo\n" * 10)
    with pytest.raises(UserError, match=r"notes\.txt: not an image"):
        load_photo(txt)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match=r"empty\.jpg.*empty"):
        load_photo(empty)
    with pytest.raises(UserError, match=r"missing\.jpg: no such file"):
        load_photo(tmp_path / "missing.jpg")
    with pytest.raises(UserError, match="folder"):
        load_photo(tmp_path)
    with pytest.raises(UserError, match="empty"):
        load_photo(b"")


def test_heic_gets_a_hint(tmp_path):
    p = tmp_path / "IMG_0001.HEIC"
    p.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 100)
    with pytest.raises(UserError, match=r"IMG_0001\.HEIC.*HEIC"):
        load_photo(p)


def test_corrupt_body_is_a_user_error(tmp_path):
    noise = np.random.default_rng(1).integers(0, 255, (200, 200, 3), np.uint8)
    data = bytearray(_encode(Image.fromarray(noise), "PNG"))
    data[5000:5200] = b"\xff" * 200                  # smash the compressed stream (CRC fails)
    p = tmp_path / "smashed.png"
    p.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"smashed\.png"):
        load_photo(p)
