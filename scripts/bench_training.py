"""Training throughput of every learning stage of ``likeness retrain`` on one device (the GPU smoke run).

    .venv/bin/python scripts/bench_training.py --config paper --device cuda --steps 20 --out bench_gpu.json
    .venv/bin/python scripts/bench_training.py --config tiny --device cpu --steps 5      # what the tests run

Each stage's own step on synthetic inputs of the config's shapes (faces at the GAN's resolution, a
paired set at the estimator's input size): G_real, face parser, G_avatar (with the frozen G_real's
colour and layout losses), inversion encoder, inversion (encoder + the config's optimisation steps),
realistic pairs (G_real faces with semantic augmentation) and the estimator, each through the code the
retrain runs, on ``--device``. ``--warmup`` steps first (CUDA kernels, cudnn autotuning), then
``--steps`` timed with the device synchronised. Prints one JSON line per stage (images/s) and a
Markdown table; ``--out`` keeps the lines. Rendering, labels, the pair check, export and validation run
on CPUs and are not here (README: measured speed).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch


def synthetic_faces(n: int, res: int, seed: int = 0):
    """A SegDataset of n 'faces' (ellipse, hair cap, eyes, mouth) in CelebAMask-HQ class ids."""
    from likeness.backend.schema import CLASS_IDS
    from likeness.training.common.data import SegDataset
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:res, 0:res] / res
    imgs = np.zeros((n, res, res, 3), np.uint8)
    labs = np.zeros((n, res, res), np.uint8)
    for i in range(n):
        cx, cy = 0.5 + rng.uniform(-0.05, 0.05), 0.45 + rng.uniform(-0.05, 0.05)
        face = ((xx - cx) / 0.25) ** 2 + ((yy - cy) / 0.32) ** 2 < 1
        labs[i][face] = CLASS_IDS["skin"]
        labs[i][face & (yy < cy - 0.15)] = CLASS_IDS["hair"]
        labs[i][face & (abs(yy - cy) < 0.03) & (abs(abs(xx - cx) - 0.1) < 0.04)] = CLASS_IDS["l_eye"]
        labs[i][face & (abs(yy - cy - 0.18) < 0.03) & (abs(xx - cx) < 0.08)] = CLASS_IDS["u_lip"]
        imgs[i] = rng.integers(0, 255, 3)[None, None]
        imgs[i][face] = rng.integers(120, 255, 3)
    return SegDataset(imgs, labs, [f"{i:05d}" for i in range(n)], "synthetic faces")


def timed(device, warmup: int, steps: int, fn) -> float:
    """Seconds of ``steps`` calls of fn (after ``warmup`` untimed ones), the device synchronised."""
    from likeness.training.common.device import synchronize
    for _ in range(warmup):
        fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return time.perf_counter() - t0


def bench(config: str, device_name: str, steps: int, warmup: int, only=None) -> list[dict]:
    from likeness.backend.schema import find_pack
    from likeness.training.common import device as dev_mod
    from likeness.training.estimator import model as est
    from likeness.training.estimator.paired_set import write_paired_set
    from likeness.training.pairs import invert as inv
    from likeness.training.pairs import paired_data as pd
    from likeness.training.pipeline import retrain
    from likeness.training.generators import train_gan as T
    from likeness.training.generators.semantic_gan import Generator

    device = dev_mod.resolve(device_name)
    rcfg = retrain.get_config(config)
    gcfg = T.get_config(rcfg.gan)
    icfg = inv.get_config(rcfg.invert, short_steps=rcfg.invert_steps)      # as the retrain inverts
    pcfg = pd.get_config(rcfg.paired)
    ecfg = replace(retrain._estimator_cfg(rcfg), real_fraction=0.0)
    rows = []

    def row(stage: str, batch: int, seconds: float, unit: str = "images"):
        r = {"stage": stage, "config": config, "device": dev_mod.describe(device), "batch": batch,
             "steps": steps, "seconds": round(seconds, 3), f"{unit}_per_s": round(batch * steps / seconds, 2)}
        print(json.dumps(r), flush=True)
        rows.append(r)

    want = (lambda s: only is None or s in only)
    ds = synthetic_faces(max(gcfg.batch, gcfg.parser_batch) * 2, gcfg.resolution)
    if want("real"):
        t = T.GANTrainer(gcfg, ds, "real", device=device)
        row("real", gcfg.batch, timed(device, warmup, steps, t.train_step))
    if want("parser"):
        t = T.ParserTrainer(gcfg, ds, device=device)
        row("parser", gcfg.parser_batch, timed(device, warmup, steps, t.train_step))
    g_real = Generator(gcfg).to(device).eval()
    if want("avatar"):
        t = T.GANTrainer(gcfg.replace(lambda_layout=rcfg.avatar_layout or gcfg.lambda_layout), ds, "avatar",
                         Generator(gcfg), device=device)
        row("avatar", gcfg.batch, timed(device, warmup, steps, t.train_step))
    G = Generator(gcfg).to(device).eval()
    means = G.mean_latents(n=min(icfg.mean_samples, 2000))
    enc = inv.build_encoder(G, icfg, means["w_mean"]).to(device)
    if want("encoder"):
        opt = torch.optim.Adam(enc.parameters(), lr=icfg.enc_lr, betas=(0.9, 0.99))
        scaler = dev_mod.scaler(device)
        state = {"i": 0}

        def enc_step():
            wp, noise, img, parts = inv._encoder_step_batch(G, icfg, state["i"])
            loss, _ = inv.encoder_loss(G, enc, icfg, wp, noise, img, parts,
                                       image_terms=state["i"] % max(1, icfg.enc_image_every) == 0)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            state["i"] += 1
        with inv.frozen(G):
            row("encoder", icfg.enc_batch, timed(device, warmup, steps, enc_step))
    if want("invert"):
        y, parts = ds.batch(range(min(icfg.batch, len(ds))))
        keys = list(range(len(y)))
        enc.eval()
        n_opt = icfg.short_steps
        row(f"invert (encoder + {n_opt} steps)" if n_opt else "invert (encoder only)", len(y),
            timed(device, min(warmup, 1), steps, lambda: inv.invert_batch(G, y, parts, keys, icfg, None,
                                                                         encoder=enc)), unit="latents")
    if want("pairs"):
        wp = G.broadcast(G.map(torch.randn(max(1, pcfg.batch // (1 + pcfg.n_aug)), gcfg.z_dim, device=device)))
        per = 1 + pcfg.n_aug
        with torch.no_grad(), inv.frozen(g_real):
            row(f"pairs (1 + {pcfg.n_aug} augmented)", len(wp) * per,
                timed(device, warmup, steps, lambda: pd.realistic_faces(g_real, wp, list(range(len(wp))), pcfg)))
    if want("estimator"):
        pack = find_pack("default")
        n = ecfg.batch * (warmup + steps) + 8
        rng = np.random.default_rng(0)
        with tempfile.TemporaryDirectory() as tmp:
            write_paired_set(Path(tmp) / "pairs", pack,
                             rng.integers(0, 255, (n, ecfg.input_size, ecfg.input_size, 3), dtype=np.uint8),
                             rng.random((n, pack.n_continuous)).astype(np.float32),
                             np.stack([rng.integers(0, k, n) for k in pack.slot_sizes], 1), kind="bench")
            cfg = replace(ecfg, epochs=1, epoch_images=n, val_fraction=0.01, checkpoint_every=10 ** 9)
            quiet = dict(progress=False, log=lambda s: None, device=device)
            est.train_estimator(pack, Path(tmp) / "pairs", Path(tmp) / "w0", cfg, max_steps=warmup, **quiet)
            dev_mod.synchronize(device)
            t0 = time.perf_counter()
            est.train_estimator(pack, Path(tmp) / "pairs", Path(tmp) / "w1", cfg, max_steps=steps, **quiet)
            dev_mod.synchronize(device)
            row("estimator", ecfg.batch, time.perf_counter() - t0)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="tiny", help="retrain config: tiny, cpu, small or paper")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="stages (real parser avatar encoder invert pairs estimator)")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--out", help="write the JSON lines here too")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench(args.config, args.device, args.steps, args.warmup, set(args.only) if args.only else None)
    print(f"\n| stage | batch | images/s ({rows[0]['device'] if rows else ''}) |\n|---|---|---|")
    for r in rows:
        rate = r.get("images_per_s", r.get("latents_per_s"))
        print(f"| {r['stage']} | {r['batch']} | {rate} |")
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
