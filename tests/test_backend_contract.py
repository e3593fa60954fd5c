"""The model contract end to end: a tiny torch estimator exported by training/estimator/export.py, loaded by
backend/contract.py, run on real photos by backend/predict.py; and every refusal."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from likeness.backend import contract, realfaces  # noqa: E402
from likeness.backend.errors import UserError  # noqa: E402
from likeness.backend.predict import Failure, Prediction, Predictor  # noqa: E402
from likeness.backend.schema import load_pack  # noqa: E402
from likeness.training.estimator.export import ExportError, export_estimator  # noqa: E402

SIZE = 64
MEAN = (0.5, 0.45, 0.4)
STD = (0.25, 0.25, 0.3)

PACK_TOML = """
[pack]
id = "{id}"
name = "Test pack"
builder = "none"

[[parameters]]
name = "jaw_width"
min = -1.0
max = 1.0

[[parameters]]
name = "eye_size"
min = 0.0
max = 2.0

[[parameters]]
name = "skin_tone"
min = 0.0
max = 1.0

[[slots]]
name = "hair"
options = [{{ id = "short", label = "Short hair" }}, {{ id = "long", label = "Long hair" }}, {{ id = "bald", label = "Bald" }}{extra}]

[[slots]]
name = "glasses"
options = [{{ id = "none", label = "No glasses" }}, {{ id = "round", label = "Round glasses" }}]
"""


def _pack(folder, pack_id="tiny", extra=""):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pack.toml").write_text(PACK_TOML.format(id=pack_id, extra=extra))
    return load_pack(folder)


class TinyEstimator(torch.nn.Module):
    """Follows the export interface: (sigmoid continuous, [logits per slot])."""

    def __init__(self, n_continuous, slot_sizes):
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.cont = torch.nn.Linear(16, n_continuous)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(16, k) for k in slot_sizes)

    def forward(self, x):
        f = self.features(x)
        return torch.sigmoid(self.cont(f)), [h(f) for h in self.heads]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    pack = _pack(root / "tiny")
    model = TinyEstimator(pack.n_continuous, pack.slot_sizes)
    path = export_estimator(model, pack, root / "tiny.onnx", SIZE, MEAN, STD,
                            report={"note": "test model", "val_accuracy": {"hair": 0.5}})
    return root, pack, model, path


def test_export_writes_the_contract(setup):
    root, pack, model, path = setup
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["likeness.pack"] == "tiny"
    assert meta["likeness.schema"] == pack.schema_hash
    assert int(meta["likeness.input_size"]) == SIZE
    assert json.loads(meta["likeness.mean"]) == list(MEAN)
    layout = json.loads(meta["likeness.layout"])
    assert [b["output"] for b in layout] == ["continuous", "logits_hair", "logits_glasses"]
    assert [b["size"] for b in layout] == [3, 3, 2]
    assert [o.name for o in proto.graph.output] == ["continuous", "logits_hair", "logits_glasses"]
    info = contract.read_info(path)
    assert info.report["note"] == "test model" and info.format_version == contract.FORMAT_VERSION


def test_run_matches_torch_with_preprocessing(setup):
    root, pack, model, path = setup
    est = contract.load_model(path, pack, device="cpu")
    assert est.device == "cpu" and est.input_size == SIZE
    batch = np.random.default_rng(3).integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
    cont, probs = est.run(batch)
    assert cont.shape == (5, 3) and [p.shape for p in probs] == [(5, 3), (5, 2)]
    assert cont.min() >= 0 and cont.max() <= 1
    for p in probs:
        np.testing.assert_allclose(p.sum(axis=1), 1, atol=1e-5)
    x = (batch.astype(np.float32) / 255 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    with torch.no_grad():
        ref_cont, ref_logits = model.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_allclose(cont, ref_cont.numpy(), atol=1e-4)
    for p, lg in zip(probs, ref_logits):
        np.testing.assert_allclose(p, torch.softmax(lg, dim=1).numpy(), atol=1e-4)
    # other crop sizes are resized; batches larger than max_batch are chunked
    est.max_batch = 2
    c2, _ = est.run(batch)
    np.testing.assert_allclose(c2, cont, atol=1e-5)
    c3, p3 = est.run(np.zeros((1, 100, 100, 3), np.uint8))
    assert c3.shape == (1, 3) and p3[0].shape == (1, 3)


@pytest.mark.skipif(not (realfaces.default_root() / "images").is_dir(),
                    reason="shared CelebAMask-HQ data not found")
def test_predict_end_to_end_on_real_photos(setup, tmp_path):
    root, pack, model, path = setup
    pred = Predictor(pack, path, device="cpu")
    stems = realfaces.stems(split="val")[:2]
    photo = realfaces.default_root() / "images" / f"{stems[0]}.jpg"
    r = pred.predict(photo)
    assert isinstance(r, Prediction)
    assert r.source == str(photo)
    assert pack.vector_from_json(r.vector.to_json()) == r.vector          # a valid vector of the pack
    for slot in pack.slots:
        alts = r.alternatives[slot.name]
        assert len(alts) == min(3, len(slot.options))
        assert alts[0].option == r.vector.slots[slot.name]
        assert [a.probability for a in alts] == sorted((a.probability for a in alts), reverse=True)
        assert alts[0].label == slot.option(alts[0].option).label
        assert abs(sum(r.probabilities[slot.name].values()) - 1) < 1e-4
    assert r.crop.shape == (SIZE, SIZE, 3) and r.n_faces == 1 and r.warnings == []
    assert set(r.timings) == {"load", "detect", "align", "estimator", "total"}
    assert r.timings["total"] >= r.timings["detect"] > 0
    # the estimator's numbers are those of running the model on the crop
    cont, probs = pred.model.run(r.crop[None])
    np.testing.assert_allclose(r.continuous, cont[0], atol=1e-6)
    js = r.to_json()
    assert js["vector"]["pack"] == "tiny" and set(js["slots"]) == {"hair", "glasses"}
    json.dumps(js)

    # predict_many: a folder with two photos (read in place via symlinks) and a broken file
    folder = tmp_path / "photos"
    folder.mkdir()
    for s in stems:
        (folder / f"{s}.jpg").symlink_to(realfaces.default_root() / "images" / f"{s}.jpg")
    (folder / "zz_broken.jpg").write_bytes(b"not a jpeg")
    blank = tmp_path / "blank.png"
    Image.new("RGB", (300, 300), (200, 200, 200)).save(blank)
    results = pred.predict_many([folder, blank], batch_size=2)
    assert [type(x) for x in results] == [Prediction, Prediction, Failure, Failure]
    assert "zz_broken.jpg" in results[2].error
    assert results[3].error.startswith("no face found in") and "blank.png" in results[3].error
    np.testing.assert_allclose(results[0].continuous, r.continuous, atol=1e-5)
    with pytest.raises(UserError, match="no face found"):
        pred.predict_many([blank], on_error="raise")


def test_predict_astronaut_bytes_and_array(setup):
    skimage_data = pytest.importorskip("skimage.data")
    root, pack, model, path = setup
    pred = Predictor(pack, path, device="cpu")
    rgb = skimage_data.astronaut()
    import io
    b = io.BytesIO()
    Image.fromarray(rgb).save(b, "PNG")
    r1 = pred.predict(b.getvalue(), name="astronaut.png")
    r2 = pred.predict(rgb)
    assert r1.source == "astronaut.png"
    np.testing.assert_allclose(r1.continuous, r2.continuous, atol=1e-6)
    with pytest.raises(UserError, match="no face found in blank"):
        pred.predict(np.full((200, 200, 3), 128, np.uint8), name="blank")


def test_a_photo_and_its_mirror_image_get_the_same_options(setup):
    """The options' probabilities are the mean over the crop and its mirror image (one face seen
    from its other side); the sliders stay the crop's own."""
    skimage_data = pytest.importorskip("skimage.data")
    root, pack, model, path = setup
    pred = Predictor(pack, path, device="cpu")
    crop = pred.prepare(skimage_data.astronaut()).crop
    cont, probs = pred.run_estimator(crop[None])
    _, mirrored = pred.run_estimator(crop[None, :, ::-1])
    raw_cont, raw = pred.model.run(crop[None])
    for p, q in zip(probs, mirrored):
        np.testing.assert_allclose(p, q, atol=1e-6)
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(cont, raw_cont, atol=1e-6)
    assert max(float(np.abs(p - r).max()) for p, r in zip(probs, raw)) > 1e-4   # the model alone differs


def test_small_and_several_faces(setup):
    skimage_data = pytest.importorskip("skimage.data")
    root, pack, model, path = setup
    pred = Predictor(pack, path, device="cpu")
    rgb = skimage_data.astronaut()
    # two astronauts side by side: the larger one is used, with a warning
    small = np.asarray(Image.fromarray(rgb).resize((384, 384)))
    canvas = np.full((512, 900, 3), 128, np.uint8)
    canvas[:, :512] = rgb
    canvas[64:448, 512:896] = small
    r = pred.predict(canvas, name="two")
    assert r.n_faces == 2 and any("2 faces found" in w for w in r.warnings)
    assert r.face.landmarks[:, 0].max() < 512
    # a small face: warning under 40 px between the eyes, error under 16 px
    tiny = np.asarray(Image.fromarray(rgb).resize((300, 300)))
    r = pred.predict(tiny, name="tiny")
    assert any("small" in w for w in r.warnings)
    with pytest.raises(UserError, match="too small"):
        pred.predict(np.asarray(Image.fromarray(rgb).resize((150, 150))), name="mini")


def test_refuses_other_pack_and_stale_schema(setup, tmp_path):
    root, pack, model, path = setup
    other = _pack(tmp_path / "other", pack_id="other")
    with pytest.raises(UserError, match="for pack 'tiny', not for pack 'other'"):
        contract.load_model(path, other)
    stale = _pack(tmp_path / "tiny2", extra=', { id = "mohawk", label = "Mohawk" }')
    assert stale.id == pack.id and stale.schema_hash != pack.schema_hash
    with pytest.raises(UserError, match="stale"):
        contract.load_model(path, stale)
    with pytest.raises(UserError, match="stale"):
        Predictor(stale, path)


def test_refuses_missing_and_non_onnx_files(setup, tmp_path):
    root, pack, model, path = setup
    with pytest.raises(UserError, match="model file not found"):
        contract.load_model(tmp_path / "nope.onnx", pack)
    junk = tmp_path / "junk.onnx"
    junk.write_text("this is not a model\n")
    with pytest.raises(UserError, match=r"junk\.onnx: not a valid ONNX model"):
        contract.load_model(junk, pack)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        contract.load_model(empty, pack)
    # a valid ONNX file without our metadata
    plain = tmp_path / "plain.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, 3, SIZE, SIZE),), str(plain), dynamo=False,
                          input_names=["input"])
    with pytest.raises(UserError, match="not a Likeness estimator"):
        contract.load_model(plain, pack)
    # metadata claims a newer format
    proto = onnx.load(str(path))
    for p in proto.metadata_props:
        if p.key == contract.KEY_FORMAT:
            p.value = "99"
    newer = tmp_path / "newer.onnx"
    onnx.save(proto, str(newer))
    with pytest.raises(UserError, match="newer"):
        contract.load_model(newer, pack)
    with pytest.raises(UserError, match="unknown device"):
        contract.load_model(path, pack, device="tpu")


def test_cuda_request_without_cuda(setup):
    import onnxruntime as ort
    root, pack, model, path = setup
    if "CUDAExecutionProvider" in ort.get_available_providers():
        est = contract.load_model(path, pack, device="cuda")
        assert est.device == "cuda"
    else:
        with pytest.raises(UserError, match="onnxruntime-gpu"):
            contract.load_model(path, pack, device="cuda")
        assert contract.load_model(path, pack, device="auto").device == "cpu"


def test_export_checks(setup, tmp_path):
    root, pack, model, path = setup

    class Unbounded(TinyEstimator):
        def forward(self, x):
            c, lg = super().forward(x)
            return c * 10 - 5, lg

    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        export_estimator(Unbounded(3, pack.slot_sizes), pack, tmp_path / "u.onnx", SIZE, MEAN, STD)
    with pytest.raises(ValueError, match="slots"):
        export_estimator(TinyEstimator(3, [3]), pack, tmp_path / "s.onnx", SIZE, MEAN, STD)

    class Noisy(TinyEstimator):
        """Samples noise in forward: ONNX's random numbers cannot match torch's."""
        def forward(self, x):
            c, lg = super().forward(x)
            return c, [g + torch.rand_like(g) for g in lg]

    with pytest.raises(ExportError, match="differs from torch"):
        export_estimator(Noisy(3, pack.slot_sizes), pack, tmp_path / "n.onnx", SIZE, MEAN, STD)


def test_pack_without_parameters(tmp_path):
    folder = tmp_path / "slots_only"
    folder.mkdir()
    (folder / "pack.toml").write_text('[pack]\nid = "slots_only"\nbuilder = "none"\n\n[[slots]]\nname = "hair"\n'
                                      'options = [{ id = "a" }, { id = "b" }]\n')
    pack = load_pack(folder)

    class SlotsOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x):
            f = x.mean(dim=(2, 3))
            return f[:, :0], [self.lin(f)]

    path = export_estimator(SlotsOnly(), pack, tmp_path / "s.onnx", 32, MEAN, STD)
    est = contract.load_model(path, pack)
    cont, probs = est.run(np.zeros((2, 32, 32, 3), np.uint8))
    assert cont.shape == (2, 0) and probs[0].shape == (2, 2)
    shutil.rmtree(folder)
