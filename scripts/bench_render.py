"""Benchmark of the avatar engine: apply time, samples/s by workers and shards, 50k-sample cost.

    .venv/bin/python scripts/bench_render.py [--count 60] [--resolution 256]

Prints a markdown table for the README. Numbers depend on the machine: say which one.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def apply_timing(n: int = 200) -> dict:
    from likeness.backend.schema import find_pack
    from likeness.render_engine.packs import open_pack_scene
    from likeness.render_engine.render import render_sample, setup_render
    from likeness.render_engine.rig import apply_vector
    pack = find_pack("default")
    open_pack_scene(pack)
    setup_render(pack, 256)
    vectors = [pack.sample_seeded(99, i) for i in range(n)]
    times = []
    for v in vectors:
        t = time.perf_counter()
        apply_vector(v)
        times.append(time.perf_counter() - t)
    render_times = []
    for v in vectors[:20]:
        apply_vector(v)
        t = time.perf_counter()
        render_sample(pack, 256)
        render_times.append(time.perf_counter() - t)
    return {"apply_ms_median": 1000 * statistics.median(times),
            "apply_ms_p95": 1000 * sorted(times)[int(0.95 * n)],
            "render_rgb_mask_s_median": statistics.median(render_times)}


def job_rate(count: int, resolution: int, workers: int, shards: int) -> float:
    """Samples/s of a whole job: `shards` concurrent processes with `workers` workers each."""
    out = Path(tempfile.mkdtemp(prefix="likeness-bench-"))
    # Build the pack cache first so no run pays for it.
    subprocess.run([sys.executable, "-m", "likeness.cli", "pack", "build"], check=True,
                   capture_output=True)
    t = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "likeness.cli", "render", "--count", str(count),
                               "--out", str(out), "--resolution", str(resolution), "--seed", "1",
                               "--shard", f"{i}/{shards}", "--workers", str(workers), "--no-progress"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(shards)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(err.decode())
    dt = time.perf_counter() - t
    shutil.rmtree(out)
    return count / dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=60)
    ap.add_argument("--resolution", type=int, default=256)
    args = ap.parse_args()
    cpu = platform.processor() or platform.machine()
    print(f"machine: {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}")
    a = apply_timing()
    print(json.dumps(a))
    rows = []
    for workers, shards in ((1, 1), (2, 1), (1, 2)):
        rate = job_rate(args.count, args.resolution, workers, shards)
        rows.append((workers, shards, rate))
    print(f"\n| workers × shards | samples/s ({args.resolution}², RGB + mask, {args.count} samples incl. start-up) | 50,000 samples |")
    print("|---|---|---|")
    for w, s, r in rows:
        print(f"| {w} × {s} | {r:.2f} | {50000 / r / 3600:.1f} h |")
    print(f"\napply one vector: median {a['apply_ms_median']:.2f} ms, p95 {a['apply_ms_p95']:.2f} ms; "
          f"render RGB + mask: median {a['render_rgb_mask_s_median'] * 1000:.0f} ms")


if __name__ == "__main__":
    main()
