"""`likeness retrain --config tiny` end to end on the CPU: every stage, skip when current, refusals."""
import json
import subprocess
import sys

import numpy as np
import pytest

from likeness.backend.contract import load_model
from likeness.backend.errors import UserError
from likeness.backend.schema import find_pack
from likeness.training.estimator import PairedSet
from likeness.training.retrain import retrain

STAGES = ["render", "real", "parser", "avatar", "encoder", "invert", "pairs", "estimator", "export",
          "validate"]


def test_tiny_retrain_end_to_end(tiny_run):
    work, summary = tiny_run
    assert list(summary["timings_s"]) == STAGES
    pack = find_pack("default")
    model = load_model(work / "model.onnx", pack, device="cpu")       # the contract holds
    crops = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    cont, probs = model.run(crops)
    assert cont.shape == (2, pack.n_continuous) and len(probs) == len(pack.slots)
    pairs = PairedSet(work / "pairs", pack)
    assert len(pairs) > 48                      # augmented copies beyond the 48 renders
    assert len(np.unique(pairs.groups)) <= 48
    assert (work / "pairs" / "contact_sheet.png").is_file()
    val = summary["validation"]
    assert val["photos"] == 4 and len(val["targets"]) >= 10
    assert "| validate |" in (work / "report.md").read_text()


def test_rerun_skips_current_stages_and_refuses_other_jobs(tiny_run):
    work, _ = tiny_run
    before = {s: json.loads((work / s / "stage.json").read_text())["started"] for s in STAGES}
    logs = []
    retrain("default", "tiny", str(work), train_real=True, progress=False, log=logs.append)
    after = {s: json.loads((work / s / "stage.json").read_text())["started"] for s in STAGES}
    assert before == after
    assert sum("current, skipped" in line for line in logs) == len(STAGES)
    with pytest.raises(UserError, match="mode: folder has 'full', this run wants 'baseline'"):
        retrain("default", "tiny", str(work), baseline=True, progress=False, log=lambda s: None)


def test_baseline_row_via_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "likeness.cli", "retrain", "--config", "tiny",
                        "--work", str(tmp_path), "--baseline"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["mode"] == "baseline" and list(out["timings_s"]) == ["render", "pairs", "estimator",
                                                                     "export", "validate"]
