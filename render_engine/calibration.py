"""Colour calibration of a pack: which rendered colour each colour parameter value gives.

The fidelity measures (``backend.fidelity.mask_stats``) judge an avatar by the robust CIELAB
colour of its rendered hair, skin, lips and eyes -- after lighting, shading and the 8-bit sRGB
film, not the material's own colour. To label real photos with colour *parameters* (training
targets whose renders reproduce the photo's colour), each parameter value must be mapped to the
colour its render shows. This module renders that map.

Everything is found from the manifest, not from parameter names:

* candidates: parameters with ``ramp``/``tint`` drives; the materials they drive map to
  CelebAMask-HQ classes through ``[segmentation]``, the classes to the colour regions of
  ``fidelity.COLOUR_RULES``;
* the default avatar is rendered with each candidate at its minimum and maximum: a parameter
  drives the region whose measured colour moves most (at least ``DRIVE_MIN_DE00``); a candidate
  whose materials are not visible on the default avatar (facial hair, hats) drives nothing;
* per region, a grid over its parameters (normalised [0, 1] units): a ramp parameter at its
  stops and midpoints, a tint-only one at ``TINT_POINTS`` points, shrunk until the grid has at
  most ``max_points`` points; every grid point is rendered (RGB only: colour drives never move
  geometry, so the default avatar's mask is reused) and measured with ``mask_stats``;
* variants: the slot whose default option shows an object carrying the region's materials (the
  hair style for hair) changes the shading (long hair renders up to ~5 dE00 darker than the
  crop). Each of its options is rendered along the region's first ramp at its stops (other
  parameters at their defaults) and stored as a Lab offset from the default option, so label
  makers can build a style-specific or style-averaged table (``training.estimator.real_labels``).

The result is plain JSON (lists and numbers), cached as
``<cache>/calibration/<pack>-<schema>.json`` and rebuilt when its fingerprint (manifest, pack
build, Blender version, resolution, grid settings, fidelity rules, this module's version) changes.

Rendering replaces the current Blender file with the pack's scene (like ``likeness validate``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..backend.cache import cache_root
from ..backend import fidelity
from ..backend.colour import ciede2000
from ..backend.schema import CLASS_IDS, Pack

CALIBRATION_VERSION = 1
DRIVE_MIN_DE00 = 1.0      # min-to-max colour change that counts as "this parameter drives it"
TINT_POINTS = 5           # grid points of a tint-only parameter
MAX_POINTS = 400          # default cap on one region's grid (renders)




def calibration_path(pack: Pack, cache_dir: str | os.PathLike | None = None) -> Path:
    base = Path(cache_dir) if cache_dir else cache_root() / "calibration"
    return base / f"{pack.id}-{pack.schema_hash}.json"


# --------------------------------------------------------------------------------------------
# Manifest analysis (no Blender needed)
# --------------------------------------------------------------------------------------------

def region_of_class() -> dict[int, str]:
    """CelebAMask-HQ class id -> fidelity colour region ("hair", "skin", "lips", "eyes")."""
    out: dict[int, str] = {}
    for region, rule in fidelity.COLOUR_RULES.items():
        for cid in rule.classes:
            out.setdefault(int(cid), region)
    return out


def colour_candidates(pack: Pack) -> dict[str, dict[str, list[str]]]:
    """Parameters with colour drives -> {region: [driven materials of that region]}.

    A material counts when the manifest's segmentation puts it in a class of a colour region."""
    by_class = region_of_class()
    out: dict[str, dict[str, list[str]]] = {}
    for p in pack.parameters:
        regions: dict[str, list[str]] = {}
        for d in p.drives:
            if d.kind not in ("ramp", "tint"):
                continue
            for m in d.materials:
                cls = pack.class_of_material(m)
                region = by_class.get(CLASS_IDS[cls]) if cls is not None else None
                if region is not None and m not in regions.setdefault(region, []):
                    regions[region].append(m)
        regions = {r: ms for r, ms in regions.items() if ms}
        if regions:
            out[p.name] = regions
    return out


def axis_points(pack: Pack, name: str) -> int:
    """Grid points of a colour parameter: ramp stops and midpoints, else ``TINT_POINTS``."""
    ramps = [d for d in pack.parameter(name).drives if d.kind == "ramp"]
    if ramps:
        return 2 * max(len(d.colors) for d in ramps) - 1
    return TINT_POINTS


def ramp_stops(pack: Pack, name: str) -> int | None:
    ramps = [d for d in pack.parameter(name).drives if d.kind == "ramp"]
    return max(len(d.colors) for d in ramps) if ramps else None


def grid_counts(pack: Pack, params: list[str], max_points: int) -> list[int]:
    """Points per axis, shrunk until their product is at most ``max_points``: ramp axes first
    drop their midpoints (still on the stops), then tint axes go down to 3 points, then the
    longest axis loses points (min 2)."""
    counts = [axis_points(pack, n) for n in params]
    stops = [ramp_stops(pack, n) for n in params]
    while math.prod(counts) > max_points:
        shrinkable = [i for i, (c, s) in enumerate(zip(counts, stops)) if s and c > s]
        if shrinkable:
            i = max(shrinkable, key=lambda k: counts[k])
            counts[i] = stops[i]
            continue
        tints = [i for i, (c, s) in enumerate(zip(counts, stops)) if not s and c > 3]
        i = max(tints or range(len(counts)), key=lambda k: counts[k])
        if counts[i] <= 2:
            break
        counts[i] -= 1
    return counts


def fingerprint(pack: Pack, resolution: int, max_points: int, variants: bool) -> str:
    import bpy
    h = hashlib.sha256()
    h.update((pack.root / "pack.toml").read_bytes())
    if pack.builder and not pack.blend:
        from .packs import build_hash
        h.update(build_hash(pack).encode())
    elif pack.blend_path() is not None and pack.blend_path().is_file():
        st = pack.blend_path().stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(Path(__file__).read_bytes())
    h.update(repr(sorted((k, v.classes, v.l_lo, v.l_hi, v.erode)
                         for k, v in fidelity.COLOUR_RULES.items())).encode())
    h.update(json.dumps([CALIBRATION_VERSION, bpy.app.version_string, int(resolution),
                         int(max_points), bool(variants)]).encode())
    return h.hexdigest()[:20]


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

class _Renderer:
    """The pack's scene with a fixed camera; measures region colours of vectors."""

    def __init__(self, pack: Pack, resolution: int):
        from .packs import open_pack_scene
        from .render import setup_render
        self.pack = pack
        self.resolution = int(resolution)
        open_pack_scene(pack)
        setup_render(pack, self.resolution)
        self.renders = 0

    def render(self, vector, mask: bool = True):
        from .render import render_sample
        from .rig import apply_vector
        apply_vector(vector)
        self.renders += 1
        return render_sample(self.pack, self.resolution, mask=mask)

    def colours(self, vector, mask: np.ndarray) -> dict[str, Any]:
        """Region colours of ``vector`` rendered over a known (unchanged) mask."""
        rgb, _ = self.render(vector, mask=False)
        s = fidelity.mask_stats(mask, rgb)
        return {r: s[r] for r in fidelity.COLOURS}


def _with(pack: Pack, base, params: dict[str, float] | None = None, slots: dict[str, str] | None = None):
    v = pack.vector_from_json(base.to_json())
    for name, u in (params or {}).items():
        v.params[name] = pack.parameter(name).denormalize(float(u))
    for name, oid in (slots or {}).items():
        v.slots[name] = oid
    return v


def _variant_slot(pack: Pack, materials: list[str]) -> str | None:
    """The slot whose default option shows an object using one of ``materials``."""
    import bpy
    wanted = set(materials)
    for s in pack.slots:
        default = s.option(s.default or s.options[0].id)
        for name in default.show:
            ob = bpy.data.objects.get(name)
            if ob is None:
                continue
            if any(ms.material is not None and ms.material.name in wanted for ms in ob.material_slots):
                return s.name
    return None


def calibrate_colours(pack: Pack, resolution: int = 128, *, max_points: int = MAX_POINTS,
                      variants: bool = True, cache: bool = True,
                      cache_dir: str | os.PathLike | None = None,
                      log: Callable[[str], Any] | None = None) -> dict:
    """Render and measure the pack's colour parameters; return (and cache) the tables.

    Returns a JSON-able dict::

        {"pack", "schema", "fingerprint", "resolution", "blender", "renders", "seconds",
         "default": {region: [L, a, b] | None},          # the default avatar's measured colours
         "drives": {param: {"region": r, "de00": min-to-max change, "all": {region: de00}}},
         "regions": {region: {
             "params": [names],                           # grid axes, manifest order
             "axes": [[u, ...], ...],                     # normalised [0, 1] values per axis
             "lab": nested [n1, ..., nk, 3],              # measured CIELAB at every grid point
             "variants": None | {"slot", "param", "axis": [u...], "default_option",
                                 "options": {id: {"weight", "tags", "lab": [[L,a,b]...],
                                                  "offset": [[dL,da,db]...]}}}}}}

    ``max_points`` caps each region's grid; ``variants`` adds the per-option offsets of the slot
    that shapes the region. Cached under ``calibration_path(pack, cache_dir)`` unless
    ``cache=False``.
    """
    import bpy
    say = log or (lambda s: None)
    key = fingerprint(pack, resolution, max_points, variants)
    path = calibration_path(pack, cache_dir)
    if cache and path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("fingerprint") == key:
                return data
        except (OSError, ValueError):
            pass
    t0 = time.monotonic()
    candidates = colour_candidates(pack)
    r = _Renderer(pack, resolution)
    base = pack.default_vector()
    rgb0, mask0 = r.render(base)
    s0 = fidelity.mask_stats(mask0, rgb0)
    default = {reg: (list(s0[reg]) if s0[reg] is not None else None) for reg in fidelity.COLOURS}

    # 1. which region each candidate parameter really moves on the default avatar
    drives: dict[str, dict] = {}
    for name, regions in candidates.items():
        lo = r.colours(_with(pack, base, {name: 0.0}), mask0)
        hi = r.colours(_with(pack, base, {name: 1.0}), mask0)
        moved = {}
        for reg in regions:
            if lo.get(reg) is not None and hi.get(reg) is not None:
                moved[reg] = float(ciede2000(np.array(lo[reg]), np.array(hi[reg])))
        if not moved:
            continue
        best = max(moved, key=moved.get)
        if moved[best] >= DRIVE_MIN_DE00:
            drives[name] = {"region": best, "de00": moved[best], "all": moved}
        say(f"calibration: {name} -> {best} ({moved[best]:.1f} dE00 min to max)")

    # 2. a grid per region
    regions_out: dict[str, dict] = {}
    for reg in fidelity.COLOURS:
        params = [p.name for p in pack.parameters if drives.get(p.name, {}).get("region") == reg]
        if not params:
            continue
        counts = grid_counts(pack, params, max_points)
        axes = [np.linspace(0.0, 1.0, c) for c in counts]
        lab = np.full((*counts, 3), np.nan)
        for idx in np.ndindex(*counts):
            v = _with(pack, base, {n: axes[k][idx[k]] for k, n in enumerate(params)})
            c = r.colours(v, mask0)[reg]
            if c is not None:
                lab[idx] = c
        if np.isnan(lab).any():
            raise RuntimeError(f"calibration of '{reg}' lost the region at some grid points")
        entry: dict[str, Any] = {"params": params, "axes": [a.tolist() for a in axes],
                                 "lab": lab.round(3).tolist(), "variants": None}
        say(f"calibration: {reg} grid {'x'.join(map(str, counts))} over {', '.join(params)}")

        # 3. variants of the slot that shapes this region
        mats = sorted({m for n in params for m in candidates[n].get(reg, [])})
        vslot = _variant_slot(pack, mats) if variants else None
        ramp_param = next((n for n in params if ramp_stops(pack, n)), None)
        if vslot is not None and ramp_param is not None:
            slot = pack.slot(vslot)
            vaxis = np.linspace(0.0, 1.0, ramp_stops(pack, ramp_param))
            opts: dict[str, dict] = {}
            for o in slot.options:
                vb = _with(pack, base, slots={vslot: o.id})
                _, mask_o = r.render(vb)
                seq = []
                for u in vaxis:
                    c = r.colours(_with(pack, vb, {ramp_param: u}), mask_o)[reg]
                    if c is None:
                        break
                    seq.append(c)
                if len(seq) == len(vaxis):
                    opts[o.id] = {"weight": o.weight, "tags": dict(o.tags),
                                  "lab": np.round(seq, 3).tolist()}
            default_opt = slot.default or slot.options[0].id
            if default_opt in opts:
                ref = np.array(opts[default_opt]["lab"])
                for o in opts.values():
                    o["offset"] = (np.array(o["lab"]) - ref).round(3).tolist()
                entry["variants"] = {"slot": vslot, "param": ramp_param, "axis": vaxis.tolist(),
                                     "default_option": default_opt, "options": opts}
                say(f"calibration: {reg} variants over slot '{vslot}' ({len(opts)} options)")
        regions_out[reg] = entry

    data = {"version": CALIBRATION_VERSION, "pack": pack.id, "schema": pack.schema_hash,
            "fingerprint": key, "resolution": int(resolution), "blender": bpy.app.version_string,
            "max_points": int(max_points), "renders": r.renders,
            "seconds": round(time.monotonic() - t0, 1), "default": default, "drives": drives,
            "regions": regions_out}
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    return data


def cli_calibrate(argv=None) -> int:
    """python -m likeness.render_engine.calibration [--pack default] [--resolution 128]"""
    import argparse
    ap = argparse.ArgumentParser(description="Colour calibration tables of a pack")
    ap.add_argument("--pack", default="default")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--max-points", type=int, default=MAX_POINTS)
    ap.add_argument("--rebuild", action="store_true")
    args = ap.parse_args(argv)
    from ..backend.schema import find_pack
    pack = find_pack(args.pack)
    if args.rebuild:
        calibration_path(pack).unlink(missing_ok=True)
    data = calibrate_colours(pack, args.resolution, max_points=args.max_points, log=print)
    print(f"{data['renders']} renders in {data['seconds']} s -> {calibration_path(pack)}")
    for reg, e in data["regions"].items():
        lab = np.array(e["lab"]).reshape(-1, 3)
        print(f"  {reg}: params {e['params']}; L* {lab[:, 0].min():.1f}..{lab[:, 0].max():.1f}, "
              f"a* {lab[:, 1].min():.1f}..{lab[:, 1].max():.1f}, "
              f"b* {lab[:, 2].min():.1f}..{lab[:, 2].max():.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_calibrate())
