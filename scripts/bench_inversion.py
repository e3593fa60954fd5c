"""Benchmark GAN inversion: latents/s of each mode, and (with a trained G and data) reconstruction quality.

Speed (always): a G of the ``--gan-config`` sizes (randomly initialised unless --gen is given), targets drawn
from it, ``--measure-steps`` optimisation steps timed and extrapolated to the configured step counts:

  mean          the start latent itself (no computation)
  encoder       one encoder forward pass
  encoder+opt   encoder + short_steps optimisation steps
  opt           steps optimisation steps (the paper's 200)

Reconstruction (with --gen CHECKPOINT and --data DIR): the first --n samples of DIR (an engine dataset, or
a real-face folder as a stand-in target set: its validation split), inverted with every mode, measured by
pixel MSE, perceptual distance (LPIPS if it can run offline, else the parser's, with --parser) and mIoU of
G's segmentation against the target's mask; each --lambda-m value repeats the optimisation modes with that
mask-term weight. The encoder: --encoder WORK (trained), or --train-encoder N steps into --work.

    python scripts/bench_inversion.py                          # speed, cpu sizes
    python scripts/bench_inversion.py --gan-config tiny --inv-config tiny \\
        --gen RUN --parser PARSER_RUN --data DIR --n 32 --train-encoder 300 --lambda-m 0 0.1 1
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def _log(*a):
    print(*a, file=sys.stderr, flush=True)


def speed(G, cfg, batch: int, measure_steps: int, perceptual) -> dict:
    from likeness.training.pairs import invert as inv
    w0 = G.mean_latents(n=min(cfg.mean_samples, 1000))["w_mean_transparent"]
    wp, noise, y, parts = inv._encoder_step_batch(G, inv.get_config(cfg, enc_batch=batch), 123)
    enc = inv.build_encoder(G, cfg, w0)
    inv.invert(G, y, parts, cfg, w0, perceptual, noise, steps=1)            # warm-up
    t = time.perf_counter()
    r = inv.invert(G, y, parts, cfg, w0, perceptual, noise, steps=measure_steps)
    step_s = (time.perf_counter() - t) / measure_steps
    with torch.no_grad():
        enc(y, parts)
        t = time.perf_counter()
        for _ in range(3):
            enc(y, parts)
        enc_s = (time.perf_counter() - t) / 3
    ecfg = inv.get_config(cfg, enc_batch=batch)
    wp_t, noise_t, img_t, parts_t = inv._encoder_step_batch(G, ecfg, 7)
    opt = torch.optim.Adam(enc.parameters(), 1e-4)
    with inv.frozen(G):
        t = time.perf_counter()
        for _ in range(2):
            loss, _ = inv.encoder_loss(G, enc, ecfg, wp_t, noise_t, img_t, parts_t, True)
            opt.zero_grad()
            loss.backward()
            opt.step()
        train_s = (time.perf_counter() - t) / 2
    del r
    from likeness.training.pairs import paired_data as pd
    pcfg = pd.get_config(G.cfg.name if G.cfg.name in pd.CONFIGS else "cpu", batch=batch)
    pd.realistic_faces(G, wp[:2], [0, 1], pcfg)
    t = time.perf_counter()
    faces = pd.realistic_faces(G, wp[:4], [0, 1, 2, 3], pcfg)
    pair_s = (time.perf_counter() - t) / faces[:, :].flatten(0, 1).shape[0]
    return {
        "paired_images_per_s": 1.0 / pair_s,
        "batch": batch, "seconds_per_opt_step": step_s, "seconds_per_encoder_pass": enc_s,
        "latents_per_s": {
            "mean": "no computation (the start latent itself)",
            "encoder": batch / enc_s,
            f"encoder+opt{cfg.short_steps}": batch / (enc_s + cfg.short_steps * step_s),
            f"opt{cfg.steps}": batch / (cfg.steps * step_s)},
        "encoder_training_samples_per_s": batch / train_s,
        "hours_for_10000_renders": {
            f"encoder+opt{cfg.short_steps}": 10000 * (enc_s + cfg.short_steps * step_s) / batch / 3600,
            f"opt{cfg.steps}": 10000 * cfg.steps * step_s / batch / 3600},
    }


def load_targets(path, G, n: int):
    from likeness.training.common import data as data_mod
    from likeness.training.pairs import invert as inv
    path = Path(path)
    if (path / "manifest.json").is_file() and (path / "vectors").is_dir():
        names = inv.dataset_names(path)[:n]
        y, parts = inv.load_renders(path, names, G.cfg.resolution)
        return y, parts, [int(x) if x.isdigit() else i for i, x in enumerate(names)], f"engine renders {path}"
    ds = data_mod.open_dataset(path, resolution=G.cfg.resolution, split="val")
    idx = list(range(min(n, len(ds))))
    y, parts = ds.batch(idx)
    return y, parts, idx, f"{ds.source} (validation split, stand-in targets)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gan-config", default="cpu")
    ap.add_argument("--inv-config", default="cpu")
    ap.add_argument("--batch", type=int, help="inversion batch (default: the inversion config's)")
    ap.add_argument("--measure-steps", type=int, default=5)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--gen", help="trained G checkpoint folder or work dir (train_gan)")
    ap.add_argument("--parser", help="trained face parser checkpoint or work dir (perceptual fallback)")
    ap.add_argument("--random-parser", action="store_true",
                    help="time the parser perceptual term with an untrained parser of the config's size")
    ap.add_argument("--data", help="engine dataset (or real-face folder) for the reconstruction comparison")
    ap.add_argument("--n", type=int, default=32, help="samples in the reconstruction comparison")
    ap.add_argument("--encoder", help="trained encoder work dir")
    ap.add_argument("--train-encoder", type=int, default=0, metavar="STEPS")
    ap.add_argument("--work", help="where --train-encoder writes (default a temp folder)")
    ap.add_argument("--lambda-m", type=float, nargs="*", default=[0.0])
    ap.add_argument("--steps", type=int, help="override the full optimisation's step count")
    ap.add_argument("--short-steps", type=int)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    from likeness.training.pairs import invert as inv
    from likeness.training.generators.gan_configs import get_config as gan_config
    from likeness.training.common.perceptual import resolve_perceptual
    from likeness.training.generators.semantic_gan import Generator
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = inv.get_config(args.inv_config, batch=args.batch, steps=args.steps, short_steps=args.short_steps)
    if args.gen:
        from likeness.training.generators.train_gan import load_generator
        G, _ = load_generator(args.gen)
    else:
        torch.manual_seed(0)
        G = Generator(gan_config(args.gan_config)).eval()
    parser = None
    if args.parser:
        from likeness.training.generators.train_gan import load_parser
        parser, _ = load_parser(args.parser)
    elif args.random_parser:
        from likeness.training.readout.face_parser import FaceParser
        parser = FaceParser(G.cfg.parser_channels)
    perc, desc, _ = resolve_perceptual(cfg.perceptual, cfg.perceptual_fallback, parser, cfg.lpips_net)
    _log(f"perceptual: {desc}")
    results = {"gan_config": G.cfg.name, "inv_config": cfg.name, "threads": torch.get_num_threads(),
               "perceptual": desc}
    results["speed"] = speed(G, cfg, cfg.batch, args.measure_steps, perc)
    _log(json.dumps(results["speed"], indent=1))

    if args.gen and args.data:
        y, parts, keys, what = load_targets(args.data, G, args.n)
        _log(f"targets: {len(y)} from {what}")
        means = G.mean_latents(n=cfg.mean_samples)
        w0 = inv.start_latent(means, cfg)
        enc = None
        if args.encoder:
            enc = inv.load_encoder(args.encoder, G)
        elif args.train_encoder:
            work = Path(args.work or tempfile.mkdtemp(prefix="likeness-encoder-"))
            ecfg = inv.get_config(cfg, enc_steps=args.train_encoder)
            t = time.perf_counter()
            enc = inv.train_encoder(G, ecfg, work, means=means, progress=False, log=_log)
            results["encoder_training"] = {"steps": args.train_encoder, "seconds": time.perf_counter() - t,
                                           "work": str(work)}
        comp = {}
        for lm in args.lambda_m:
            modes = ("mean", "encoder", "encoder+opt", "opt") if lm == args.lambda_m[0] else ("encoder+opt", "opt")
            _log(f"-- lambda_m = {lm}")
            comp[f"lambda_m={lm}"] = inv.compare_modes(G, enc, y, parts, cfg, w0, perc, keys, modes, lm, log=_log)
        results["reconstruction"] = {"targets": what, "n": len(y), "steps": cfg.steps,
                                     "short_steps": cfg.short_steps, "modes": comp}
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
