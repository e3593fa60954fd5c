"""Measures of the dual-domain generators.

  throughput   training images/s of a config on this machine (full steps, lazy regularisers included).
  coherence    mIoU between G's own segmentation and the face parser's segmentation of G's image:
               does the generated part map describe the generated picture?
  attributes   shares of G's images (as the shipped photo parser reads them) wearing a hat, glasses,
               and of each hair length, beside the training faces' (their masks): can G_real draw
               what the pack's renders show?
  cross        for shared latents, how well G_avatar keeps G_real's identity cues: distance of the hair and
               face mean colours (RGB in [0, 1], Euclidean) and per-part IoU of the two segmentations.
               Run it on avatar runs trained with and without the colour loss (lambda_color) to compare.

CLI: python -m likeness.training.generators.gan_metrics throughput --configs tiny cpu small
     python -m likeness.training.generators.gan_metrics coherence --gen RUN --parser PARSER_RUN|parser.onnx
     python -m likeness.training.generators.gan_metrics attributes --gen RUN [RUN2 ...] --parser parser.onnx
     python -m likeness.training.generators.gan_metrics cross --real RUN --avatar RUN [--avatar RUN2 ...]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from ...backend.errors import UserError
from ..readout.face_parser import confusion, miou
from .gan_configs import get_config
from ..common.parts import COLOR_PARTS, NUM_PARTS, PARTS, PART_IDS
from .train_gan import (GANTrainer, attribute_groups, group_shares, groups_of_parts,
                        load_frozen_real, load_generator, load_parser, region_mean_color)


def throughput(config, dataset=None, steps: int = 32, warmup: int = 3, threads: int | None = None) -> dict:
    """Training images/s of ``config`` (real stage) over ``steps`` full steps after ``warmup`` steps.
    ``steps`` a multiple of 16 includes R1 and path-length steps at their lazy rates."""
    from ..common import data as data_mod
    cfg = get_config(config)
    if threads:
        torch.set_num_threads(threads)
    ds = dataset if dataset is not None else data_mod.real_faces(None, "train", cfg.resolution)
    tr = GANTrainer(cfg, ds)
    for _ in range(warmup):
        tr.train_step()
    tr.step = 0                                     # so the timed window starts at a lazy-regulariser step
    t = time.perf_counter()
    for _ in range(steps):
        tr.train_step()
    dt = time.perf_counter() - t
    return {"config": cfg.name, "resolution": cfg.resolution, "batch": cfg.batch, "steps": steps,
            "seconds": round(dt, 3), "images_per_s": round(steps * cfg.batch / dt, 2),
            "threads": torch.get_num_threads(),
            "params_G": sum(p.numel() for p in tr.G.parameters()),
            "params_D": sum(p.numel() for p in tr.D.parameters())}


@torch.no_grad()
def coherence(G, parser, n: int = 256, batch: int = 32, seed: int = 0, truncation: float = 1.0) -> dict:
    """mIoU (over parts) between argmax of G's segmentation and the parser's parse of G's image.
    ``parser``: a FaceParser module (logits) or a callable image [B, 3, H, W] in [-1, 1] -> part
    ids [B, H, W] (``onnx_parser``: the photo parser the add-on ships)."""
    G.eval()
    if isinstance(parser, torch.nn.Module):
        parser.eval()
    g = torch.Generator().manual_seed(seed)
    conf = torch.zeros(NUM_PARTS, NUM_PARTS, dtype=torch.long)
    for i in range(0, n, batch):
        z = torch.randn(min(batch, n - i), G.cfg.z_dim, generator=g)
        out = G.sample(z)
        img = out["image"].clamp(-1, 1)
        pred = parser(img)
        if pred.dim() == 4:                           # logits
            if pred.shape[-1] != img.shape[-1]:
                pred = torch.nn.functional.interpolate(pred, size=img.shape[-2:], mode="bilinear")
            pred = pred.argmax(1)
        conf += confusion(pred, out["seg"].argmax(1))
    m, per = miou(conf)
    return {"miou": m, "per_part": dict(zip(PARTS, per)), "samples": n}


@torch.no_grad()
def parser_reference(parser, dataset, batch: int = 64) -> dict:
    """The judge's own mIoU on real faces at the generator's resolution (their true masks): the
    ceiling a generator's coherence is read against."""
    conf = torch.zeros(NUM_PARTS, NUM_PARTS, dtype=torch.long)
    for i in range(0, len(dataset), batch):
        img, parts = dataset.batch(range(i, min(i + batch, len(dataset))))
        pred = parser(img)
        if pred.dim() == 4:
            pred = pred.argmax(1)
        conf += confusion(pred, parts)
    m, per = miou(conf)
    return {"miou": m, "per_part": dict(zip(PARTS, per)), "photos": len(dataset)}


def onnx_parser(path):
    """The shipped photo parser (backend.colour_match.ParserModel) as a coherence judge: G's images
    go in as uint8 crops (it resizes them to its own input), its part names map onto PARTS."""
    from ...backend.colour_match import ParserModel
    model = ParserModel(path, device="cpu")
    missing = [p for p in model.parts if p not in PART_IDS]
    if missing:
        raise UserError(f"{path}: parser parts {missing} are not generator parts ({', '.join(PARTS)})")
    lut = torch.tensor([PART_IDS[p] for p in model.parts])

    def parse(img: torch.Tensor) -> torch.Tensor:
        crops = ((img + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        return lut[torch.from_numpy(model.run(crops).astype("int64"))]
    return parse


@torch.no_grad()
def cross_domain(G_real, G_avatar, n: int = 256, batch: int = 32, seed: int = 0,
                 shuffled: bool = False) -> dict:
    """Shared z through both generators: hair/face mean-colour distance and per-part IoU.
    ``shuffled``: G_avatar draws another sample's z (the chance level of the same measures)."""
    G_real.eval()
    G_avatar.eval()
    g = torch.Generator().manual_seed(seed)
    conf = torch.zeros(NUM_PARTS, NUM_PARTS, dtype=torch.long)
    dist = {p: [] for p in COLOR_PARTS}
    for i in range(0, n, batch):
        z = torch.randn(min(batch, n - i), G_real.cfg.z_dim, generator=g)
        a = G_real.sample(z)
        b = G_avatar.sample(z.roll(1, 0) if shuffled else z)
        pa, pb = a["seg"].softmax(1), b["seg"].softmax(1)
        for p in COLOR_PARTS:
            k = PART_IDS[p]
            ca = (region_mean_color(a["image"].clamp(-1, 1), pa, k) + 1) / 2      # [B, 3] in [0, 1]
            cb = (region_mean_color(b["image"].clamp(-1, 1), pb, k) + 1) / 2
            dist[p].append((ca - cb).norm(dim=1))
        conf += confusion(pb.argmax(1), pa.argmax(1))
    m, per = miou(conf)
    return {"color_distance": {p: float(torch.cat(v).mean()) for p, v in dist.items()},
            "miou": m, "per_part_iou": dict(zip(PARTS, per)), "samples": n}


@torch.no_grad()
def attributes(G, parse, n: int = 512, batch: int = 32, seed: int = 0) -> dict:
    """``group_shares`` of ``n`` samples of G as ``parse`` (``onnx_parser``) reads its images."""
    G.eval()
    g = torch.Generator().manual_seed(seed)
    groups = []
    for i in range(0, n, batch):
        z = torch.randn(min(batch, n - i), G.cfg.z_dim, generator=g)
        groups.append(groups_of_parts(parse(G.sample(z)["image"].clamp(-1, 1))))
    return group_shares(np.concatenate(groups))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m likeness.training.generators.gan_metrics")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("throughput")
    p.add_argument("--configs", nargs="+", default=["tiny", "cpu", "small"])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--threads", type=int)
    p = sub.add_parser("coherence")
    p.add_argument("--gen", required=True, help="real/avatar run dir or checkpoint")
    p.add_argument("--parser", required=True, help="parser run dir or checkpoint, or the photo "
                   "parser's .onnx (models/parser/parser.onnx)")
    p.add_argument("-n", type=int, default=256)
    p.add_argument("--reference", action="store_true", help="also the parser's mIoU on the real "
                   "validation faces at the generator's resolution (the ceiling)")
    p = sub.add_parser("attributes")
    p.add_argument("--gen", required=True, nargs="+", help="real/avatar run dirs or checkpoints")
    p.add_argument("--parser", required=True, help="the photo parser's .onnx")
    p.add_argument("-n", type=int, default=512)
    p = sub.add_parser("cross")
    p.add_argument("--real", help="G_real run (default: each avatar run's own frozen G_real)")
    p.add_argument("--avatar", required=True, nargs="+")
    p.add_argument("-n", type=int, default=256)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "throughput":
            for c in args.configs:
                print(json.dumps(throughput(c, steps=args.steps, threads=args.threads)), flush=True)
        elif args.cmd == "coherence":
            G, _ = load_generator(args.gen)
            parser = (onnx_parser(args.parser) if str(args.parser).endswith(".onnx")
                      else load_parser(args.parser)[0])
            print(json.dumps(coherence(G, parser, n=args.n)))
            if args.reference:
                from ..common.data import real_faces
                ds = real_faces(None, "val", G.cfg.resolution)
                print(json.dumps({"reference": parser_reference(parser, ds)}))
        elif args.cmd == "attributes":
            from ..common.data import real_faces
            parse = onnx_parser(args.parser)
            res = None
            for path in args.gen:
                G, cfg = load_generator(path)
                if res is None:
                    train = real_faces(None, "train", cfg.resolution)
                    print(json.dumps({"training faces (masks)":
                                      group_shares(attribute_groups(train)[0])}))
                res = attributes(G, parse, n=args.n)
                print(json.dumps({"gen": path, **res}))
        else:
            for path in args.avatar:
                G_av, cfg = load_generator(path)
                G_real = load_generator(args.real)[0] if args.real else load_frozen_real(path)
                print(json.dumps({"avatar": path, "lambda_color": cfg.lambda_color,
                                  **cross_domain(G_real, G_av, n=args.n),
                                  "chance": cross_domain(G_real, G_av, n=args.n, shuffled=True)}))
    except UserError as e:
        print(f"gan_metrics: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
