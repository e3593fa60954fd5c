"""Benchmark Create from photo in Blender: a 12 MP JPEG -> the avatar's rig updated, through the
add-on's operator (``bpy.ops.likeness.create_from_photo``, synchronous path), headless.

    python scripts/bench_addon.py [--runs 5] [--model M.onnx] [--input-size 128] [--json out.json]

The photo is scikit-image's public-domain astronaut portrait upscaled onto a 4000x3000 canvas.
The estimator is ``--model``, else the pack's installed model, else the real estimator
architecture (``training/estimator/model.py``: ResNet-18 + heads, random weights) exported at the
"cpu" config's input size, which costs the same time as a trained one.

Reported: the first call (loads the estimator and the face detector) and the median of the
following calls (the loaded estimator is cached by the add-on), each split into the backend's
stages (load, detect, align, estimator) and the Blender side (add/apply to the rig, crop image,
undo push).
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



def make_photo(path: Path) -> Path:
    from PIL import Image
    from skimage import data
    face = Image.fromarray(data.astronaut()).resize((3000, 3000), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (4000, 3000), (120, 130, 140))
    canvas.paste(face, (500, 0))
    canvas.save(path, "JPEG", quality=92)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--model", help="estimator .onnx (default: installed, else a stand-in)")
    ap.add_argument("--input-size", type=int, default=128, help="stand-in estimator input size")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    import bpy
    import addon_utils          # importable once bpy is
    from likeness.addon import photo as photo_ops
    from likeness.backend.errors import UserError
    from likeness.backend.models import find_model
    from likeness.backend.schema import find_pack
    from likeness.render_engine import avatar

    pack = find_pack("default")
    addon_utils.enable("likeness", default_set=True)
    bpy.ops.wm.read_homefile(use_empty=True)
    bpy.ops.ed.undo_push(message="bench")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photo = make_photo(tmp / "astronaut_12mp.jpg")
        model_note = ""
        if args.model:
            model = Path(args.model)
        else:
            try:
                model = find_model(pack)
            except UserError:
                from likeness.training.estimator.export import export_stand_in
                t = time.perf_counter()
                model = export_stand_in(pack, tmp / "estimator.onnx", args.input_size)
                model_note = (f"stand-in: ResNet-18 estimator, random weights, input "
                              f"{args.input_size} (export {time.perf_counter() - t:.1f} s)")
        run = lambda: bpy.ops.likeness.create_from_photo(  # noqa: E731
            "EXEC_DEFAULT", True, filepath=str(photo), model=str(model))

        photo_ops.clear_cache()
        records = []
        for i in range(args.runs + 1):
            t = time.perf_counter()
            result = run()
            total = time.perf_counter() - t
            assert result == {"FINISHED"}, result
            coll = avatar.active_avatar()
            info = avatar.prediction_info(coll)
            stages = {k: v / 1000 for k, v in info["timings_ms"].items() if k != "total"}
            records.append({**stages, "total": total})
        pred = next(iter(photo_ops._PREDICTORS.values()))
        device = f"{pred.model.device} ({', '.join(pred.model.providers)})"
        load_s = pred.load_seconds
        for i, r in enumerate(records):
            r["model_load"] = load_s if i == 0 else 0.0
            r["blender"] = r["total"] - r["model_load"] - (r["load"] + r["detect"] + r["align"]
                                                           + r["estimator"])
        first, rest = records[0], records[1:]
        med = {k: statistics.median(r[k] for r in rest) for k in rest[0]}
        photo_mb = photo.stat().st_size / 1e6

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; Blender {bpy.app.version_string} (bpy module, headless)")
    print(f"photo: 12 MP JPEG (4000x3000, {photo_mb:.1f} MB); "
          f"estimator {model.name} on {device}; {model_note}")
    print()
    print(f"| photo -> rig through the operator | first call | median of {args.runs} |")
    print("|---|---:|---:|")
    for k in ("model_load", "load", "detect", "align", "estimator", "blender", "total"):
        label = {"blender": "Blender: apply to rig, crop image, undo push",
                 "model_load": "estimator session load (cached afterwards)",
                 "total": "**total (operator call)**"}.get(k, f"backend: {k}")
        print(f"| {label} | {first[k] * 1000:.0f} ms | {med[k] * 1000:.0f} ms |")
    if args.json:
        Path(args.json).write_text(json.dumps({"first": first, "median": med, "runs": args.runs,
                                               "device": device, "model": model_note or str(model)},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
