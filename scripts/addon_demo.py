"""What an artist gets from Create from photo, as one picture (headless: no screenshot possible).

    python scripts/addon_demo.py [--photo P] [--model M.onnx] [--out docs/images/addon_create_from_photo.png]

Runs the add-on's operators in the bpy module: Create from photo on the photo (default: the
public-domain astronaut portrait that scikit-image ships), then composes the aligned crop the model
saw, a render of the resulting avatar, and the table the Photo panel shows: per slot the model's
choice with its confidence and the next-best options (one-click alternatives in the panel).

The estimator is ``--model``, else the pack's installed model; without one, the real estimator
architecture with random weights stands in, and the picture says so (its choices and
confidences are then meaningless; the picture shows what the panel reports, not fidelity).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "images" / "addon_create_from_photo.png"
TILE = 256


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:                       # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def compose(crop, render, rows, title: str, notes: list[str]):
    """crop, render: uint8 HxWx3; rows: (slot label, choice label, p, [(label, p), ...])."""
    from PIL import Image, ImageDraw
    pad, line = 12, 19
    table_w = 560
    width = pad * 4 + TILE * 2 + table_w
    height = max(pad * 2 + 30 + TILE + 26 + line * len(notes),
                 pad * 2 + 30 + line * (len(rows) + 2))
    img = Image.new("RGB", (width, height), (246, 245, 242))
    d = ImageDraw.Draw(img)
    f, fb = _font(14), _font(16)
    d.text((pad, pad), title, fill=(20, 20, 20), font=fb)
    y0 = pad + 30
    for i, (tile, caption) in enumerate(((crop, "aligned crop the model saw"),
                                         (render, "the avatar in Blender"))):
        x = pad + i * (TILE + pad)
        img.paste(Image.fromarray(tile).resize((TILE, TILE), Image.Resampling.LANCZOS), (x, y0))
        d.text((x, y0 + TILE + 6), caption, fill=(60, 60, 60), font=f)
    for k, note in enumerate(notes):
        d.text((pad, y0 + TILE + 26 + k * line), note, fill=(150, 40, 30), font=f)
    x0 = pad * 3 + TILE * 2
    cols = (x0, x0 + 110, x0 + 290)
    for x, head in zip(cols, ("slot", "choice (confidence)", "alternatives (one click)")):
        d.text((x, y0), head, fill=(20, 20, 20), font=fb)
    d.line((x0, y0 + line + 2, width - pad, y0 + line + 2), fill=(180, 180, 180))
    for r, (slot, choice, p, alts) in enumerate(rows):
        y = y0 + (r + 1) * line + 6
        colour = (20, 110, 40) if p >= 0.5 else (170, 90, 0)
        d.text((cols[0], y), slot, fill=(40, 40, 40), font=f)
        d.text((cols[1], y), f"{choice} ({p:.0%})", fill=colour, font=f)
        d.text((cols[2], y), "   ".join(f"{a} {q:.0%}" for a, q in alts), fill=(70, 70, 70), font=f)
    return img


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photo", help="photo file (default: the astronaut portrait, public domain)")
    ap.add_argument("--model", help="estimator .onnx (default: installed, else a stand-in)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--resolution", type=int, default=256)
    args = ap.parse_args(argv)

    import numpy as np
    from PIL import Image

    import bpy
    import addon_utils          # importable once bpy is
    from likeness.backend.errors import UserError
    from likeness.backend.models import find_model
    from likeness.backend.schema import find_pack
    from likeness.render_engine import avatar, render

    pack = find_pack("default")
    addon_utils.enable("likeness", default_set=True)
    bpy.ops.wm.read_homefile(use_empty=True)
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.photo:
            photo = Path(args.photo)
        else:
            from skimage import data
            photo = tmp / "astronaut.png"
            Image.fromarray(data.astronaut()).save(photo)
        if args.model:
            model = Path(args.model)
        else:
            try:
                model = find_model(pack)
            except UserError:
                from likeness.training.estimator.export import export_stand_in
                model = export_stand_in(pack, tmp / "estimator.onnx", 128)
                notes = ["No trained estimator is installed for this pack: a stand-in",
                         "with random weights ran, so choices and confidences mean",
                         "nothing yet; re-run this script with a trained model."]
        t = time.perf_counter()
        result = bpy.ops.likeness.create_from_photo("EXEC_DEFAULT", True, filepath=str(photo),
                                                    model=str(model))
        seconds = time.perf_counter() - t
        if result != {"FINISHED"}:
            print("Create from photo failed", file=sys.stderr)
            return 1
        coll = avatar.active_avatar()
        image = avatar.crop_image(coll)
        w, h = image.size
        px = np.empty(w * h * 4, np.float32)
        image.pixels.foreach_get(px)
        crop = (px.reshape(h, w, 4)[::-1, :, :3] * 255).round().astype(np.uint8)
        render.setup_render(pack, args.resolution)
        rgb, _ = render.render_sample(pack, args.resolution, mask=False)
        rows = []
        for slot, choice, p, alts in avatar.iter_slot_confidences(coll):
            s = pack.slot(slot)
            rows.append((s.label or slot, s.option(choice).label, p,
                         [(a["label"], a["probability"]) for a in alts if a["option"] != choice]))
        title = (f"Create from photo: {photo.name if args.photo else 'astronaut portrait'} -> "
                 f"'{coll.name}' in {seconds:.2f} s ({model.name})")
        img = compose(crop, rgb, rows, title, notes)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, optimize=True)
    print(f"{out} ({out.stat().st_size / 1000:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
