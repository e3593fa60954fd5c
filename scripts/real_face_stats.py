#!/usr/bin/env python
"""Photo-side fidelity statistics over the real validation faces, and a constant predictor's score.

    python scripts/real_face_stats.py [--split val] [--hair '#3b2a20'] [--skin '#e0b899']
                                      [--lips '#b05a55'] [--eyes '#4a3628'] [--json out.json]

Prints how many faces have glasses / headwear / earrings / fringe, the spread of hair, skin, lip
and eye colours (CIELAB), the hair amount and the shape measures -- what an estimator must
capture -- and the CIEDE2000 a constant avatar with the given default colours scores, beside the
best constant colour (the face colour with the lowest median difference to all the others).
The faces are read in place (../shared/data/celebamask-hq-1k or $LIKENESS_CELEBAMASK).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from likeness.backend import fidelity as F
from likeness.backend import realfaces
from likeness.backend.colour import ciede2000, lab_to_hex

# Placeholder defaults until the stylized pack's default colours are fixed: pass the pack's.
DEFAULT_COLOURS = {"hair": "#3b2a20", "skin": "#e0b899", "lips": "#b05a55", "eyes": "#4a3628"}


def _pct(values, qs=(5, 25, 50, 75, 95), digits=3) -> str:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if not len(v):
        return "n=0"
    p = np.percentile(v, qs)
    return f"n={len(v):3d}  " + "  ".join(f"p{q}={x:.{digits}f}" for q, x in zip(qs, p))


def best_constant(labs: np.ndarray) -> tuple[np.ndarray, float]:
    """The sample colour whose median CIEDE2000 to all samples is lowest (a medoid)."""
    d = ciede2000(labs[:, None, :], labs[None, :, :])
    med = np.median(d, axis=1)
    i = int(np.argmin(med))
    return labs[i], float(med[i])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=None, help="CelebAMask-HQ 1k folder (default: shared data)")
    ap.add_argument("--split", default="val", choices=realfaces.SPLITS)
    for name, hexv in DEFAULT_COLOURS.items():
        ap.add_argument(f"--{name}", default=hexv, help=f"constant predictor's {name} colour "
                        f"(hex, default {hexv})")
    ap.add_argument("--json", default=None, help="also write every face's stats here (outside "
                    "the repository: they derive from the licensed faces)")
    args = ap.parse_args(argv)

    stems = realfaces.stems(args.root, split=args.split)
    t0 = time.time()
    stats = []
    for st in stems:
        rgb, mask = realfaces.load_pair(st, args.root)
        stats.append(F.mask_stats(mask, rgb))
    n = len(stats)
    print(f"{n} faces ({args.split} split), {time.time() - t0:.1f} s")

    print("\nPresence (photo side)")
    for name in F.PRESENCE:
        vals = [s[name] for s in stats]
        print(f"  {name:9s} yes {sum(v is True for v in vals):3d}   no {sum(v is False for v in vals):3d}"
              f"   unknown {sum(v is None for v in vals):3d}")
    ff = [s["fringe_fraction"] for s in stats if s["fringe_fraction"] is not None]
    hist, edges = np.histogram(ff, bins=10, range=(0, 1))
    print("  fringe fraction histogram (0..1 in tenths):", " ".join(str(h) for h in hist),
          f"  threshold {F.FRINGE_THRESHOLD}")

    const = F.constant_stats(**{k: getattr(args, k) for k in DEFAULT_COLOURS})
    print("\nColours (CIELAB; percentiles over faces)")
    summary = {}
    for name in F.COLOURS:
        labs = np.array([s[name] for s in stats if s[name] is not None], dtype=float)
        print(f"  {name}: found in {len(labs)}/{n}")
        if not len(labs):
            continue
        for j, ch in enumerate("Lab"):
            print(f"    {ch}*  {_pct(labs[:, j], digits=1)}")
        med_lab = np.median(labs, axis=0)
        spread = ciede2000(labs, med_lab)
        best, best_med = best_constant(labs)
        de_const = ciede2000(labs, np.asarray(const[name]))
        best_de = ciede2000(labs, best)
        print(f"    median colour {lab_to_hex(med_lab)} (L {med_lab[0]:.1f}, a {med_lab[1]:.1f}, "
              f"b {med_lab[2]:.1f}); dE00 to it: median {np.median(spread):.2f}, "
              f"p90 {np.percentile(spread, 90):.2f}")
        print(f"    constant {getattr(args, name)}: dE00 median {np.median(de_const):.2f}, "
              f"p90 {np.percentile(de_const, 90):.2f}")
        print(f"    best constant {lab_to_hex(best)}: dE00 median {best_med:.2f}, "
              f"p90 {np.percentile(best_de, 90):.2f}")
        summary[name] = {"constant_median": float(np.median(de_const)),
                         "best_constant_median": best_med}
    for name, limit in (("hair", 10.0), ("skin", 8.0)):
        if name in summary:
            need = min(limit, 2 / 3 * summary[name]["constant_median"])
            print(f"  => {name}: the model needs median dE00 <= {need:.2f} "
                  f"(<= {limit:g} and <= 2/3 of the constant's {summary[name]['constant_median']:.2f})")

    print("\nHair amount")
    print(f"  hair_fraction  {_pct([s['hair_fraction'] for s in stats])}")
    print("\nShape measures")
    for k in (*F.SHAPES, "yaw"):
        print(f"  {k:18s} {_pct([s[k] for s in stats])}")
    yaw = [abs(s["yaw"]) for s in stats if s["yaw"] is not None]
    print(f"  |yaw| <= 0.1 (near frontal): {sum(y <= 0.1 for y in yaw)}/{n}")

    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"stems": stems, "stats": stats}, f, default=list)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
