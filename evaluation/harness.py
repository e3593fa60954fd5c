"""``likeness eval``: competing photo -> vector methods on the same faces, measured and reported.

For every photo: load, detect and align ONCE (``backend.predict.prepare_photo``, 256 px), then
every method predicts from that same crop (timed alone), and the engine renders each predicted
vector (``render_engine.validate_job.AvatarRenderer``, shared with ``likeness validate``).
Measures, when their inputs exist:
  * ``--truth DIR`` (``vectors/<stem>.json``): per-slot accuracy, continuous L1, per-part mask IoU
    between the renders of the predicted and of the true vector, and LPIPS between them when its
    weights are on disk (otherwise the report says why it was skipped);
  * a parsing mask of the photo (the CelebAMask-HQ layout ``images/`` + ``masks/``, ``--photos val``,
    or ``--parser DIR``, a trained face parser run on the crop): the label-free fidelity measures
    and targets of ``backend.fidelity``, exactly as ``likeness validate`` computes them;
  * speed: seconds per photo and images/s of each method on this machine (after one warm-up call).
Photos without a usable face are counted and listed; a method that fails on a photo is listed too.
``aligned`` (``--aligned``) skips detection: each image is taken as the aligned crop, resized (generator
outputs and renders, e.g. ``likeness eval synth``'s benchmark); the report says detection was skipped.
Output folder::

    report.json  report.html  rating.html
    crops/<stem>.png  vectors/<method>/<stem>.json  renders/<method>/<stem>.png
    masks/<method>/<stem>.png  (renders/truth, masks/truth with --truth)
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..backend import fidelity, realfaces
from ..backend.errors import UserError
from ..backend.schema import AvatarVector, Pack, SchemaError, find_pack
from . import metrics
from .methods import Method, load_method, parse_spec

ALIGN_SIZE = 256
VAL = "val"
THUMB = 128                  # px of the thumbnails kept for the HTML pages
RESERVED = ("truth", "constant", "photo")   # column names of the report beside the methods'


@dataclass
class PhotoItem:
    stem: str
    path: Path
    root: Path | None = None          # a CelebAMask-HQ layout folder holding masks/<stem>.png


@dataclass
class MethodRun:
    method: Method
    spec: str
    kind: str
    path: str
    load_seconds: float
    folder: str                                     # file-system safe name
    seconds: list[float] = field(default_factory=list)
    warmed: bool = False


# ------------------------------------------------------------------------------------------------
# Inputs: checked before anything slow runs, each problem one UserError line
# ------------------------------------------------------------------------------------------------

def resolve_photos(photos: str, data: str | None = None, limit: int | None = None
                   ) -> tuple[list[PhotoItem], dict[str, Any]]:
    """``--photos``: "val" (the shared faces' validation split), a CelebAMask-HQ layout folder
    (images/ + masks/), a folder holding images/ alone, or a folder of photos. Returns the items and
    a description of the data."""
    from ..backend.predict import IMAGE_SUFFIXES
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    if photos == VAL:
        root = Path(data) if data else realfaces.default_root()
        stems = realfaces.stems(root, split="val")
        items = [PhotoItem(s, root / "images" / f"{s}.jpg", root) for s in stems]
        info = {"source": VAL, "root": str(root), "split": "val",
                "rule": "CelebAMask-HQ faces whose stem begins with " + ", ".join(realfaces.VALIDATION_PREFIXES),
                "masks": "CelebAMask-HQ parsing masks", "licence": "non-commercial research use"}
    else:
        folder = Path(photos)
        if not folder.exists():
            raise UserError(f"--photos {photos}: no such folder (or use --photos val)")
        if not folder.is_dir():
            raise UserError(f"--photos {photos}: not a folder")
        layout = (folder / "images").is_dir() and (folder / "masks").is_dir()
        # the 1k layout, or an images/ folder alone (``likeness eval synth``'s photo sets)
        image_dir = folder / "images" if (folder / "images").is_dir() else folder
        files = sorted(p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        # A photo is measured by its mask only in the real faces' own layout: images/<stem>.jpg
        # beside masks/<stem>.png (``realfaces.load_pair``); other images are photos without one.
        items = [PhotoItem(p.stem, p, folder if layout and p.suffix == ".jpg"
                           and (folder / "masks" / f"{p.stem}.png").is_file() else None) for p in files]
        stems = [i.stem for i in items]
        dup = sorted({s for s in stems if stems.count(s) > 1})
        if dup:
            raise UserError(f"--photos {photos}: several images share the name {dup[0]} (outputs are "
                            "named by file stem); rename them")
        info = {"source": str(folder), "root": str(folder), "split": None,
                "masks": f"{sum(i.root is not None for i in items)} with CelebAMask-HQ parsing masks"
                         if layout else "none"}
    if not items:
        raise UserError(f"--photos {photos}: no images ({', '.join(s[1:] for s in IMAGE_SUFFIXES[:4])}, ...) found")
    info["available"] = len(items)
    if limit:
        items = items[:limit]
        info["limit"] = limit
    info["photos"] = len(items)
    return items, info


def load_truth(truth: str, pack: Pack, stems: list[str]) -> tuple[dict[str, AvatarVector], list[str]]:
    """``--truth DIR``: ``DIR/vectors/<stem>.json`` (or ``DIR/<stem>.json``), the schema's JSON form
    (``likeness create``'s vector.json, holding it under "vector", works too; so does an eval
    report's ``vectors/<method>/``). Returns (stem -> vector, stems without one). No vector for any
    photo, or one that is not of the pack, is an error; photos without one are listed in the report."""
    d = Path(truth)
    if not d.is_dir():
        raise UserError(f"--truth {truth}: no such folder")
    folder = d / "vectors" if (d / "vectors").is_dir() else d
    files = {p.stem: p for p in folder.glob("*.json")}
    if not files:
        raise UserError(f"--truth {truth}: no vectors (expected {folder}/<photo stem>.json)")
    missing = [s for s in stems if s not in files]
    if len(missing) == len(stems):
        raise UserError(f"--truth {truth}: no vector matches a photo (e.g. photo {stems[0]} needs "
                        f"{folder}/{stems[0]}.json; the folder has {next(iter(files))}.json ...)")
    out = {}
    for s in stems:
        if s not in files:
            continue
        try:
            data = json.loads(files[s].read_text())
            if isinstance(data, dict) and "params" not in data and isinstance(data.get("vector"), dict):
                data = data["vector"]
            out[s] = pack.vector_from_json(data)
        except json.JSONDecodeError as e:
            raise UserError(f"--truth {files[s]}: not valid JSON ({e})") from None
        except SchemaError as e:
            raise UserError(f"--truth {files[s]}: does not match pack '{pack.id}': {e}") from None
    return out, missing


def prepare_out(out: str) -> Path:
    """The report folder, created and proven writable before any work is done."""
    p = Path(out)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".likeness-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    return p


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "method"


def check_specs(specs: list[str]) -> list[tuple[str, str, str]]:
    """Parse every spec (unknown kinds fail here) and refuse two methods of the same name."""
    if not specs:
        raise UserError("--methods: give at least one method (default, onnx:PATH, f2p:DIR, ...)")
    parsed = [parse_spec(s) for s in specs]
    seen: dict[str, str] = {}
    for spec, (_, _, label) in zip(specs, parsed):
        key = safe_name(label)
        if key in RESERVED:
            raise UserError(f"method '{spec}': the name '{label}' is reserved for the report's "
                            f"{key} column; give it another label, e.g. onnx:PATH=other")
        if key in seen:
            raise UserError(f"methods '{seen[key]}' and '{spec}' share the name '{label}': "
                            "give one a label, e.g. onnx:PATH=other")
        seen[key] = spec
    return parsed


# ------------------------------------------------------------------------------------------------
# Optional face parser for photos without masks
# ------------------------------------------------------------------------------------------------

def parts_to_classes(parts: np.ndarray) -> np.ndarray:
    """Part ids (``training.common.parts``) -> CelebAMask-HQ class ids (``backend.colour_match``)."""
    from ..backend.colour_match import parts_to_classes as convert
    from ..training.common.parts import PARTS
    return convert(parts, PARTS)


def load_face_parser(path: str, threads: int = 1) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """A trained face parser checkpoint (``likeness train gan --stage parser``'s work dir) as
    crop uint8 HxWx3 -> CelebAMask-HQ class-id mask of the same size."""
    try:
        import torch
        import torch.nn.functional as F
        from ..training.generators.train_gan import load_parser
    except ImportError as e:
        raise UserError(f"--parser needs the training extras (torch): {e}") from None
    torch.set_num_threads(threads)
    net, cfg = load_parser(path)
    res = cfg.resolution

    def parse(crop: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.asarray(crop, np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0
        x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False, antialias=True)
        with torch.no_grad():
            logits = F.interpolate(net(x), size=crop.shape[:2], mode="bilinear", align_corners=False)
        return parts_to_classes(logits.argmax(1)[0].numpy().astype(np.uint8))

    return parse, f"face parser {path} (config {cfg.name}, {res} px)"


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def load_aligned(path: Path) -> np.ndarray:
    """``--aligned``: the image already is the aligned crop (a generator's output, a render), so no
    detection (it often fails on small GAN faces); only resized to ``ALIGN_SIZE``."""
    from ..backend.image_io import load_photo
    from ..backend.visual import resize_square
    rgb = load_photo(path, name=path.name)
    if rgb.shape[0] != rgb.shape[1]:
        raise UserError(f"{path.name}: {rgb.shape[1]}x{rgb.shape[0]} is not square; --aligned takes "
                        "square aligned crops")
    return resize_square(rgb, ALIGN_SIZE)


def _write_png(path: Path, img: np.ndarray):
    from ..backend.png import encode_png
    from ..render_engine.dataset import atomic_write
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, encode_png(img))


def _summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "mean": None, "median": None}
    a = np.asarray(values, np.float64)
    return {"n": len(a), "mean": float(a.mean()), "median": float(np.median(a))}


def evaluate(photos: str, specs: list[str], out: str, truth: str | None = None,
             pack_name: str = "default", limit: int | None = None, data: str | None = None,
             parser: str | None = None, threads: int = 1, seed: int = 0, progress: bool = True,
             aligned: bool = False, reuse: str | None = None, log=print) -> dict[str, Any]:
    from ..backend.predict import prepare_photo
    from ..backend.progress import Progress
    from ..render_engine.validate_job import (RENDER_RES, AvatarRenderer, machine, real_photo_stats,
                                              score_fidelity)
    from .report import write_reports
    t_start = time.perf_counter()
    parsed = check_specs(specs)
    pack = find_pack(pack_name)
    items, data_info = resolve_photos(photos, data, limit)
    truths, no_truth = load_truth(truth, pack, [i.stem for i in items]) if truth else (None, [])
    if no_truth:
        log(f"likeness eval: {len(no_truth)} photo(s) have no true vector (listed in the report): "
            + ", ".join(no_truth[:5]) + (" ..." if len(no_truth) > 5 else ""))
    out_path = prepare_out(out)

    runs: list[MethodRun] = []
    for spec, (kind, path, _) in zip(specs, parsed):
        t = time.perf_counter()
        m = load_method(spec, pack, threads=threads)
        runs.append(MethodRun(m, spec, kind, path, time.perf_counter() - t, safe_name(m.name)))
    infos = [_method_info(r) for r in runs]           # hashes each model's files once
    code = code_digest()
    reused, reused_from = reusable(reuse, pack, aligned, infos, code)
    if reused:
        log(f"likeness eval: the vectors of {', '.join(reused)} come from {reused_from}")
    elif reuse is not None:
        log(f"likeness eval: nothing reused from {reuse} (other methods, files, code or shipped models)")
    if "torch" in sys.modules:                      # torch methods: one thread, like the trainings here
        import torch
        torch.set_num_threads(threads)
    parse_fn, parser_note = load_face_parser(parser, threads) if parser else (None, None)
    lpips_fn, lpips_note = metrics.make_lpips(threads=threads) if truths else (None, None)

    renderer = AvatarRenderer(pack, RENDER_RES)
    need_fidelity = parse_fn is not None or any(i.root is not None for i in items)
    constant_stats = renderer.constant_stats() if need_fidelity else None
    default_vec = pack.default_vector()
    default_render = renderer.render(default_vec) if truths else None

    names = [r.method.name for r in runs]
    failures: list[dict] = []
    method_failures: list[dict] = []
    per_photo: list[dict] = []
    align_seconds: list[float] = []
    render_seconds: list[float] = []
    photo_stats: dict[str, dict] = {}                            # stem -> stats
    avatar_stats: dict[str, dict[str, dict]] = {n: {} for n in names}
    truth_rows: dict[str, list[dict]] = {n: [] for n in [*names, "constant"]}
    thumbs: list[dict] = []
    # the viewer's yardstick where the photos carry viewed labels (the shared faces' attributes.csv)
    from ..backend import viewer
    labels: dict = {}
    for root in {i.root for i in items if i.root is not None}:
        if viewer.labels_path(root).is_file():
            labels.update(viewer.read_labels(viewer.labels_path(root)))
    colour_rule = viewer.default_colour_rule() if labels else None
    readings: dict[str, dict[str, dict]] = {n: {} for n in names}
    bar = Progress(len(items), "eval", enabled=progress)
    for item in items:
        try:
            if aligned:
                crop, warnings = load_aligned(item.path), []
            else:
                prep = prepare_photo(str(item.path), name=item.path.name, size=ALIGN_SIZE)
                align_seconds.append(sum(prep.timings.values()))
                crop, warnings = prep.crop, prep.warnings
        except UserError as e:
            failures.append({"stem": item.stem, "photo": str(item.path), "error": str(e)})
            bar.update()
            continue
        _write_png(out_path / "crops" / f"{item.stem}.png", crop)
        rec: dict[str, Any] = {"stem": item.stem, "photo": str(item.path), "warnings": warnings,
                               "crop": f"crops/{item.stem}.png", "methods": {}}
        thumb = {"stem": item.stem, "photo": crop, "avatars": {}}

        if item.root is not None:
            _, photo_stats[item.stem] = real_photo_stats(item.stem, item.root)
            rec["photo_measures"] = "parsing mask"
        elif parse_fn is not None:
            s = fidelity.mask_stats(parse_fn(crop), crop)
            s["earrings"] = None                       # the parser merges earrings into ears
            photo_stats[item.stem] = s
            rec["photo_measures"] = "face parser"

        true_vec = truths.get(item.stem) if truths else None
        if true_vec is not None:
            t_rgb, t_mask = renderer.render(true_vec)
            _write_png(out_path / "renders" / "truth" / f"{item.stem}.png", t_rgb)
            _write_png(out_path / "masks" / "truth" / f"{item.stem}.png", t_mask)
            thumb["truth"] = t_rgb
            truth_rows["constant"].append(_truth_measures(
                default_vec, true_vec, *default_render, t_rgb, t_mask, lpips_fn, item.stem))

        for run in runs:
            name = run.method.name
            earlier = reused.get(name, {}).get(item.stem)
            try:
                if earlier is not None:                # --reuse: the earlier run's vector and timing
                    vec = pack.vector_from_json((reused_from / earlier["vector"]).read_text())
                    dt = float(earlier["seconds"])
                else:
                    if not run.warmed:                 # first call pays for lazy set-up: not timed
                        run.method.predict(crop)
                        run.warmed = True
                    t = time.perf_counter()
                    vec = run.method.predict(crop)
                    dt = time.perf_counter() - t
                if not isinstance(vec, AvatarVector) or vec.pack.schema_hash != pack.schema_hash:
                    raise UserError(f"returned {type(vec).__name__}, not a vector of pack '{pack.id}'")
            except Exception as e:                     # one method's failure must not lose the others
                method_failures.append({"stem": item.stem, "method": name,
                                        "error": f"{type(e).__name__}: {e}"})
                print(f"likeness eval: {name} failed on {item.stem}: {type(e).__name__}: {e}",
                      file=sys.stderr)
                continue
            run.seconds.append(dt)
            vec_rel = f"vectors/{run.folder}/{item.stem}.json"
            (out_path / vec_rel).parent.mkdir(parents=True, exist_ok=True)
            (out_path / vec_rel).write_text(vec.dumps(indent=2))
            t = time.perf_counter()
            rgb, mask = renderer.render(vec)
            render_seconds.append(time.perf_counter() - t)
            _write_png(out_path / "renders" / run.folder / f"{item.stem}.png", rgb)
            _write_png(out_path / "masks" / run.folder / f"{item.stem}.png", mask)
            thumb["avatars"][name] = rgb
            m_rec: dict[str, Any] = {"vector": vec_rel, "render": f"renders/{run.folder}/{item.stem}.png",
                                     "seconds": round(dt, 5)}
            if item.stem in photo_stats:
                avatar_stats[name][item.stem] = fidelity.avatar_stats(mask, rgb, vector=vec)
            if item.stem in labels:
                readings[name][item.stem] = viewer.read_avatar(vec, rgb, mask, colour_rule)
                m_rec["viewer_reading"] = readings[name][item.stem]
            if true_vec is not None:
                row = _truth_measures(vec, true_vec, rgb, mask, t_rgb, t_mask, lpips_fn, item.stem)
                truth_rows[name].append(row)
                m_rec.update({k: row[k] for k in ("slot_accuracy", "l1", "iou", "lpips")})
            rec["methods"][name] = m_rec
        per_photo.append(rec)
        thumbs.append(_thumbs(thumb))
        bar.update()
    bar.close()

    detected = len(per_photo)
    report: dict[str, Any] = {
        "kind": "likeness eval",
        "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "data": data_info,
        "pack": {"id": pack.id, "version": pack.version, "schema": pack.schema_hash},
        "methods": [{**info, **({"vectors_from": str(reused_from)} if info["name"] in reused else {})}
                    for info in infos],
        "hardware": {"machine": machine(), "threads": threads, "load_average": _loadavg()},
        "code": code,
        "counts": {"photos": len(items), "detected": detected, "failed": len(failures),
                   "method_failures": len(method_failures)},
        "failures": failures,
        "method_failures": method_failures,
        "align": {"size": ALIGN_SIZE, "seconds": _summary(align_seconds),
                  "detection": (f"skipped (--aligned): each image is taken as the aligned crop, resized "
                                f"to {ALIGN_SIZE} px" if aligned else "MTCNN, then alignment to the "
                                "CelebA-HQ frame"), "detection_skipped": aligned},
        "render": {"resolution": RENDER_RES, "engine": "workbench", "seconds": _summary(render_seconds)},
        "speed": {r.method.name: _speed(r, align_seconds) for r in runs},
    }
    report["truth"] = (_truth_report(truth, truth_rows, names, lpips_note, no_truth) if truths
                       else {"skipped": "no --truth given: accuracy, L1, mask IoU and LPIPS need true vectors"})
    if labels and names:
        report["viewer"] = {}
        first = names[0]
        for name in names:
            stems = [s for s in readings[name] if s in readings[first]]
            if not stems:
                continue
            entry = viewer.score([labels[s] for s in stems], [readings[name][s] for s in stems])
            if name != first:
                entry["against_" + first] = viewer.paired_bootstrap(
                    [labels[s] for s in stems], [readings[name][s] for s in stems],
                    [readings[first][s] for s in stems], draws=1000)
            report["viewer"][name] = entry
    else:
        report["viewer"] = {"skipped": "the photos carry no viewed labels (attributes.csv beside "
                                       "images/, as in the shared faces)"}
    if photo_stats:
        fid = {}
        for name in names:
            stems = [s for s in photo_stats if s in avatar_stats[name]]
            fid[name] = (score_fidelity([photo_stats[s] for s in stems],
                                        [avatar_stats[name][s] for s in stems], constant_stats)
                         if stems else {"skipped": f"{name} produced no avatar for a photo with a mask"})
        report["fidelity"] = {"photos_measured_by": parser_note or "their CelebAMask-HQ parsing masks",
                              "n_photos": len(photo_stats), "methods": fid}
    else:
        report["fidelity"] = {"skipped": (
            "label-free measures skipped: the photos come without parsing masks (use --photos val, a "
            "CelebAMask-HQ layout folder with images/ and masks/, or --parser DIR with a trained face parser)")}
    report["per_photo"] = per_photo
    report["seconds_total"] = round(time.perf_counter() - t_start, 2)
    write_reports(out_path, report, thumbs, seed=seed)
    log(f"evaluated {len(runs)} method(s) on {detected}/{len(items)} photos "
        f"({len(failures)} without a usable face, {len(method_failures)} method failures); "
        f"report in {out_path}")
    return report


def _truth_measures(vec, true_vec, rgb, mask, t_rgb, t_mask, lpips_fn, stem) -> dict[str, Any]:
    l1, per_param = metrics.continuous_l1(vec, true_vec, per_parameter=True)
    matches = metrics.slot_matches(vec, true_vec)
    iou = metrics.mask_iou(mask, t_mask)
    return {"stem": stem, "slots": matches, "slot_accuracy": float(np.mean(list(matches.values()))),
            "l1": l1, "per_parameter": per_param, "iou": iou["mean"], "iou_parts": iou["per_part"],
            "lpips": float(lpips_fn([rgb], [t_rgb])[0]) if lpips_fn else None}


def _truth_report(truth: str, rows: dict[str, list[dict]], names: list[str], lpips_note,
                  missing: list[str]) -> dict:
    def one(rs: list[dict]) -> dict[str, Any]:
        if not rs:
            return {"n": 0}
        slots = list(rs[0]["slots"])
        parts = sorted({p for r in rs for p in r["iou_parts"]})
        params = list(rs[0]["per_parameter"])
        per_slot = {s: float(np.mean([r["slots"][s] for r in rs])) for s in slots}
        return {
            "n": len(rs),
            "slot_accuracy": {"mean": float(np.mean(list(per_slot.values()))), "per_slot": per_slot},
            "l1": {**_summary([r["l1"] for r in rs]),
                   "per_parameter": {p: float(np.mean([r["per_parameter"][p] for r in rs])) for p in params}},
            "mask_iou": {**_summary([r["iou"] for r in rs if r["iou"] is not None]),
                         "per_part": {p: float(np.mean([r["iou_parts"][p] for r in rs if p in r["iou_parts"]]))
                                      for p in parts}},
            "lpips": _summary([r["lpips"] for r in rs if r["lpips"] is not None]),
        }
    return {"dir": str(truth), "photos_without_truth": missing,
            "lpips": {"status": "measured" if lpips_note and not lpips_note.startswith("LPIPS skipped")
                      else "skipped", "note": lpips_note},
            "l1_note": "mean |difference| of the continuous parameters, each normalised to [0, 1] by its range",
            "iou_note": "per-part IoU of the two renders' masks (12 parts, background excluded), mean over "
                        "the parts present in either",
            "methods": {n: one(rows[n]) for n in names},
            "constant": {"what": "the pack's default avatar for every photo", **one(rows["constant"])}}


def path_digest(p: Path) -> str | None:
    """What a method was loaded from, as a short digest: a file's bytes; a folder's files (names,
    sizes and modification times: a retrained model in the same folder gets another digest)."""
    from ..backend.models import sha256
    if p.is_file():
        return sha256(p)[:16]
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]
    return None


def code_digest() -> dict[str, str]:
    """What every method's vectors also depend on beside its own files: the sources of the photo ->
    vector path (backend/, evaluation/, training/) and the shipped models (the reader, the parser and
    its rules, the calibrations), as digests."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for folder in ("backend", "evaluation", "training"):
        for f in sorted((root / folder).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return {"sources": h.hexdigest()[:16], "models": path_digest(root / "models") or ""}


def reusable(previous: str | os.PathLike | None, pack: Pack, aligned: bool, infos: list[dict],
             code: dict[str, str]) -> tuple[dict[str, dict[str, dict]], Path | None]:
    """``--reuse DIR``: method name -> stem -> its per-photo record in an earlier ``likeness eval``
    folder, for each method loaded from the same spec and the same files (``path_digest``), with the
    same pack and alignment; its vectors are then read back instead of predicted again (renders and
    measures are made again), and its timings are the earlier run's. Nothing is reused from an eval
    made with other code or other shipped models (``code``: ``code_digest``). ``infos``: the
    methods' ``_method_info``."""
    if previous is None:
        return {}, None
    folder = Path(previous)
    path = folder / "report.json"
    if not path.is_file():
        raise UserError(f"--reuse {previous}: no likeness eval report there (report.json)")
    old = json.loads(path.read_text())
    if old.get("pack", {}).get("schema") != pack.schema_hash:
        raise UserError(f"--reuse {previous}: an eval of another pack or schema")
    if bool(old.get("align", {}).get("detection_skipped")) != bool(aligned):
        raise UserError(f"--reuse {previous}: an eval {'without' if aligned else 'with'} --aligned")
    if old.get("code") != code:
        return {}, folder          # other code or shipped models: every vector may differ
    out = {}
    for info in infos:
        prev = next((m for m in old.get("methods", []) if m.get("name") == info["name"]), None)
        if prev is None or prev.get("spec") != info["spec"] or prev.get("sha256") != info.get("sha256"):
            continue
        out[info["name"]] = {rec["stem"]: rec["methods"][info["name"]] for rec in old.get("per_photo", [])
                             if info["name"] in rec["methods"]}
    return out, folder


def _method_info(run: MethodRun) -> dict[str, Any]:
    m = run.method
    info: dict[str, Any] = {"name": m.name, "spec": run.spec, "kind": run.kind, "folder": run.folder,
                            "load_seconds": round(run.load_seconds, 3)}
    path = getattr(m, "path", None) or run.path
    if path:
        p = Path(path)
        info["path"] = str(p.resolve()) if p.exists() else str(p)
        digest = path_digest(p)
        if digest:
            info["sha256"] = digest
    model = getattr(m, "model", None)
    if model is not None and hasattr(model, "input_size"):
        info["input_size"] = model.input_size
    describe = getattr(m, "describe", None)
    if callable(describe):
        info["describe"] = describe()
    return info


def _speed(run: MethodRun, align_seconds: list[float]) -> dict[str, Any]:
    s = run.seconds
    total = float(sum(s))
    out = {"photos": len(s), "seconds_per_photo": _summary(s),
           "images_per_s": (len(s) / total) if total > 0 else None,
           "note": "the method alone, batch 1, after one untimed warm-up call"}
    if s and align_seconds:
        per = total / len(s) + float(np.mean(align_seconds))
        out["images_per_s_with_detection"] = 1.0 / per
    return out


def _loadavg() -> list[float] | None:
    try:
        import os
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _thumbs(t: dict) -> dict:
    """Downsized copies for the HTML pages (the full renders are on disk)."""
    from ..backend.visual import resize_square
    out = {"stem": t["stem"], "photo": resize_square(t["photo"], THUMB),
           "avatars": {k: resize_square(v, THUMB) for k, v in t["avatars"].items()}}
    if "truth" in t:
        out["truth"] = resize_square(t["truth"], THUMB)
    return out


def cli_eval(args) -> int:
    if not args.photos or not args.methods or not args.out:
        raise UserError("eval needs --photos DIR|val, --methods SPEC[,SPEC...] and --out REPORT_DIR "
                        "(or: likeness eval tabulate RATINGS.csv ...)")
    specs = [s.strip() for s in args.methods.split(",") if s.strip()]
    report = evaluate(args.photos, specs, args.out, truth=args.truth, pack_name=args.pack,
                      limit=args.limit, data=args.data, parser=args.parser, threads=args.threads,
                      seed=args.seed, progress=not args.no_progress,
                      aligned=getattr(args, "aligned", False), reuse=getattr(args, "reuse", None))
    for name, sp in report["speed"].items():
        ips = sp["images_per_s"]
        print(f"{name}: {sp['photos']} photos, {'n/a' if ips is None else f'{ips:.1f}'} images/s")
    return 0 if report["counts"]["detected"] else 1
