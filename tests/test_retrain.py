"""`likeness retrain --config tiny` end to end on the CPU: every stage, skip when current, refusals,
the real-photo labels stage (with, without, without the shared faces)."""
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from likeness.backend.contract import load_model, read_info
from likeness.backend.errors import UserError
from likeness.backend.schema import find_pack
from likeness.training.pipeline import retrain as retrain_mod
from likeness.training.estimator.paired_set import PairedSet
from likeness.training.estimator.real_labels import SHAPE_MIN_R2
from likeness.training.pipeline.retrain import retrain

STAGES = ["render", "calibration", "photo_parser", "labels", "real", "parser", "avatar", "encoder", "invert",
          "pairs", "check", "estimator", "export", "shape", "bundle", "validate"]
REAL_TERMS = ("real_presence", "real_hair", "real_colour", "real_shape")


def record(work: Path, stage: str) -> dict:
    return json.loads((work / stage / "stage.json").read_text())


def copy_run(src: Path, dst: Path) -> Path:
    """The tiny run's folder for a test that changes it, without the estimator's weights and the
    ONNX files (the tests that copy it redo those stages)."""
    def skip(folder, names):
        if Path(folder).name in ("estimator", "export"):
            return [n for n in names if n != "stage.json"]
        return [n for n in names if n.endswith(".onnx")]
    shutil.copytree(src, dst, ignore=skip)
    return dst


def test_tiny_retrain_end_to_end(tiny_run):
    work, summary = tiny_run
    assert list(summary["timings_s"]) == STAGES
    pack = find_pack("default")
    model = load_model(work / "model.onnx", pack, device="cpu")       # the contract holds
    crops = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    cont, probs = model.run(crops)
    assert cont.shape == (2, pack.n_continuous) and len(probs) == len(pack.slots)
    pairs = PairedSet(work / "pairs", pack)
    assert len(pairs) > 50                      # augmented copies beyond the 50 renders
    assert len(np.unique(pairs.groups)) <= 50
    assert (work / "pairs" / "contact_sheet.png").is_file()
    val = summary["validation"]
    assert val["photos"] == 4 and len(val["targets"]) >= 10
    assert "| validate |" in (work / "report.md").read_text()
    c = summary["counts"]
    assert c["renders"] == 50 and c["pairs"] == len(pairs) and c["held_out_n"] > 0
    assert f"Data: 50 renders, {len(pairs):,} pairs; estimator held out" in (
        work / "report.md").read_text()


def test_labels_stage_labels_real_photos_and_the_estimator_trains_on_them(tiny_run):
    work, summary = tiny_run
    lab = record(work, "labels")
    cal = record(work, "calibration")
    assert lab["done"] and lab["upstream"] == {"render": record(work, "render")["key"],
                                               "calibration": f"content:{cal['result']['content']}"}
    res = lab["result"]
    assert res["used"] and res["photos"] == 64 and res["size"] == 32 and res["key"]
    assert set(res["presence"]) >= {"glasses", "headwear", "earrings", "fringe"}
    for name, c in res["presence"].items():
        assert 0 <= c["positive"] <= c["valid"] <= 64, name
    assert sum(c["positive"] for c in res["presence"].values()) > 0
    assert sum(res["hair_length"].values()) == 64
    assert set(res["colour"]) >= {"hair_color", "skin_tone"} and min(res["colour"].values()) > 0
    # the tiny config's 50 renders are what the shape surrogate needs: its step runs in tests
    assert "skipped" not in res["shape_surrogate"], res["shape_surrogate"]
    assert res["shape_surrogate"]["n"] == 50 and len(res["shape_surrogate"]["r2"]) >= 3
    # labels only for the measures it predicts well enough (50 renders at 64 px: held-out R^2 < 0.5)
    sur = res["shape_surrogate"]
    assert set(res["shape"]) == {m for m, r in zip(sur["measures"], sur["r2"])
                                 if r >= SHAPE_MIN_R2}
    assert all(0 <= n <= 64 for n in res["shape"].values())
    assert res["calibration"]["resolution"] == 64 and res["calibration"]["max_points"] == 8
    assert (work / "labels" / "calibration.json").read_text() == (work / "calibration" / "calibration.json").read_text()
    assert json.loads((work / "labels" / "summary.json").read_text())["n"] == 64

    est = record(work, "estimator")
    assert est["inputs"]["real_fraction"] == 0.25
    assert est["upstream"]["labels"] == f"content:{res['content']}"     # what the labels say
    assert all(k in est["result"] for k in REAL_TERMS)
    assert est["result"]["real_labels"] == {"key": res["key"], "content": res["content"],
                                            "photos": 64}
    assert est["result"]["real_held_out"]["n"] == 6                 # 10 % of the 64 kept aside

    report = read_info(work / "model.onnx").report
    assert report["real_labels"]["used"] and report["real_labels"]["photos"] == 64
    assert report["real_labels"]["presence"] == res["presence"]
    assert "non-commercial" in report["licence"] and "training photos" in report["licence"]
    assert summary["real_labels"]["used"]
    assert "Real-photo labels: 64 TRAIN photos, 0.25 of every estimator batch" in \
        (work / "report.md").read_text()


def test_rerun_skips_current_stages_and_refuses_other_jobs(tiny_run):
    work, _ = tiny_run
    before = {s: record(work, s)["started"] for s in STAGES}
    logs = []
    retrain("default", "tiny", str(work), train_real=True, progress=False, log=logs.append)
    after = {s: record(work, s)["started"] for s in STAGES}
    assert before == after
    assert sum("current, skipped" in line for line in logs) == len(STAGES)
    with pytest.raises(UserError, match="mode: folder has 'full', this run wants 'baseline'"):
        retrain("default", "tiny", str(work), baseline=True, progress=False, log=lambda s: None)


def test_no_real_labels_redoes_only_what_depends_on_them(tiny_run, tmp_path):
    work = copy_run(tiny_run[0], tmp_path / "work")
    logs = []
    summary = retrain("default", "tiny", str(work), train_real=True, real_labels=False,
                      progress=False, log=logs.append)
    skipped = [s for s in STAGES if f"[{s}] current, skipped" in "\n".join(logs)]
    assert skipped == ["render", "calibration", "photo_parser", "real", "parser", "avatar", "encoder",
                       "invert", "pairs", "check"]
    assert any("real-photo labels off (--no-real-labels)" in line for line in logs)
    assert record(work, "labels")["result"] == {"used": False, "reason": "--no-real-labels"}
    est = record(work, "estimator")
    assert est["inputs"]["real_fraction"] == 0.0
    assert not any(k in est["result"] for k in REAL_TERMS)
    report = read_info(work / "model.onnx").report
    assert report["real_labels"]["used"] is False
    assert "non-commercial" in report["licence"]                     # G_real still saw the faces
    assert summary["real_labels"]["used"] is False
    assert "Real-photo labels: not used (--no-real-labels)" in (work / "report.md").read_text()


def test_render_share_redoes_the_estimator_on_renders_beside_the_pairs(tiny_run, tmp_path):
    work = copy_run(tiny_run[0], tmp_path / "work")
    logs = []
    retrain("default", retrain_mod.get_config("tiny", render_share=0.5), str(work), train_real=True,
            progress=False, log=logs.append)
    skipped = [s for s in STAGES if f"[{s}] current, skipped" in "\n".join(logs)]
    assert skipped == STAGES[:STAGES.index("estimator")]
    assert record(work, "estimator")["inputs"]["render_share"] == 0.5
    renders = PairedSet(work / "estimator" / "renders", find_pack("default"))
    assert len(renders) == 50 and renders.manifest["kind"] == "renders"
    assert (work / "model.onnx").is_file()


def test_half_weights_redo_only_the_export_and_halve_the_file(tiny_run, tmp_path):
    """What ships is a float16-weight export (the default model must stay under ~25 MB): one
    setting, and only the export and what follows it (shape table, bundle, validation) are redone."""
    work = tmp_path / "work"
    shutil.copytree(tiny_run[0], work)
    logs = []
    retrain("default", retrain_mod.get_config("tiny", half_weights=True), str(work),
            train_real=True, progress=False, log=logs.append)
    skipped = [s for s in STAGES if f"[{s}] current, skipped" in "\n".join(logs)]
    assert skipped == STAGES[:STAGES.index("export")]
    full, half = (tiny_run[0] / "model.onnx").stat().st_size, (work / "model.onnx").stat().st_size
    assert half < 0.6 * full
    pack = find_pack("default")
    crops = np.random.default_rng(1).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    a = load_model(tiny_run[0] / "model.onnx", pack, device="cpu").run(crops)[0]
    b = load_model(work / "model.onnx", pack, device="cpu").run(crops)[0]
    assert np.abs(a - b).max() < 0.05                  # the same model, rounded weights


def test_without_the_shared_faces_the_labels_stage_is_skipped(tiny_run, tmp_path, monkeypatch):
    work = copy_run(tiny_run[0], tmp_path / "work")
    shutil.rmtree(work / "labels")                         # a folder whose labels were never made
    monkeypatch.setenv("LIKENESS_CELEBAMASK", str(tmp_path / "no-faces"))
    logs = []
    retrain("default", "tiny", str(work), train_real=True, until="estimator", progress=False,
            log=logs.append)
    assert any(line.startswith("[labels] skipped: no shared real faces at") and "no-faces" in line
               for line in logs)
    assert record(work, "labels")["result"]["used"] is False
    est = record(work, "estimator")
    assert est["done"] and est["inputs"]["real_fraction"] == 0.0
    assert not any(k in est["result"] for k in REAL_TERMS)


def test_faces_gone_after_labelling_keep_the_labels(tiny_run, tmp_path, monkeypatch):
    """A node without the faces (a farm job) neither relabels nor retrains a finished estimator
    without them; an estimator that still has to train says what is missing."""
    from likeness.backend import realfaces
    work = copy_run(tiny_run[0], tmp_path / "work")
    faces = tmp_path / "faces"
    faces.symlink_to(realfaces.default_root(), target_is_directory=True)   # never a copy
    monkeypatch.setenv("LIKENESS_CELEBAMASK", str(faces))
    run = dict(train_real=True, until="estimator", progress=False)
    retrain("default", "tiny", str(work), log=lambda s: None, **run)
    assert record(work, "labels")["result"]["used"] and record(work, "estimator")["done"]
    faces.unlink()
    logs = []
    retrain("default", "tiny", str(work), log=logs.append, **run)
    assert any("faces are not at" in line and "keeping the labels" in line for line in logs)
    assert "[labels] current, skipped" in "\n".join(logs)
    assert "[estimator] current, skipped" in "\n".join(logs)
    shutil.rmtree(work / "estimator")
    with pytest.raises(UserError, match="real faces are gone from .*--no-real-labels"):
        retrain("default", "tiny", str(work), log=lambda s: None, **run)


@pytest.mark.real_faces
def test_labels_stage_fits_the_shape_surrogate_on_the_renders(tmp_path, monkeypatch):
    """With 50+ renders the stage fits the shape surrogate on its own render folder."""
    tiny = retrain_mod.CONFIGS["tiny"]
    monkeypatch.setitem(retrain_mod.CONFIGS, "tiny", replace(tiny, render_count=56))
    out = retrain("default", "tiny", str(tmp_path), baseline=True, until="labels", progress=False,
                  log=lambda s: None)
    assert out["stopped_after"] == "labels" and not (tmp_path / "pairs").exists()
    res = record(tmp_path, "labels")["result"]
    sur = res["shape_surrogate"]
    assert sur["n"] == 56 and len(sur["r2"]) == len(sur["measures"]) >= 3
    saved = json.loads((tmp_path / "labels" / "shape_surrogate.json").read_text())
    assert saved["n"] == 56 and saved["measures"] == sur["measures"]
    assert set(res["shape"]) <= set(sur["measures"])
    assert all(0 <= v <= 64 for v in res["shape"].values())


def test_licence_notes():
    assert retrain_mod._licence(True, False) == "trained on engine renders only"
    for baseline in (True, False):
        assert "non-commercial" in retrain_mod._licence(baseline, True)
    assert "non-commercial" in retrain_mod._licence(False, False)


@pytest.mark.real_faces
def test_baseline_row_via_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "likeness.cli", "retrain", "--config", "tiny",
                        "--work", str(tmp_path), "--baseline"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["mode"] == "baseline" and list(out["timings_s"]) == [
        "render", "calibration", "photo_parser", "labels", "pairs", "estimator", "export", "shape", "bundle",
        "validate"]
    # the baseline row gets the real-photo labels too: the rows differ in the domain part only
    assert out["real_labels"]["used"] and out["real_labels"]["photos"] == 64
    assert all(k in record(tmp_path, "estimator")["result"] for k in REAL_TERMS)
    assert "non-commercial" in read_info(tmp_path / "model.onnx").report["licence"]


def test_existing_renders_and_generators_with_an_image_budget(tiny_run, tmp_path):
    """A TD who has a farm's renders and a trained G_avatar: the pipeline starts from them, inverts
    with the encoder alone (no parser needed) and trains the estimator on a fixed image budget."""
    src = tiny_run[0]
    work = tmp_path / "work"
    r = subprocess.run([sys.executable, "-m", "likeness.cli", "retrain", "--config", "tiny", "--work",
                        str(work), "--no-augment", "--renders", str(src / "render"),
                        "--generators", str(src / "avatar"), "--set", "invert_steps=0",
                        "estimator_epoch_images=24", "estimator_epochs=2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[render] using the existing dataset" in r.stderr
    assert record(work, "render")["result"]["count"] == 50
    assert record(work, "real")["result"]["external"] and record(work, "avatar")["result"]["external"]
    assert "skipped" in record(work, "parser")["result"]
    assert not (work / "render" / "images").exists()             # nothing re-rendered or retrained
    assert not any((work / "avatar").glob("checkpoints/*"))
    assert json.loads((work / "invert" / "manifest.json").read_text())["config"]["short_steps"] == 0
    state = json.loads((work / "estimator" / "checkpoint" / "state.json").read_text())
    n_syn = 16 - round(16 * 0.25)                                 # tiny batch 16, a quarter real
    assert state["global_step"] == 2 * (24 // n_syn)              # the budget, not the set's size
    assert len(PairedSet(work / "pairs", find_pack("default"))) == 50   # --no-augment: one per render
    # the competing methods trained from this folder read the farm's renders where they are
    from likeness.training.baselines import imitator, mapper
    assert imitator.retrain_inputs(work)["renders"].resolve() == (src / "render").resolve()
    assert mapper.locate_work(work)[0].render.resolve() == (src / "render").resolve()


def test_pairs_come_from_the_avatar_runs_own_g_real(tiny_run):
    """The frozen G_real kept by the avatar run is the real stage's final EMA generator."""
    import torch
    from likeness.training.generators import train_gan
    work = tiny_run[0]
    frozen = train_gan.load_frozen_real(work / "avatar")
    G_real, _ = train_gan.load_generator(work / "real")
    G_avatar, _ = train_gan.load_generator(work / "avatar")
    a, b, c = frozen.state_dict(), G_real.state_dict(), G_avatar.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)            # the twin did move


def test_bad_existing_inputs_are_refused_before_anything_runs(tiny_run, tmp_path):
    src = tiny_run[0]
    cases = [(["--renders", str(tmp_path / "nowhere")], "not a render dataset"),
             (["--generators", str(src / "real")], "not a G_avatar run"),
             (["--generators", str(tmp_path)], "no checkpoint"),
             (["--set", "estimator_epoch_images=many"], "cannot read 'many' as"),
             (["--set", "colour=1"], "bad --set 'colour=1'")]
    for i, (extra, message) in enumerate(cases):
        work = tmp_path / f"w{i}"
        r = subprocess.run([sys.executable, "-m", "likeness.cli", "retrain", "--config", "tiny",
                            "--work", str(work), *extra], capture_output=True, text=True)
        assert r.returncode != 0 and message in r.stderr, (extra, r.stderr[-1500:])
        assert not (work / "estimator").exists()


def test_the_shipped_models_are_found_from_the_training_folders():
    """Paths to models/ from inside training/'s sub-folders: the cpu config starts from the shipped
    G_real (models/real_cpu/), the exports write into models/."""
    from likeness.backend.models import SHIPPED
    from likeness.training.readout import mtcnn_export
    assert retrain_mod.shipped_weights("real", "cpu") == SHIPPED / "real_cpu"
    assert not retrain_mod.uses_device("real", "cpu")           # shipped: nothing to train
    assert mtcnn_export.OUT_DIR == SHIPPED / "mtcnn" and (SHIPPED / "mtcnn" / "pnet.onnx").is_file()


def test_set_reads_optional_fields_by_their_annotation():
    from likeness.training.common.presets import parse_set
    cfg = retrain_mod.get_config("cpu")
    got = parse_set(cfg, ["invert_steps=0", "estimator_epoch_images=8000", "real_fraction=0.5",
                          "validate_limit=none"])
    assert got == {"invert_steps": 0, "estimator_epoch_images": 8000, "real_fraction": 0.5,
                   "validate_limit": None}
    assert retrain_mod.get_config(cfg, **got).estimator_epoch_images == 8000
    with pytest.raises(UserError, match="cannot read 'x' as int"):
        parse_set(cfg, ["invert_steps=x"])


def test_shipped_generator_weights_are_what_a_retrain_starts_from(tiny_run, tmp_path, monkeypatch):
    """`likeness train export-gan` writes slim G_real / parser folders; with them under models/ a
    retrain trains neither and fine-tunes G_avatar from the shipped G_real."""
    import torch
    from likeness.training.generators import train_gan
    src = tiny_run[0]
    models = tmp_path / "models"
    for kind in ("real", "parser"):
        r = subprocess.run([sys.executable, "-m", "likeness.cli", "train", "export-gan", "--from",
                            str(src / kind), "--out", str(models / f"{kind}_tiny")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-1500:]
    shipped = models / "real_tiny"
    assert sorted(p.name for p in shipped.iterdir()) == ["D.safetensors", "G_ema.safetensors",
                                                         "README.md", "state.json"]
    assert "non-commercial" in (shipped / "README.md").read_text()
    assert (shipped / "state.json").stat().st_size < 20_000        # no optimiser state
    with pytest.raises(UserError, match="only real and parser runs"):
        train_gan.export_for_shipping(src / "avatar", tmp_path / "x", "")
    monkeypatch.setattr(retrain_mod, "SHIPPED", models)
    work = tmp_path / "work"
    shutil.copytree(src / "render", work / "render")                  # no need to render again
    (work / "pipeline.json").write_text((src / "pipeline.json").read_text())
    shutil.copytree(src / "labels", work / "labels")
    retrain("default", "tiny", str(work), until="avatar", progress=False, log=lambda s: None)
    assert record(work, "real")["result"] == {"checkpoint": str(shipped), "shipped": True}
    assert record(work, "parser")["result"]["shipped"] is True
    frozen = train_gan.load_frozen_real(work / "avatar")
    ref = train_gan.load_generator(shipped)[0].state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in frozen.state_dict().items())
    assert any((work / "avatar").glob("checkpoints/step_*"))         # G_avatar did train

    # the layout loss is a retrain setting: G_avatar retrains with it
    layout = retrain_mod.get_config("tiny", avatar_layout=1.0)
    retrain("default", layout, str(work), until="avatar", progress=False, log=lambda s: None)
    assert record(work, "avatar")["inputs"]["lambda_layout"] == 1.0
    assert json.loads((work / "avatar" / "config.json").read_text())["lambda_layout"] == 1.0
    # new shipped weights (same folder, other content) redo the stages that used the old ones
    from safetensors.torch import load_file, save_file
    g = load_file(str(shipped / "G_ema.safetensors"))
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in g.items()},
              str(shipped / "G_ema.safetensors"))
    before = record(work, "real")["key"]
    retrain("default", layout, str(work), until="real", progress=False, log=lambda s: None)
    assert record(work, "real")["key"] != before and list(work.glob("real.stale-*"))


def test_cross_domain_measure_reads_each_avatar_run_against_its_own_g_real(tiny_run):
    r = subprocess.run([sys.executable, "-m", "likeness.training.generators.gan_metrics", "cross", "--avatar",
                        str(tiny_run[0] / "avatar"), "-n", "8"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1500:]
    out = json.loads(r.stdout)
    assert out["lambda_color"] > 0 and 0 <= out["miou"] <= 1
    assert set(out["color_distance"]) == {"hair", "face"}


def test_ablation_table_judges_each_rows_estimator_alone(tiny_run, tmp_path):
    work = copy_run(tiny_run[0], tmp_path / "row")
    shutil.copyfile(tiny_run[0] / "model.onnx", work / "model.onnx")
    script = Path(__file__).resolve().parents[1] / "scripts" / "ablation_table.py"
    cmd = [sys.executable, str(script), "--row", f"tiny={work}", "--row", f"again={work}",
           "--limit", "3", "--out", str(tmp_path / "table.md"), "--yardstick"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1500:]
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0].startswith("| row | glasses | headwear |") and len(table) == 19, table
    assert table[2].startswith("| tiny |") and table[2].endswith(" of 12 |")
    # the second table: the same model against itself differs by exactly nothing
    assert table[7].startswith("| vs tiny | glasses |") and table[9].startswith("| again |")
    cells = [c.strip() for c in table[9].strip("|").split("|")[1:]]
    assert len(cells) == 10 and all(c in ("+0.000 [+0.000, +0.000]", "n/a") for c in cells), cells
    rep = json.loads((work / "validate_estimator" / "report.json").read_text())
    assert rep["photos"] == 3 and rep["colours"]["mode"] == "model"
    assert "shape from the estimator" in rep["shape"]["note"]
    # the yardstick: each row alone, then with the prior (the attribute reader), means vs the first
    assert table[13].startswith("| row | glasses | facial_hair |"), table[13]
    assert [t.split("|")[1].strip() for t in table[15:19]] == [
        "tiny, alone", "again, alone", "tiny, with the prior", "again, with the prior"]
    # each setting against its own first row: the same model with the prior differs by nothing
    for first, second in ((15, 16), (17, 18)):
        assert table[first].endswith("|  |") and table[second].endswith("| +0.000 [+0.000, +0.000] |")
    prior = json.loads((work / "validate_prior" / "report.json").read_text())
    alone_reads = json.loads((work / "validate_estimator" / "viewer.json").read_text())["readings"]
    prior_reads = json.loads((work / "validate_prior" / "viewer.json").read_text())["readings"]
    assert "reader" in prior["attributes"]["note"] and rep["attributes"]["note"] != prior["attributes"]["note"]
    mean = lambda v: f"{v['viewer']['mean']:.3f}" if v["viewer"]["mean"] is not None else "n/a"
    assert f"**{mean(rep)}**" in table[15] and f"**{mean(prior)}**" in table[17]
    assert len(alone_reads) == len(prior_reads) == 3
    mtime = (work / "validate_estimator" / "report.json").stat().st_mtime
    r = subprocess.run(cmd, capture_output=True, text=True)             # same model: reused
    assert r.returncode == 0 and (work / "validate_estimator" / "report.json").stat().st_mtime == mtime
    r = subprocess.run([sys.executable, str(script), "--row", f"x={tmp_path / 'none'}"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "no model.onnx" in r.stderr


def test_input_size_study_trains_exports_and_judges_each_size(tiny_run, tmp_path):
    """scripts/input_size_study.py at toy scale: one paired set at the largest size, one model per
    size with its input size in the contract, each judged on validation photos, cost in the table."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "input_size_study.py"
    work = tmp_path / "study"
    cmd = [sys.executable, str(script), "--renders", str(tiny_run[0] / "render"), "--work",
           str(work), "--sizes", "32", "48", "--data-size", "48", "--epochs", "1", "--epoch-images", "64",
           "--real-fraction", "0", "--limit", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    pack = find_pack("default")
    for size in (32, 48):
        assert read_info(work / f"input_{size}" / "model.onnx").input_size == size
        cost = json.loads((work / f"input_{size}" / "cost.json").read_text())
        assert cost["images"] == 64 and cost["seconds"] > 0 and cost["images_per_s"] > 0
        load_model(work / f"input_{size}" / "model.onnx", pack, device="cpu")
    table = (work / "table.md").read_text().splitlines()
    assert table[0].endswith("| train img/s | train min | targets met |")
    assert table[2].startswith("| 32 px |") and table[3].startswith("| 48 px |")
    r = subprocess.run(cmd[:-2] + ["--sizes", "16"], capture_output=True, text=True)
    assert r.returncode != 0 and "32 to 48 px" in r.stderr


def test_augment_parts_choose_the_parts_semantic_augmentation_touches():
    from likeness.training.pairs.paired_data import get_config as pair_cfg
    from likeness.training.pipeline.retrain import _augment_parts
    assert _augment_parts("") == {}
    cfg = pair_cfg("cpu", **_augment_parts("background=1, eyeglasses=0.06"))
    assert cfg.aug_lambdas == (("background", 1.0), ("eyeglasses", 0.06))
    with pytest.raises(UserError, match="expected PART=LAMBDA"):
        _augment_parts("hair")
    with pytest.raises(UserError, match="unknown part 'tail'"):
        pair_cfg("cpu", **_augment_parts("tail=0.5"))


def test_until_with_overrides_stops_cleanly_and_prints_json(tiny_run, tmp_path):
    """A farm job runs one stage: `--until` with `--set` overrides prints its JSON summary."""
    work = tmp_path / "w"
    shutil.copytree(tiny_run[0] / "render", work / "render")
    (work / "pipeline.json").write_text((tiny_run[0] / "pipeline.json").read_text())
    r = subprocess.run([sys.executable, "-m", "likeness.cli", "retrain", "--config", "tiny", "--work",
                        str(work), "--until", "render", "--set", "estimator_epochs=1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1500:]
    assert json.loads(r.stdout) == {"pack": "default", "config": "tiny", "stopped_after": "render"}


def test_a_stopped_generator_stage_is_resumed_not_recorded_done(tiny_run, tmp_path, monkeypatch):
    """SIGINT/SIGTERM (a session's end, a preempted farm job) stops G_avatar's training with a
    checkpoint; the retrain must not record the stage as done (the next stages would use a half-
    trained twin) but stop, and the same command resumes the stage from that checkpoint."""
    from likeness.training.generators import train_gan
    work = copy_run(tiny_run[0], tmp_path / "w")
    shutil.rmtree(work / "avatar")
    real_train = train_gan.train

    def stopped_after_two_steps(*a, **kw):
        out = real_train(*a, **{**kw, "steps": 2})
        return {**out, "stopped": True}            # what a signal during step 2 returns

    monkeypatch.setattr(train_gan, "train", stopped_after_two_steps)
    with pytest.raises(KeyboardInterrupt):              # the run's own G_real: train_real
        retrain("default", "tiny", str(work), until="avatar", train_real=True, progress=False,
                log=lambda s: None)
    assert record(work, "avatar")["done"] is False
    assert train_gan.read_state(train_gan.find_checkpoint(work / "avatar"))["step"] == 2
    monkeypatch.setattr(train_gan, "train", real_train)
    logs = []
    retrain("default", "tiny", str(work), until="avatar", train_real=True, progress=False,
            log=logs.append)
    assert record(work, "avatar")["done"] is True
    assert any("resumed avatar" in line for line in logs)
    assert train_gan.read_state(train_gan.find_checkpoint(work / "avatar"))["step"] == 30
