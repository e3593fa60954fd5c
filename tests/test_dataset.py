"""The dataset job with real Blender: determinism, kill + resume, shards, bad input, TD packs."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from likeness.backend.errors import UserError
from likeness.backend.schema import find_pack, load_pack
from likeness.render_engine.dataset import Job, dataset_status, render_dataset

RES = 64


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for sub in ("images", "masks", "vectors") for p in sorted((folder / sub).iterdir())}


def likeness(*args, **kw):
    return subprocess.run([sys.executable, "-m", "likeness.cli", *args], capture_output=True,
                          text=True, **kw)


@pytest.fixture(scope="module")
def pack():
    return find_pack("default")


@pytest.fixture(scope="module")
def reference(pack, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    render_dataset(Job(pack, out, count=10, seed=3, resolution=RES), workers=1, progress=False)
    return out


def test_layout_and_determinism(pack, reference, tmp_path):
    man = json.loads((reference / "manifest.json").read_text())
    assert man["pack"] == "stylized" and man["schema"] == pack.schema_hash and man["count"] == 10
    rec = json.loads((reference / "vectors" / "000004.json").read_text())
    assert pack.vector_from_json(rec["vector"]) == pack.sample_seeded(3, 4)
    assert pack.vector_from_arrays(rec["continuous"], rec["discrete"]).slots == rec["vector"]["slots"]
    img = np.asarray(Image.open(reference / "images" / "000004.png"))
    mask = np.asarray(Image.open(reference / "masks" / "000004.png"))
    assert img.shape == (RES, RES, 3) and mask.shape == (RES, RES) and mask.max() <= 18
    assert (mask == 1).mean() > 0.1                      # a face is there
    again = tmp_path / "again"
    render_dataset(Job(pack, again, count=10, seed=3, resolution=RES), workers=2, progress=False)
    assert files(again) == files(reference)              # same seed, other worker count: same bytes
    other = tmp_path / "other"
    render_dataset(Job(pack, other, count=2, seed=4, resolution=RES), workers=1, progress=False)
    assert files(other)["images/000000.png"] != files(reference)["images/000000.png"]


def test_shards_union_equals_full_run(pack, reference, tmp_path):
    out = tmp_path / "sharded"
    for i in range(3):
        s = render_dataset(Job(pack, out, count=10, seed=3, resolution=RES), shard=(i, 3),
                           workers=1, progress=False)
        assert s["rendered"] == len(range(i, 10, 3))
    assert files(out) == files(reference)
    assert dataset_status(out)["complete"]


def test_killed_run_leaves_no_half_files_and_resumes(pack, reference, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "likeness.cli", "render", "--count", "10",
                             "--seed", "3", "--resolution", str(RES), "--out", str(out),
                             "--workers", "1", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((out / "vectors").glob("*.json"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    st = dataset_status(out)
    assert 3 <= st["complete_samples"] < 10
    for sub in ("images", "masks"):                      # every visible file is whole
        for p in (out / sub).glob("*.png"):
            Image.open(p).load()
    for p in (out / "vectors").glob("*.json"):
        json.loads(p.read_text())
    done_before = {p.name: p.stat().st_mtime_ns for p in (out / "vectors").glob("*.json")}
    s = render_dataset(Job(pack, out, count=10, seed=3, resolution=RES), workers=1, progress=False)
    assert s["already_done"] == len(done_before) and s["rendered"] == 10 - len(done_before)
    assert files(out) == files(reference)
    assert not list(out.rglob(".tmp-*"))
    assert all((out / "vectors" / n).stat().st_mtime_ns == t for n, t in done_before.items())


def test_bad_requests(pack, reference, tmp_path):
    with pytest.raises(UserError, match="seed: folder has 3, this run wants 4"):
        render_dataset(Job(pack, reference, count=10, seed=4, resolution=RES), progress=False)
    with pytest.raises(UserError, match="--resolution must be between"):
        render_dataset(Job(pack, tmp_path / "r", count=1, resolution=4096), progress=False)
    with pytest.raises(UserError, match="--count must be at least 1"):
        render_dataset(Job(pack, tmp_path / "c", count=0), progress=False)
    r = likeness("render", "--count", "2", "--out", "/proc/likeness-cannot-write", "--shard", "3/2")
    assert r.returncode == 1 and "--shard 3/2: need 0 <= I < K" in r.stderr
    r = likeness("render", "--count", "2", "--out", "/proc/likeness-cannot-write")
    assert r.returncode == 1 and "is not writable" in r.stderr
    r = likeness("render", "--pack", "nope", "--count", "2", "--out", str(tmp_path / "n"))
    assert r.returncode == 1 and "unknown pack 'nope'" in r.stderr


def test_second_run_into_the_same_shard_is_refused(pack, tmp_path):
    import fcntl
    out = tmp_path / "locked"
    render_dataset(Job(pack, out, count=1, seed=0, resolution=RES), workers=1, progress=False)
    lock = open(out / ".locks" / "shard-0-of-1.lock", "a+")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)     # as a running job holds it
    try:
        r = likeness("render", "--count", "1", "--out", str(out), "--resolution", str(RES))
        assert r.returncode == 1 and "another run is already writing shard 0/1" in r.stderr
    finally:
        lock.close()


def test_full_disk_is_a_clear_error_and_keeps_samples(pack, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs",
                                            str(mnt)], capture_output=True).returncode:
        pytest.skip("needs root to mount a tiny tmpfs")
    try:
        r = likeness("render", "--count", "40", "--out", str(mnt / "ds"), "--resolution", "128",
                     "--workers", "1", "--no-progress")
        assert r.returncode == 1 and "disk full while writing" in r.stderr
        st = dataset_status(mnt / "ds")
        assert 0 < st["complete_samples"] < 40 and not st["temp_files"]
        for p in (mnt / "ds" / "images").glob("*.png"):
            Image.open(p).load()
    finally:
        subprocess.run(["umount", str(mnt)])


TD_MANIFEST = """
[pack]
id = "td"
blend = "td.blend"
collection = "Avatar"

[camera]
location = [0.0, -6.0, 0.0]
look_at = [0.0, 0.0, 0.0]
lens = 50.0

[[parameters]]
name = "width"
min = 0.0
max = 1.0
default = 0.0
drives = [{ kind = "shape_key", object = "Head", key = "wide" }]

[[parameters]]
name = "skin"
min = 0.0
max = 1.0
drives = [{ kind = "ramp", materials = ["Skin"], colors = ["#f0d0b0", "#402010"] }]

[[slots]]
name = "hat"
options = [{ id = "none", tags = { headwear = "none" } },
           { id = "cone", tags = { headwear = "hat" }, show = ["%s"] }]

[segmentation]
"Skin" = "skin"
"Hat" = "hat"
"""


@pytest.fixture(scope="module")
def td_pack(tmp_path_factory):
    """A technical director's pack: their own .blend, our manifest format, no Python."""
    import bpy
    folder = tmp_path_factory.mktemp("tdpack")
    bpy.ops.wm.read_factory_settings(use_empty=True)
    coll = bpy.data.collections.new("Avatar")
    bpy.context.scene.collection.children.link(coll)
    bpy.ops.mesh.primitive_uv_sphere_add(radius=1.0)
    head = bpy.context.active_object
    head.name = "Head"
    head.shape_key_add(name="Basis")
    key = head.shape_key_add(name="wide")
    co = np.empty(len(head.data.vertices) * 3, np.float32)
    key.data.foreach_get("co", co)
    co = co.reshape(-1, 3)
    co[:, 0] *= 1.6
    key.data.foreach_set("co", co.ravel())
    skin = bpy.data.materials.new("Skin")
    head.data.materials.append(skin)
    bpy.ops.mesh.primitive_cone_add(radius1=0.8, depth=1.2, location=(0, 0, 1.3))
    hat = bpy.context.active_object
    hat.name = "HatCone"
    hat.data.materials.append(bpy.data.materials.new("Hat"))
    for ob in (head, hat):
        for c in ob.users_collection:
            c.objects.unlink(ob)
        coll.objects.link(ob)
    bpy.ops.wm.save_as_mainfile(filepath=str(folder / "td.blend"))
    (folder / "pack.toml").write_text(textwrap.dedent(TD_MANIFEST % "HatCone"))
    return load_pack(folder)


def test_td_pack_renders_what_its_manifest_says(td_pack, tmp_path):
    out = tmp_path / "td"
    render_dataset(Job(td_pack, out, count=12, seed=0, resolution=RES), workers=1, progress=False)
    for i in range(12):
        rec = json.loads((out / "vectors" / f"{i:06d}.json").read_text())
        mask = np.asarray(Image.open(out / "masks" / f"{i:06d}.png"))
        has_hat = (mask == 14).sum() > 20
        assert has_hat == (rec["vector"]["slots"]["hat"] == "cone")
        assert (mask == 1).sum() > 100


def test_manifest_pointing_at_missing_objects_is_named(td_pack, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "td.blend").write_bytes((td_pack.root / "td.blend").read_bytes())
    (folder / "pack.toml").write_text(textwrap.dedent(TD_MANIFEST % "Sombrero"))
    r = likeness("pack", "check", "--pack", str(folder))
    assert r.returncode == 1 and "Sombrero" in r.stderr
    r = likeness("render", "--pack", str(folder), "--count", "1", "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and "Sombrero" in r.stderr
    assert not list((tmp_path / "o" / "images").glob("*.png"))


def test_blender_entry_script_runs_the_same_job(pack, reference, tmp_path):
    """What `blender -b --python render_engine/blender_entry.py -- render ...` runs, with bpy."""
    import likeness
    entry = Path(likeness.__file__).parent / "render_engine" / "blender_entry.py"
    out = tmp_path / "entry"
    r = subprocess.run([sys.executable, str(entry), "--", "render", "--count", "10", "--seed", "3",
                        "--resolution", str(RES), "--out", str(out), "--no-progress"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert files(out) == files(reference)


def test_contact_sheet(reference, tmp_path):
    r = likeness("contact-sheet", str(reference), "--out", str(tmp_path / "s.png"), "--count", "6",
                 "--columns", "3")
    assert r.returncode == 0, r.stderr
    sheet = np.asarray(Image.open(tmp_path / "s.png"))
    assert sheet.shape[0] > 2 * 128 and sheet.shape[1] > 6 * 128      # 2 rows of 3 (render|mask)
