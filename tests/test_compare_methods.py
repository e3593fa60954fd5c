"""scripts/compare_methods.py: the method comparison from one `likeness eval` folder (4 validation
photos, the shipped model against a small untrained estimator)."""
import json

import numpy as np
import pytest

from _scripts import load_script

def _script():
    return load_script("compare_methods")


@pytest.fixture(scope="module")
def eval_dir(tiny_default_model, tmp_path_factory):
    from likeness.evaluation.harness import evaluate
    out = tmp_path_factory.mktemp("cmp") / "eval"
    evaluate("val", ["default", f"onnx:{tiny_default_model}=tiny"], str(out), limit=4, threads=1,
             progress=False, log=lambda s: None)
    return out


@pytest.mark.real_faces
def test_tables_recompute_the_eval_and_pair_every_method_with_the_reference(eval_dir, tmp_path):
    cm = _script()
    report = json.loads((eval_dir / "report.json").read_text())
    stems = cm.common_stems(report, ["default", "tiny"])
    assert len(stems) == report["counts"]["detected"] >= 3
    text, numbers = cm.tables(eval_dir, labels={"default": "shipped", "tiny": "untrained"}, draws=200,
                              mask_draws=50)
    assert numbers["reference"] == "default" and numbers["photos"] == stems
    # the yardstick is the eval's own (same photos, labels and readings)
    for name in ("default", "tiny"):
        assert numbers["yardstick"][name]["mean"] == pytest.approx(report["viewer"][name]["mean"])
    assert numbers["yardstick"]["default"]["vs"] is None
    vs = numbers["yardstick"]["tiny"]["vs"]["mean"]
    assert vs["diff"] == pytest.approx(report["viewer"]["tiny"]["mean"] - report["viewer"]["default"]["mean"])
    assert vs["low"] <= vs["diff"] <= vs["high"]
    # the mask measures recomputed from the eval's renders, masks and vectors equal the eval's
    for name in ("default", "tiny"):
        have = {t["name"]: t["value"] for t in report["fidelity"]["methods"][name]["targets"]}
        for key, value in numbers["masks"][name].items():
            if key in have and key != "vs" and "vs_constant" not in key:
                assert value == pytest.approx(have[key], nan_ok=True), key
    assert "vs" in numbers["masks"]["tiny"] and "vs" not in numbers["masks"]["default"]
    assert "| shipped |" in text and "| untrained |" in text and "(reference)" in text
    assert "mean − shipped [95 %]" in text and "ms / photo" in text and "| vs shipped |" in text


@pytest.mark.real_faces
def test_the_sheet_has_one_row_per_photo_and_a_column_per_method(eval_dir, tmp_path):
    from PIL import Image
    cm = _script()
    out = tmp_path / "sheet.png"
    shown = cm.sheet(eval_dir, out, n=2, size=32)
    assert len(shown) == 2
    with Image.open(out) as im:
        a = np.asarray(im)
    assert a.shape == (2 * 34 + 2, 3 * 34 + 2, 3)        # grid: 2 px padding around 32 px tiles
    assert cm.main([str(eval_dir), "--draws", "20", "--mask-draws", "0", "--out", str(tmp_path / "t.md"),
                    "--sheet", str(tmp_path / "s.png"), "--sheet-photos", "3"]) == 0
    assert "columns photo | default | tiny" in (tmp_path / "t.md").read_text()
    with pytest.raises(SystemExit, match="not a method"):
        cm.tables(eval_dir, ref="nobody")


def test_variety_tells_one_avatar_for_everyone_from_avatars_that_follow_the_photo(tmp_path):
    import random
    from likeness.backend.schema import find_pack
    cm = _script()
    pack = find_pack("stylized")
    rng = random.Random(0)
    stems = [f"p{i}" for i in range(6)]
    per_photo = []
    for i, s in enumerate(stems):
        methods = {}
        for name, vec in (("constant", pack.default_vector()), ("varied", pack.sample(rng))):
            path = tmp_path / "vectors" / name / f"{s}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(vec.dumps())
            methods[name] = {"vector": str(path.relative_to(tmp_path))}
        per_photo.append({"stem": s, "methods": methods})
    report = {"pack": {"id": "stylized"}, "per_photo": per_photo}
    var = cm.variety(tmp_path, report, ["constant", "varied"], stems)
    assert var["constant"]["option_sets"] == 1 and var["constant"]["top_hair"] == 1.0
    assert var["constant"]["slider_sd"] == pytest.approx(0.0, abs=1e-12)
    assert var["varied"]["option_sets"] == 6 and var["varied"]["top_hair"] < 1.0
    assert 0.05 < var["varied"]["slider_sd"] < 0.5


def test_shown_counts_what_the_labels_and_each_method_show_skipping_unknown_labels(tmp_path):
    cm = _script()
    (tmp_path / "attributes.csv").write_text(
        "stem,glasses,facial_hair,hair_length,hair_color,skin_tone,bangs,hat,confidence\n"
        "a,eyeglasses,none,long,black,light,no,no,high\n"
        "b,none,beard,short,brown,light,yes,no,low\n"
        "c,none,none,unknown,unknown,light,no,yes,high\n")
    plain = {"glasses": "none", "facial_hair": "none", "hair_length": "short", "hair_color": "brown",
             "bangs": "no", "hat": "no"}
    loud = {"glasses": "any", "facial_hair": "any", "hair_length": "long", "hair_color": "black",
            "bangs": "yes", "hat": "yes"}
    report = {"data": {"root": str(tmp_path)},
              "per_photo": [{"stem": s, "methods": {"plain": {"viewer_reading": plain},
                                                    "loud": {"viewer_reading": loud}}} for s in "abc"]}
    rates = cm.shown(report, ["plain", "loud"], ["a", "b", "c"])
    assert rates["labels"] == {"glasses=any": pytest.approx(1 / 3), "facial_hair=any": pytest.approx(1 / 3),
                               "hat=yes": pytest.approx(1 / 3), "bangs=yes": pytest.approx(1 / 3),
                               "hair_length=long": 0.5, "hair_color=black": 0.5}   # c's unknowns skipped
    assert set(rates["plain"].values()) == {0.0} and set(rates["loud"].values()) == {1.0}
