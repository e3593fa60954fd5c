#!/usr/bin/env python
"""Train the backend's photo face parser (128 px) and export it as models/parser/parser.onnx.

    python scripts/train_photo_parser.py train  [--work DIR] [--steps 2000] [--batch 16] [--resume]
    python scripts/train_photo_parser.py export [--work DIR] [--out models/parser/parser.onnx]
                                                [--regions hair,skin,lips] [--evidence A.json B.json]

``train`` is ``likeness train gan --stage parser`` (train_gan's loop: checkpoints every 250
steps, resume with --resume, Ctrl-C checkpoints and stops, validation mIoU at each checkpoint)
with the ``small`` config (128 px, U-Net channels 16-32-64-128) and one change to the batches:
the backend measures colours where this parser points, so its augmentation is colour-safe --
flips, a small random similarity transform (MTCNN crops are framed less exactly than the
dataset's) and one brightness gain for all three channels; no per-channel or hue jitter, which
the GAN-facing parser stage uses. The learning rate follows a cosine from ``parser_lr`` to 5 %.
Trained on the 744 TRAIN photos of the shared faces only (stems c-f are validation).

``export`` writes the ONNX file (opset 17, dynamic batch, ``likeness.*`` metadata: input size,
normalisation, part names, licence, the validation report, the colour regions the backend reads
from it) and checks onnxruntime against torch on validation crops. The regions are chosen by
``likeness validate --colours model`` against ``--colours photo`` (all four regions read from the
photo): a region is read from the photo only where that beats the estimator; ``--evidence`` takes
the two report.json files and records their colour rows in the parser's report.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


DEFAULT_WORK = "~/.cache/likeness/runs/photo_parser_128"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "models" / "parser" / "parser.onnx"
CONFIG = "small"                       # 128 px, parser channels (16, 32, 64, 128)
LICENCE = "non-commercial research use: trained on CelebAMask-HQ"
MAX_BYTES = 3 << 20
AFFINE = {"scale": 0.08, "rotate_deg": 8.0, "shift": 0.05}   # uniform +- ranges
GAIN = (0.8, 1.2)
LR_FLOOR = 0.05


def photo_trainer_class():
    import torch
    import torch.nn.functional as F
    from likeness.training.generators.train_gan import ParserTrainer

    class PhotoParserTrainer(ParserTrainer):
        """train_gan's parser trainer with colour-safe batches and a cosine learning rate."""

        def batch(self):
            b = self.b
            idx = torch.randint(len(self.data), (b,), generator=self.data_gen)
            img, parts = self.data.batch(idx)
            g = self.data_gen
            flip = torch.rand(b, generator=g) < 0.5
            img = torch.where(flip[:, None, None, None], img.flip(3), img)
            parts = torch.where(flip[:, None, None], parts.flip(2), parts)
            # similarity transform, the same grid for image (bilinear) and parts (nearest)
            u = lambda: torch.rand(b, generator=g) * 2 - 1          # noqa: E731
            s = 1 + AFFINE["scale"] * u()
            a = math.radians(AFFINE["rotate_deg"]) * u()
            tx, ty = AFFINE["shift"] * 2 * u(), AFFINE["shift"] * 2 * u()
            theta = torch.stack([torch.stack([s * torch.cos(a), -s * torch.sin(a), tx], 1),
                                 torch.stack([s * torch.sin(a), s * torch.cos(a), ty], 1)], 1)
            grid = F.affine_grid(theta, list(img.shape), align_corners=False)
            img = F.grid_sample(img, grid, mode="bilinear", padding_mode="reflection",
                                align_corners=False)
            parts = F.grid_sample(parts[:, None].float(), grid, mode="nearest",
                                  padding_mode="reflection", align_corners=False)[:, 0].long()
            gain = GAIN[0] + (GAIN[1] - GAIN[0]) * torch.rand(b, 1, 1, 1, generator=g)
            img = ((img + 1) * gain).clamp(0, 2) - 1             # one gain for R, G and B
            return img, parts

        def train_step(self):
            t = min(self.step / max(self.cfg.parser_steps, 1), 1.0)
            lr = self.cfg.parser_lr * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * t)))
            for group in self.opt.param_groups:
                group["lr"] = lr
            return super().train_step()

    return PhotoParserTrainer


def cmd_train(args) -> int:
    import torch
    from likeness.training.generators import train_gan
    from likeness.training.generators.gan_configs import get_config
    torch.set_num_threads(args.threads)
    cfg = get_config(CONFIG).replace(parser_batch=args.batch, ckpt_every=250, log_every=50)
    t0 = time.monotonic()
    summary = train_gan.train("parser", cfg, work_dir=Path(args.work).expanduser(), steps=args.steps,
                              resume=args.resume, parser_trainer=photo_trainer_class(),
                              device=getattr(args, "device", "auto"))
    summary.pop("trainer", None)
    summary["wall_seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(summary))
    return 0


def _val_crops(n: int | None = None):
    """Validation images and part maps at 128 px (the training frame)."""
    from likeness.training.common import data as data_mod
    from likeness.training.generators.gan_configs import get_config
    ds = data_mod.open_dataset(None, get_config(CONFIG).resolution, split="val")
    idx = list(range(len(ds) if n is None else min(n, len(ds))))
    return ds.batch(idx)


def cmd_export(args) -> int:
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from likeness.backend import colour_match as cm
    from likeness.training.readout.face_parser import confusion, miou
    from likeness.training.common.parts import NUM_PARTS, PARTS
    from likeness.training.generators.train_gan import find_checkpoint, load_parser, read_state

    torch.set_num_threads(args.threads)
    work = Path(args.work).expanduser()
    folder = find_checkpoint(work)
    net, cfg = load_parser(folder)
    step = int(read_state(folder)["step"])
    size = cfg.resolution
    regions = [r for r in args.regions.split(",") if r] if args.regions else list(cm.REGION_PARTS)
    bad = [r for r in regions if r not in cm.REGION_PARTS]
    if bad:
        raise SystemExit(f"unknown colour regions {bad} (known: {', '.join(cm.REGION_PARTS)})")

    img, parts = _val_crops()
    with torch.no_grad():
        pred = torch.cat([net(img[i:i + 32]).argmax(1) for i in range(0, len(img), 32)])
    m, per = miou(confusion(pred, parts, NUM_PARTS))
    report = {"trained_on": "744 CelebAMask-HQ TRAIN photos (stems not c-f)", "steps": step,
              "config": CONFIG, "channels": list(cfg.parser_channels), "batch": cfg.parser_batch,
              "augment": {"flip": True, **AFFINE, "gain": list(GAIN), "colour_jitter": False},
              "validation": {"photos": int(len(img)), "miou": round(m, 4),
                             "iou": {p: (None if v is None else round(v, 4)) for p, v in zip(PARTS, per)}}}
    print(json.dumps(report["validation"]))
    if args.evidence:
        rows = {}
        for f in args.evidence:
            val = json.loads(Path(f).read_text())
            rows[val["colours"]["mode"]] = {
                k: {m: (None if c[m] is None else round(c[m], 3)) for m in ("median", "p90", "ratio_median")}
                for k, c in val["colour"].items()}
        report["colour_choice"] = {"regions": regions, "validation_de00": rows,
                                   "rule": "read from the photo where its median beats the estimator's"}

    meta = {cm.PARSER_KIND_KEY: cm.PARSER_KIND, cm.KEY_FORMAT: str(cm.PARSER_FORMAT),
            cm.KEY_INPUT_SIZE: str(size), cm.KEY_MEAN: json.dumps([0.5, 0.5, 0.5]),
            cm.KEY_STD: json.dumps([0.5, 0.5, 0.5]), cm.KEY_PARTS: json.dumps(list(PARTS)),
            cm.KEY_LICENCE: LICENCE, cm.KEY_REGIONS: json.dumps(regions),
            cm.KEY_REPORT: json.dumps(report)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    probe = torch.zeros(2, 3, size, size)
    torch.onnx.export(net, (probe,), str(tmp), dynamo=False, opset_version=17,
                      input_names=[cm.PARSER_INPUT], output_names=[cm.PARSER_OUTPUT],
                      dynamic_axes={cm.PARSER_INPUT: {0: "batch"}, cm.PARSER_OUTPUT: {0: "batch"}})
    proto = onnx.load(str(tmp))
    del proto.metadata_props[:]
    for k, v in meta.items():
        e = proto.metadata_props.add()
        e.key, e.value = k, v
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    if tmp.stat().st_size > MAX_BYTES:
        tmp.unlink()
        raise SystemExit(f"the parser is {tmp.stat().st_size} bytes, over {MAX_BYTES}: export float16")

    # parity on real validation crops at two batch sizes: logits and the label maps
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    worst, flips = 0.0, 0
    for n in (1, 8):
        x = img[:n]
        with torch.no_grad():
            want = net(x).numpy()
        got = sess.run([cm.PARSER_OUTPUT], {cm.PARSER_INPUT: x.numpy()})[0]
        worst = max(worst, float(np.abs(got - want).max()))
        flips += int((got.argmax(1) != want.argmax(1)).sum())
    if worst > 1e-3:
        tmp.unlink()
        raise SystemExit(f"onnxruntime differs from torch by {worst:.3g} (over 1e-3)")
    tmp.replace(out)
    print(f"{out}: {out.stat().st_size / 1e6:.2f} MB, step {step}, val mIoU {m:.4f}, "
          f"parity max |diff| {worst:.2e} ({flips} label flips), colour regions {regions}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--work", default=DEFAULT_WORK)
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--device", default="auto", help="auto, cpu or cuda (training.common.device)")
    e = sub.add_parser("export")
    e.add_argument("--work", default=DEFAULT_WORK)
    e.add_argument("--out", default=str(DEFAULT_OUT))
    e.add_argument("--regions", help="colour regions the backend reads from the photo "
                   "(comma-separated; default all: hair,skin,lips,eyes)")
    e.add_argument("--evidence", nargs=2, metavar="REPORT_JSON",
                   help="likeness validate report.json files of --colours model and --colours photo")
    e.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    from likeness.backend.errors import UserError
    try:
        return cmd_train(args) if args.cmd == "train" else cmd_export(args)
    except UserError as err:
        print(f"train_photo_parser: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
