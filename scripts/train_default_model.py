#!/usr/bin/env python
"""Train the default pack's estimator, export it as ONNX and judge it on the real validation photos.

    python scripts/train_default_model.py [--pairs PAIRS] [--renders DATASET [--size 128]]
        --work WORK [--config cpu] [--epochs N] [--epoch-images N] [--input-size S]
        [--real-fraction 0.25] [--lambda-real 10] [--lambda-real-colour 10] [--lambda-real-shape 2]
        [--export WORK/estimator.onnx] [--validate-out WORK/validate] [--validate-limit N]
        [--no-validate] [--max-steps N] [--threads 1] [--json WORK/summary.json]

Data: a paired set (``training.estimator.model.PairedSet``: realistic pairs or renders) or an engine
render dataset (``likeness render``), converted once with ``paired_data.renders_to_paired_set``.

Real auxiliary labels (``--real-fraction`` > 0, the default 0.25): the pack's colours are
calibrated in Blender (``render_engine.calibration``, cached), the 744 real TRAIN photos are
labelled from their masks (``training.estimator.real_labels``, cached; built by ``training.pipeline.retrain.
build_real_labels``, as in the ``labels`` stage of ``likeness retrain``) and that share of every
batch is real photos scored on presence, hair length, calibrated colours and face shape (through
the shape surrogate fitted on ``--renders``). ``--real-fraction 0`` is the
plain run on the synthetic pairs alone: the with/without comparison is this one flag (use two
``--work`` folders).

Training checkpoints in WORK and resumes when run again with the same arguments. After training
the model is exported (``training.estimator.export.export_estimator``) and validated on the validation
photos (stems c-f, never trained on; ``render_engine.validate_job.validate``); every target of
``backend.fidelity.TARGETS`` is printed as PASS / FAIL.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path



def paired_from_renders(renders: Path, pack, size: int) -> Path:
    """A paired set made once from an engine render dataset (cached by its manifest and size)."""
    from likeness.backend.cache import cache_root
    from likeness.training.pairs.paired_data import renders_to_paired_set
    man = renders / "manifest.json"
    sig = hashlib.sha256(f"{renders.resolve()}:{size}:{pack.schema_hash}".encode())
    if man.is_file():
        sig.update(man.read_bytes())
    sig.update(str(sum(1 for _ in (renders / "vectors").glob("*.json"))).encode())
    out = cache_root() / "paired" / f"renders-{size}-{sig.hexdigest()[:16]}"
    if not (out / "manifest.json").is_file():
        print(f"paired set from renders {renders} -> {out}")
        renders_to_paired_set(renders, pack, out, size)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", help="paired set folder (default: one made from --renders)")
    ap.add_argument("--renders", help="engine render dataset (likeness render --out ...): the "
                    "training set without --pairs, and the shape surrogate's data either way")
    ap.add_argument("--half-weights", action="store_true",
                    help="store weights as float16 in the ONNX file (for shipping: half the size)")
    ap.add_argument("--size", type=int, default=128, help="image size of a paired set made from "
                    "--renders (default 128)")
    ap.add_argument("--pack", default="default")
    ap.add_argument("--work", required=True, help="training folder (checkpoint, resume)")
    ap.add_argument("--config", default="cpu", help="estimator config: tiny, cpu, small, paper")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--epoch-images", type=int, help="synthetic images per epoch (default: the whole "
                    "set): a budget in images, equal across paired sets of different sizes")
    ap.add_argument("--input-size", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--real-fraction", type=float, default=0.25,
                    help="share of each batch from real train photos with mask labels (0: off)")
    ap.add_argument("--lambda-real", type=float, help="weight of presence + hair-length terms")
    ap.add_argument("--lambda-real-colour", type=float, help="weight of the colour L1 term")
    ap.add_argument("--lambda-real-shape", type=float, default=2.0,
                    help="weight of the face-shape term through the shape surrogate fitted on "
                         "--renders (0: no shape labels)")
    ap.add_argument("--calibration-res", type=int, default=128)
    ap.add_argument("--pretrained", help="ImageNet ResNet-18 weights file, if you have one")
    ap.add_argument("--max-steps", type=int, help="stop after this many steps (smoke tests)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a "
                    "busy 2-core machine)")
    ap.add_argument("--export", help="ONNX path (default WORK/estimator.onnx)")
    ap.add_argument("--no-validate", action="store_true")
    ap.add_argument("--validate-out", help="validation report folder (default WORK/validate)")
    ap.add_argument("--validate-limit", type=int, help="first N validation photos only")
    ap.add_argument("--json", help="summary JSON (default WORK/summary.json)")
    args = ap.parse_args(argv)
    if not (args.pairs or args.renders):
        ap.error("give --pairs, --renders or both")

    import torch
    torch.set_num_threads(max(1, args.threads))
    from likeness.backend.schema import find_pack
    from likeness.training.estimator import model as est
    from likeness.training.estimator.export import export_estimator

    t0 = time.monotonic()
    pack = find_pack(args.pack)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pairs = Path(args.pairs) if args.pairs else paired_from_renders(Path(args.renders), pack,
                                                                   args.size)
    data = est.PairedSet(pairs, pack)
    cfg = est.get_config(args.config, epochs=args.epochs, input_size=args.input_size,
                         batch=args.batch, lr=args.lr, real_fraction=args.real_fraction,
                         lambda_real=args.lambda_real, lambda_real_colour=args.lambda_real_colour,
                         lambda_real_shape=args.lambda_real_shape, epoch_images=args.epoch_images)
    print(f"pack {pack.id} ({pack.schema_hash}); {len(data)} pairs at {data.images.shape[1]} px "
          f"from {pairs}; config {cfg.name}: {cfg.epochs} epochs, batch {cfg.batch}, input "
          f"{cfg.input_size}, real fraction {cfg.real_fraction}")

    summary: dict = {"pack": pack.id, "schema": pack.schema_hash, "pairs": str(pairs),
                     "config": asdict(cfg)}
    labels = None
    if cfg.real_fraction > 0:
        # the same labels as the `labels` stage of `likeness retrain`
        from likeness.training.pipeline.retrain import build_real_labels, describe_real_labels
        if args.lambda_real_shape > 0 and not args.renders:
            raise SystemExit("shape labels need the engine renders (--renders) to fit the shape "
                             "surrogate; or pass --lambda-real-shape 0")
        built = build_real_labels(pack, int(data.images.shape[1]),
                                  renders=args.renders if args.lambda_real_shape > 0 else None,
                                  require_shapes=True, calibration_res=args.calibration_res,
                                  log=print)
        labels = built.labels
        if built.surrogate is not None:
            summary["shape_surrogate"] = built.summary["shape_surrogate"]
        summary["real_labels"] = labels.summary()
        print(describe_real_labels(built.summary) + "; match dE00 median "
              + ", ".join(f"{k} {v['median']:.1f}" for k, v in summary["real_labels"]
                          ["residual_de00"].items() if v["median"] is not None))

    result = est.train_estimator(pack, pairs, work, cfg, pretrained=args.pretrained,
                                 max_steps=args.max_steps, real_labels=labels)
    summary["held_out"] = result
    model, cfg_trained = est.load_trained(pack, work)
    onnx_path = Path(args.export) if args.export else work / "estimator.onnx"
    import os
    import platform
    report = {"config": asdict(cfg_trained), "held_out": result, "pairs": str(pairs),
              "pairs_count": len(data), "real_labels": summary.get("real_labels", {}).get("n", 0),
              "trained_on": f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU",
              "licence": "non-commercial research use only (trained with CelebAMask-HQ photos)"
              if cfg.real_fraction > 0 else "trained on engine renders only"}
    export_estimator(model, pack, onnx_path, cfg_trained.input_size, est.IMAGENET_MEAN,
                     est.IMAGENET_STD, report=report, half_weights=args.half_weights)
    print(f"exported {onnx_path}")
    summary["model"] = str(onnx_path)

    if not args.no_validate:
        from likeness.render_engine.validate_job import validate
        out = Path(args.validate_out) if args.validate_out else work / "validate"
        report = validate(str(onnx_path), args.pack, str(out), limit=args.validate_limit)
        summary["validation"] = {"out": str(out), "detected": report["detected"],
                                 "photos": report["photos"], "targets": report["targets"]}
        print(f"validation on {report['detected']}/{report['photos']} photos "
              f"(real fraction {cfg.real_fraction}):")
        for t in report["targets"]:
            v = "n/a" if t["value"] is None else f"{t['value']:.3f}"
            print(f"  {'PASS' if t['passed'] else 'FAIL'}  {t['name']}: {v} (target {t['target']})")
        c = report["colour"]
        for name in ("hair", "skin"):
            const = (c[name].get("constant") or {}).get("median")
            if c[name]["median"] is not None and const is not None:
                print(f"  {name} colour median dE00 {c[name]['median']:.2f} vs constant {const:.2f}")
    summary["seconds"] = round(time.monotonic() - t0, 1)
    json_path = Path(args.json) if args.json else work / "summary.json"
    json_path.write_text(json.dumps(summary, indent=2, default=float))
    print(f"summary -> {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
