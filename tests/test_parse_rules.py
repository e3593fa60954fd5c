"""The parse rules that switch on hats and fringes where no attribute reader is installed: their
thresholds chosen on TRAIN photos only, stored beside the parser, read by the real Predictor."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from likeness.backend import colour_match as cm
from likeness.backend import fidelity, models, realfaces
from likeness.backend.errors import UserError
from likeness.backend.predict import Predictor
from likeness.backend.schema import find_pack
from likeness.training.readout import parse_rules as PR

SHIPPED_PARSER = models.SHIPPED / "parser" / "parser.onnx"
FOLD_PARSERS = [models.SHIPPED / "attributes" / f"parser_fold_{k}.onnx" for k in range(3)]
ESTIMATOR = models.SHIPPED / "stylized" / models.FILENAME
needs_faces = pytest.mark.skipif(not (realfaces.default_root() / "images").is_dir(),
                                 reason="the shared real faces are not here")


def test_threshold_choice_by_hand():
    values = [0.0, 0.01, 0.02, 0.30, 0.40, None, 0.05]
    truth = ["no", "no", "yes", "yes", "yes", "yes", None]       # None value / label: skipped
    r = PR.choose_threshold(values, truth, np.array([0.005, 0.015, 0.025, 0.5]))
    assert r["threshold"] == 0.015 and r["balanced_accuracy"] == 1.0 and r["n"] == 5
    assert r["positives"] == 3
    # equal scores: the middle of the best run
    r = PR.choose_threshold([0.0, 1.0], ["no", "yes"], np.array([0.1, 0.2, 0.3, 0.4, 0.5]))
    assert r["threshold"] == 0.3


def test_rules_files_beside_a_parser_are_read_and_malformed_ones_refused(tmp_path):
    parser = tmp_path / "p.onnx"
    assert cm.load_parse_rules(parser) == {}                     # none: the mask rules
    rules = tmp_path / "p.rules.json"
    rules.write_text(json.dumps({"kind": cm.PARSE_RULES_KIND, "thresholds": {"bangs": 0.2}}))
    assert cm.load_parse_rules(parser) == {"bangs": 0.2}
    for bad in ({"kind": "other", "thresholds": {}}, {"kind": cm.PARSE_RULES_KIND},
                {"kind": cm.PARSE_RULES_KIND, "thresholds": {"glasses": 0.1}},
                {"kind": cm.PARSE_RULES_KIND, "thresholds": {"bangs": 1.5}}):
        rules.write_text(json.dumps(bad))
        with pytest.raises(UserError, match="parse rules"):
            cm.load_parse_rules(parser)
    rules.write_text("{not json")
    with pytest.raises(UserError, match="malformed parse rules"):
        cm.load_parse_rules(parser)


def test_the_shipped_parser_carries_rules_chosen_on_train():
    data = json.loads(SHIPPED_PARSER.with_suffix(".rules.json").read_text())
    assert data["chosen_on"]["photos"] == "TRAIN"
    assert data["chosen_on"]["parsers"] == [p.name for p in FOLD_PARSERS]
    rules = cm.ParserModel(SHIPPED_PARSER, "cpu", 1).rules
    assert rules == data["thresholds"] and set(rules) == {"headwear", "bangs"}


@needs_faces
def test_a_fit_reads_only_train_photos_each_with_the_parser_that_never_saw_it(tmp_path):
    train = set(realfaces.stems(None, "train"))
    out = tmp_path / "parser.rules.json"
    data = PR.fit(FOLD_PARSERS, out, limit=6, log=lambda *a: None)
    report = data["chosen_on"]["report"]
    assert report["headwear"]["n"] == 18 and set(data["thresholds"]) == {"headwear", "bangs"}
    assert json.loads(out.read_text()) == data
    for path in FOLD_PARSERS:
        parser = cm.ParserModel(path, "cpu", 1)
        held = PR.held_out_stems(parser)
        assert set(held) <= train and not any(realfaces.is_validation(s) for s in held)
    # the three parsers' held-out photos partition TRAIN
    helds = [set(PR.held_out_stems(cm.ParserModel(p, "cpu", 1))) for p in FOLD_PARSERS]
    assert set().union(*helds) == train and sum(map(len, helds)) == len(train)
    with pytest.raises(UserError, match="not a cross-fitted parser"):
        PR.fit([SHIPPED_PARSER], None, limit=1)


@needs_faces
def test_the_predictor_switches_a_fringe_on_by_its_parsers_rule(tmp_path):
    """A TRAIN mask as parser parts with a thin fringe (hair on part of the forehead band): the mask
    rule (0.35) leaves it off; the same parser with a lower threshold beside it switches it on."""
    from likeness.training.common.parts import labels_to_parts
    pack = find_pack("default")
    root = realfaces.default_root()
    stem = next(s for s in realfaces.stems(root, "train")
                if (fidelity.mask_stats(realfaces.load_pair(s, root)[1])["fringe_fraction"] or 0) > 0.6)
    parse = labels_to_parts(realfaces.load_pair(stem, root)[1]).astype(np.uint8)
    copy = tmp_path / "parser.onnx"
    shutil.copy(SHIPPED_PARSER, copy)
    parts = cm.ParserModel(copy, "cpu", 1).parts
    band = fidelity.fringe_band(cm.parts_to_classes(parse, parts))
    ys, xs = np.nonzero(band & (parse == parts.index("hair")))
    thin = parse.copy()
    keep = xs < np.percentile(xs, 20)                           # a fifth of the band stays hair
    thin[ys[~keep], xs[~keep]] = parts.index("face")
    frac = cm.parse_fractions(thin, parts)["bangs"]
    assert 0.05 < frac < 0.35

    def bangs_source(threshold):
        (tmp_path / "parser.rules.json").write_text(json.dumps(
            {"kind": cm.PARSE_RULES_KIND, "thresholds": {"bangs": threshold}}))
        pred = Predictor(pack, ESTIMATOR, device="cpu", threads=1, colours="photo",
                         attributes="model", parser=copy)
        k = next(i for i, s in enumerate(pack.slots) if s.name == "bangs")
        opts = pack.slots[k].options
        none = [i for i, o in enumerate(opts) if o.tags.get("bangs") == "none"]
        probs = [np.full(len(s.options), 1 / len(s.options)) for s in pack.slots]
        p = np.full(len(opts), 0.05)
        p[none[0]] = 0.8
        probs[k] = p / p.sum()
        choice = [int(np.argmax(q)) for q in probs]
        return pred._photo_presence(choice, probs, thin)["bangs"]

    assert bangs_source(0.35) == "model"
    assert bangs_source(frac / 2) == "photo"
