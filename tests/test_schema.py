"""The pack/vector schema: manifests, both vector forms, validation messages, sampling."""
import json
import random
import textwrap

import pytest

from likeness.backend.schema import SchemaError, find_pack, load_pack

MANIFEST = """
[pack]
id = "mini"
name = "Mini"
version = "1.0"
builder = "none"

[[parameters]]
name = "face_width"
group = "face"
min = -1.0
max = 1.0
default = 0.0
drives = [{ kind = "shape_key", object = "Head", key = "wide" }]

[[parameters]]
name = "skin_tone"
group = "colour"
min = 0.0
max = 1.0
default = 0.3
distribution = "beta"
alpha = 2.0
beta = 5.0
drives = [{ kind = "ramp", materials = ["Skin"], colors = ["#ffe0c0", "#3b2219"] }]

[[parameters]]
name = "jaw"
group = "face"
min = 0.0
max = 2.0
distribution = "normal"
mean = 1.0
std = 0.1

[[slots]]
name = "glasses"
label = "Glasses"
default = "none"
options = [
  { id = "none", label = "None", tags = { glasses = "none" }, weight = 3.0 },
  { id = "round", label = "Round", tags = { glasses = "eyeglasses" }, show = ["Glasses.Round"] },
  { id = "shades", label = "Sunglasses", tags = { glasses = "sunglasses" }, show = ["Glasses.Shades"] },
]

[[slots]]
name = "hair"
options = [
  { id = "bald", tags = { hair_length = "bald" }, weight = 0.0 },
  { id = "long", tags = { hair_length = "long" }, show = ["Hair.Long"], shape_keys = { "Head:long" = 1.0 } },
]

[segmentation]
"Skin*" = "skin"
"Hair*" = "hair"
"""


def write_pack(tmp_path, text=MANIFEST, name="mini"):
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pack.toml").write_text(textwrap.dedent(text))
    return folder


@pytest.fixture
def pack(tmp_path):
    return load_pack(write_pack(tmp_path))


def test_manifest_parsed(pack):
    assert pack.param_names == ("face_width", "skin_tone", "jaw")
    assert pack.slot_names == ("glasses", "hair")
    assert pack.slot_sizes == (3, 2) and pack.n_options == 5
    assert pack.parameter("jaw").default == 1.0          # midpoint when no default is given
    assert pack.slot("glasses").controlled_objects == ("Glasses.Round", "Glasses.Shades")
    assert pack.slot("hair").controlled_shape_keys == ("Head:long",)
    assert pack.class_of_material("Skin.001") == "skin"
    assert pack.class_of_material("Cloth") is None
    assert pack.parameter("skin_tone").drives[0].colors == ("#ffe0c0", "#3b2219")


def test_json_and_arrays_round_trip_exactly(pack):
    rng = random.Random(3)
    for _ in range(50):
        v = pack.sample(rng)
        again = pack.vector_from_json(json.loads(v.dumps()))
        assert again == v
        cont, disc = v.to_arrays()
        assert all(0.0 <= u <= 1.0 for u in cont)
        back = pack.vector_from_arrays(cont, disc)
        assert back.slots == v.slots
        for name in pack.param_names:
            assert back.params[name] == pytest.approx(v.params[name], abs=1e-12)
    d = pack.default_vector()
    assert pack.vector_from_arrays(*d.to_arrays()) == d   # default values survive exactly


def test_schema_hash_tracks_what_models_depend_on(tmp_path):
    a = load_pack(write_pack(tmp_path, name="a"))
    relabelled = load_pack(write_pack(tmp_path, MANIFEST.replace('label = "Round"', 'label = "Circle"'), "b"))
    reordered = load_pack(write_pack(tmp_path, MANIFEST.replace(
        '{ id = "round"', '{ id = "roundish"'), "c"))
    assert a.schema_hash == relabelled.schema_hash
    assert a.schema_hash != reordered.schema_hash


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["params"].update(nose=0.1), "unknown parameter 'nose'"),
    (lambda d: d["params"].update(face_width=1.5), "'face_width': value 1.5 out of range"),
    (lambda d: d["params"].update(face_width="wide"), "'face_width': value 'wide' is not a finite"),
    (lambda d: d["params"].update(face_width=float("nan")), "not a finite number"),
    (lambda d: d["slots"].update(glasses="monocle"), "slot 'glasses': unknown option 'monocle'"),
    (lambda d: d["slots"].pop("hair"), "missing slot 'hair'"),
    (lambda d: d["params"].pop("jaw"), "missing parameter 'jaw'"),
    (lambda d: d.update(pack="other"), "wrong pack: vector is for pack 'other'"),
    (lambda d: d.update(schema="0123"), "stale schema"),
])
def test_invalid_vectors_name_the_field(pack, edit, message):
    data = pack.default_vector().to_json()
    edit(data)
    with pytest.raises(SchemaError, match=message):
        pack.vector_from_json(data)


def test_partial_vectors_fill_defaults(pack):
    v = pack.vector_from_json({"params": {"jaw": 0.5}, "slots": {"glasses": "round"}}, partial=True)
    assert v.params["jaw"] == 0.5 and v.params["face_width"] == 0.0
    assert v.slots == {"glasses": "round", "hair": "bald"}
    assert v.tag("glasses") == "eyeglasses"


def test_bad_arrays(pack):
    with pytest.raises(SchemaError, match="3 parameters"):
        pack.vector_from_arrays([0.5], [0, 0])
    with pytest.raises(SchemaError, match="slot 'hair': index 2 out of range"):
        pack.vector_from_arrays([0.5] * 3, [0, 2])


def test_sampling_is_seeded_and_follows_the_manifest(pack):
    assert pack.sample_seeded(7, 11) == pack.sample_seeded(7, 11)
    assert pack.sample_seeded(7, 11) != pack.sample_seeded(7, 12)
    vs = [pack.sample_seeded(1, i) for i in range(2000)]
    glasses = [v.slots["glasses"] for v in vs]
    assert 0.5 < glasses.count("none") / len(vs) < 0.7        # weight 3 of 5
    assert all(v.slots["hair"] == "long" for v in vs)          # weight 0 never drawn
    jaw = [v.params["jaw"] for v in vs]
    assert abs(sum(jaw) / len(jaw) - 1.0) < 0.02
    skin = [pack.parameter("skin_tone").normalize(v.params["skin_tone"]) for v in vs]
    assert abs(sum(skin) / len(skin) - 2 / 7) < 0.02           # beta(2, 5) mean


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('id = "mini"\n', ''), r"\[pack\]: missing 'id'"),
    (lambda t: t.replace('builder = "none"', ''), "needs 'blend'"),
    (lambda t: t.replace('builder = "none"', 'blend = "missing.blend"'), "blend file 'missing.blend' not found"),
    (lambda t: t.replace('min = -1.0', 'min = 2.0'), "'face_width': min 2.0 must be below max"),
    (lambda t: t.replace('default = 0.0', 'default = 5.0'), "default 5.0 out of range"),
    (lambda t: t.replace('kind = "shape_key"', 'kind = "magic"'), "unknown drive kind 'magic'"),
    (lambda t: t.replace('"#3b2219"', '"brown"'), "'brown' is not a hex colour"),
    (lambda t: t.replace('glasses = "sunglasses"', 'glasses = "monocle"'), "glasses = 'monocle' not in"),
    (lambda t: t.replace('id = "shades"', 'id = "round"'), "duplicate option ids"),
    (lambda t: t.replace('"Hair*" = "hair"', '"Hair*" = "fur"'), "unknown class 'fur'"),
    (lambda t: t.replace('distribution = "normal"', 'distribution = "cauchy"'), "unknown distribution"),
    (lambda t: t + "\n[[slots]\n", "not valid TOML"),
    (lambda t: t.replace('default = "none"', 'default = "nope"'), "default 'nope' is not one of"),
])
def test_broken_manifests_name_the_problem(tmp_path, edit, message):
    with pytest.raises(SchemaError, match=message):
        load_pack(write_pack(tmp_path, edit(MANIFEST)))


def test_find_pack(tmp_path, monkeypatch):
    write_pack(tmp_path)
    monkeypatch.setenv("LIKENESS_PACKS_PATH", str(tmp_path))
    assert find_pack("mini").id == "mini"
    assert find_pack(tmp_path / "mini").id == "mini"
    with pytest.raises(SchemaError, match="unknown pack 'nope'"):
        find_pack("nope")
    with pytest.raises(SchemaError, match="no pack manifest"):
        load_pack(tmp_path)
