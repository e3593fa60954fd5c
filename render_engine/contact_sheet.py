"""``likeness contact-sheet``: a grid of a dataset's samples, each render beside its mask."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..backend.errors import UserError
from ..backend.visual import colorize_mask, grid
from .dataset import dataset_status


def contact_sheet(dataset: str | Path, count: int = 24, columns: int = 6, tile: int = 128) -> np.ndarray:
    """Evenly spaced complete samples: render | colourised mask pairs, ``columns`` pairs a row."""
    from PIL import Image
    status = dataset_status(dataset)
    man = status["manifest"]
    width = man["layout"]["index_width"]
    missing = set(status["missing"])
    done = [i for i in range(status["count"]) if i not in missing]
    if not done:
        raise UserError(f"{dataset} has no complete samples yet")
    picks = [done[int(k)] for k in np.linspace(0, len(done) - 1, min(count, len(done)))]
    tiles = []
    for i in dict.fromkeys(picks):
        name = f"{i:0{width}d}.png"
        with Image.open(Path(dataset) / "images" / name) as im:
            rgb = np.asarray(im.convert("RGB").resize((tile, tile), Image.BILINEAR))
        with Image.open(Path(dataset) / "masks" / name) as im:
            mask = np.asarray(im.resize((tile, tile), Image.NEAREST))
        tiles += [rgb, colorize_mask(mask)]
    return grid(tiles, columns * 2)


def cli_contact_sheet(args) -> int:
    from PIL import Image
    sheet = contact_sheet(args.dataset, args.count, args.columns)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(out)
    print(out)
    return 0
