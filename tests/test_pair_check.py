"""The pair check: the shipped face parser reads realistic faces and contradicted presence labels
are left out of the estimator's loss."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from likeness.backend import fidelity, models, realfaces
from likeness.backend.colour_match import ParserModel
from likeness.backend.errors import UserError
from likeness.backend.schema import find_pack
from likeness.training.estimator.model import symmetric_cross_entropy
from likeness.training.estimator.paired_set import UNKNOWN, PairedSet, write_paired_set
from likeness.training.pairs.pair_check import check_pairs

PARSER = models.SHIPPED / models.PARSER
needs_faces = pytest.mark.skipif(not realfaces.default_root().is_dir(),
                                 reason="the shared real faces are not here")


def test_unknown_labels_are_left_out_of_the_sce():
    torch.manual_seed(0)
    logits = torch.randn(5, 4, requires_grad=True)
    target = torch.tensor([0, UNKNOWN, 3, UNKNOWN, 1])
    known = target != UNKNOWN
    got = symmetric_cross_entropy(logits, target)
    want = symmetric_cross_entropy(logits[known], target[known])
    assert torch.allclose(got, want)
    got.backward()
    assert torch.all(logits.grad[~known] == 0) and torch.any(logits.grad[known] != 0)
    none = symmetric_cross_entropy(logits, torch.full((5,), UNKNOWN))
    assert float(none.detach()) == 0.0 and none.requires_grad


def _write_pairs(folder, images, discrete, groups, pack):
    write_paired_set(folder, pack, images, np.full((len(images), pack.n_continuous), 0.5, np.float32),
                     discrete, groups)


@needs_faces
def test_contradicted_presence_labels_become_unknown(tmp_path):
    """Real validation photos with and without hats and glasses stand in for realistic faces; their
    vectors say the opposite for some. Exactly the labels the parser's reading contradicts (by the
    validation's pixel rule) become UNKNOWN, for the whole group; the rest is untouched."""
    from PIL import Image
    pack = find_pack("default")
    root = realfaces.default_root()
    hats, glasses, plain = [], [], []
    for s in realfaces.stems(root, "val"):
        _, mask = realfaces.load_pair(s, root)
        st = fidelity.mask_stats(mask)
        (hats if st["headwear"] else glasses if st["glasses"] else plain).append(s)
    stems = hats[:6] + glasses[:6] + plain[:6]
    images = np.stack([np.asarray(Image.open(root / "images" / f"{s}.jpg").convert("RGB").resize(
        (128, 128), Image.Resampling.BILINEAR)) for s in stems])
    k_hat = next(k for k, s in enumerate(pack.slots) if s.name == "headwear")
    k_gl = next(k for k, s in enumerate(pack.slots) if s.name == "glasses")
    none_of = lambda k, tag: next(i for i, o in enumerate(pack.slots[k].options) if o.tags.get(tag) == "none")
    some_of = lambda k, tag: next(i for i, o in enumerate(pack.slots[k].options)
                                  if o.tags.get(tag, "none") != "none")
    rng = np.random.default_rng(0)
    says_hat = rng.random(len(stems)) < 0.5
    says_gl = rng.random(len(stems)) < 0.5
    discrete = np.zeros((len(stems), len(pack.slots)), np.int64)
    discrete[:, k_hat] = np.where(says_hat, some_of(k_hat, "headwear"), none_of(k_hat, "headwear"))
    discrete[:, k_gl] = np.where(says_gl, some_of(k_gl, "glasses"), none_of(k_gl, "glasses"))
    # each photo twice, as a group of two (an unaugmented face and its copy)
    images2, discrete2 = np.repeat(images, 2, axis=0), np.repeat(discrete, 2, axis=0)
    groups = np.repeat(np.arange(len(stems)), 2)
    folder = tmp_path / "pairs"
    _write_pairs(folder, images2, discrete2, groups, pack)
    summary = check_pairs(folder, pack, PARSER, batch=5, progress=False, log=lambda s: None)

    parser = ParserModel(PARSER, device="cpu", threads=1)
    parts = parser.run(images)
    sees_hat = (parts == parser.parts.index("hat")).mean((1, 2)) >= fidelity.PRESENCE_THRESHOLDS["headwear"]
    sees_gl = (parts == parser.parts.index("eyeglasses")).mean((1, 2)) >= fidelity.PRESENCE_THRESHOLDS["glasses"]
    assert sees_hat[:6].sum() >= 3 and not sees_hat[12:].any()     # the parser does see real hats
    out = np.load(folder / "discrete.npy")
    want_hat = np.repeat(np.where(sees_hat != says_hat, UNKNOWN, discrete[:, k_hat]), 2)
    want_gl = np.repeat(np.where(sees_gl != says_gl, UNKNOWN, discrete[:, k_gl]), 2)
    assert np.array_equal(out[:, k_hat], want_hat) and np.array_equal(out[:, k_gl], want_gl)
    k_hair = pack.slot_names.index("hair")
    k_bangs = pack.slot_names.index("bangs")
    others = [k for k in range(len(pack.slots)) if k not in (k_hat, k_gl, k_hair, k_bangs)]
    assert np.array_equal(out[:, others], discrete2[:, others])
    assert np.array_equal(np.load(folder / "discrete_vector.npy"), discrete2)
    c = summary["checks"]["headwear"]
    assert c["vector_yes_face_no"] == 2 * int((says_hat & ~sees_hat).sum())
    assert summary["faces_read"] == len(stems)
    assert json.loads((folder / "check.json").read_text())["checks"] == summary["checks"]
    check_pairs(folder, pack, PARSER, progress=False, log=lambda s: None)   # idempotent
    assert np.array_equal(np.load(folder / "discrete.npy"), out)
    data = PairedSet(folder, pack)                                   # UNKNOWN is a valid label
    _, _, disc = data.batch(np.arange(4))
    assert disc.dtype == torch.int64


@needs_faces
def test_contradicted_hair_length_and_fringe_become_unknown(tmp_path):
    """Every vector says long hair and no fringe. Photos whose true masks show very short hair lose
    the hair label, long-haired ones keep it; a clear fringe loses the bangs label, a clear bare
    forehead keeps it. With hair augmentation the verdict holds for the unaugmented face only."""
    from PIL import Image
    pack = find_pack("default")
    root = realfaces.default_root()
    short, long_, fringe, bare = [], [], [], []
    for s in realfaces.stems(root, "val"):
        _, mask = realfaces.load_pair(s, root)
        st = fidelity.mask_stats(mask)
        if st["headwear"] or st["fringe"] is None:
            continue
        if st["hair_fraction"] < 0.06:
            short.append(s)
        elif st["hair_fraction"] > 0.5:
            long_.append(s)
        if st["fringe_fraction"] > 0.9:
            fringe.append(s)
        elif st["fringe_fraction"] < 0.02 and st["hair_fraction"] > 0.2:
            bare.append(s)
    stems = short[:4] + long_[:4] + fringe[:4] + bare[:4]
    assert len(stems) == 16
    images = np.stack([np.asarray(Image.open(root / "images" / f"{s}.jpg").convert("RGB").resize(
        (128, 128), Image.Resampling.BILINEAR)) for s in stems])
    k_hair, k_bangs = pack.slot_names.index("hair"), pack.slot_names.index("bangs")
    long_opt = next(i for i, o in enumerate(pack.slots[k_hair].options)
                    if o.tags.get("hair_length") == "long")
    no_bangs = next(i for i, o in enumerate(pack.slots[k_bangs].options)
                    if o.tags.get("bangs") == "none")
    discrete = np.zeros((len(stems), len(pack.slots)), np.int64)
    discrete[:, k_hair], discrete[:, k_bangs] = long_opt, no_bangs
    folder = tmp_path / "pairs"
    _write_pairs(folder, images, discrete, np.arange(len(stems)), pack)
    summary = check_pairs(folder, pack, PARSER, batch=7, progress=False, log=lambda s: None)
    out = np.load(folder / "discrete.npy")
    hair_ok, bangs_ok = out[:, k_hair] != UNKNOWN, out[:, k_bangs] != UNKNOWN
    assert not hair_ok[:4].any() and hair_ok[4:8].all(), hair_ok
    assert not bangs_ok[8:12].any() and bangs_ok[12:].all(), bangs_ok
    assert summary["checks"]["hair_length"]["vector_longer"] >= 4
    assert summary["checks"]["fringe"]["vector_no_face_yes"] >= 4

    # the same faces as groups of two (face, hair-augmented copy): only the first is judged on hair
    folder2 = tmp_path / "augmented"
    _write_pairs(folder2, np.repeat(images, 2, 0), np.repeat(discrete, 2, 0),
                 np.repeat(np.arange(len(stems)), 2), pack)
    man = json.loads((folder2 / "manifest.json").read_text())
    man["aug_lambdas"] = [["hair", 0.3]]
    (folder2 / "manifest.json").write_text(json.dumps(man))
    check_pairs(folder2, pack, PARSER, progress=False, log=lambda s: None)
    out2 = np.load(folder2 / "discrete.npy")
    assert np.array_equal(out2[0::2, k_hair], out[:, k_hair])
    assert (out2[1::2, k_hair] == long_opt).all() and (out2[1::2, k_bangs] == no_bangs).all()
    # presence only (the previous behaviour) leaves hair and bangs alone
    folder3 = tmp_path / "presence_only"
    _write_pairs(folder3, images, discrete, np.arange(len(stems)), pack)
    check_pairs(folder3, pack, PARSER, progress=False, log=lambda s: None,
                labels=("glasses", "headwear"))
    assert np.array_equal(np.load(folder3 / "discrete.npy")[:, [k_hair, k_bangs]],
                          discrete[:, [k_hair, k_bangs]])


def test_mismatched_pairs_are_refused(tmp_path):
    pack = find_pack("default")
    folder = tmp_path / "pairs"
    _write_pairs(folder, np.zeros((3, 128, 128, 3), np.uint8),
                 np.zeros((3, len(pack.slots) - 1), np.int64), np.arange(3), pack)
    with pytest.raises(UserError, match="do not fit"):
        check_pairs(folder, pack, PARSER, progress=False)
    with pytest.raises(UserError, match="choose from"):
        check_pairs(folder, pack, PARSER, progress=False, labels=("glasses", "beard"))
