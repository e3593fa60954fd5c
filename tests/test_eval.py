"""The evaluation harness (``likeness eval``): metrics on hand-computed cases, end to end on real
validation photos and on rendered avatars with known vectors (real bpy renders, real models), bad
input, and the rating page in a real headless Chromium (click, reload, export CSV, tabulate)."""
import csv
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from likeness.backend.schema import CLASS_IDS, find_pack
from likeness.cli import main
from likeness.evaluation import metrics

PACK = find_pack("default")


def run_cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------------
# Metrics on hand-computed cases
# ------------------------------------------------------------------------------------------------

def test_slot_accuracy_and_l1_by_hand():
    truth = PACK.default_vector()
    pred = PACK.default_vector()
    s0, s1 = PACK.slots[0], PACK.slots[1]
    pred.slots[s0.name] = next(o.id for o in s0.options if o.id != truth.slots[s0.name])
    n = len(PACK.slots)
    assert metrics.slot_matches(pred, truth)[s0.name] is False
    acc = metrics.slot_accuracy([pred, truth], [truth, truth])
    assert acc["n"] == 2 and acc["per_slot"][s0.name] == 0.5 and acc["per_slot"][s1.name] == 1.0
    assert acc["mean"] == pytest.approx((n - 0.5) / n)
    assert metrics.slot_accuracy([], [])["mean"] is None

    # one parameter moved by a quarter of its range, another to the other end: L1 = (0.25 + d) / P
    p0, p1 = PACK.parameters[0], PACK.parameters[1]
    pred = PACK.default_vector()
    pred.params[p0.name] = min(p0.max, truth.params[p0.name] + 0.25 * (p0.max - p0.min))
    pred.params[p1.name] = p1.max
    d0 = abs(p0.normalize(pred.params[p0.name]) - p0.normalize(truth.params[p0.name]))
    d1 = 1.0 - p1.normalize(truth.params[p1.name])
    l1, per = metrics.continuous_l1(pred, truth, per_parameter=True)
    assert l1 == pytest.approx((d0 + d1) / PACK.n_continuous)
    assert per[p0.name] == pytest.approx(d0) and per[p1.name] == pytest.approx(d1)
    assert metrics.continuous_l1(truth, truth) == 0.0


def test_mask_iou_by_hand():
    C = CLASS_IDS
    a = np.zeros((10, 10), np.uint8)
    b = np.zeros((10, 10), np.uint8)
    a[0:4, 0:5] = C["hair"]                       # 20 px
    b[2:6, 0:5] = C["hair"]                       # 20 px, 10 shared: IoU 10 / 30
    a[8, 0:2] = C["l_eye"]                        # eyes: left/right labels are one part
    b[8, 0:2] = C["r_eye"]
    a[9, 9] = C["hat"]                            # hat only in a: IoU 0
    r = metrics.mask_iou(a, b)
    assert r["per_part"]["hair"] == pytest.approx(1 / 3)
    assert r["per_part"]["eyes"] == 1.0 and r["per_part"]["hat"] == 0.0
    assert "background" not in r["per_part"] and "nose" not in r["per_part"]   # absent from both
    assert r["mean"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    by_class = metrics.mask_iou(a, b, parts=False)["per_part"]
    assert by_class["l_eye"] == 0.0 and by_class["r_eye"] == 0.0
    assert metrics.mask_iou(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8))["mean"] is None
    with pytest.raises(ValueError):
        metrics.mask_iou(a, b[:5])


def test_lpips_is_skipped_with_a_reason_or_measures(tmp_path, monkeypatch):
    # Point the backbone at a file that does not exist: never a download, a stated reason instead.
    monkeypatch.setenv("LIKENESS_LPIPS_BACKBONE", str(tmp_path / "missing.pth"))
    fn, note = metrics.make_lpips()
    assert fn is None and note.startswith("LPIPS skipped")


def test_lpips_wrapper_feeds_images_in_minus_one_to_one(monkeypatch):
    """The wrapper's plumbing (uint8 HxWx3 -> [B, 3, H, W] in [-1, 1]) with a stand-in distance,
    since the real backbone weights are not on this machine."""
    pytest.importorskip("torch")
    from likeness.training.common import perceptual
    seen = {}

    def fake(net="alex"):
        def dist(x, y):
            seen["shape"], seen["range"] = tuple(x.shape), (float(x.min()), float(y.max()))
            return (x - y).abs().mean(dim=(1, 2, 3))
        return dist, "LPIPS (stand-in)"
    monkeypatch.setattr(perceptual, "make_lpips", fake)
    fn, note = metrics.make_lpips()
    black, white = np.zeros((8, 6, 3), np.uint8), np.full((8, 6, 3), 255, np.uint8)
    d = fn([black, white], [white, white])
    assert note == "LPIPS (stand-in)" and seen["shape"] == (2, 3, 8, 6) and seen["range"] == (-1.0, 1.0)
    assert d.tolist() == pytest.approx([2.0, 0.0])


# ------------------------------------------------------------------------------------------------
# End to end on real validation photos
# ------------------------------------------------------------------------------------------------

@pytest.mark.real_faces
def test_eval_val_two_methods(tiny_default_model, tmp_path, capsys):
    out = tmp_path / "report"
    code, stdout, err = run_cli(["eval", "--photos", "val", "--limit", "4", "--no-progress",
                                 "--methods", f"default,onnx:{tiny_default_model}=tiny",
                                 "--out", str(out)], capsys)
    assert code == 0, err
    r = json.loads((out / "report.json").read_text())
    assert [m["name"] for m in r["methods"]] == ["default", "tiny"]
    assert r["methods"][1]["path"].endswith("tiny.onnx") and len(r["methods"][1]["sha256"]) == 16
    assert r["data"]["source"] == "val" and r["data"]["photos"] == 4 and r["data"]["available"] == 256
    assert r["counts"]["photos"] == 4 and r["counts"]["detected"] + r["counts"]["failed"] == 4
    assert r["counts"]["detected"] >= 3
    assert "core" in r["hardware"]["machine"] and r["hardware"]["threads"] == 1
    for name in ("default", "tiny"):
        sp = r["speed"][name]
        assert sp["photos"] == r["counts"]["detected"] and sp["images_per_s"] > 1
        assert f"{name}:" in stdout and "images/s" in stdout
    # label-free measures, one implementation with validate: every method scored, with targets
    fid = r["fidelity"]
    assert fid["n_photos"] == r["counts"]["detected"]
    for name in ("default", "tiny"):
        rep = fid["methods"][name]
        assert rep["n"] == r["counts"]["detected"]
        assert rep["colour"]["skin"]["median"] is not None and rep["colour"]["skin"]["constant"]
        assert {t["name"] for t in rep["targets"]} >= {"glasses_balanced_accuracy", "hair_amount_spearman"}
    assert "skipped" in r["truth"]
    # the viewer's yardstick heads the report: each method's avatars read against the viewed labels
    from likeness.backend import viewer
    v = r["viewer"]
    assert set(v) == {"default", "tiny"} and v["default"]["photos"] == r["counts"]["detected"]
    assert set(v["tiny"]["attributes"]) == set(viewer.ATTRIBUTES)
    assert "against_default" in v["tiny"] and "against_default" not in v["default"]
    assert "The viewer's yardstick" in (out / "report.html").read_text()
    for rec in r["per_photo"]:
        for name in ("default", "tiny"):
            m = rec["methods"][name]
            vec = PACK.vector_from_json((out / m["vector"]).read_text())
            assert vec.pack.id == PACK.id
            assert m["viewer_reading"] == {**viewer.read_tags(vec),
                                           **{a: m["viewer_reading"][a] for a in viewer.COLOUR_READING}}
            assert (out / m["render"]).is_file() and m["seconds"] > 0
        assert (out / rec["crop"]).is_file()
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "tiny" in page and "Targets" in page
    assert r["hardware"]["machine"] in page
    assert (out / "rating.html").is_file()


@pytest.mark.real_faces
def test_reuse_reads_back_the_same_methods_vectors_and_timings(tiny_default_model, tmp_path, capsys):
    """--reuse: a method loaded from the same spec and file takes its earlier vectors (shown here by
    one edited by hand) and timings; the others are predicted; renders and measures are made again."""
    first, second = tmp_path / "first", tmp_path / "second"
    spec = f"onnx:{tiny_default_model}=tiny"
    code, _, err = run_cli(["eval", "--photos", "val", "--limit", "2", "--no-progress", "--methods", spec,
                            "--out", str(first)], capsys)
    assert code == 0, err
    r1 = json.loads((first / "report.json").read_text())
    edited = r1["per_photo"][0]["methods"]["tiny"]
    (first / edited["vector"]).write_text(PACK.default_vector().dumps(indent=2))
    code, out, err = run_cli(["eval", "--photos", "val", "--limit", "2", "--no-progress", "--methods",
                              f"default,{spec}", "--out", str(second), "--reuse", str(first)], capsys)
    assert code == 0, err
    r2 = json.loads((second / "report.json").read_text())
    methods = {m["name"]: m for m in r2["methods"]}
    assert methods["tiny"]["vectors_from"] == str(first) and "vectors_from" not in methods["default"]
    for a, b in zip(r1["per_photo"], r2["per_photo"]):
        assert b["methods"]["tiny"]["seconds"] == a["methods"]["tiny"]["seconds"]
        assert (second / b["methods"]["tiny"]["vector"]).read_text() == (first / a["methods"]["tiny"]["vector"]).read_text()
        assert b["methods"]["default"]["seconds"] > 0
    assert (PACK.vector_from_json((second / r2["per_photo"][0]["methods"]["tiny"]["vector"]).read_text())
            == PACK.default_vector())
    # another spec (the same file elsewhere) is predicted again
    other = tmp_path / "other.onnx"
    shutil.copy(tiny_default_model, other)
    code, _, err = run_cli(["eval", "--photos", "val", "--limit", "1", "--no-progress", "--methods",
                            f"onnx:{other}=tiny", "--out", str(tmp_path / "third"), "--reuse", str(first)], capsys)
    r3 = json.loads((tmp_path / "third" / "report.json").read_text())
    assert code == 0 and "vectors_from" not in r3["methods"][0]
    # an eval made with other code or shipped models lends nothing
    r1["code"] = {**r1["code"], "sources": "0" * 16}
    (first / "report.json").write_text(json.dumps(r1))
    code, _, err = run_cli(["eval", "--photos", "val", "--limit", "1", "--no-progress", "--methods", spec,
                            "--out", str(tmp_path / "fifth"), "--reuse", str(first)], capsys)
    r5 = json.loads((tmp_path / "fifth" / "report.json").read_text())
    assert code == 0 and "vectors_from" not in r5["methods"][0]
    code, _, err = run_cli(["eval", "--photos", "val", "--limit", "1", "--no-progress", "--methods", spec,
                            "--out", str(tmp_path / "fourth"), "--reuse", str(tmp_path / "nothing")], capsys)
    assert code == 1 and "no likeness eval report" in err


# ------------------------------------------------------------------------------------------------
# Rendered avatars as photos: the truth is known (MTCNN finds rendered faces)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """3 renders of sampled vectors + a flat grey image (no face), and their true vectors."""
    from PIL import Image
    from likeness.render_engine.validate_job import AvatarRenderer
    root = tmp_path_factory.mktemp("rendered")
    photos, truth = root / "photos", root / "truth" / "vectors"
    photos.mkdir()
    truth.mkdir(parents=True)
    renderer = AvatarRenderer(PACK, 256)
    for i in range(3):
        vec = PACK.sample_seeded(11, i)
        rgb, _ = renderer.render(vec)
        Image.fromarray(rgb).save(photos / f"avatar{i}.png")
        (truth / f"avatar{i}.json").write_text(vec.dumps())
    Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(photos / "grey.png")
    (truth / "grey.json").write_text(PACK.default_vector().dumps())
    return root


@pytest.fixture(scope="module")
def truth_run(rendered, tiny_default_model, tmp_path_factory):
    from likeness.evaluation.harness import evaluate
    out = tmp_path_factory.mktemp("truth-run")
    report = evaluate(str(rendered / "photos"), ["default", f"onnx:{tiny_default_model}=tiny"], str(out),
                      truth=str(rendered / "truth"), progress=False, log=lambda *a, **k: None)
    return out, report


def test_eval_with_truth_and_a_failed_photo(truth_run):
    out, r = truth_run
    assert r["counts"] == {"photos": 4, "detected": 3, "failed": 1, "method_failures": 0}
    assert r["failures"][0]["stem"] == "grey" and "no face" in r["failures"][0]["error"]
    t = r["truth"]
    assert t["lpips"]["status"] in ("skipped", "measured") and t["lpips"]["note"]
    for name in ("default", "tiny", "constant"):
        m = t["methods"].get(name) or t["constant"]
        assert m["n"] == 3
        assert 0 <= m["slot_accuracy"]["mean"] <= 1 and set(m["slot_accuracy"]["per_slot"]) == set(PACK.slot_names)
        assert 0 <= m["l1"]["mean"] <= 1 and 0 <= m["mask_iou"]["mean"] <= 1
        assert set(m["l1"]["per_parameter"]) == set(PACK.param_names)
    assert "parsing masks" in r["fidelity"]["skipped"]             # plain photos: stated, not faked
    for s in ("avatar0", "avatar1", "avatar2"):
        assert (out / "renders" / "truth" / f"{s}.png").is_file()
    page = (out / "report.html").read_text()
    assert "grey" in page and "no face" in page and "Accuracy per slot" in page
    assert "LPIPS" in page


def test_truth_equal_to_a_methods_own_prediction(rendered, truth_run, tiny_default_model, tmp_path):
    """Truth = the default model's own predictions: it must score perfectly, the other not."""
    from likeness.evaluation.harness import evaluate
    first, _ = truth_run
    r = evaluate(str(rendered / "photos"), ["default", f"onnx:{tiny_default_model}=tiny"], str(tmp_path),
                 truth=str(first / "vectors" / "default"), progress=False, log=lambda *a, **k: None)
    t = r["truth"]
    assert t["photos_without_truth"] == ["grey"]
    d, tiny = t["methods"]["default"], t["methods"]["tiny"]
    assert d["slot_accuracy"]["mean"] == 1.0 and d["l1"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert d["mask_iou"]["mean"] == pytest.approx(1.0)
    assert tiny["slot_accuracy"]["mean"] < 1.0 and tiny["l1"]["mean"] > 0


class _Flaky:
    """A torch-style method stand-in: the default avatar, except that it fails on one photo."""

    def __init__(self, name):
        self.name = name

    def predict(self, aligned):
        assert aligned.shape == (256, 256, 3) and aligned.dtype == np.uint8
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 3:          # warm-up + first photo succeed, the second photo fails
            raise RuntimeError("diverged")
        return PACK.default_vector()


def _flaky_loader(path, pack, name):
    return _Flaky(name)


def _untrained_parser(folder: Path) -> Path:
    """A face parser checkpoint in the training stage's format (untrained: the plumbing is tested)."""
    import torch
    from safetensors.torch import save_file
    from likeness.training.readout.face_parser import FaceParser
    from likeness.training.generators.gan_configs import get_config
    cfg = get_config("tiny")
    torch.manual_seed(0)
    folder.mkdir(parents=True)
    save_file(FaceParser(cfg.parser_channels).state_dict(), str(folder / "parser.safetensors"))
    torch.save({"config": json.dumps(cfg.to_dict())}, folder / "state.pt")
    return folder


def test_parts_to_classes_splits_pairs_at_the_face_centre():
    from likeness.evaluation.harness import parts_to_classes
    from likeness.training.common.parts import PART_IDS as P
    parts = np.zeros((4, 8), np.uint8)
    parts[1:3, 2:6] = P["face"]
    parts[1, 2] = parts[1, 5] = P["eyes"]
    parts[3, 3] = P["mouth"]
    c = parts_to_classes(parts)
    assert c[1, 2] == CLASS_IDS["l_eye"] and c[1, 5] == CLASS_IDS["r_eye"]
    assert c[2, 3] == CLASS_IDS["skin"] and c[3, 3] == CLASS_IDS["u_lip"] and c[0, 0] == 0


def test_any_method_object_a_failing_method_and_a_face_parser(rendered, tmp_path, monkeypatch):
    """A lazily loaded (torch-kind) method that fails on one photo is listed, the others go on;
    photos without masks get the label-free measures through a face parser checkpoint."""
    from likeness.evaluation import methods
    from likeness.evaluation.harness import evaluate
    monkeypatch.setitem(methods.TORCH_LOADERS, "f2p", "test_eval:_flaky_loader")
    parser = _untrained_parser(tmp_path / "parser")
    r = evaluate(str(rendered / "photos"), ["default", f"f2p:{tmp_path}=flaky"], str(tmp_path / "out"),
                 parser=str(parser), progress=False, log=lambda *a, **k: None)
    assert r["counts"]["detected"] == 3 and r["counts"]["method_failures"] == 1
    mf = r["method_failures"][0]
    assert mf["method"] == "flaky" and mf["stem"] == "avatar1" and "diverged" in mf["error"]
    assert r["speed"]["flaky"]["photos"] == 2 and r["speed"]["default"]["photos"] == 3
    assert "flaky" not in next(p for p in r["per_photo"] if p["stem"] == "avatar1")["methods"]
    assert r["methods"][1]["kind"] == "f2p"
    fid = r["fidelity"]
    assert fid["photos_measured_by"].startswith("face parser") and fid["n_photos"] == 3
    assert fid["methods"]["default"]["n"] == 3 and fid["methods"]["flaky"]["n"] == 2
    assert all(p["photo_measures"] == "face parser" for p in r["per_photo"])
    page = (tmp_path / "out" / "report.html").read_text()
    assert "diverged" in page and "face parser" in page


# ------------------------------------------------------------------------------------------------
# Bad input: one clear line, nothing lost
# ------------------------------------------------------------------------------------------------

@pytest.mark.real_faces
def test_an_estimator_alone_is_decoded_without_the_photo_readings():
    """``default@alone`` / ``onnx:PATH@alone``: the estimator's own options, sliders and colours
    (the paper's setting), exactly what a Predictor with every reading from the model gives, while
    ``default`` is decoded as ``likeness create`` decodes it."""
    from likeness.backend import models, realfaces
    from likeness.backend.predict import Predictor
    from likeness.backend.errors import UserError
    from likeness.evaluation.methods import load_method, parse_spec
    assert parse_spec("default@alone") == ("default", "@alone", "default-alone")
    assert parse_spec("onnx:x/y.onnx@alone=paper")[2] == "paper"
    with pytest.raises(UserError, match="applies to default and onnx"):
        parse_spec("f2p:somewhere@alone")
    path = realfaces.default_root() / "images" / f"{realfaces.stems(None, 'val')[0]}.jpg"
    alone = Predictor(PACK, models.find_model(PACK), device="cpu", threads=1, colours="model",
                      shape="model", attributes="model")
    prep = alone.prepare(str(path))
    aligned = prep.colour_crop if prep.colour_crop is not None else prep.crop
    methods = {s: load_method(s, PACK, threads=1)
               for s in ("default", "default@alone", f"onnx:{models.find_model(PACK)}@alone")}
    assert methods["default"].predictor.reader is not None
    assert methods["default@alone"].predictor.reader is None
    got = {s: m.predict(aligned) for s, m in methods.items()}
    want = alone.predict(str(path)).vector
    for s in ("default@alone", f"onnx:{models.find_model(PACK)}@alone"):
        assert got[s].slots == want.slots, s
        assert all(abs(got[s].params[k] - want.params[k]) < 0.02 for k in want.params)
    assert got["default"].dumps() != got["default@alone"].dumps()


def test_bad_input_is_one_clear_line(rendered, tmp_path, capsys):
    keep = tmp_path / "existing"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    empty = tmp_path / "empty"
    empty.mkdir()
    wrong = tmp_path / "wrong" / "vectors"
    wrong.mkdir(parents=True)
    (wrong / "avatar0.json").write_text(json.dumps({"pack": "other", "params": {}, "slots": {}}))
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "someone.json").write_text(PACK.default_vector().dumps())
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    photos = str(rendered / "photos")
    cases = [
        (["--photos", str(tmp_path / "nope"), "--methods", "default"], "no such folder"),
        (["--photos", str(empty), "--methods", "default"], "no images"),
        (["--photos", photos, "--methods", "default,foo:bar"], "unknown method 'foo:bar'"),
        (["--photos", photos, "--methods", "onnx:/no/such.onnx"], "no model file"),
        (["--photos", photos, "--methods", "default,default"], "share the name"),
        (["--photos", photos, "--methods", "default", "--truth", str(wrong.parent)], "does not match pack"),
        (["--photos", photos, "--methods", "default", "--truth", str(unrelated)], "no vector matches"),
        (["--photos", photos, "--methods", "default", "--limit", "0"], "--limit"),
    ]
    for args, expected in cases:
        code, _, err = run_cli(["eval", *args, "--out", str(keep)], capsys)
        lines = [l for l in err.splitlines() if l.startswith("likeness eval")]
        assert code == 1 and len(lines) == 1 and expected in lines[0], (args, err)
    code, _, err = run_cli(["eval", "--photos", photos, "--methods", "default",
                            "--out", str(blocker / "sub")], capsys)
    assert code == 1 and "cannot write there" in err
    assert (keep / "notes.txt").read_text() == "mine" and sorted(p.name for p in keep.iterdir()) == ["notes.txt"]
    code, _, err = run_cli(["eval", "--photos", photos], capsys)
    assert code == 1 and "--methods" in err


# ------------------------------------------------------------------------------------------------
# Tabulating ratings (Table 2)
# ------------------------------------------------------------------------------------------------

def _write_csv(path, rows):
    from likeness.evaluation.rating import CSV_COLUMNS
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        w.writerows(rows)


def test_share_intervals_resample_photos_and_raters_by_hand():
    from likeness.evaluation.rating import tabulate
    def rows(votes):                      # votes[rater][photo] -> the chosen method
        return [{"study": "s", "rater": f"r{i}", "photo": f"p{j}", "choice": c, "order": "a;b",
                 "time": "t"} for i, vs in enumerate(votes) for j, c in enumerate(vs)]
    # every rater picks a on the first 6 photos and b on the last 4: the photos decide, so the
    # interval comes from resampling photos, and it is wide for 10 photos however many raters
    t = tabulate(rows([["a"] * 6 + ["b"] * 4] * 20), draws=2000, seed=1)
    a = next(m for m in t["methods"] if m["method"] == "a")
    assert a["share"] == 0.6 and a["share_95"][0] < 0.35 and a["share_95"][1] > 0.85
    # the same 200 votes, but each rater has a constant taste and photos do not matter
    t2 = tabulate(rows([["a"] * 10] * 12 + [["b"] * 10] * 8), draws=2000, seed=1)
    a2 = next(m for m in t2["methods"] if m["method"] == "a")
    assert a2["share"] == 0.6 and a2["share_95"][0] < 0.45 and a2["share_95"][1] > 0.75
    # votes independent of rater and photo: narrower than either
    rng = np.random.default_rng(0)
    t3 = tabulate(rows(rng.choice(["a", "b"], p=[0.6, 0.4], size=(20, 10)).tolist()), draws=2000, seed=1)
    a3 = next(m for m in t3["methods"] if m["method"] == "a")
    width = lambda m: m["share_95"][1] - m["share_95"][0]
    assert width(a3) < min(width(a), width(a2)) and a3["share_95"][0] <= a3["share"] <= a3["share_95"][1]
    assert tabulate(rows([["a"] * 6 + ["b"] * 4] * 20), draws=2000, seed=1) == t     # seeded


def test_tabulate_counts_votes(tmp_path, capsys):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    _write_csv(a, [["s1", "ann", "p1", "swift", 0, "swift;f2p", "2026-01-01T10:00:00Z"],
                   ["s1", "ann", "p2", "f2p", 1, "swift;f2p", "2026-01-01T10:01:00Z"]])
    # bob, plus ann again with a later change of mind on p2 (counted once, the later vote)
    _write_csv(b, [["s1", "bob", "p1", "swift", 1, "f2p;swift", "2026-01-02T10:00:00Z"],
                   ["s1", "ann", "p2", "swift", 0, "swift;f2p", "2026-01-03T10:00:00Z"]])
    code, out, _ = run_cli(["eval", "tabulate", str(a), str(b), "--json"], capsys)
    t = json.loads(out)
    assert code == 0 and t["votes"] == 3 and t["raters"] == 2 and t["photos"] == 2
    assert t["methods"] == [{"method": "swift", "votes": 3, "share": 1.0, "share_95": [1.0, 1.0]},
                            {"method": "f2p", "votes": 0, "share": 0.0, "share_95": [0.0, 0.0]}]
    code, out, _ = run_cli(["eval", "tabulate", str(a)], capsys)
    assert "| swift | 1 | 50.0 % | 0.0–100.0 % |" in out and "| f2p | 1 | 50.0 % |" in out
    c = tmp_path / "c.csv"
    _write_csv(c, [["s2", "cy", "p1", "swift", 0, "swift;f2p", "2026-01-01T10:00:00Z"]])
    code, _, err = run_cli(["eval", "tabulate", str(a), str(c)], capsys)
    assert code == 1 and "different rating pages" in err
    (tmp_path / "bad.csv").write_text("x,y\n1,2\n")
    code, _, err = run_cli(["eval", "tabulate", str(tmp_path / "bad.csv")], capsys)
    assert code == 1 and "not a rating export" in err


# ------------------------------------------------------------------------------------------------
# The rating page in a real headless Chromium
# ------------------------------------------------------------------------------------------------

def _chromium() -> tuple[str, str] | str:
    """(chromium, chromedriver) paths, installing Debian's packages as root in CI; else a reason."""
    def found():
        c = shutil.which("chromium") or shutil.which("chromium-browser")
        d = shutil.which("chromedriver")
        return (c, d) if c and d else None
    if not found() and os.geteuid() == 0 and os.environ.get("CI"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env)
        r = subprocess.run(["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"],
                           capture_output=True, text=True, env=env)
        if r.returncode != 0:
            return f"could not install chromium: {r.stderr.strip()[-300:]}"
    return found() or "chromium and chromedriver not installed (apt-get install chromium chromium-driver; CI does)"


def test_rating_page_in_headless_chromium(truth_run, tmp_path, capsys):
    paths = _chromium()
    if isinstance(paths, str):
        pytest.skip(paths)
    if os.environ.get("CI"):
        from selenium import webdriver      # CI installs the test extra: a missing one must fail
    else:
        webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (test extra) not installed")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    out, report = truth_run
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts = webdriver.ChromeOptions()
    opts.binary_location = paths[0]
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(a)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(executable_path=paths[1]), options=opts)
    try:
        driver.get((out / "rating.html").as_uri())
        cards = driver.find_elements(By.CSS_SELECTOR, ".card")
        assert len(cards) == report["counts"]["detected"] == 3
        names = {m["name"] for m in report["methods"]}
        picked = {}
        for card, k in zip(cards[:2], (1, 0)):
            buttons = card.find_elements(By.CSS_SELECTOR, "button.avatar")
            assert {b.get_attribute("data-method") for b in buttons} == names
            buttons[k].click()
            picked[card.get_attribute("data-photo")] = buttons[k].get_attribute("data-method")
        assert "2 of 3" in driver.find_element(By.ID, "progress").text
        driver.refresh()                                   # votes survive in localStorage
        # the page restores them once loaded (slow on a loaded machine: CI once took over 10 s)
        deadline, chosen = time.time() + 60, []
        while time.time() < deadline and len(chosen) < 2:
            time.sleep(0.1)
            chosen = driver.find_elements(By.CSS_SELECTOR, "button.avatar.chosen")
        assert {c.get_attribute("data-method") for c in chosen} <= names and len(chosen) == 2
        rater = driver.find_element(By.ID, "rater")
        rater.clear()
        rater.send_keys("tester\n")
        driver.find_element(By.ID, "export").click()
        deadline = time.time() + 15
        files, sizes = [], None
        while time.time() < deadline:      # done = a non-empty CSV whose size held for one poll
            files = [p for p in downloads.glob("*.csv")]
            try:
                now = [p.stat().st_size for p in files]
            except FileNotFoundError:      # Chromium renames its partial file as it finishes
                now = None
            if files and now and min(now) > 0 and now == sizes and not list(downloads.glob("*.crdownload")):
                break
            sizes = now
            time.sleep(0.2)
        assert files, "no CSV was downloaded"
    finally:
        driver.quit()
    with open(files[0], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and files[0].name.endswith("-tester.csv")
    assert {r["photo"]: r["choice"] for r in rows} == picked
    assert all(r["rater"] == "tester" and set(r["order"].split(";")) == names for r in rows)
    code, out_text, _ = run_cli(["eval", "tabulate", str(files[0]), "--json"], capsys)
    t = json.loads(out_text)
    assert code == 0 and t["votes"] == 2 and t["raters"] == 1
    assert {m["method"] for m in t["methods"]} == names and sum(m["votes"] for m in t["methods"]) == 2
