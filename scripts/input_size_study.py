#!/usr/bin/env python
"""Estimator input size on the real validation photos: the same estimator, data and image budget at
several input sizes, each judged alone on the 256 validation photos, with its training cost.

    python scripts/input_size_study.py --renders DATASET --work WORK [--sizes 96 128 160 224]
        [--epochs 3] [--epoch-images 4000] [--data-size 224] [--pack default] [--threads 1]
        [--out WORK/table.md]

One paired set at ``--data-size`` (224) is made from the renders (cached) and one set of real labels
at that size (the `labels` stage's), so every row sees the same pixels, only resampled to its input
size by the estimator's own batch preparation. Each size trains in WORK/input_SIZE (resumable: run
again with the same arguments), exports WORK/input_SIZE/model.onnx and is validated as an ablation
row (``scripts/ablation_table.py``: colours and shape from the estimator). The table adds training
images/s and wall time: the cost side of the comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path



def train_one(pack, pairs: Path, labels, work: Path, size: int, args) -> dict:
    """Train (or resume) and export one size; returns its cost figures."""
    from likeness.training.estimator import model as est
    from likeness.training.estimator.export import export_estimator
    cost_path = work / "cost.json"
    model_path = work / "model.onnx"
    if model_path.is_file() and cost_path.is_file():
        return json.loads(cost_path.read_text())
    cfg = est.get_config("cpu", epochs=args.epochs, input_size=size,
                         epoch_images=args.epoch_images, real_fraction=args.real_fraction)
    result = est.train_estimator(pack, pairs, work, cfg, real_labels=labels)
    model, trained = est.load_trained(pack, work)
    hist = json.loads((work / "checkpoint" / "state.json").read_text())["history"]
    # Training time from each epoch's measured rate (a run stopped and resumed keeps its epochs'
    # rates; a wall clock around this call would miss the earlier sittings).
    n_syn, n_real = est.batch_split(cfg)
    per_epoch = max(1, cfg.epoch_images // n_syn) * (n_syn + n_real)
    rates = [h["images_per_s"] for h in hist]
    export_estimator(model, pack, model_path, trained.input_size, est.IMAGENET_MEAN,
                     est.IMAGENET_STD, report={"config": asdict(trained), "held_out": result,
                                               "study": "input size"})
    cost = {"size": size, "seconds": round(sum(per_epoch / r for r in rates), 1),
            "images_per_s": round(len(rates) * per_epoch / sum(per_epoch / r for r in rates), 2),
            "images": per_epoch * len(rates), "threads": args.threads,
            "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU"}
    cost_path.write_text(json.dumps(cost, indent=2))
    return cost


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--renders", required=True, help="engine render dataset (likeness render)")
    ap.add_argument("--work", required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[96, 128, 160, 224])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--epoch-images", type=int, default=4000)
    ap.add_argument("--data-size", type=int, default=224, help="pixels of the paired set and real "
                    "labels every size is resampled from (fixed, so rows can be added later)")
    ap.add_argument("--real-fraction", type=float, default=0.25)
    ap.add_argument("--pack", default="default")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, help="first N validation photos only")
    ap.add_argument("--out", help="markdown table (default WORK/table.md)")
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    from likeness.evaluation.ablation import format_table, row_report
    from likeness.training.pairs.paired_data import cached_renders_pairs
    from likeness.backend.schema import find_pack
    from likeness.training.pipeline.retrain import build_real_labels

    if any(s < 32 or s > args.data_size for s in args.sizes):
        ap.error(f"--sizes: each input size must be 32 to {args.data_size} px (--data-size)")
    pack = find_pack(args.pack)
    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    top = args.data_size
    pairs = cached_renders_pairs(Path(args.renders), pack, top)
    labels = None
    if args.real_fraction > 0:
        labels = build_real_labels(pack, top, renders=args.renders, require_shapes=True,
                                   log=print).labels
    rows, extra = [], {}
    for size in sorted(args.sizes):
        sub = work / f"input_{size}"
        cost = train_one(pack, pairs, labels, sub, size, args)
        rep = row_report(sub, args.pack, args.limit)
        label = f"{size} px"
        rows.append((label, rep))
        extra[label] = {"train img/s": f"{cost['images_per_s']:.1f}",
                        "train min": f"{cost['seconds'] / 60:.0f}"}
    table = format_table(rows, extra)
    print(table)
    Path(args.out or work / "table.md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
