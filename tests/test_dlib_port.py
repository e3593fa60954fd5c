"""dlib's face-descriptor ResNet ported to ONNX (training/readout/dlib_port.py -> models/attributes/descriptor.onnx).

Runs without dlib: the references in tests/data/dlib_descriptors.json were computed by dlib-bin 20.0.1
(``write_reference_fixture``) on ``fixed_chip`` crops, which are pure numpy and so bit-identical here.
"""
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from likeness.training.readout import dlib_port as dp

ROOT = Path(__file__).resolve().parents[1]
ONNX = ROOT / "models" / "attributes" / "descriptor.onnx"
FIXTURE = json.loads((Path(__file__).parent / "data" / "dlib_descriptors.json").read_text())
TOL = 1e-3        # float rounding; measured max |ONNX - dlib| is ~4e-7
SAME_PERSON = 0.6  # dlib's threshold on the L2 distance of raw descriptors


@pytest.fixture(scope="module")
def session():
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    return ort.InferenceSession(str(ONNX), so, providers=["CPUExecutionProvider"])


def describe(session, chips):
    return session.run(["descriptor"], {"images": dp.normalise(np.stack(chips))})[0]


def fixture_face(name):
    return next(f for f in FIXTURE["faces"] if f["name"] == name)


def shifted(box, d=4):
    return (box[0] + d, box[1] + d, box[2])


def test_onnx_contract(session):
    assert ONNX.stat().st_size <= 25 * 2 ** 20
    (inp,), (out, grid) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape[1:], out.name, out.shape[1:]) == ("images", [3, 150, 150], "descriptor", [128])
    assert (grid.name, grid.shape[1:]) == ("map", [128, 4, 4])
    meta = session.get_modelmeta().custom_metadata_map
    assert [float(m) for m in meta["mean_rgb"].split(",")] == pytest.approx([122.782, 117.001, 104.298], abs=1e-3)
    assert meta["scale"] == "1/256" and "CC0" in meta["licence"]


def test_astronaut_matches_dlib_and_is_stable(session):
    """A public-domain portrait (skimage), so this runs where the shared faces are absent."""
    data = pytest.importorskip("skimage.data")
    ref = fixture_face("skimage.data.astronaut")
    img = data.astronaut()
    chip = dp.fixed_chip(img, ref["box"])
    d, d_flip, d_shift = describe(session, [chip, chip[:, ::-1], dp.fixed_chip(img, shifted(ref["box"], 3))])
    assert np.abs(d - ref["descriptor"]).max() < TOL
    assert np.abs(d_flip - ref["descriptor_flipped"]).max() < TOL
    assert np.isfinite(d).all() and 1.0 < np.linalg.norm(d) < 2.0  # raw descriptor, norm ~1.3-1.7
    assert np.linalg.norm(d - d_flip) < SAME_PERSON and np.linalg.norm(d - d_shift) < SAME_PERSON


@pytest.mark.real_faces
def test_shared_faces_match_dlib_and_separate_people(session):
    from PIL import Image
    from likeness.backend import realfaces
    faces = [f for f in FIXTURE["faces"] if f["name"].startswith("celebamask-hq-1k/")]
    assert len(faces) == 3
    images = realfaces.default_root() / "images"
    same, own = [], []
    for f in faces:
        img = np.array(Image.open(images / Path(f["name"]).name).convert("RGB"))
        chip = dp.fixed_chip(img, f["box"])
        d, d_flip, d_shift = describe(session, [chip, chip[:, ::-1], dp.fixed_chip(img, shifted(f["box"]))])
        assert np.abs(d - f["descriptor"]).max() < TOL, f["name"]
        assert np.abs(d_flip - f["descriptor_flipped"]).max() < TOL, f["name"]
        assert 1.0 < np.linalg.norm(d) < 2.0
        same += [np.linalg.norm(d - d_flip), np.linalg.norm(d - d_shift)]
        own.append(d)
    different = [np.linalg.norm(own[i] - own[j]) for i in range(3) for j in range(i + 1, 3)]
    assert max(same) < SAME_PERSON < min(different), (same, different)


def test_parser_reproduces_onnx_weights():
    src = os.environ.get("LIKENESS_DLIB_SDIST")
    if not src or not Path(src).is_file():
        pytest.skip("set LIKENESS_DLIB_SDIST to face_recognition_models-0.3.0.tar.gz (or the .dat) "
                    "to check the parser against the shipped ONNX")
    import onnx
    from onnx import numpy_helper
    parsed = dp.parse_dat(src)
    assert parsed["mean_rgb"] == pytest.approx([122.782, 117.001, 104.298], abs=1e-4)
    sd = dp.state_dict_from_dat(parsed)
    # large weights are stored as float16 ("<name>_fp16", cast back to float32 in the graph)
    init = {t.name.removesuffix("_fp16"): numpy_helper.to_array(t)
            for t in onnx.load(str(ONNX)).graph.initializer}
    assert set(sd) <= set(init)
    for name, w in sd.items():
        np.testing.assert_array_equal(init[name], w.astype(init[name].dtype), err_msg=name)
    assert sum(w.size for w in sd.values()) == 5_614_592


def test_the_onnx_is_the_torch_port_and_its_map_the_third_level(session):
    """The torch module loaded with the ONNX's own weights gives the same descriptor and map: the
    map is the 128-channel level (8x8) averaged to 4x4 cells, and the descriptor is computed from
    the same pass."""
    torch = pytest.importorskip("torch")
    import onnx
    from onnx import numpy_helper
    init = {t.name.removesuffix("_fp16"): numpy_helper.to_array(t).astype(np.float32)
            for t in onnx.load(str(ONNX)).graph.initializer}
    net = dp.DlibFaceResNet()
    net.load_state_dict({k: torch.from_numpy(init[k]) for k in net.state_dict()})
    chips = np.random.default_rng(0).integers(0, 256, (2, 150, 150, 3), dtype=np.uint8)
    x = dp.normalise(chips)
    d, grid = session.run(["descriptor", "map"], {"images": x})
    with torch.no_grad():
        td, tgrid = net.eval()(torch.from_numpy(x))
        s = net.blocks[:dp.MAP_LEVEL](torch.nn.functional.max_pool2d(
            torch.relu(net.bn0(net.conv0(torch.from_numpy(x)))), 3, 2))
    assert s.shape[1:] == (128, 8, 8)
    assert np.abs(td.numpy() - d).max() < 1e-3 and np.abs(tgrid.numpy() - grid).max() < 1e-3
    np.testing.assert_allclose(grid, s.reshape(2, 128, 4, 2, 4, 2).mean((3, 5)).numpy(), atol=1e-3)
