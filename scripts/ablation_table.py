#!/usr/bin/env python
"""The ablation on real photos (the method's Table 3): one `likeness retrain` work folder per row,
each row's estimator judged alone on the 256 validation photos, one markdown table.

    python scripts/ablation_table.py --row baseline=WORK1 --row "+ domain"=WORK2 --row "+ aug"=WORK3
        [--pack default] [--out ablation.md] [--limit N]

Rows come from e.g. ``likeness retrain --baseline``, ``--no-augment`` and the full run, with the same
``--set estimator_epochs=... estimator_epoch_images=...`` budget; a row may also be an .onnx file
(e.g. the shipped model). Each model is validated alone, every option, colour and shape its own
(``--attributes model --colours model --shape model``: reading them from the photo would make the
rows' figures identical), into WORK/validate_estimator/ (reused when it is there for the same model
file). A second table gives each row's difference from the first row
with a 95 % paired bootstrap interval over the photos (``fidelity.paired_bootstrap``), so chance
differences on a 256-photo split are not read as findings. ``--yardstick`` adds the rows on the
viewer's yardstick, alone and with the real-face prior (the attribute reader, colours and shape
from the photo; validated into WORK/validate_prior/), each row's mean against the first row's
in the same setting.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from likeness.evaluation.ablation import (format_table, row_folder, row_report, versus_table,
                                          yardstick_table)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", action="append", required=True, metavar="LABEL=WORK")
    ap.add_argument("--pack", default="default")
    ap.add_argument("--out", help="also write the table here")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--bootstrap", type=int, default=500, metavar="N",
                    help="paired bootstrap draws for the second table (each row against the "
                         "first; 0: no second table)")
    ap.add_argument("--yardstick", action="store_true",
                    help="also the viewer's yardstick: each row alone and with the real-face prior")
    args = ap.parse_args(argv)
    works = []
    for item in args.row:
        label, sep, work = item.partition("=")
        if not sep:
            ap.error(f"--row {item}: expected LABEL=WORK")
        works.append((label, Path(work).expanduser()))
    rows = [(label, row_report(work, args.pack, args.limit)) for label, work in works]
    folders = [(label, row_folder(work)) for label, work in works]
    table = format_table(rows)
    if args.bootstrap and len(rows) > 1:
        table += ("\nEach row minus the first, with its 95 % paired bootstrap interval over the "
                  f"validation photos ({args.bootstrap} draws; bold: the interval excludes 0; "
                  "colour errors: negative is better):\n\n" + versus_table(folders, args.bootstrap))
    if args.yardstick:
        alone = [(f"{label}, alone", rep, folder) for (label, rep), (_, folder) in zip(rows, folders)]
        prior = [(f"{label}, with the prior", row_report(work, args.pack, args.limit, "prior"),
                  row_folder(work, "prior")) for label, work in works]
        table += ("\nThe viewer's yardstick (balanced accuracy), each estimator alone and with the "
                  "real-face prior on top; the last column: the row's mean minus the first row's "
                  "in the same setting, 95 % paired bootstrap interval (bold: it excludes 0):\n\n"
                  + yardstick_table(alone + prior, ["alone"] * len(alone) + ["prior"] * len(prior)))
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
