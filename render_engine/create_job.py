"""``likeness create``: photo(s) -> avatar vector -> posed rig -> render, in one process.

For each photo the output folder gets ``vector.json`` (the vector with per-slot probabilities and
alternatives, where each colour came from -- the photo or the estimator, see ``backend.predict`` --,
warnings and timings), ``crop.png`` (the aligned face the model saw), ``render.png``,
``mask.png`` (class ids), ``mask_color.png`` and ``side_by_side.png`` (crop | avatar). One photo
writes straight into --out; a folder of photos writes one subfolder per photo, named after the
photo's file name with its extension (``face.jpg`` -> ``face_jpg/``, so ``face.png`` beside it gets
its own), and ``failures.json`` listing each photo that failed and why (empty when none did). Exit
code: 0 every photo done, 3 some failed (``backend.outputs.EXIT_PARTIAL``), 1 none done. With no
photo the public-domain astronaut portrait that scikit-image ships is used, so the main job runs
anywhere.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from ..backend.errors import UserError
from ..backend.outputs import EXIT_PARTIAL, check_output_dir, result_names
from ..backend.png import encode_png
from ..backend.schema import find_pack
from ..backend.visual import colorize_mask, grid, resize_square
from .dataset import atomic_write, check_resolution
FAILURES = "failures.json"


def default_photo() -> tuple[np.ndarray, str]:
    try:
        from skimage import data
    except ImportError:
        raise UserError("no --photo given and scikit-image (which ships the default portrait) "
                        "is not installed") from None
    return data.astronaut(), "astronaut"


def write_result(out: Path, prediction, rgb: np.ndarray, mask: np.ndarray):
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "crop.png", encode_png(prediction.crop))
    atomic_write(out / "render.png", encode_png(rgb))
    atomic_write(out / "mask.png", encode_png(mask))
    atomic_write(out / "mask_color.png", encode_png(colorize_mask(mask)))
    side = grid([resize_square(prediction.crop, 256), resize_square(rgb, 256)], 2)
    atomic_write(out / "side_by_side.png", encode_png(side))
    atomic_write(out / "vector.json", json.dumps(prediction.to_json(), indent=2).encode())


def create(photos: list, pack_name: str = "default", model: str | None = None, out: str = "out",
           resolution: int = 512, device: str = "auto", log=print, colours: str | None = None,
           shape: str | None = None) -> dict:
    from ..backend.models import find_model
    from ..backend.predict import Failure, Predictor
    from .packs import open_pack_scene
    from .render import render_sample, setup_render
    from ..backend.predict import expand_photos
    from .rig import apply_vector
    check_resolution(resolution)
    out_path = check_output_dir(out)            # before any work: a folder we cannot write fails now
    pack = find_pack(pack_name)
    model_path = Path(model) if model else find_model(pack)
    single = len(photos) == 1 and not (isinstance(photos[0], (str, Path)) and Path(photos[0]).is_dir())
    items = expand_photos(photos)               # an empty folder: an error naming the types
    predictor = Predictor(pack, model_path, device=device, colours=colours, shape=shape)
    results = predictor.predict_many(items)
    names = result_names([r.source for r in results])
    summary = {"model": str(model_path), "pack": pack.id, "done": [], "failed": [],
               "colours": predictor.colour_note, "shape": predictor.shape_note,
               "attributes": predictor.reader_note}
    if any(not isinstance(r, Failure) for r in results):
        open_pack_scene(pack)
        setup_render(pack, resolution)
    for r, name in zip(results, names):
        if isinstance(r, Failure):
            summary["failed"].append({"photo": r.source, "reason": r.error})
            log(f"likeness create: {r.error}", file=sys.stderr)
            continue
        t = time.perf_counter()
        apply_vector(r.vector)
        rgb, mask = render_sample(pack, resolution)
        r.timings["render"] = time.perf_counter() - t
        folder = out_path if single else out_path / name
        write_result(folder, r, rgb, mask)
        for w in r.warnings:
            log(f"likeness create: {r.source}: warning: {w}", file=sys.stderr)
        summary["done"].append({"photo": r.source, "out": str(folder), "colours": r.colour_sources})
    if not single:                              # a batch: what failed, and why, beside the results
        atomic_write(out_path / FAILURES, json.dumps(
            {"photos": len(results), "done": len(summary["done"]), "failed": summary["failed"]},
            indent=2).encode())
    return summary


def cli_create(args) -> int:
    photos: list = []
    if args.photo:
        photos.append(args.photo)
    if args.photos:
        if not Path(args.photos).is_dir():
            raise UserError(f"--photos {args.photos} is not a folder")
        photos.append(args.photos)
    if not photos:
        img, name = default_photo()
        print(f"likeness create: no --photo given, using the {name} portrait (public domain)",
              file=sys.stderr)
        photos = [img]
    summary = create(photos, args.pack, args.model, args.out, args.resolution, args.device,
                     log=print, colours=getattr(args, "colours", None), shape=getattr(args, "shape", None))
    if summary["done"]:
        print(f"likeness create: {summary['attributes']}; {summary['colours']}; {summary['shape']}",
              file=sys.stderr)
    for d in summary["done"]:
        print(d["out"])
    if summary["failed"] and args.photos:
        print(f"likeness create: {len(summary['failed'])} of "
              f"{len(summary['failed']) + len(summary['done'])} photos failed; the list is in "
              f"{Path(args.out) / FAILURES}", file=sys.stderr)
    if not summary["done"]:
        return 1
    return EXIT_PARTIAL if summary["failed"] else 0
