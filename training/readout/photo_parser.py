"""The backend's photo face parser (``models/parser/parser.onnx``, 128 px): fine-tune, refit, export.

    python -m likeness.training.readout.photo_parser train  [--work DIR] [--steps 2000] [--batch 16]
                                                            [--init shipped|scratch|PARSER.onnx] [--resume]
    python -m likeness.training.readout.photo_parser export [--work DIR] [--out models/parser/parser.onnx]
                                                            [--regions hair,skin,lips] [--evidence A.json B.json]

The backend reads colours, hats, fringes, hair amount and face shape where this parser points, and
every pack's colour calibration and shape table are read with it, so it is a *shared* stage of
``likeness retrain`` (``photo_parser``): by default the shipped ``parser.onnx`` as it is; with
``--set photo_parser_steps=N`` the stage fine-tunes it (``photo_parser_init=shipped``: the shipped
ONNX file's weights, which carry the torch names) or refits it (``photo_parser_init=scratch``) and
exports the result, which then travels in the pack's bundle (``backend.models``).

``train`` is ``train_gan``'s parser loop (checkpoints, resume, Ctrl-C checkpoints and stops,
validation mIoU at each checkpoint) with the ``small`` config (128 px, U-Net channels 16-32-64-128)
and one change to the batches: the backend measures colours where this parser points, so its
augmentation is colour-safe -- flips, a small random similarity transform (MTCNN crops are framed
less exactly than the dataset's) and one brightness gain for all three channels; no per-channel or
hue jitter, which the GAN-facing parser stage uses. The learning rate follows a cosine from
``parser_lr`` to 5 %. Trained on the 744 TRAIN photos of the shared faces only (stems c-f are
validation).

``export`` writes the ONNX file (opset 17, dynamic batch, ``likeness.*`` metadata: input size,
normalisation, part names, licence, the validation report, the colour regions the backend reads
from it) and checks onnxruntime against torch on validation crops. The regions are chosen by
``likeness validate --colours model`` against ``--colours photo`` (all four regions read from the
photo): a region is read from the photo only where that beats the estimator; ``--evidence`` takes
the two report.json files and records their colour rows in the parser's report. Without
``regions`` an export keeps the regions of the parser it started from (all four when refitted).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from ...backend.errors import UserError
from ...backend.models import PARSER, SHIPPED, sha256

DEFAULT_WORK = "~/.cache/likeness/runs/photo_parser_128"
SHIPPED_PARSER = SHIPPED / PARSER
CONFIG = "small"                       # 128 px, parser channels (16, 32, 64, 128)
LICENCE = "non-commercial research use: trained on CelebAMask-HQ"
MAX_BYTES = 3 << 20
AFFINE = {"scale": 0.08, "rotate_deg": 8.0, "shift": 0.05}   # uniform +- ranges
GAIN = (0.8, 1.2)
LR_FLOOR = 0.05
FINE_TUNE_LR = 0.1                     # a fine-tune's learning rate, as a share of the refit's
INIT = ("shipped", "scratch")


def describe(path: str | os.PathLike) -> dict:
    """What a parser ONNX file is (path, sha256, bytes, input size, colour regions, training steps)."""
    from ...backend.colour_match import ParserModel
    path = Path(path)
    p = ParserModel(path, device="cpu", threads=1)
    meta = _metadata(path)
    report = json.loads(meta.get("likeness.report") or "{}")
    return {"path": str(path), "sha256": sha256(path), "bytes": path.stat().st_size,
            "input_size": p.input_size, "regions": list(p.regions), "steps": report.get("steps")}


def _metadata(path: Path) -> dict:
    import onnx
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def onnx_weights(path: str | os.PathLike):
    """The torch ``FaceParser`` an exported parser ONNX file holds: (net, channels). The export
    keeps the convolutions' names; each GroupNorm's scale and shift become anonymous ``Mul`` /
    ``Add`` constants in the order the layers run, which is the modules' order. The rebuilt net is
    checked against onnxruntime on a probe (a file whose weights do not fit is refused)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import numpy_helper
    from ...backend import colour_match as cm
    from .face_parser import FaceParser
    path = Path(path)
    if not path.is_file():
        raise UserError(f"face parser {path}: no such file")
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    channels = tuple((json.loads(meta.get(cm.KEY_REPORT) or "{}")).get("channels") or (16, 32, 64, 128))
    net = FaceParser(channels).eval()
    arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    anon = {kind: [arrays[n] for n in sorted((n for n in arrays if n.startswith(f"onnx::{kind}_")),
                                             key=lambda n: int(n.rsplit("_", 1)[1]))]
            for kind in ("Mul", "Add")}
    norms = [name for name, m in net.named_modules() if isinstance(m, torch.nn.GroupNorm)]
    why = "its weights do not fit the U-Net face parser"
    if len(anon["Mul"]) != len(norms) or len(anon["Add"]) != len(norms):
        raise UserError(f"{path}: {why} ({len(norms)} GroupNorms, {len(anon['Mul'])} scales)")
    for name, w, b in zip(norms, anon["Mul"], anon["Add"]):
        arrays[f"{name}.weight"], arrays[f"{name}.bias"] = w, b
    state = {}
    for k, v in net.state_dict().items():
        if k not in arrays or arrays[k].size != v.numel():
            raise UserError(f"{path}: {why} with channels {list(channels)} ({k}); refit it "
                            "(photo_parser_init=scratch)")
        state[k] = torch.from_numpy(np.array(arrays[k], copy=True)).reshape(v.shape).to(v.dtype)
    net.load_state_dict(state)
    size = int(meta.get(cm.KEY_INPUT_SIZE, 128))
    probe = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (2, 3, size, size)).astype(np.float32))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        diff = float(np.abs(sess.run([cm.PARSER_OUTPUT], {cm.PARSER_INPUT: probe.numpy()})[0]
                            - net(probe).numpy()).max())
    if diff > 1e-3:
        raise UserError(f"{path}: {why} (rebuilt from the file, it differs from it by {diff:.3g})")
    return net, channels


def photo_trainer_class(init=None):
    """train_gan's parser trainer with colour-safe batches and a cosine learning rate; ``init``: a
    ``FaceParser`` whose weights it starts from (a fine-tune), else random ones (a refit)."""
    import torch
    import torch.nn.functional as F
    from ..generators.train_gan import ParserTrainer

    class PhotoParserTrainer(ParserTrainer):

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            if init is not None:
                self.net.load_state_dict(init.state_dict())

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


def _init_net(init: str | os.PathLike | None):
    """(FaceParser or None, its channels or None, what it is) for ``init``: "shipped",
    "scratch"/None, or a parser .onnx."""
    if init in (None, "scratch"):
        return None, None, "scratch"
    path = SHIPPED_PARSER if init == "shipped" else Path(init)
    net, channels = onnx_weights(path)
    return net, channels, f"{path} (sha256 {sha256(path)[:16]})"


def cross_fit_fold(stems: list[str], fold: int, folds: int) -> list[str]:
    """The TRAIN stems a cross-fitted parser ``fold`` of ``folds`` never sees: every ``folds``-th
    of the sorted stems, from the ``fold``-th. The reader's training features of those photos come
    from that parser (``training.readout.attributes``), so its heads learn from a parse as good as
    a new photo gets, not from one fitted on the photo itself."""
    if not 0 <= fold < folds:
        raise UserError(f"fold {fold} of {folds}: expected 0 <= fold < folds")
    return sorted(stems)[fold::folds]


def train(work: str | os.PathLike, steps: int = 2000, batch: int = 16, *, init="shipped",
          resume: bool = False, lr: float | None = None, device="auto", log=print,
          fold: tuple[int, int] | None = None) -> dict:
    """Fine-tune (``init`` "shipped" or a parser .onnx) or refit (``init`` "scratch") the photo
    parser in ``work`` (checkpoints; ``resume`` continues them); returns the loop's summary.
    ``lr``: the peak learning rate (default: the config's ``parser_lr`` for a refit, a tenth of it,
    ``FINE_TUNE_LR``, for a fine-tune). ``fold`` (k, n): train on the TRAIN photos outside
    ``cross_fit_fold(..., k, n)`` (a cross-fitted parser; the held-out stems go in the summary)."""
    from ..common import data as data_mod
    from ..generators import train_gan
    from ..generators.gan_configs import get_config
    net, channels, start = _init_net(init)
    if lr is None and net is not None:
        # a fine-tune: a tenth of the refit's rate keeps what the weights know (2 steps at the full
        # rate, batch 2, cost the shipped parser 0.14 validation mIoU)
        lr = get_config(CONFIG).parser_lr * FINE_TUNE_LR
    cfg = get_config(CONFIG).replace(parser_batch=batch, ckpt_every=min(250, max(1, steps)),
                                     log_every=50, **({"parser_lr": lr} if lr else {}),
                                     **({"parser_channels": tuple(channels)} if channels else {}))
    log(f"[photo parser] {'fine-tuning from ' + start if net is not None else 'refitting from random weights'}, "
        f"{steps} steps, batch {batch}")
    dataset, held_out = None, None
    if fold is not None:
        full = data_mod.open_dataset(None, cfg.resolution, split="train")
        held_out = set(cross_fit_fold(full.names, *fold))
        dataset = full.subset([i for i, s in enumerate(full.names) if s not in held_out],
                              f"{full.source}:without-fold-{fold[0]}-of-{fold[1]}")
        log(f"[photo parser] cross-fitting fold {fold[0]} of {fold[1]}: {len(held_out)} TRAIN photos "
            f"held out, {len(dataset)} trained on")
    t0 = time.monotonic()
    summary = train_gan.train("parser", cfg, work_dir=Path(work).expanduser(), steps=steps, resume=resume,
                              parser_trainer=photo_trainer_class(net), device=device, log=log,
                              dataset=dataset)
    summary.pop("trainer", None)
    summary.update(init=start, wall_seconds=round(time.monotonic() - t0, 1))
    if fold is not None:
        summary.update(fold=list(fold), held_out=sorted(held_out))
    return summary


def _val_crops(n: int | None = None):
    """Validation images and part maps at 128 px (the training frame)."""
    from ..common import data as data_mod
    from ..generators.gan_configs import get_config
    ds = data_mod.open_dataset(None, get_config(CONFIG).resolution, split="val")
    idx = list(range(len(ds) if n is None else min(n, len(ds))))
    return ds.batch(idx)


def export(work: str | os.PathLike, out: str | os.PathLike, regions=None, evidence=None,
           extra_report: dict | None = None, log=print) -> dict:
    """The latest checkpoint of ``work`` as a parser ONNX file at ``out`` (parity-checked against
    torch); returns its validation figures. ``regions``: the colour regions the backend reads
    from the photo (default those of the parser the run started from, else all)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from ...backend import colour_match as cm
    from ..common.parts import NUM_PARTS, PARTS
    from ..generators.train_gan import find_checkpoint, load_parser, read_state
    from .face_parser import confusion, miou

    folder = find_checkpoint(Path(work).expanduser())
    net, cfg = load_parser(folder)
    step = int(read_state(folder)["step"])
    size = cfg.resolution
    if regions is None:
        regions = list(cm.REGION_PARTS)
        if (extra_report or {}).get("init_regions"):
            regions = list(extra_report["init_regions"])
    regions = [r for r in regions if r]
    bad = [r for r in regions if r not in cm.REGION_PARTS]
    if bad:
        raise UserError(f"unknown colour regions {bad} (known: {', '.join(cm.REGION_PARTS)})")

    img, parts = _val_crops()
    with torch.no_grad():
        pred = torch.cat([net(img[i:i + 32]).argmax(1) for i in range(0, len(img), 32)])
    m, per = miou(confusion(pred, parts, NUM_PARTS))
    fold = (extra_report or {}).get("fold")
    trained_on = "744 CelebAMask-HQ TRAIN photos (stems not c-f)" if fold is None else \
        f"CelebAMask-HQ TRAIN photos (stems not c-f) outside cross-fitting fold {fold[0]} of {fold[1]}"
    report = {"trained_on": trained_on, "steps": step,
              "config": CONFIG, "channels": list(cfg.parser_channels), "batch": cfg.parser_batch,
              "augment": {"flip": True, **AFFINE, "gain": list(GAIN), "colour_jitter": False},
              "validation": {"photos": int(len(img)), "miou": round(m, 4),
                             "iou": {p: (None if v is None else round(v, 4)) for p, v in zip(PARTS, per)}},
              **{k: v for k, v in (extra_report or {}).items() if k != "init_regions"}}
    log(f"[photo parser] validation {json.dumps(report['validation'])}")
    if evidence:
        rows = {}
        for f in evidence:
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
    out = Path(out)
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
        n = tmp.stat().st_size
        tmp.unlink()
        raise UserError(f"the parser is {n} bytes, over {MAX_BYTES}: export float16")

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
        raise UserError(f"onnxruntime differs from torch by {worst:.3g} (over 1e-3)")
    tmp.replace(out)
    log(f"[photo parser] {out}: {out.stat().st_size / 1e6:.2f} MB, step {step}, val mIoU {m:.4f}, "
        f"parity max |diff| {worst:.2e} ({flips} label flips), colour regions {regions}")
    return {"parser": str(out), "step": step, "val_miou": round(m, 4), "regions": regions,
            "parity_max_diff": worst}


def fit(folder: Path, steps: int, batch: int, init: str, lr: float | None = None, device="auto",
        log=print) -> dict:
    """The retrain's ``photo_parser`` stage when asked to train: fine-tune or refit in
    ``folder/run`` (resumed when partial), export ``folder/parser.onnx``; returns its record."""
    if init not in INIT and not Path(init).is_file():
        raise UserError(f"photo_parser_init {init!r}: 'shipped', 'scratch' or a parser .onnx file")
    run = folder / "run"
    resume = (run / "latest.json").is_file()
    s = train(run, steps, batch, init=init, resume=resume, lr=lr, device=device, log=log)
    if s.get("stopped"):
        raise KeyboardInterrupt(f"photo_parser stopped at step {s['step']}")
    start = None if init == "scratch" else (SHIPPED_PARSER if init == "shipped" else Path(init))
    regions = describe(start)["regions"] if start is not None else None
    out = export(run, folder / "parser.onnx", log=log,
                 extra_report={"init": s["init"], "init_regions": regions})
    return {**describe(folder / "parser.onnx"), "parser": str(folder / "parser.onnx"),
            "shipped": False, "init": s["init"],
            "val_miou": out["val_miou"], "content": sha256(folder / "parser.onnx")[:16]}


def fold_report(fold: int, folds: int) -> dict:
    """What a cross-fitted parser's report records: its fold and the TRAIN stems it never saw."""
    from ...backend import realfaces
    return {"fold": [fold, folds], "held_out": cross_fit_fold(realfaces.stems(None, "train"), fold, folds)}


def parse_fold(text: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--fold {text!r}: expected K/N, e.g. 0/3") from None
    cross_fit_fold([], k, n)                 # the range check
    return k, n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--work", default=DEFAULT_WORK)
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--init", default="scratch", help="shipped (fine-tune models/parser/parser.onnx), "
                   "scratch (refit; how the shipped parser was made) or a parser .onnx")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--device", default="auto", help="auto, cpu or cuda (training.common.device)")
    t.add_argument("--fold", metavar="K/N", help="a cross-fitted parser: train without the K-th of N "
                   "folds of the TRAIN photos (cross_fit_fold), for the reader's training features")
    e = sub.add_parser("export")
    e.add_argument("--work", default=DEFAULT_WORK)
    e.add_argument("--out", default=str(SHIPPED_PARSER))
    e.add_argument("--regions", help="colour regions the backend reads from the photo "
                   "(comma-separated; default all: hair,skin,lips,eyes)")
    e.add_argument("--evidence", nargs=2, metavar="REPORT_JSON",
                   help="likeness validate report.json files of --colours model and --colours photo")
    e.add_argument("--fold", metavar="K/N", help="the fold the run was trained without (train --fold), "
                   "recorded in the file's report for likeness train attributes --cross-fit-parsers")
    e.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    try:
        fold = parse_fold(args.fold) if args.fold else None
        if args.cmd == "train":
            print(json.dumps(train(args.work, args.steps, args.batch, init=args.init, resume=args.resume,
                                   device=args.device, log=lambda s: print(s, file=sys.stderr),
                                   fold=fold), default=str))
        else:
            export(args.work, args.out, args.regions.split(",") if args.regions else None, args.evidence,
                   extra_report=fold_report(*fold) if fold else None)
    except UserError as err:
        print(f"photo_parser: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
