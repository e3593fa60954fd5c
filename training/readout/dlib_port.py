"""Port of dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) to ONNX.

The shipped ``models/attributes/descriptor.onnx`` is dlib's 128-d face descriptor, so the
backend gets a frozen real-face prior with numpy + ONNX Runtime only (no dlib at inference).

Provenance and licence: the ``.dat`` comes from the ``face_recognition_models-0.3.0`` sdist. Its
LICENSE file is CC0 1.0 Universal, its README says the models were "created by Davis King
(dlib-models) and are licensed in the public domain or under CC0 1.0" (setup.py's "MIT"
classifier is the packaging's, not the models'). dlib-models' README: trained by Davis King on
~3M faces (FaceScrub, VGG-Face and images scraped from the web), released into the public domain.

Input of the ONNX (``images``, float32 [N,3,150,150], NCHW, RGB) is exactly what dlib's
``input_rgb_image_sized<150>`` layer feeds the net::

    images[n, c] = (chip_rgb_uint8[..., c] - MEAN_RGB[c]) / 256      # MEAN_RGB from the .dat:
                                                                     # 122.782, 117.001, 104.298

where ``chip`` is a 150x150 face chip aligned the way ``dlib.get_face_chip(img, shape, 150, 0.25)``
does it (5-point landmarks). Output ``descriptor`` [N,128] is the raw fc output, *not*
normalised (its L2 norm is ~1.3-1.7 on faces); dlib's "same person" rule is L2 distance < 0.6.
Output ``map`` [N,128,4,4] is the net's 128-channel level (8x8 after the third stage) averaged
to 4x4 cells, for the attribute reader (what a face wears, which the descriptor discards).

Network (dnn_face_recognition_ex.cpp), with dlib's defaults made explicit:
  * con<N,k,k,s,s>: padding k//2 when stride 1, **0 when stride 2** (7x7/2 stem and 3x3/2 downs).
  * max_pool<3,3,2,2> and avg_pool<2,2,2,2>: padding 0 (stride != 1); output 1+(H-k)//s (floor).
  * affine: per-channel y = gamma*x + beta (the frozen batch-norm), no eps.
  * add_prev: output has the elementwise max of both shapes, the smaller input zero-padded at
    the end -- in channels (32->64 etc. at each ares_down) *and* in space: at 8x8 the strided
    block gives 3x3 but avg_pool gives 4x4, at 4x4 it gives 1x1 vs 2x2.
  * avg_pool_everything, then fc_no_bias<128> (dlib stores W as [inputs, outputs]).

File format (dlib/serialize.h, dlib/dnn/core.h): ints are variable length -- one byte
``sign(0x80)|nbytes`` then nbytes little-endian magnitude; floats are int mantissa + int exponent
(value = m * 2**e); strings are int length + bytes; bools are the chars '0'/'1'; tensors are
int version(2), num_samples, k, nr, nc (ints) then raw little-endian float32. The net is written
from the top: loss layer first (version, "loss_metric_2", margin, threshold), then each add_layer
writes its version and *then its subnetwork*, so all versions (2 = add_layer, 1 = tag/skip, which
carry nothing else, 3 = the layer on the input) come first and the layer details follow from the
input upward, each followed by 3 bools and empty cached tensors.
"""
from __future__ import annotations

import tarfile
import warnings
from pathlib import Path

import numpy as np

try:  # torch is needed only to build and export; the parser and chip helper are numpy-only
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:  # e.g. the side venv holding dlib-bin for the parity check
    torch = F = nn = None

DAT_NAME = "dlib_face_recognition_resnet_model_v1.dat"
CHIP = 150
# Where dlib.get_face_chip(..., 150, 0.25) lands, on average, in a 512x512 CelebA-HQ-aligned face
# (measured with dlib's HOG detector + 5-point model on 40 faces: left 81, top 137, size 356).
FIXED_CHIP_BOX = (78, 136, 360)  # left, top, size


# --------------------------------------------------------------------------------------------
# .dat parser (numpy only)

class _Reader:
    def __init__(self, data: bytes):
        self.b, self.p = data, 0

    def int(self) -> int:
        head = self.b[self.p]
        n = head & 0x0F
        v = int.from_bytes(self.b[self.p + 1:self.p + 1 + n], "little")
        self.p += 1 + n
        return -v if head & 0x80 else v

    def str(self) -> str:
        n = self.int()
        s = self.b[self.p:self.p + n].decode("ascii")
        self.p += n
        return s

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int()
        return float(np.ldexp(float(mantissa), exponent))

    def bool(self) -> bool:
        c = self.b[self.p:self.p + 1]
        self.p += 1
        if c not in (b"0", b"1"):
            raise ValueError(f"bad bool {c!r} at byte {self.p - 1}")
        return c == b"1"

    def tensor(self) -> np.ndarray:
        if (v := self.int()) != 2:
            raise ValueError(f"tensor version {v} at byte {self.p}")
        shape = [self.int() for _ in range(4)]
        n = int(np.prod(shape))
        a = np.frombuffer(self.b, "<f4", n, self.p).reshape(shape).copy()
        self.p += 4 * n
        return a

    def alias(self) -> list[int]:  # alias_tensor: a shape view into the params tensor
        if (v := self.int()) != 1:
            raise ValueError(f"alias_tensor version {v}")
        return [self.int() for _ in range(4)]


def read_dat_bytes(src) -> bytes:
    """Bytes of the descriptor .dat, from the .dat itself or from the face_recognition_models sdist."""
    src = Path(src)
    if src.suffix == ".dat":
        return src.read_bytes()
    with tarfile.open(src) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/" + DAT_NAME))
        return tar.extractfile(member).read()


def _layer_details(r: _Reader) -> dict:
    name = r.str()
    d = {"type": name}
    if name == "con_4":
        params = r.tensor().ravel()
        nf, nr, nc, sy, sx, py, px = (r.int() for _ in range(7))
        filt, bias = r.alias(), r.alias()
        [r.float() for _ in range(4)]  # learning-rate / weight-decay multipliers
        nw = int(np.prod(filt))
        d.update(weight=params[:nw].reshape(filt), bias=params[nw:nw + nf], stride=sy, pad=py)
        assert (nr, nc, sx, px, filt[0], bias[1]) == (filt[2], filt[3], sy, py, nf, nf)
    elif name == "affine_":
        params = r.tensor().ravel()
        g, _b = r.alias(), r.alias()
        if r.int() != 0:
            raise ValueError("expected a CONV_MODE affine layer")
        k = g[1]
        d.update(gamma=params[:k], beta=params[k:2 * k])
    elif name in ("max_pool_2", "avg_pool_2"):
        nr, nc, sy, sx, py, px = (r.int() for _ in range(6))
        d.update(size=nr, stride=sy, pad=py)  # size 0 = avg_pool_everything
        assert (nr, sy, py) == (nc, sx, px)
    elif name == "fc_2":
        n_out, n_in = r.int(), r.int()
        params = r.tensor()
        r.alias(), r.alias()
        if r.int() != 1:
            raise ValueError("expected fc_no_bias (bias_mode FC_NO_BIAS)")
        [r.float() for _ in range(4)]
        d.update(weight=params.reshape(n_in, n_out))  # dlib computes x @ W, W [inputs, outputs]
    elif name not in ("relu_", "add_prev_"):
        raise ValueError(f"unknown layer {name!r} at byte {r.p}")
    return d


def parse_dat(src) -> dict:
    """Parse the .dat into {'mean_rgb', 'size', 'loss', 'layers'}; layers bottom-up (input first),
    computational layers only (tags/skips hold nothing and the topology is fixed in the module)."""
    r = _Reader(read_dat_bytes(src))
    if r.int() != 1 or (loss := r.str()) != "loss_metric_2":
        raise ValueError("not a loss_metric network")
    margin, thresh = r.float(), r.float()
    versions = []
    while (v := r.int()) != 3:  # versions of every layer, top-down, until the one on the input
        if v not in (1, 2):
            raise ValueError(f"unexpected layer version {v}")
        versions.append(v)
    if r.str() != "input_rgb_image_sized":
        raise ValueError("expected input_rgb_image_sized")
    mean = np.array([r.float() for _ in range(3)], np.float32)
    nr, nc = r.int(), r.int()
    layers = []
    for i in range(versions.count(2) + 1):
        layers.append(_layer_details(r))
        [r.bool() for _ in range(3)]  # setup_called, gradient_input_is_stale, output_disabled
        for _ in range(3):  # x_grad, cached_output, params_grad (grad_final on the bottom layer)
            if r.tensor().size:
                raise ValueError("non-empty cached tensor")
        if i == 0:
            r.int()  # sample_expansion_factor
    if r.p != len(r.b):
        raise ValueError(f"{len(r.b) - r.p} trailing bytes")
    return {"mean_rgb": mean, "size": (nr, nc), "loss": (loss, margin, thresh), "layers": layers}


# --------------------------------------------------------------------------------------------
# Preprocessing helpers (numpy only)

def normalise(chips_rgb_uint8: np.ndarray, mean_rgb=(122.782, 117.001, 104.298)) -> np.ndarray:
    """[N,150,150,3] uint8 RGB chips -> [N,3,150,150] float32 input, as dlib's input layer does."""
    x = np.asarray(chips_rgb_uint8, np.float32) - np.asarray(mean_rgb, np.float32)
    return np.ascontiguousarray((x / np.float32(256)).transpose(0, 3, 1, 2))


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] integer box-filter weights (area averaging, any factor): output pixel k covers
    [k*n_in, (k+1)*n_in) and input pixel p covers [p*n_out, (p+1)*n_out) in units of 1/n_out
    input pixels; each row sums to n_in. Integers keep the chip exact on any machine."""
    lo = np.arange(n_out)[:, None] * n_in
    px = np.arange(n_in)[None, :] * n_out
    return np.clip(np.minimum(lo + n_in, px + n_out) - np.maximum(lo, px), 0, None).astype(np.int64)


def fixed_chip(img_rgb_uint8: np.ndarray, box=FIXED_CHIP_BOX) -> np.ndarray:
    """A 150x150 uint8 chip from a fixed square (left, top, size) of an image, area-resampled in
    exact integer arithmetic so that it is bit-identical wherever it runs (tests, the dlib side
    venv). It stands in for dlib's alignment only on faces already aligned like CelebA-HQ."""
    left, top, size = (int(v) for v in box)
    crop = np.asarray(img_rgb_uint8)[top:top + size, left:left + size].astype(np.int64)
    w = _area_weights(size, CHIP)
    total = np.einsum("lk,ikc->ilc", w, np.einsum("ij,jkc->ikc", w, crop))  # rows, then columns
    return ((total + size * size // 2) // (size * size)).astype(np.uint8)  # round half up


# --------------------------------------------------------------------------------------------
# Torch module

_Module = nn.Module if nn is not None else object


class Affine(_Module):
    """dlib affine_ (a frozen batch-norm): y = gamma[c] * x + beta[c]."""

    def __init__(self, n):
        super().__init__()
        # stored [n,1,1] so that the ONNX keeps them as named initializers (no folded reshape)
        self.gamma = nn.Parameter(torch.ones(n, 1, 1))
        self.beta = nn.Parameter(torch.zeros(n, 1, 1))

    def forward(self, x):
        return x * self.gamma + self.beta


def _out(size, k, s, p):
    return 1 + (size + 2 * p - k) // s


class Residual(_Module):
    """ares / ares_down: relu(add_prev(block(x), x or avg_pool(x))), with dlib's zero padding."""

    def __init__(self, cin, n, down, size):
        super().__init__()
        s, p = (2, 0) if down else (1, 1)  # dlib: padding k//2 only when stride is 1
        self.conv1, self.bn1 = nn.Conv2d(cin, n, 3, s, p), Affine(n)
        self.conv2, self.bn2 = nn.Conv2d(n, n, 3, 1, 1), Affine(n)
        self.down = down
        y = _out(size, 3, s, p)                         # block output size
        x = _out(size, 2, 2, 0) if down else size       # shortcut size
        self.out_size = max(x, y)
        # add_prev zero-pads the smaller tensor at the end (bottom/right, trailing channels)
        self.pad_y = (0, self.out_size - y, 0, self.out_size - y, 0, 0)
        self.pad_x = (0, self.out_size - x, 0, self.out_size - x, 0, n - cin)

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.down:
            x = F.avg_pool2d(x, 2, 2)
        if any(self.pad_x):
            x = F.pad(x, self.pad_x)
        if any(self.pad_y):
            y = F.pad(y, self.pad_y)
        return F.relu(x + y)


# (filters, number of ares, first one is ares_down), input side first
LEVELS = [(32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True)]


MAP_LEVEL = 10    # blocks before the map: the 128-channel level, 8x8 at the 150 px chip


class DlibFaceResNet(_Module):
    """dlib's anet_type without the loss layer: [N,3,150,150] normalised input -> (descriptor
    [N,128], map [N,128,4,4]). The map is the net's 128-channel level averaged to 4x4 cells: it still
    holds where things are and what they look like (glasses, a hat's brim, a fringe), which the
    descriptor, trained to name the person whatever they wear, learned to discard."""

    def __init__(self):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 32, 7, 2, 0), Affine(32)
        size = _out(_out(CHIP, 7, 2, 0), 3, 2, 0)  # 150 -> 72 -> 35
        blocks, cin = [], 32
        for n, count, down in LEVELS:
            for i in range(count):
                blocks.append(Residual(cin, n, down and i == 0, size))
                cin, size = n, blocks[-1].out_size
        self.blocks = nn.Sequential(*blocks)  # spatial: 35, 17, 8, 4 (3x3 padded), 2
        self.fc = nn.Parameter(torch.zeros(256, 128))  # fc_no_bias, dlib's layout: x @ W

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn0(self.conv0(x))), 3, 2)
        mid = self.blocks[:MAP_LEVEL](x)
        x = self.blocks[MAP_LEVEL:](mid).mean((2, 3))  # avg_pool_everything
        return x @ self.fc, F.avg_pool2d(mid, 2, 2)       # map: 8x8 -> 4x4 cells


def state_dict_from_dat(parsed: dict) -> dict:
    """{DlibFaceResNet parameter name: array} from the parsed layers (bottom-up order); the same
    names are the initializers of the exported ONNX. Checks the file's topology on the way."""
    pools = [(d["size"], d["stride"], d["pad"]) for d in parsed["layers"]
             if d["type"] in ("max_pool_2", "avg_pool_2")]
    if pools != [(3, 2, 0)] + [(2, 2, 0)] * 4 + [(0, 1, 0)]:
        raise ValueError(f"pooling layers differ from anet_type: {pools}")
    comp = [d for d in parsed["layers"] if d["type"] in ("con_4", "affine_", "fc_2")]
    n_blocks = sum(count for _, count, _ in LEVELS)
    prefixes = ["conv0", "bn0"] + [f"blocks.{i}.{m}" for i in range(n_blocks)
                                  for m in ("conv1", "bn1", "conv2", "bn2")]
    if len(comp) != len(prefixes) + 1 or comp[-1]["type"] != "fc_2":
        raise ValueError(f"{len(comp)} parameter layers in the file, {len(prefixes) + 1} expected")
    sd = {}
    for pre, d in zip(prefixes, comp):
        if d["type"] != ("con_4" if "conv" in pre else "affine_"):
            raise ValueError(f"{pre}: file has {d['type']}")
        if d["type"] == "con_4":
            sd[pre + ".weight"], sd[pre + ".bias"] = d["weight"], d["bias"]
        else:
            sd[pre + ".gamma"], sd[pre + ".beta"] = d["gamma"][:, None, None], d["beta"][:, None, None]
    sd["fc"] = comp[-1]["weight"]
    return sd


def load_weights(net: "DlibFaceResNet", parsed: dict) -> "DlibFaceResNet":
    """Copy the parsed weights into the module; shapes, strides and paddings must agree."""
    sd = state_dict_from_dat(parsed)
    file_convs = [(d["stride"], d["pad"]) for d in parsed["layers"] if d["type"] == "con_4"]
    net_convs = [(m.stride[0], m.padding[0]) for m in net.modules() if isinstance(m, nn.Conv2d)]
    if file_convs != net_convs:
        raise ValueError(f"conv strides/paddings differ: file {file_convs}, module {net_convs}")
    net.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()})
    return net.eval()


def export_face_descriptor(sdist_or_dat, out_onnx) -> Path:
    """Parse dlib's .dat (or the sdist holding it), build the torch net and write the ONNX."""
    import onnx

    parsed = parse_dat(sdist_or_dat)
    assert parsed["size"] == (CHIP, CHIP)
    net = load_weights(DlibFaceResNet(), parsed)
    out_onnx = Path(out_onnx)
    out_onnx.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, 3, CHIP, CHIP)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation / folding notices
        torch.onnx.export(net, (dummy,), str(out_onnx), input_names=["images"],
                          output_names=["descriptor", "map"], opset_version=17, dynamo=False,
                          dynamic_axes={"images": {0: "N"}, "descriptor": {0: "N"}, "map": {0: "N"}})
    model = onnx.load(str(out_onnx))
    mean = ", ".join(f"{m:.6g}" for m in parsed["mean_rgb"])
    meta = {
        "model": "dlib_face_recognition_resnet_model_v1 (dlib 128-d face descriptor), ported",
        "input": "images: float32 [N,3,150,150] NCHW RGB = (chip_uint8 - mean_rgb) / 256",
        "mean_rgb": mean,
        "scale": "1/256",
        "chip": "150x150 face chip aligned as dlib.get_face_chip(img, 5-point shape, 150, 0.25)",
        "output": "descriptor: float32 [N,128], raw (not unit-normalised); same person if L2 < 0.6",
        "map": "map: float32 [N,128,4,4], the 128-channel level (8x8) averaged to 4x4 cells",
        "licence": "CC0 1.0 / public domain (Davis King, dlib-models; face_recognition_models 0.3.0)",
        "source": "face_recognition_models-0.3.0/" + DAT_NAME + ", converted by training/readout/dlib_port.py",
    }
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    model.producer_name = "likeness"
    model.doc_string = "dlib face-recognition ResNet (128-d face descriptor), ported by training/readout/dlib_port.py"
    from .attributes import half_weights       # float16 storage: 11 MB instead of 22
    onnx.save(half_weights(model), str(out_onnx))
    return out_onnx


# --------------------------------------------------------------------------------------------
# Reference descriptors from dlib itself (run in a side venv holding dlib-bin, numpy and pillow)

def write_reference_fixture(sdist_or_dat, out_json, photos: dict) -> Path:
    """Descriptors by dlib-bin for fixed chips (see fixed_chip) of {name: (image_path, box)} and of
    their mirror images -> a small JSON (descriptors only, never pixels) for tests/test_dlib_port.py.
    An image may be given as .npy (skimage.data.astronaut() saved, as the side venv lacks skimage)."""
    import json
    import tempfile

    import dlib
    from PIL import Image

    with tempfile.NamedTemporaryFile(suffix=".dat") as f:
        f.write(read_dat_bytes(sdist_or_dat))
        f.flush()
        rec = dlib.face_recognition_model_v1(f.name)
    faces = []
    for name, (path, box) in photos.items():
        img = np.load(path) if str(path).endswith(".npy") else np.array(Image.open(path).convert("RGB"))
        chip = fixed_chip(img, box)
        desc = [np.array(rec.compute_face_descriptor(c)).round(7).tolist()
                for c in (chip, np.ascontiguousarray(chip[:, ::-1]))]
        faces.append({"name": name, "box": list(box), "descriptor": desc[0], "descriptor_flipped": desc[1]})
    out = {"about": f"dlib {dlib.__version__} compute_face_descriptor(chip) on training.readout.dlib_port."
                    "fixed_chip(image, box) and on its mirror image (chip[:, ::-1])",
           "faces": faces}
    Path(out_json).write_text(json.dumps(out, indent=1) + "\n")
    return Path(out_json)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="face_recognition_models sdist (.tar.gz) or the .dat")
    ap.add_argument("out", nargs="?", default=str(Path(__file__).resolve().parents[2]
                                                  / "models/attributes/descriptor.onnx"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(export_face_descriptor(a.src, a.out))
