#!/usr/bin/env python
"""The ablation on real photos (the method's Table 3): one `likeness retrain` work folder per row,
each row's estimator judged alone on the 256 validation photos, one markdown table.

    python scripts/ablation_table.py --row baseline=WORK1 --row "+ domain"=WORK2 --row "+ aug"=WORK3
        [--pack default] [--out ablation.md] [--limit N]

Rows come from e.g. ``likeness retrain --baseline``, ``--no-augment`` and the full run, with the same
``--set estimator_epochs=... estimator_epoch_images=...`` budget. Each model is validated with
colours and shape from the estimator (``--colours model --shape model``: reading them from the photo
would make the rows' colour and shape figures identical), into WORK/validate_estimator/ (reused when
it is there for the same model file). A second table gives each row's difference from the first row
with a 95 % paired bootstrap interval over the photos (``fidelity.paired_bootstrap``), so chance
differences on a 256-photo split are not read as findings.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from likeness.evaluation.ablation import format_table, row_report, versus_table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", action="append", required=True, metavar="LABEL=WORK")
    ap.add_argument("--pack", default="default")
    ap.add_argument("--out", help="also write the table here")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--bootstrap", type=int, default=500, metavar="N",
                    help="paired bootstrap draws for the second table (each row against the "
                         "first; 0: no second table)")
    args = ap.parse_args(argv)
    rows, folders = [], []
    for item in args.row:
        label, sep, work = item.partition("=")
        if not sep:
            ap.error(f"--row {item}: expected LABEL=WORK")
        work = Path(work).expanduser()
        rows.append((label, row_report(work, args.pack, args.limit)))
        folders.append((label, work / "validate_estimator"))
    table = format_table(rows)
    if args.bootstrap and len(rows) > 1:
        table += ("\nEach row minus the first, with its 95 % paired bootstrap interval over the "
                  f"validation photos ({args.bootstrap} draws; bold: the interval excludes 0; "
                  "colour errors: negative is better):\n\n" + versus_table(folders, args.bootstrap))
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
