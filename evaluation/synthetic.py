"""``likeness eval synth``: a synthetic benchmark with known answers (issue #6).

Held-out vectors sampled from the pack -> engine renders -> inversion into G_avatar's W+ with the
retrain work folder's encoder (+ its short optimisation, ``invert.invert_dataset``) -> realistic faces
x = G_real(w*) and, with ``--augment K``, K semantically augmented faces per code
(``paired_data.realistic_faces``: the pairs stage's λs, seed and noise). ``likeness eval`` reads the
folder directly::

    BENCH/renders/                       the engine dataset (images/, masks/, vectors/, manifest.json):
                                         a third photo set, with no domain gap
    BENCH/invert/latents.safetensors     w* of every render (``invert.load_latents``), and its chunks
    BENCH/realistic/images/<stem>.png    G_real(w*) at G's resolution, already in the aligned frame
    BENCH/augmented/images/<stem>_a<k>.png   k = 0..K-1
    BENCH/vectors/<stem>.json, <stem>_a<k>.json   the true vector of every image stem (an augmented
                                         face's is its source render's)
    BENCH/manifest.json                  work folder, generator fingerprints, seeds, counts, timings

    likeness eval --photos BENCH/realistic/images --aligned --truth BENCH/vectors --methods ... --out R

Held out, and how: sample i is the pack's ``sample_seeded(job_seed, i)`` with job_seed = SEED_BASE + --seed.
The pack keys each vector's random stream by (job seed, index), so a job seed other than the training
render job's (render/manifest.json of the work folder; a retrain config's seed, 0) never repeats a
training vector; equal seeds are refused. The faces' noise maps and augmentation codes are keyed by
``(job_seed << 32) + i``, a range the pairs stage (keyed by render index < 2^32) never uses, so no
training pair's augmentation code comes back either. (The inversion's own noise maps are keyed by render
index, like every inversion: they carry nothing of the vector.)
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ..backend.errors import UserError

KIND = "likeness synthetic benchmark"
SEED_BASE = 1_000_000        # benchmark job seeds; retrain renders use the config's seed (0)
KEY_SHIFT = 32               # face keys (job_seed << 32) + i: above any training render index


def face_keys(job_seed: int, n: int) -> list[int]:
    return [(job_seed << KEY_SHIFT) + i for i in range(n)]


def _existing(out: Path) -> dict | None:
    """The manifest of a benchmark folder at ``out`` (None for a missing or empty folder); any
    other existing content is refused, so a typo in --out never writes into someone's folder."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    man = out / "manifest.json"
    if man.is_file():
        try:
            data = json.loads(man.read_text())
        except (OSError, json.JSONDecodeError):
            data = None
        if isinstance(data, dict) and data.get("kind") == KIND:
            return data
    if any(out.iterdir()):
        raise UserError(f"--out {out}: exists and is not a synthetic benchmark folder; use a new or "
                        "empty folder")
    return None


def _load_work(work):
    """Everything the build reads from a retrain work folder, each missing piece a UserError."""
    from ..training.pairs.invert import generator_fingerprint, load_encoder
    from ..training.baselines.mapper import locate_work
    from ..training.pipeline.retrain import get_config
    from ..training.generators.train_gan import load_generator, load_parser
    src, pack = locate_work(work)                 # refuses non-work and --baseline folders
    g_avatar, _ = load_generator(src.work / "avatar")
    if not (src.work / "encoder").is_dir():
        raise UserError(f"{src.work}: no inversion encoder (encoder/); run the retrain through its "
                        "encoder stage first")
    encoder = load_encoder(src.work / "encoder", g_avatar)
    g_real, _ = load_generator(src.real)
    if (g_real.n_latent, g_real.cfg.w_dim) != (g_avatar.n_latent, g_avatar.cfg.w_dim):
        raise UserError(f"{src.work}: G_real and G_avatar do not share a W+ space")
    parser = load_parser(src.parser)[0] if src.parser else None
    render_man = json.loads((src.render / "manifest.json").read_text())
    cfg = get_config(src.identity.get("config", ""))
    fps = {"G_avatar": generator_fingerprint(g_avatar), "G_real": generator_fingerprint(g_real),
           "encoder": generator_fingerprint(encoder)}
    return src, pack, cfg, g_avatar, encoder, g_real, parser, render_man, fps


def build_benchmark(work, count: int, out, seed: int = 0, augment: int = 0,
                    invert_steps: int | None = None, workers: int = 0, threads: int = 1,
                    progress: bool = True, log=print) -> dict[str, Any]:
    """Build (or finish) the benchmark folder ``out``; returns its manifest."""
    if count < 1:
        raise UserError(f"--count must be at least 1, got {count}")
    if augment < 0:
        raise UserError(f"--augment must be 0 or more, got {augment}")
    if invert_steps is not None and invert_steps < 0:
        raise UserError(f"--invert-steps must be 0 or more, got {invert_steps}")
    if seed < 0:
        raise UserError(f"--seed must be 0 or more, got {seed}")
    out = Path(out)
    have = _existing(out)
    import torch
    torch.set_num_threads(threads)
    from ..render_engine.dataset import Job, atomic_write, render_dataset
    from ..render_engine.validate_job import machine
    from ..training.pairs import invert
    from ..training.pairs import paired_data
    from .harness import _write_png
    t_start = time.perf_counter()
    src, pack, rcfg, g_avatar, encoder, g_real, parser, render_man, fps = _load_work(work)
    job_seed = SEED_BASE + seed
    if job_seed == render_man.get("seed"):
        raise UserError(f"--seed {seed}: job seed {job_seed} is the training renders' own; pick another")
    inv_cfg = invert.get_config(rcfg.invert, short_steps=invert_steps)
    pair_cfg = paired_data.get_config(rcfg.paired, n_aug=augment)
    settings = {"work": str(src.work.resolve()), "count": count, "seed": seed, "augment": augment,
                "invert_steps": inv_cfg.short_steps, "generators": fps}
    if have is not None and have.get("settings") != settings:
        diff = [k for k in settings if have.get("settings", {}).get(k) != settings[k]]
        raise UserError(f"--out {out} holds a benchmark of other settings ({', '.join(diff)}); use "
                        "another --out")
    man: dict[str, Any] = {"kind": KIND, "format": 1, "complete": False, "settings": settings}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "manifest.json", json.dumps(man, indent=2).encode())

    # 1. renders of held-out vectors, at the training renders' resolution, jitter and engine
    t0 = time.perf_counter()
    job = Job(pack, out / "renders", count=count, seed=job_seed, resolution=int(render_man["resolution"]),
              jitter=bool(render_man.get("jitter")), engine=render_man.get("engine", "workbench"))
    render_dataset(job, workers=workers, progress=progress)
    # 2. encoder + short optimisation into G_avatar's W+ (resumable; refuses a folder of other settings)
    t1 = time.perf_counter()
    lat = invert.load_latents(invert.invert_dataset(g_avatar, encoder, job.out, out / "invert", inv_cfg,
                                                    parser=parser, progress=progress, log=log))
    names, wp = lat["names"], lat["wp"]
    if names != [job.name(i) for i in range(count)]:
        raise UserError(f"{out / 'invert'}: latents do not match the {count} renders; delete the folder")
    # 3. G_real(w*) and its semantic augmentations, in the pairs stage's batches and noise
    t2 = time.perf_counter()
    keys = face_keys(job_seed, count)
    per = 1 + augment
    res = g_real.cfg.resolution
    step = max(1, pair_cfg.batch // per)
    stems: dict[str, dict] = {}
    with invert.frozen(g_real):
        for i in range(0, count, step):
            faces = paired_data.realistic_faces(g_real, wp[i:i + step], keys[i:i + step], pair_cfg)
            imgs = paired_data.to_uint8(faces.flatten(0, 1), res).reshape(-1, per, res, res, 3)
            for b, name in enumerate(names[i:i + step]):
                rec = json.loads((job.out / "vectors" / f"{name}.json").read_text())
                _write_png(out / "realistic" / "images" / f"{name}.png", imgs[b, 0])
                aug = [f"{name}_a{k}" for k in range(augment)]
                for k, a in enumerate(aug):
                    _write_png(out / "augmented" / "images" / f"{a}.png", imgs[b, 1 + k])
                for stem, k in [(name, None), *zip(aug, range(augment))]:
                    truth = {"stem": stem, "source": name, "augmentation": k, "index": rec["index"],
                             "job_seed": job_seed, "vector": rec["vector"]}
                    (out / "vectors").mkdir(exist_ok=True)
                    atomic_write(out / "vectors" / f"{stem}.json", json.dumps(truth).encode())
                stems[name] = {"index": rec["index"], "face_key": keys[i + b], "augmented": aug,
                               "inversion_loss": float(lat["loss"][i + b])}
    t3 = time.perf_counter()
    images = count * per
    man.update({
        "complete": True,
        "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "work": settings["work"],
        "pack": {"id": pack.id, "version": pack.version, "schema": pack.schema_hash},
        "retrain_config": rcfg.name,
        "generators": {**fps, "G_real_checkpoint": str(src.real),
                       "G_avatar_checkpoint": str(src.work / "avatar"),
                       "resolution": res},
        "seeds": {"user_seed": seed, "job_seed": job_seed, "training_job_seed": render_man.get("seed"),
                  "training_count": render_man.get("count"),
                  "rule": "vector i = pack.sample_seeded(job_seed, i); job_seed = SEED_BASE + seed "
                          f"({SEED_BASE}) differs from the training renders' job seed, so the vector "
                          "streams are disjoint",
                  "face_keys": f"(job_seed << {KEY_SHIFT}) + i: noise and augmentation codes of G_real "
                               "faces, above every training render index",
                  "augmentation_seed": pair_cfg.seed},
        "render": {"resolution": job.resolution, "jitter": job.jitter, "engine": job.engine},
        "inversion": {"mode": lat["meta"].get("mode"), "short_steps": inv_cfg.short_steps,
                      "config": inv_cfg.name, "perceptual": lat["meta"].get("perceptual"),
                      "mean_loss": float(lat["loss"].mean())},
        "augmentation": {"n_aug": augment, "lambdas": [list(p) for p in pair_cfg.aug_lambdas],
                         "noise": pair_cfg.noise, "paired_config": pair_cfg.name},
        "counts": {"vectors": count, "renders": count, "realistic": count, "augmented": count * augment,
                   "truth_files": images},
        "hardware": {"machine": machine(), "threads": threads, "render_workers": workers,
                     "load_average": [round(x, 2) for x in os.getloadavg()]},
        "timings_s": {"load": round(t0 - t_start, 2), "render": round(t1 - t0, 2),
                      "invert": round(t2 - t1, 2), "faces": round(t3 - t2, 2),
                      "total": round(t3 - t_start, 2),
                      "per_vector": round((t3 - t_start) / count, 3),
                      "per_image": round((t3 - t_start) / images, 3)},
        "folders": {"renders": "renders/images", "realistic": "realistic/images",
                    "augmented": "augmented/images" if augment else None, "truth": "vectors",
                    "latents": "invert/latents.safetensors"},
        "evaluate": f"likeness eval --photos {out}/realistic/images --aligned --truth {out}/vectors "
                    "--methods SPEC,... --out REPORT_DIR",
        "stems": stems,
    })
    atomic_write(out / "manifest.json", json.dumps(man, indent=2).encode())
    log(f"synthetic benchmark: {count} vectors, {count} realistic and {count * augment} augmented faces "
        f"in {out} ({man['timings_s']['total']:.1f} s, {man['timings_s']['per_image']:.2f} s an image)")
    return man


def cli_synth(args) -> int:
    build_benchmark(args.work, args.count, args.out, seed=args.seed, augment=args.augment,
                    invert_steps=args.invert_steps, workers=args.workers, threads=args.threads,
                    progress=not args.no_progress)
    return 0
