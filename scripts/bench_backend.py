"""Benchmark the photo -> vector backend on this machine.

* a 12 MP JPEG (the public-domain astronaut portrait of scikit-image, upscaled onto a 4000x3000
  canvas) -> vector: median time of each stage (load, detect, align, estimator) over a few runs;
* the estimator alone, a ResNet-18-sized ONNX model (``training/common/resnet.py``, random weights) for a
  synthetic pack: images per second at batch 1 and batch 32.

    python scripts/bench_backend.py [--runs 5] [--input-size 224] [--threads 0] [--json out.json]
    python scripts/bench_backend.py --shipped [--colours photo|model] [--runs 5] [--threads 0]

``--shipped``: the default pack's shipped estimator instead, with photo colours (face parser +
colour matching and the shape fit: the ``parser``, ``colours`` and ``shape`` stages) unless ``--colours model``.

Needs torch (to build and export the benchmark model) besides the backend's own dependencies.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


from likeness.backend.predict import Predictor  # noqa: E402
from likeness.backend.schema import load_pack  # noqa: E402

BENCH_PACK = """
[pack]
id = "bench"
name = "Benchmark pack (synthetic)"
builder = "none"
{params}
{slots}
"""


def make_pack(folder: Path, n_params: int = 48, slot_sizes=(8, 6, 5, 4, 4, 3, 3, 2, 2, 12)):
    params = "".join(f'\n[[parameters]]\nname = "p{i:02d}"\nmin = 0.0\nmax = 1.0\n' for i in range(n_params))
    slots = "".join(
        f'\n[[slots]]\nname = "s{j}"\noptions = [' + ", ".join(f'{{ id = "o{k}" }}' for k in range(n)) + "]\n"
        for j, n in enumerate(slot_sizes))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pack.toml").write_text(BENCH_PACK.format(params=params, slots=slots))
    return load_pack(folder)


def make_photo(path: Path) -> Path:
    from skimage import data
    face = Image.fromarray(data.astronaut()).resize((3000, 3000), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (4000, 3000), (120, 130, 140))
    canvas.paste(face, (500, 0))
    canvas.save(path, "JPEG", quality=92)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=0, help="estimator threads (0: onnxruntime default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json")
    ap.add_argument("--shipped", action="store_true", help="the default pack's shipped model")
    ap.add_argument("--colours", choices=["photo", "model"], help="with --shipped (default photo)")
    args = ap.parse_args(argv)
    if args.shipped:
        return bench_shipped(args)

    import torch
    from likeness.training.estimator.export import export_estimator
    from likeness.training.common.resnet import ResNetEstimator

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pack = make_pack(tmp / "bench")
        photo = make_photo(tmp / "astronaut_12mp.jpg")
        torch.manual_seed(0)
        model = ResNetEstimator(pack.n_continuous, pack.slot_sizes)
        t = time.perf_counter()
        onnx_path = export_estimator(model, pack, tmp / "resnet18.onnx", args.input_size,
                                     (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        export_s = time.perf_counter() - t
        pred = Predictor(pack, onnx_path, device=args.device, threads=args.threads)

        pred.predict(photo)   # warm-up
        stages = {k: [] for k in ("load", "detect", "align", "estimator", "total")}
        for _ in range(args.runs):
            r = pred.predict(photo)
            for k in stages:
                stages[k].append(r.timings[k])
        med = {k: statistics.median(v) * 1000 for k, v in stages.items()}

        rng = np.random.default_rng(0)
        S = args.input_size
        throughput = {}
        for batch, reps in ((1, max(10, 4 * args.runs)), (32, max(2, args.runs // 2))):
            x = rng.integers(0, 256, (batch, S, S, 3), dtype=np.uint8)
            pred.model.max_batch = batch
            pred.model.run(x)
            t = time.perf_counter()
            for _ in range(reps):
                pred.model.run(x)
            dt = time.perf_counter() - t
            throughput[batch] = batch * reps / dt

        size_mb = onnx_path.stat().st_size / 1e6
        params_m = sum(p.numel() for p in model.parameters()) / 1e6

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; estimator on {pred.model.device} ({', '.join(pred.model.providers)})")
    print(f"photo: 12 MP JPEG (4000x3000); face found: {r.face.eye_distance:.0f} px between the eyes; "
          f"photo as loaded {r.photo_size[0]}x{r.photo_size[1]}")
    print(f"estimator: ResNet-18 ({params_m:.1f} M parameters, {size_mb:.0f} MB ONNX), input {S}x{S}; "
          f"export + parity check {export_s:.1f} s; session load {pred.load_seconds * 1000:.0f} ms\n")
    print("| stage (median of %d runs) | ms |" % args.runs)
    print("|---|---:|")
    for k in ("load", "detect", "align", "estimator", "total"):
        print(f"| {k} | {med[k]:.0f} |")
    print("\n| estimator throughput | images/s |")
    print("|---|---:|")
    for b, v in throughput.items():
        print(f"| batch {b} | {v:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"stages_ms": med, "images_per_s": throughput,
                                               "input_size": S, "device": pred.model.device}, indent=2))
    return 0


def bench_shipped(args) -> int:
    from likeness.backend.models import find_model
    from likeness.backend.schema import find_pack
    pack = find_pack("default")
    with tempfile.TemporaryDirectory() as tmp:
        photo = make_photo(Path(tmp) / "astronaut_12mp.jpg")
        pred = Predictor(pack, find_model(pack), device=args.device, threads=args.threads,
                         colours=args.colours)
        pred.predict(photo)   # warm-up (builds the colour tables)
        keys = ["load", "detect", "align", "estimator", "parser", "colours", "shape", "total"]
        stages = {k: [] for k in keys}
        for _ in range(args.runs):
            r = pred.predict(photo)
            for k in keys:
                stages[k].append(r.timings.get(k, 0.0))
    med = {k: statistics.median(v) * 1000 for k, v in stages.items()}
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; shipped estimator, colours: {pred.colour_mode} "
          f"({pred.colour_note}); session load {pred.load_seconds * 1000:.0f} ms\n")
    print("| stage (median of %d runs) | ms |" % args.runs)
    print("|---|---:|")
    for k in keys:
        print(f"| {k} | {med[k]:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"stages_ms": med, "colours": pred.colour_mode}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
