"""Bad input and interruptions as a demanding user meets them: every failure a clear message, nothing
lost, nothing left running (real Blender, real ONNX Runtime, real photos)."""
import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from likeness.backend import realfaces
from likeness.backend.errors import UserError
from likeness.backend.schema import find_pack

RES = 64
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def likeness(*args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", **kw.pop("env", {}))
    return subprocess.run([sys.executable, "-m", "likeness.cli", *args], capture_output=True,
                          text=True, env=env, **kw)


def clean(r) -> str:
    """stderr, asserting it is a message and not a traceback."""
    assert "Traceback" not in r.stderr, r.stderr
    return r.stderr


@pytest.fixture(scope="module")
def model(tiny_default_model):
    return tiny_default_model


@pytest.fixture
def astronaut(tmp_path) -> Path:
    from skimage import data
    path = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


def unwritable_dir(tmp_path: Path) -> Path:
    """A folder no file can be written in: mode 0500, or for root (who ignores modes) a folder of
    the read-only /sys file system."""
    d = tmp_path / "locked"
    d.mkdir()
    d.chmod(0o500)
    try:
        (d / "probe").write_bytes(b"")
    except OSError:
        return d
    (d / "probe").unlink()
    d.chmod(0o700)
    for cand in (Path("/sys/kernel"), Path("/sys")):
        try:
            (cand / ".likeness-probe").write_bytes(b"")
            (cand / ".likeness-probe").unlink()
        except OSError:
            if cand.is_dir():
                return cand
    pytest.skip("no folder here refuses writes (root without a read-only /sys)")


# ---- 1 and 4: batches: unique names, failures listed, partial exit code, no photos -----------------

@pytest.mark.real_faces
def test_batch_results_are_never_overwritten_and_failures_are_listed(model, tmp_path):
    stems = realfaces.stems(split="val")[:2]
    src = realfaces.default_root() / "images"
    photos = tmp_path / "photos"
    photos.mkdir()                 # copies in a temp folder only, never in the repository
    (photos / "face.jpg").write_bytes((src / f"{stems[0]}.jpg").read_bytes())
    Image.open(src / f"{stems[1]}.jpg").save(photos / "face.png")
    Image.open(src / f"{stems[1]}.jpg").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
        photos / "face.JPEG", format="JPEG")
    Image.fromarray(np.full((300, 300, 3), 200, np.uint8)).save(photos / "blank.png")
    (photos / "broken.jpg").write_bytes(b"not a jpeg at all")
    out = tmp_path / "out"
    r = likeness("create", "--photos", str(photos), "--model", str(model), "--out", str(out),
                 "--resolution", str(RES))
    err = clean(r)
    assert r.returncode == 3, err                                      # some failed: partial
    printed = r.stdout.split()
    assert sorted(printed) == sorted(str(out / n) for n in ("face_jpg", "face_png", "face_JPEG"))
    sources = {json.loads((Path(p) / "vector.json").read_text())["source"] for p in printed}
    assert sources == {str(photos / n) for n in ("face.jpg", "face.png", "face.JPEG")}
    crops = [np.asarray(Image.open(Path(p) / "crop.png")) for p in printed]
    assert not np.array_equal(crops[0], crops[1]) and not np.array_equal(crops[1], crops[2])
    failures = json.loads((out / "failures.json").read_text())
    assert failures["photos"] == 5 and failures["done"] == 3
    reasons = {Path(f["photo"]).name: f["reason"] for f in failures["failed"]}
    assert set(reasons) == {"blank.png", "broken.jpg"}
    assert "no face found" in reasons["blank.png"] and "not an image" in reasons["broken.jpg"]
    assert "2 of 5 photos failed" in err and "failures.json" in err
    # the same input gives the same names: a rerun overwrites its own results, nothing else
    r2 = likeness("create", "--photos", str(photos), "--model", str(model), "--out", str(out),
                  "--resolution", str(RES))
    assert r2.returncode == 3 and sorted(r2.stdout.split()) == sorted(printed)
    assert sorted(p.name for p in out.iterdir()) == sorted(["failures.json", "face_JPEG", "face_jpg", "face_png"])

    crops_dir = tmp_path / "crops"
    r = likeness("predict", str(photos), "--model", str(model), "--crops", str(crops_dir),
                 "--out", str(tmp_path / "p.jsonl"))
    assert r.returncode == 3, clean(r)
    assert sorted(p.name for p in crops_dir.iterdir()) == ["face_JPEG.png", "face_jpg.png", "face_png.png"]
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert sum("error" in x for x in lines) == 2 and len(lines) == 5

    # all photos fine: exit 0 and an empty failures list
    good = tmp_path / "good"
    good.mkdir()
    (good / "a.jpg").write_bytes((src / f"{stems[0]}.jpg").read_bytes())
    r = likeness("create", "--photos", str(good), "--model", str(model), "--out", str(tmp_path / "g"),
                 "--resolution", str(RES))
    assert r.returncode == 0, clean(r)
    assert json.loads((tmp_path / "g" / "failures.json").read_text())["failed"] == []


def test_a_folder_without_photos_names_the_supported_types(model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "IMG_0001.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (odd / "notes.txt").write_text("x")
    for folder, held in ((empty, "it is empty"), (odd, ".heic")):
        for cmd in (["create", "--photos", str(folder), "--out", str(tmp_path / "o")],
                    ["predict", str(folder)]):
            r = likeness(*cmd, "--model", str(model))
            err = clean(r)
            assert r.returncode == 1 and r.stdout == "", (cmd, r.stdout, err)
            assert f"no photos in {folder}" in err and held in err and ".jpg" in err and ".png" in err


def test_jfif_photos_are_read(model, tmp_path, astronaut):
    folder = tmp_path / "jfif"
    folder.mkdir()
    Image.open(astronaut).convert("RGB").save(folder / "me.jfif", format="JPEG")
    r = likeness("predict", str(folder), "--model", str(model))
    assert r.returncode == 0, clean(r)
    assert json.loads(r.stdout)["source"].endswith("me.jfif")


# ---- 3: outputs that cannot be written, checked before the work -----------------------------------

def test_outputs_that_cannot_be_written_are_messages_before_the_work(model, tmp_path, astronaut):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    locked = unwritable_dir(tmp_path)
    vec = tmp_path / "v.json"
    vec.write_text(find_pack("default").default_vector().dumps())
    photo = ["--photo", str(astronaut), "--model", str(model)]
    cases = [
        (["create", *photo, "--out", str(a_file)], "existing file"),
        (["create", *photo, "--out", str(locked)], "cannot write"),
        (["create", *photo, "--out", str(locked / "new")], "cannot create"),
        (["apply", str(vec), "--out", str(a_file)], "existing file"),
        (["apply", str(vec), "--out", str(locked)], "cannot write"),
        (["apply", str(vec), "--out", str(tmp_path / "ok"), "--blend", str(tmp_path)], "is a folder"),
        (["apply", str(vec), "--out", str(tmp_path / "ok"), "--blend", str(locked / "x.blend")], "--blend"),
        (["predict", str(astronaut), "--model", str(model), "--out", str(tmp_path)], "is a folder"),
        (["predict", str(astronaut), "--model", str(model), "--out", str(locked / "p.jsonl")], "cannot"),
        (["predict", str(astronaut), "--model", str(model), "--crops", str(a_file)], "existing file"),
        (["retrain", "--work", str(a_file)], "existing file"),
        (["retrain", "--work", str(locked / "w")], "cannot create"),
    ]
    if (realfaces.default_root() / "images").is_dir():
        cases.append((["validate", "--model", str(model), "--out", str(a_file), "--limit", "2"],
                      "existing file"))
    for cmd, words in cases:
        t = time.monotonic()
        r = likeness(*cmd)
        err = clean(r)
        assert r.returncode == 1 and "error:" in err and words in err, (cmd, err)
        assert time.monotonic() - t < 30, cmd          # refused before the work, not after it
    assert a_file.read_text() == "keep me"
    assert not (tmp_path / "ok" / "render.png").exists()        # --blend checked before rendering


# ---- 3 and 5: vectors: every file Likeness writes is read by every reader ------------------------

def test_every_vector_file_likeness_writes_is_readable(model, tmp_path, astronaut):
    pack = find_pack("default")
    r = likeness("create", "--photo", str(astronaut), "--model", str(model), "--out", str(tmp_path / "c"),
                 "--resolution", str(RES))
    assert r.returncode == 0, clean(r)
    created = tmp_path / "c" / "vector.json"
    assert isinstance(json.loads(created.read_text())["slots"]["hair"], dict)   # with probabilities
    r = likeness("predict", str(astronaut), "--model", str(model), "--out", str(tmp_path / "one.jsonl"))
    assert r.returncode == 0, clean(r)
    from likeness.render_engine.dataset import Job, render_dataset
    render_dataset(Job(pack, tmp_path / "ds", count=1, seed=2, resolution=RES), workers=1, progress=False)
    record = tmp_path / "ds" / "vectors" / "000000.json"
    expected = {created: json.loads(created.read_text())["vector"],
                tmp_path / "one.jsonl": json.loads((tmp_path / "one.jsonl").read_text())["vector"],
                record: json.loads(record.read_text())["vector"]}
    for path, want in expected.items():
        # the CLI's reader and the add-on's (Import and Paste use pack.vector_from_json, partial)
        got = pack.vector_from_json(path.read_text(), partial=True)
        assert got.slots == want["slots"] and got.params == pytest.approx(want["params"])
        r = likeness("apply", str(path), "--out", str(tmp_path / f"a-{path.stem}"), "--resolution", str(RES))
        assert r.returncode == 0, (path, clean(r))
        again = json.loads((tmp_path / f"a-{path.stem}" / "vector.json").read_text())
        assert again["slots"] == want["slots"]
    two = tmp_path / "two.jsonl"
    two.write_text((tmp_path / "one.jsonl").read_text() * 2)
    for arg, words in ((str(two), "JSON Lines with 2 records"), ("random:abc", "whole number"),
                       (str(tmp_path / "latin1.json"), "not UTF-8")):
        (tmp_path / "latin1.json").write_bytes(b'{"params": {}, "slots": {"hair": "\xe9"}}')
        r = likeness("apply", arg, "--out", str(tmp_path / "x"))
        assert r.returncode == 1 and words in clean(r), (arg, r.stderr)


# ---- 6: one rule for sizes ---------------------------------------------------------------------------

def test_resolution_has_one_rule_everywhere(model, tmp_path, astronaut):
    for res in ("0", "-1", "4", "5000"):
        for cmd in (["create", "--photo", str(astronaut), "--model", str(model)], ["apply", "default"],
                    ["render", "--count", "1"]):
            out = tmp_path / f"{cmd[0]}{res}"
            r = likeness(*cmd, "--out", str(out), "--resolution", res)
            assert r.returncode == 1 and "--resolution must be between 64 and 1024" in clean(r), (cmd, res)
            assert not (out / "render.png").exists()


# ---- 7: a broken model -------------------------------------------------------------------------------

def test_an_estimator_with_nan_outputs_is_refused(tmp_path, astronaut):
    import torch
    from likeness.training.estimator import model as est
    from likeness.training.estimator.export import export_estimator
    pack = find_pack("default")
    torch.manual_seed(0)
    net = est.Estimator(pack.n_continuous, pack.slot_sizes, 16).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(math.nan)
    path = tmp_path / "nan.onnx"
    export_estimator(net, pack, path, 64, est.IMAGENET_MEAN, est.IMAGENET_STD)
    r = likeness("predict", str(astronaut), "--model", str(path))
    assert r.returncode == 1 and "NaN" in clean(r) and "broken" in r.stderr and r.stdout == ""
    r = likeness("create", "--photo", str(astronaut), "--model", str(path), "--out", str(tmp_path / "c"))
    assert r.returncode == 1 and "NaN" in clean(r)
    assert not (tmp_path / "c" / "vector.json").exists()


# ---- 3: packs whose .blend is damaged ---------------------------------------------------------------

def test_a_td_pack_with_a_corrupt_blend_is_a_message(tmp_path):
    from test_dataset import TD_MANIFEST
    folder = tmp_path / "td"
    folder.mkdir()
    (folder / "pack.toml").write_text(TD_MANIFEST)
    (folder / "td.blend").write_bytes(b"BLENDER-v500" + os.urandom(2000))
    r = likeness("apply", "default", "--pack", str(folder), "--out", str(tmp_path / "o"))
    err = clean(r)
    assert r.returncode == 1 and "Blender cannot open its .blend" in err and "td.blend" in err


def test_a_corrupt_cached_build_is_rebuilt(tmp_path, monkeypatch):
    from likeness.render_engine.packs import built_blend_path
    cache = tmp_path / "cache"
    monkeypatch.setenv("LIKENESS_CACHE", str(cache))
    path = built_blend_path(find_pack("default"))
    assert str(path).startswith(str(cache))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"BLENDER-v500" + b"\0" * 4000)          # a build cut short by something else
    r = likeness("apply", "default", "--out", str(tmp_path / "o"), "--resolution", str(RES),
                 env={"LIKENESS_CACHE": str(cache)})
    err = clean(r)
    assert r.returncode == 0 and "is damaged" in err and "rebuilding it" in err
    assert path.stat().st_size > 100_000 and (tmp_path / "o" / "render.png").is_file()
    r = likeness("apply", "default", "--out", str(tmp_path / "o2"), "--resolution", str(RES),
                 env={"LIKENESS_CACHE": str(cache)})
    assert r.returncode == 0 and "damaged" not in clean(r)


# ---- 2: render workers die with their parent; a rerun never races a stray worker ------------------

def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid and b"spawn_main" in (d / "cmdline").read_bytes():
                out.append(int(d.name))
        except (OSError, ValueError, IndexError):
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _n_done(out: Path) -> int:
    d = out / "vectors"
    return len([p for p in d.iterdir() if not p.name.startswith(".")]) if d.is_dir() else 0


def _wait(cond, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


@linux_only
@pytest.mark.parametrize("sig,command", [(signal.SIGKILL, "render"), (signal.SIGTERM, "render"),
                                         (signal.SIGINT, "render"), (signal.SIGKILL, "retrain")])
def test_render_workers_die_with_their_parent(tmp_path, sig, command):
    # 2,000 samples: far more than the test waits for, so only a stop can end the workers
    if command == "render":
        out = tmp_path / "ds"
        args = ["render", "--count", "2000", "--out", str(out), "--resolution", str(RES),
                "--workers", "2", "--no-progress"]
    else:                                   # the retrain's render stage runs the same job
        out = tmp_path / "work" / "render"
        args = ["retrain", "--config", "tiny", "--work", str(tmp_path / "work"), "--until", "render",
                "--set", "render_count=2000"]
    # A shell that starts a job in the background (`.ci/run &`) ignores SIGINT in it, and Python
    # keeps an inherited SIG_IGN; the child here stands for a job in a terminal, where Ctrl-C counts.
    proc = subprocess.Popen([sys.executable, "-m", "likeness.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", LIKENESS_THREADS="1"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert _wait(lambda: _n_done(out) >= 2 and len(_children(proc.pid)) == 2, 120), proc.poll()
        workers = _children(proc.pid)
        t = time.monotonic()
        os.kill(proc.pid, sig)                          # the main process alone, not its group
        proc.wait(timeout=60)                       # a loaded 2-core CI machine: tens of s
        assert _wait(lambda: not any(_alive(w) for w in workers), 5), "workers outlived the parent"
        stopped = time.monotonic() - t
        n = _n_done(out)
        time.sleep(1.5)
        assert _n_done(out) == n < 2000                   # nothing renders any more
        assert stopped < 10, stopped                       # promptly, not after the workers' share
        if sig != signal.SIGKILL:
            assert proc.returncode == 130 and "interrupted" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    from likeness.render_engine.dataset import dataset_status
    st = dataset_status(out)
    assert st["complete_samples"] == _n_done(out) and st["damaged"] == []


@linux_only
def test_a_rerun_waits_for_a_stray_worker_of_an_earlier_run(tmp_path):
    out = tmp_path / "ds"
    (out / ".locks").mkdir(parents=True)
    held = open(out / ".locks" / "shard-0-of-1.worker-1.lock", "a+")
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)         # a worker of an earlier run, still running
    proc = subprocess.Popen([sys.executable, "-m", "likeness.cli", "render", "--count", "2",
                             "--out", str(out), "--resolution", str(RES), "--workers", "1",
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(6)
        assert proc.poll() is None and _n_done(out) == 0     # waiting, not rendering beside it
        fcntl.flock(held, fcntl.LOCK_UN)                      # the stray worker ends
        out_s, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert json.loads(out_s)["rendered"] == 2 and json.loads(out_s)["complete"]
    finally:
        held.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_stray_worker_that_does_not_stop_is_named(tmp_path, monkeypatch):
    from likeness.render_engine import dataset
    out = tmp_path / "ds"
    (out / ".locks").mkdir(parents=True)
    held = open(out / ".locks" / "shard-0-of-1.worker-0.lock", "a+")
    held.write("4242")
    held.flush()
    proc = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                             "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                             str(out / ".locks" / "shard-0-of-1.worker-0.lock")],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        monkeypatch.setattr(dataset, "STRAY_WORKER_WAIT", 0.5)
        with pytest.raises(UserError, match=r"render worker of an earlier run \(pid 4242\) is still"):
            dataset.render_dataset(dataset.Job(find_pack("default"), out, count=1, resolution=RES),
                                   workers=1, progress=False)
        assert _n_done(out) == 0
    finally:
        held.close()
        proc.kill()
        proc.wait()


# ---- 8: completeness is what the record says, not that files exist ---------------------------------

def test_a_truncated_png_is_not_a_complete_sample(tmp_path):
    from likeness.render_engine.dataset import Job, dataset_status, render_dataset
    pack = find_pack("default")
    out = tmp_path / "ds"
    job = Job(pack, out, count=3, seed=1, resolution=RES)
    render_dataset(job, workers=1, progress=False)
    original = {p.name: p.read_bytes() for p in (out / "images").iterdir()}
    masks = {p.name: p.read_bytes() for p in (out / "masks").iterdir()}
    img = out / "images" / "000001.png"
    img.write_bytes(original["000001.png"][: len(original["000001.png"]) // 2])   # cut by a copy tool
    # a record of an older dataset (no sizes): the PNG's end is checked instead
    rec_path = out / "vectors" / "000002.json"
    rec = json.loads(rec_path.read_text())
    assert rec["files"] == {"image": len(original["000002.png"]), "mask": len(masks["000002.png"])}
    del rec["files"]
    rec_path.write_text(json.dumps(rec))
    (out / "masks" / "000002.png").write_bytes(masks["000002.png"][:-20])
    st = dataset_status(out)
    assert st["complete_samples"] == 1 and st["missing"] == [1, 2] and st["damaged"] == ["000001", "000002"]
    assert not st["complete"]
    r = likeness("farm", "status", str(out))
    clean(r)
    assert r.stdout.startswith("1/3 samples complete") and "2 samples damaged" in r.stdout, r.stdout
    r = likeness("farm", "finish", str(out))
    assert r.returncode != 0 and "2 of them damaged" in r.stdout + r.stderr, (r.stdout, r.stderr)
    s = render_dataset(job, workers=1, progress=False)
    assert s["rendered"] == 2 and s["already_done"] == 1 and s["complete"]
    assert {p.name: p.read_bytes() for p in (out / "images").iterdir()} == original
    assert {p.name: p.read_bytes() for p in (out / "masks").iterdir()} == masks


# ---- 9: noise ---------------------------------------------------------------------------------------

def test_no_egl_noise_and_no_colour_note_for_a_failed_create(model, tmp_path):
    r = likeness("apply", "default", "--out", str(tmp_path / "a"), "--resolution", str(RES))
    assert r.returncode == 0 and "EGL" not in clean(r), r.stderr
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((300, 300, 3), 200, np.uint8)).save(blank)
    r = likeness("create", "--photo", str(blank), "--model", str(model), "--out", str(tmp_path / "b"))
    err = clean(r)
    assert r.returncode == 1 and "no face found" in err
    assert "colours" not in err and "EGL" not in err, err


def test_the_addon_rebuilds_a_corrupt_cached_build(tmp_path, monkeypatch, capfd):
    from likeness.render_engine import avatar
    from likeness.render_engine.packs import built_blend_path, empty_scene
    monkeypatch.setenv("LIKENESS_CACHE", str(tmp_path / "cache"))
    pack = find_pack("default")
    path = built_blend_path(pack)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"BLENDER-v500" + b"\0" * 4000)
    empty_scene()
    coll = avatar.add_avatar(pack)                      # what the panel's Add Avatar does
    assert len(coll.all_objects) > 5 and set(avatar.read(coll).slots) == {s.name for s in pack.slots}
    assert "is damaged" in capfd.readouterr().err and path.stat().st_size > 100_000
