"""``likeness validate``: a model judged on the real validation photos by what their masks say.

For every validation face (stems beginning c-f of the shared CelebAMask-HQ subset, which no model
trains on): photo -> vector -> engine render + mask, then the photo's own parsing mask and the
avatar's mask/render are compared with ``backend.fidelity`` (presence, colours, hair amount,
fringe, shape). The pack's default avatar is scored the same way as the constant predictor.
Detection failures are counted and listed, never dropped. ``colours``: "photo" or "model", the
Predictor's colour mode (default: photo colours when the face parser and the pack's calibration are
found); the report records the mode and, per colour region, how many avatars took the photo's
colour. The photo's parser never sees its true mask, which is what the colours are scored against.
Output folder::

    report.json  report.md  report.html  per_photo.csv  sheet.png (photo | avatar, 24 photos)
    stats.json (per-photo measures, photo and avatar side: paired comparisons of two models)
"""
from __future__ import annotations

import csv
import json
import platform
import os
import time
from pathlib import Path

import numpy as np

from ..backend import fidelity, realfaces, viewer
from ..backend.errors import UserError
from ..backend.schema import find_pack
from ..backend.visual import grid, resize_square

SHEET_PHOTOS = 24
VIEWER_SHEET_PHOTOS = 48
RENDER_RES = 256


def machine() -> str:
    """What produced a figure: core count, architecture, CPU model (when the OS says), system."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = f" ({line.split(':', 1)[1].strip()})"
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {platform.machine()} CPU{model}, {platform.system()}"


class AvatarRenderer:
    """The pack's scene opened once: vector -> (RGB uint8 HxWx3, class-id mask HxW).

    Shared by ``likeness validate`` and ``likeness eval`` so both pose and render avatars (and score
    the pack's default avatar as the constant predictor) the same way.
    """

    def __init__(self, pack, resolution: int = RENDER_RES):
        from .packs import open_pack_scene
        from .render import setup_render
        self.pack, self.resolution = pack, resolution
        open_pack_scene(pack)
        setup_render(pack, resolution)

    def render(self, vector) -> tuple[np.ndarray, np.ndarray]:
        from .render import render_sample
        from .rig import apply_vector
        apply_vector(vector)
        return render_sample(self.pack, self.resolution)

    def constant_stats(self) -> dict:
        """Fidelity stats of the pack's default avatar: the constant predictor every model must beat."""
        vector = self.pack.default_vector()
        rgb, mask = self.render(vector)
        return fidelity.avatar_stats(mask, rgb, vector=vector)


PERTURBATIONS = ("loose_crop", "blur", "jpeg30", "warm", "cold", "under", "over", "noise", "low_res")
NOISE_SIGMA = 8.0           # sensor noise of a phone in dim light, in 8-bit levels
LOW_RES = 128               # px across the frame: the 512 px shared faces at a quarter of their size


def perturb(rgb: np.ndarray, kind: str) -> np.ndarray:
    """A validation photo as a user's camera might give it (the robustness table's rows):
    ``loose_crop`` an FFHQ-style wider frame (the face at 70 %, the rest reflected), ``blur`` a
    Gaussian of 2 px at 512, ``jpeg30`` JPEG quality 30, ``warm`` / ``cold`` a white-balance shift
    (red and blue gains 1.15 / 0.85 and back), ``under`` / ``over`` exposure (x0.55 / x1.6),
    ``noise`` Gaussian sensor noise (``NOISE_SIGMA`` levels, the same seeded pattern on every photo),
    ``low_res`` a small photo (down to ``LOW_RES`` px across, the frame's size kept by bicubic
    upscaling, as a low-resolution collection or a webcam gives a face)."""
    import io
    from PIL import Image, ImageFilter
    img = Image.fromarray(rgb)
    if kind == "loose_crop":
        h, w = rgb.shape[:2]
        small = np.asarray(img.resize((int(w * 0.7), int(h * 0.7)), Image.Resampling.LANCZOS))
        py, px = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
        out = np.pad(small, ((py, h - small.shape[0] - py), (px, w - small.shape[1] - px), (0, 0)),
                     mode="reflect")
        return np.ascontiguousarray(out)
    if kind == "blur":
        return np.asarray(img.filter(ImageFilter.GaussianBlur(2)))
    if kind == "jpeg30":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=30)
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    if kind == "noise":
        noise = np.random.default_rng(0).normal(0.0, NOISE_SIGMA, rgb.shape)
        return np.clip(rgb + noise + 0.5, 0, 255).astype(np.uint8)
    if kind == "low_res":
        h, w = rgb.shape[:2]
        small = img.resize((LOW_RES, max(1, round(LOW_RES * h / w))), Image.Resampling.LANCZOS)
        return np.asarray(small.resize((w, h), Image.Resampling.BICUBIC))
    gains = {"warm": (1.15, 1.0, 0.85), "cold": (0.85, 1.0, 1.15), "under": (0.55,) * 3,
             "over": (1.6,) * 3}
    if kind not in gains:
        raise UserError(f"unknown perturbation '{kind}' (known: {', '.join(PERTURBATIONS)})")
    lin = (rgb / 255.0) ** 2.2 * np.array(gains[kind])
    return (np.clip(lin, 0, 1) ** (1 / 2.2) * 255 + 0.5).astype(np.uint8)


def real_photo_stats(stem: str, root) -> tuple[np.ndarray, dict]:
    """(RGB, ``fidelity.mask_stats``) of one shared real face, measured by its own parsing mask."""
    rgb, mask = realfaces.load_pair(stem, root)
    return rgb, fidelity.mask_stats(mask, rgb)


def score_fidelity(photo_stats: list, avatar_stats: list, constant: dict) -> dict:
    """``fidelity.compare`` of (photo, avatar) pairs plus the targets as JSON rows."""
    report = fidelity.compare(photo_stats, avatar_stats, constant)
    report["targets"] = [{"name": n, "value": v, "target": t, "passed": p}
                         for n, v, t, p in fidelity.check_targets(report)]
    return report


def validate(model: str, pack_name: str = "default", out: str = "out/validate",
             data: str | None = None, limit: int | None = None, device: str = "cpu",
             log=print, colours: str | None = None, shape: str | None = None,
             attributes: str | None = None, compare: str | None = None,
             perturbation: str | None = None) -> dict:
    """Every validation photo -> avatar -> render, judged by the viewer's yardstick (the headline:
    ``backend.viewer``) and the mask measures. ``compare``: another validate output folder (its
    ``viewer.json``) for paired bootstrap intervals of this model against that one."""
    from ..backend.models import find_model
    from ..backend.predict import Failure, Predictor
    pack = find_pack(pack_name)
    model_path = Path(model) if model else find_model(pack)
    root = Path(data) if data else realfaces.default_root()
    stems = realfaces.stems(root, split="val")
    if limit:
        stems = stems[:limit]
    if not stems:
        raise UserError(f"no validation photos in {root}")
    from ..backend.outputs import check_output_dir
    out_path = check_output_dir(out)        # before the work: a folder we cannot write fails now
    t0 = time.perf_counter()
    labels = viewer.read_labels(viewer.labels_path(root))
    rule = viewer.default_colour_rule()
    predictor = Predictor(pack, model_path, device=device, colours=colours, shape=shape,
                          attributes=attributes)
    paths = [str(root / "images" / f"{s}.jpg") for s in stems]
    if perturbation:       # the photos as a camera might give them; judged against the same labels
        if perturbation not in PERTURBATIONS:
            raise UserError(f"unknown perturbation '{perturbation}' (known: {', '.join(PERTURBATIONS)})")
        results = [predictor.predict_many([perturb(realfaces.load_pair(s, root)[0], perturbation)])[0]
                   for s in stems]
    else:
        results = predictor.predict_many(paths)
    t_predict = time.perf_counter() - t0

    renderer = AvatarRenderer(pack, RENDER_RES)
    constant = renderer.constant_stats()

    photo_stats, avatar_stats, rows, tiles, failures = [], [], [], [], []
    judged, readings, viewer_tiles = [], [], []
    for stem, r in zip(stems, results):
        if isinstance(r, Failure):
            failures.append({"stem": stem, "error": r.error})
            continue
        rgb_p, ps = real_photo_stats(stem, root)
        rgb_a, mask_a = renderer.render(r.vector)
        avs = fidelity.avatar_stats(mask_a, rgb_a, vector=r.vector)
        photo_stats.append(ps)
        avatar_stats.append(avs)
        reading = viewer.read_avatar(r.vector, rgb_a, mask_a, rule)
        if stem in labels:
            judged.append(stem)
            readings.append(reading)
            if len(viewer_tiles) < VIEWER_SHEET_PHOTOS:
                viewer_tiles.append(viewer.sheet_tile(rgb_p, rgb_a, labels[stem], reading))
        rows.append({"stem": stem, **{f"slot.{k}": v for k, v in r.vector.slots.items()},
                     **{f"label.{a}": labels[stem].classes[a] if stem in labels else None
                        for a in viewer.ATTRIBUTES},
                     **{f"avatar_reads.{a}": reading.get(a) for a in viewer.ATTRIBUTES},
                     **{f"photo.{k}": ps.get(k) for k in fidelity.PRESENCE},
                     **{f"avatar.{k}": avs.get(k) for k in fidelity.PRESENCE},
                     **{f"colour_source.{k}": v for k, v in r.colour_sources.items()},
                     **{f"presence_source.{k}": v for k, v in r.presence_sources.items()},
                     "shape_from_photo": " ".join(r.shape_from_photo),
                     "warnings": "; ".join(r.warnings)})
        if len(tiles) < 2 * SHEET_PHOTOS:
            tiles += [resize_square(rgb_p, 128), resize_square(rgb_a, 128)]
    if not photo_stats:
        raise UserError(f"the model produced no avatar for any of the {len(stems)} photos")
    report = score_fidelity(photo_stats, avatar_stats, constant)
    targets = report.pop("targets")
    judged_labels = [labels[s] for s in judged]
    report["viewer"] = viewer.score(judged_labels, readings) if judged else None
    if report["viewer"] is not None:
        report["viewer"]["colour_rule"] = rule.source
        report["viewer"]["targets"] = viewer.check_targets(report["viewer"])
    (out_path / "viewer.json").write_text(json.dumps(
        {"stems": judged, "readings": readings, "model": str(model_path)}))
    if compare:
        report["viewer_compare"] = viewer.compare_with(Path(compare) / "viewer.json", judged,
                                                       judged_labels, readings)
    report.update({
        "model": str(model_path), "pack": pack.id, "schema": pack.schema_hash,
        "perturbation": perturbation,
        "data": str(root), "split": "val", "photos": len(stems), "detected": len(photo_stats),
        "failures": failures, "machine": machine(),
        "colours": {"mode": predictor.colour_mode, "note": predictor.colour_note,
                    "from_photo": {k: sum(row[f"colour_source.{k}"] == "photo" for row in rows)
                                   for k in fidelity.COLOURS}},
        "attributes": {"note": predictor.reader_note},
        "shape": {"note": predictor.shape_note,
                  "from_photo": sum(bool(row["shape_from_photo"]) for row in rows)},
        "seconds": {"predict": round(t_predict, 1), "total": round(time.perf_counter() - t0, 1)},
        "targets": targets,
    })
    _write_outputs(out_path, report, rows, tiles)
    if viewer_tiles:
        from PIL import Image
        Image.fromarray(grid(viewer_tiles, 8)).save(out_path / "viewer_sheet.png")
    write_stats(out_path / "stats.json", [r["stem"] for r in rows], photo_stats, avatar_stats,
                constant)
    if report["viewer"] is not None:
        log(viewer.format_summary(report["viewer"]))
    log(f"validated {len(photo_stats)}/{len(stems)} photos ({len(failures)} detection failures); "
        f"{sum(t['passed'] for t in targets)}/{len(targets)} targets met; report in {out_path}")
    return report


def write_stats(path: Path, stems: list[str], photo: list[dict], avatar: list[dict],
                constant: dict) -> None:
    """Per-photo measures behind a report (photo and avatar side, the constant predictor), so
    two models validated on the same photos can be compared photo by photo
    (``fidelity.paired_bootstrap``)."""
    from ..backend.report_html import json_default
    path.write_text(json.dumps({"stems": stems, "photo": photo, "avatar": avatar,
                                "constant": constant}, default=json_default))


def read_stats(path: Path) -> dict:
    """``write_stats``' file, colours back to tuples."""
    d = json.loads(Path(path).read_text())
    def fix(s):
        return {k: tuple(v) if k in fidelity.COLOURS and v is not None else v for k, v in s.items()}
    d["photo"] = [fix(s) for s in d["photo"]]
    d["avatar"] = [fix(s) for s in d["avatar"]]
    d["constant"] = fix(d["constant"])
    return d


def _write_outputs(out: Path, report: dict, rows: list[dict], tiles: list[np.ndarray]):
    from PIL import Image
    from ..backend.report_html import to_html, to_markdown
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    head = (f"Model `{Path(report['model']).name}` on {report['detected']}/{report['photos']} "
            f"validation photos ({report['machine']}).\n\n")
    if report.get("viewer"):
        head += viewer.to_markdown(report["viewer"], report.get("viewer_compare")) + "\n\n"
    if report.get("colours"):
        head += f"Colours: {report['colours']['mode']} mode; {report['colours']['note']}.\n\n"
    if report.get("shape"):
        head += f"Shape: {report['shape']['note']} ({report['shape']['from_photo']} photos).\n\n"
    (out / "report.md").write_text(head + to_markdown(report))
    (out / "report.html").write_text(to_html(report))
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(out / "per_photo.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    if tiles:
        Image.fromarray(grid(tiles, 8)).save(out / "sheet.png")


def cli_validate(args) -> int:
    report = validate(args.model, args.pack, args.out, args.data, args.limit, args.device,
                      colours=getattr(args, "colours", None), shape=getattr(args, "shape", None),
                      attributes=getattr(args, "attributes", None),
                      compare=getattr(args, "compare", None),
                      perturbation=getattr(args, "perturb", None))
    failed = [t for t in report["targets"] if not t["passed"]]
    for t in report["targets"]:
        v = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        print(f"{'PASS' if t['passed'] else 'FAIL'}  {t['name']}: {v} (target {t['target']})")
    print(f"colours ({report['colours']['mode']}: {report['colours']['note']}):")
    for name, c in report["colour"].items():
        if c["median"] is not None:
            ratio = "n/a" if c["ratio_median"] is None else f"{c['ratio_median']:.3f}"
            print(f"  {name}: median dE00 {c['median']:.2f}, p90 {c['p90']:.2f}, constant "
                  f"{(c['constant'] or {}).get('median') or float('nan'):.2f}, ratio {ratio}, "
                  f"from the photo {report['colours']['from_photo'][name]}/{report['detected']}")
    return 0 if not failed or not args.strict else 1
