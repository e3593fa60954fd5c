"""Render farms against a real one-node SLURM: job arrays, resubmission, the finishing check."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from likeness.backend.errors import UserError
from likeness.farm import slurm

COUNT, SHARDS, RES = 8, 4, 64


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for sub in ("images", "masks", "vectors") for p in sorted((folder / sub).iterdir())}


def wait_for(job_ids, env, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not slurm.queue_states([j for j in job_ids if j]):
            return
        time.sleep(1)
    raise TimeoutError(f"jobs {job_ids} still queued after {timeout} s")


def likeness(*args):
    return subprocess.run([sys.executable, "-m", "likeness.cli", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The unsharded job, rendered locally."""
    out = tmp_path_factory.mktemp("ref")
    r = likeness("render", "--count", str(COUNT), "--out", str(out), "--seed", "5",
                 "--resolution", str(RES), "--workers", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slurm
def test_job_array_equals_unsharded_run_and_resubmission_redoes_only_missing(slurm_env, reference, tmp_path):
    out = tmp_path / "farm"
    res = slurm.farm_render("default", COUNT, str(out), SHARDS, seed=5, resolution=RES)
    assert res["submit_shards"] == [0, 1, 2, 3]
    wait_for([res["array_job"], res["finish_job"]], slurm_env)
    assert files(out) == files(reference)                       # file for file
    assert json.loads((out / "COMPLETE.json").read_text())["complete"] is True
    assert slurm.status(str(out))["complete"]

    # A task killed mid-way: two samples of shard 1 lost, a half-written temp file left behind.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    (out / "vectors" / "000001.json").unlink()
    (out / "images" / "000005.png").unlink()
    (out / "vectors" / "000005.json").unlink()
    (out / "images" / ".tmp-000005.png-999").write_bytes(b"\x89PNG half")
    st = slurm.status(str(out))
    assert st["missing_samples"] == 2 and st["remaining_shards"] == [1]
    res2 = slurm.farm_render("default", COUNT, str(out), SHARDS, seed=5, resolution=RES)
    assert res2["submit_shards"] == [1]                         # nothing else is redone
    wait_for([res2["array_job"], res2["finish_job"]], slurm_env)
    assert files(out) == files(reference)
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    changed = {str(p.relative_to(out)) for p in before if after.get(p) != before[p]}
    assert changed == {"images/000001.png", "masks/000001.png",   # only the lost samples
                       "images/000005.png", "masks/000005.png"}
    assert not list(out.rglob(".tmp-*"))


@pytest.mark.slurm
def test_finishing_job_fails_loudly_on_a_missing_sample(slurm_env, reference, tmp_path):
    out = tmp_path / "broken"
    r = likeness("render", "--count", str(COUNT), "--out", str(out), "--seed", "5",
                 "--resolution", str(RES), "--workers", "1", "--no-progress", "--shard", "0/2")
    assert r.returncode == 0, r.stderr
    script = tmp_path / "finish.sbatch"
    script.write_text(f"#!/bin/bash\n#SBATCH --output={tmp_path}/finish.out\n"
                      f"{sys.executable} -m likeness.cli farm finish {out}\n")
    done = subprocess.run(["sbatch", "--wait", str(script)], env=slurm_env, capture_output=True, text=True)
    assert done.returncode != 0
    log = (tmp_path / "finish.out").read_text()
    assert "4 samples missing (indices 1, 3, 5, 7)" in log


@pytest.mark.slurm
def test_bad_farm_requests_fail_before_submitting(slurm_env, reference, tmp_path):
    with pytest.raises(UserError, match="unknown SLURM partition 'gpu'"):
        slurm.farm_render("default", COUNT, str(tmp_path / "a"), 2, partition="gpu")
    with pytest.raises(UserError, match="--shards 9 is larger than --count 8"):
        slurm.farm_render("default", COUNT, str(tmp_path / "a"), 9)
    with pytest.raises(UserError, match="seed: folder has 5, this job wants 6"):
        slurm.farm_render("default", COUNT, str(reference), 2, seed=6, resolution=RES)
    with pytest.raises(UserError, match="Blender binary '/no/blender' not found"):
        slurm.farm_render("default", COUNT, str(tmp_path / "a"), 2, blender="/no/blender")
    old = tmp_path / "blender"
    old.write_text("#!/bin/sh\necho 'Blender 3.4.1'\n")
    old.chmod(0o755)
    with pytest.raises(UserError, match="Blender 3.4 .* is too old"):
        slurm.farm_render("default", COUNT, str(tmp_path / "a"), 2, blender=str(old))
    assert not (tmp_path / "a").exists()                         # nothing was written


def test_no_scheduler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "missing.conf"))
    monkeypatch.setenv("PATH", str(tmp_path))                    # no sinfo at all
    with pytest.raises(UserError, match="'sinfo' not found"):
        slurm.check_scheduler()


def test_dry_run_prints_the_array_and_the_dependent_finish(tmp_path):
    r = likeness("farm", "render", "--count", "10", "--shards", "3", "--out", str(tmp_path / "d"),
                 "--partition", "render", "--time", "01:00:00", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "--shard \"$SLURM_ARRAY_TASK_ID/3\"" in r.stdout
    assert "#SBATCH --partition=render" in r.stdout and "farm finish" in r.stdout
    assert "3 of 3 shards" in r.stdout
    assert not (tmp_path / "d").exists()


@pytest.mark.real_faces
@pytest.mark.slurm
def test_farm_retrain_tiny_runs_as_chained_jobs(slurm_env, tmp_path):
    from likeness.training.pipeline.retrain import STAGES
    work = tmp_path / "rt"
    res = slurm.farm_retrain("default", "tiny", str(work), train_real=True, cpus=1)
    assert list(res["jobs"]) == list(STAGES) and list(STAGES)[:4] == ["render", "calibration", "photo_parser",
                                                                      "labels"]
    wait_for(list(res["jobs"].values()), slurm_env, timeout=900)
    st = slurm.retrain_status(str(work))
    assert all(e["state"] == "done" for e in st.values()), st
    assert (work / "model.onnx").is_file() and (work / "validate" / "stage.json").is_file()
    logs = sorted((work / ".farm" / "logs").glob("retrain-*.out"))
    assert len(logs) == len(STAGES)
    # Each job ran one stage; the ones before it were skipped as current.
    assert "current, skipped" in (work / ".farm" / "logs" / f"retrain-avatar-{res['jobs']['avatar']}.out").read_text()
    labels = json.loads((work / "labels" / "stage.json").read_text())["result"]
    assert labels["used"] and labels["photos"] == 64
    assert "real_presence" in json.loads((work / "estimator" / "stage.json").read_text())["result"]


def test_farm_retrain_dry_run_uses_torchrun_for_multi_gpu_gan_stages(tmp_path):
    res = slurm.farm_retrain("default", "tiny", str(tmp_path / "w"), gpus=2, dry_run=True)
    assert "torch.distributed.run" in res["scripts"]["avatar"] and "--nproc_per_node=2" in res["scripts"]["avatar"]
    assert "--gres=gpu:2" in res["scripts"]["estimator"] and "--gres" not in res["scripts"]["render"]
    assert res["scripts"]["validate"].rstrip().endswith("--until validate")
    assert "--gres" not in res["scripts"]["labels"]                # labelling runs on CPUs
    assert "--no-real-labels" not in res["scripts"]["labels"]
    with pytest.raises(UserError, match="unknown retrain config 'huge'"):
        slurm.farm_retrain("default", "huge", str(tmp_path / "w"), dry_run=True)


def test_farm_retrain_dry_run_passes_no_real_labels_to_every_stage(tmp_path):
    r = likeness("farm", "retrain", "--config", "tiny", "--work", str(tmp_path / "w"), "--baseline",
                 "--no-real-labels", "--dry-run")
    assert r.returncode == 0, r.stderr
    stages = [line.split()[2] for line in r.stdout.splitlines() if line.startswith("# stage ")]
    assert stages == ["render", "calibration", "photo_parser", "labels", "pairs", "estimator", "export",
                      "shape", "bundle", "validate"]
    commands = [line for line in r.stdout.splitlines() if "likeness.cli retrain" in line]
    assert len(commands) == len(stages) and all("--no-real-labels" in c for c in commands)
    assert not (tmp_path / "w").exists()
