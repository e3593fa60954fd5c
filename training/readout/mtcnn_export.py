"""Export the MTCNN face detector (PNet, RNet, ONet) to ONNX for ``backend/face_detect.py``.

The weights are the MIT-licensed state dicts shipped inside the ``facenet-pytorch`` wheel
(``facenet_pytorch/data/{pnet,rnet,onet}.pt``; Tim Esler's port of the original MTCNN release by
Zhang et al.). We never install that package (it pulls torchvision): download the wheel only and
point this script at it::

    pip download --no-deps facenet-pytorch -d /tmp/fp
    python -m likeness.training.readout.mtcnn_export --wheel-dir /tmp/fp

``--wheel-dir`` may hold the ``.whl`` itself or an unpacked tree containing
``facenet_pytorch/data/*.pt``. The modules below are our own, written to match the state-dict keys
and the tensor layout of that port (the dense layers of RNet/ONet read a (W, H)-transposed feature
map, a legacy of the original Caffe models). Outputs are written to ``models/mtcnn/`` and checked
against torch (max abs diff) before the script returns.

ONNX interface (float32, NCHW, RGB, input normalised as ``(x - 127.5) / 128``):
  * pnet: ``input`` [B, 3, H, W] (H, W >= 12, dynamic) -> ``reg`` [B, 4, H', W'], ``prob`` [B, 2, H', W']
  * rnet: ``input`` [B, 3, 24, 24] -> ``reg`` [B, 4], ``prob`` [B, 2]
  * onet: ``input`` [B, 3, 48, 48] -> ``reg`` [B, 4], ``landmarks`` [B, 10] (x1..x5, y1..y5), ``prob`` [B, 2]
"""
from __future__ import annotations

import argparse
import io
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

OUT_DIR = Path(__file__).resolve().parents[2] / "models" / "mtcnn"
OPSET = 17


class PNet(nn.Module):
    """Proposal network: fully convolutional, 12x12 receptive field, stride 2."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


class RNet(nn.Module):
    """Refinement network on 24x24 crops."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)   # Caffe's (W, H) order
        x = self.prelu4(self.dense4(x))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    """Output network on 48x48 crops: box refinement, score and 5 landmarks."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)
        x = self.prelu5(self.dense5(x))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


NETS = {
    "pnet": (PNet, (1, 3, 37, 53), ["reg", "prob"]),
    "rnet": (RNet, (1, 3, 24, 24), ["reg", "prob"]),
    "onet": (ONet, (1, 3, 48, 48), ["reg", "landmarks", "prob"]),
}

LICENSE_TEXT = """\
MTCNN face detector weights (pnet.onnx, rnet.onnx, onet.onnx)
================================================================

Origin: the state dicts pnet.pt, rnet.pt, onet.pt shipped in the facenet-pytorch wheel
(facenet-pytorch {version}, https://github.com/timesler/facenet-pytorch), by Tim Esler, released
under the MIT licence (below). Those weights are a port of the pretrained models released by the
original MTCNN authors: K. Zhang, Z. Zhang, Z. Li, Y. Qiao, "Joint Face Detection and Alignment
using Multitask Cascaded Convolutional Networks", IEEE Signal Processing Letters 2016
(https://github.com/kpzhang93/MTCNN_face_detection_alignment).

Converted to ONNX by likeness/training/readout/mtcnn_export.py (our own module definitions; the numbers
are unchanged). Re-create with:
    pip download --no-deps facenet-pytorch -d /tmp/fp
    python -m likeness.training.readout.mtcnn_export --wheel-dir /tmp/fp

--- facenet-pytorch licence ---------------------------------------------------------------

{license}
"""


def _read_wheel(wheel_dir: Path) -> tuple[dict[str, bytes], str, str]:
    """{net: state-dict bytes}, the wheel's licence text and version, from a wheel or unpacked tree."""
    wheel_dir = Path(wheel_dir)
    wheels = sorted(wheel_dir.glob("facenet_pytorch-*.whl")) if wheel_dir.is_dir() else [wheel_dir]
    wheels = [w for w in wheels if w.suffix == ".whl" and w.is_file()]
    if wheels:
        whl = wheels[-1]
        version = whl.name.split("-")[1]
        with zipfile.ZipFile(whl) as z:
            names = z.namelist()
            blobs = {n: z.read(f"facenet_pytorch/data/{n}.pt") for n in NETS}
            lic = [x for x in names if x.endswith(".dist-info/LICENSE.md") or x.endswith(".dist-info/LICENSE")]
            license_text = z.read(lic[0]).decode() if lic else ""
        return blobs, license_text, version
    data = next((p for p in wheel_dir.rglob("facenet_pytorch/data") if p.is_dir()), None)
    if data is None:
        raise SystemExit(f"{wheel_dir}: no facenet_pytorch-*.whl and no facenet_pytorch/data folder; "
                         "run: pip download --no-deps facenet-pytorch -d DIR")
    blobs = {n: (data / f"{n}.pt").read_bytes() for n in NETS}
    lic = next(iter(wheel_dir.rglob("facenet_pytorch-*.dist-info/LICENSE*")), None)
    version = lic.parent.name.split("-")[1].removesuffix(".dist") if lic else "unknown"
    return blobs, (lic.read_text() if lic else ""), version


def build(name: str, state_bytes: bytes) -> nn.Module:
    cls = NETS[name][0]
    net = cls()
    state = torch.load(io.BytesIO(state_bytes), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval()


def export_one(name: str, net: nn.Module, out: Path) -> float:
    """Export one net and return the max abs diff ONNX vs torch over a few random inputs."""
    import onnx
    import onnxruntime as ort
    _, shape, outputs = NETS[name]
    dyn = {"input": {0: "batch"}}
    if name == "pnet":
        dyn["input"].update({2: "height", 3: "width"})
        for o in outputs:
            dyn[o] = {0: "batch", 2: "out_height", 3: "out_width"}
    else:
        for o in outputs:
            dyn[o] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the TorchScript exporter's deprecation notice
        torch.onnx.export(net, (torch.randn(*shape),), str(out), dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=outputs, dynamic_axes=dyn,
                          do_constant_folding=True)
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    model.doc_string = f"MTCNN {name} (weights: facenet-pytorch, MIT; see LICENSE.txt)"
    onnx.save(model, str(out))

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    shapes = ([(1, 3, 12, 12), (2, 3, 37, 53), (1, 3, 120, 97)] if name == "pnet"
              else [(1, 3) + shape[2:], (7, 3) + shape[2:]])
    worst = 0.0
    for s in shapes:
        x = rng.uniform(-1, 1, size=s).astype(np.float32)
        with torch.no_grad():
            ref = [t.numpy() for t in net(torch.from_numpy(x))]
        got = sess.run(outputs, {"input": x})
        for r, g in zip(ref, got):
            if r.shape != g.shape:
                raise SystemExit(f"{name}: ONNX output shape {g.shape} != torch {r.shape} for input {s}")
            worst = max(worst, float(np.abs(r - g).max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m likeness.training.readout.mtcnn_export", description=__doc__.splitlines()[0])
    ap.add_argument("--wheel-dir", required=True, help="folder with the facenet_pytorch wheel (or unpacked)")
    ap.add_argument("--out", default=str(OUT_DIR), help=f"output folder (default {OUT_DIR})")
    ap.add_argument("--tolerance", type=float, default=1e-5)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    blobs, license_text, version = _read_wheel(Path(args.wheel_dir))
    failed = False
    for name in NETS:
        net = build(name, blobs[name])
        path = out / f"{name}.onnx"
        diff = export_one(name, net, path)
        ok = diff <= args.tolerance
        failed |= not ok
        print(f"{name}: {path} ({path.stat().st_size / 1024:.0f} KiB), max |onnx - torch| = {diff:.2e}"
              f" {'ok' if ok else 'FAILED'}")
    (out / "LICENSE.txt").write_text(LICENSE_TEXT.format(version=version, license=license_text.strip()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
