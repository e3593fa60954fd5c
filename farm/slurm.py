"""Dataset rendering (and retraining) as SLURM jobs.

``likeness farm render`` writes an sbatch job array, one task per shard running
``likeness render ... --shard $SLURM_ARRAY_TASK_ID/K``, and a finishing job that depends on it
(``afterok``) and checks the union. Submitting again renders only what is missing: only shards
with missing samples are submitted, and each task skips its completed samples. Everything the
farm writes lives in ``OUT/.farm/``: the scripts, the task logs and ``jobs.json`` (what was
submitted), which ``likeness farm status`` reads together with the scheduler.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..backend.errors import UserError
from ..backend.schema import Pack, find_pack

MIN_BLENDER = (4, 2)
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


# ---- scheduler access --------------------------------------------------------------------------

def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)
    except FileNotFoundError:
        raise UserError(f"'{cmd[0]}' not found: is SLURM installed on this machine?") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"'{' '.join(cmd)}' did not answer in 60 s: is the scheduler up?") from None


def check_scheduler(partition: str | None = None):
    r = _run(["sinfo", "-h", "-o", "%P %a"])
    if r.returncode != 0:
        raise UserError("no SLURM scheduler reachable (sinfo failed: "
                        f"{(r.stderr or r.stdout).strip().splitlines()[-1:] or ['?']})")
    if partition:
        names = {line.split()[0].rstrip("*") for line in r.stdout.splitlines() if line.strip()}
        if partition not in names:
            raise UserError(f"unknown SLURM partition '{partition}' (available: "
                            f"{', '.join(sorted(names)) or 'none'})")


def check_blender(path: str) -> str:
    """A Blender binary that exists and is new enough; returns its absolute path."""
    exe = shutil.which(path) or (path if os.access(path, os.X_OK) else None)
    if not exe:
        raise UserError(f"Blender binary '{path}' not found or not executable")
    r = _run([exe, "--version"])
    m = re.search(r"Blender (\d+)\.(\d+)", r.stdout)
    if not m:
        raise UserError(f"'{path}' does not look like Blender (--version printed no version)")
    version = (int(m.group(1)), int(m.group(2)))
    if version < MIN_BLENDER:
        raise UserError(f"Blender {version[0]}.{version[1]} at '{path}' is too old; "
                        f"{MIN_BLENDER[0]}.{MIN_BLENDER[1]} or newer is needed")
    return os.path.abspath(exe)


def sbatch(script: Path, dependency: str | None = None, array: str | None = None,
           kill_on_invalid_dep: bool = False) -> str:
    cmd = ["sbatch", "--parsable"]
    if kill_on_invalid_dep:   # a failed array cancels its finishing job instead of leaving it pending
        cmd.append("--kill-on-invalid-dep=yes")
    if dependency:
        cmd.append(f"--dependency={dependency}")
    if array:
        cmd.append(f"--array={array}")
    r = _run(cmd + [str(script)])
    if r.returncode != 0:
        raise UserError(f"sbatch refused {script.name}: {r.stderr.strip()}")
    return r.stdout.strip().split(";")[0]


def queue_states(job_ids: list[str]) -> dict[str, str]:
    """{'123_4': 'RUNNING', ...} for jobs still known to squeue."""
    if not job_ids:
        return {}
    r = _run(["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i %T"])
    states = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


# ---- scripts -----------------------------------------------------------------------------------

def likeness_command(blender: str | None) -> list[str]:
    """How a task runs ``likeness``: this Python with the package, or a Blender binary."""
    if blender:
        return [blender, "-b", "--factory-startup", "--python",
                str(PACKAGE_ROOT / "render_engine" / "blender_entry.py"), "--"]
    return [sys.executable, "-m", "likeness.cli"]


def _header(name: str, log: Path, partition: str | None, time_limit: str | None,
            cpus: int | None = None, extra: list[str] = ()) -> list[str]:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --output={log}"]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if time_limit:
        lines.append(f"#SBATCH --time={time_limit}")
    if cpus:
        lines.append(f"#SBATCH --cpus-per-task={cpus}")
    lines += [f"#SBATCH {x}" for x in extra]
    return lines + ["set -euo pipefail", f"cd {shlex.quote(os.getcwd())}"]


def render_scripts(pack: Pack, out: Path, count: int, shards: int, seed: int, resolution: int,
                   partition: str | None, time_limit: str | None, blender: str | None,
                   cpus: int, jitter: bool, folder: Path) -> tuple[str, str]:
    cmd = likeness_command(blender)
    task = cmd + ["render", "--pack", str(pack.root), "--count", str(count), "--out", str(out),
                  "--seed", str(seed), "--resolution", str(resolution), "--workers", "1",
                  "--no-progress"] + (["--jitter"] if jitter else [])
    task_line = " ".join(shlex.quote(x) for x in task) + " --shard \"$SLURM_ARRAY_TASK_ID/" + str(shards) + "\""
    array = _header("likeness-render", folder / "logs" / "render-%A_%a.out", partition, time_limit,
                    cpus) + [f"echo \"likeness render shard $SLURM_ARRAY_TASK_ID/{shards} on $(hostname)\"",
                             task_line]
    finish = _header("likeness-render-finish", folder / "logs" / "finish-%j.out", partition,
                     time_limit) + [" ".join(shlex.quote(x) for x in [sys.executable, "-m", "likeness.cli",
                                                                    "farm", "finish", str(out)])]
    return "\n".join(array) + "\n", "\n".join(finish) + "\n"


def _check_out_folder(pack: Pack, out: Path, count: int, seed: int, resolution: int, jitter: bool):
    man_path = out / "manifest.json"
    if not man_path.is_file():
        return
    have = json.loads(man_path.read_text())
    want = {"pack": pack.id, "schema": pack.schema_hash, "seed": seed, "count": count,
            "resolution": resolution, "jitter": jitter}
    diff = [f"{k}: folder has {have.get(k)!r}, this job wants {v!r}" for k, v in want.items()
            if have.get(k) != v]
    if diff:
        raise UserError(f"{out} holds another dataset job; nothing was submitted:\n  " + "\n  ".join(diff))


def missing_shards(out: Path, count: int, shards: int) -> list[int]:
    """Shards with at least one incomplete sample (all of them for a new folder)."""
    if not (out / "manifest.json").is_file():
        return list(range(shards))
    from ..render_engine.dataset import dataset_status
    missing = dataset_status(out)["missing"]
    return sorted({i % shards for i in missing})


def farm_render(pack_name: str, count: int, out: str, shards: int, seed: int = 0,
                resolution: int = 256, partition: str | None = None, time_limit: str | None = None,
                blender: str | None = None, cpus: int = 1, jitter: bool = False,
                dry_run: bool = False) -> dict:
    pack = find_pack(pack_name)
    out_path = Path(out).resolve()
    if count < 1:
        raise UserError("--count must be at least 1")
    if shards < 1:
        raise UserError("--shards must be at least 1")
    if shards > count:
        raise UserError(f"--shards {shards} is larger than --count {count}: some tasks would render nothing")
    _check_out_folder(pack, out_path, count, seed, resolution, jitter)
    if blender:
        blender = check_blender(blender)
    if not dry_run:
        check_scheduler(partition)
    todo = missing_shards(out_path, count, shards)
    folder = out_path / ".farm"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    array_text, finish_text = render_scripts(pack, out_path, count, shards, seed, resolution,
                                             partition, time_limit, blender, cpus, jitter, folder)
    array_spec = ",".join(map(str, todo))
    result = {"out": str(out_path), "shards": shards, "submit_shards": todo,
              "array": array_text, "finish": finish_text}
    if dry_run:
        return result
    if not todo:
        result["note"] = "every sample is already rendered; only the finishing check was submitted"
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    array_path = folder / f"render-{stamp}.sbatch"
    finish_path = folder / f"finish-{stamp}.sbatch"
    array_path.write_text(array_text)
    finish_path.write_text(finish_text)
    record = {"kind": "render", "time": stamp, "shards": shards, "submitted_shards": todo,
              "count": count}
    if todo:
        record["array_job"] = sbatch(array_path, array=array_spec)
        record["finish_job"] = sbatch(finish_path, dependency=f"afterok:{record['array_job']}",
                                      kill_on_invalid_dep=True)
    else:
        record["finish_job"] = sbatch(finish_path)
    jobs_path = folder / "jobs.json"
    jobs = json.loads(jobs_path.read_text()) if jobs_path.is_file() else []
    jobs.append(record)
    jobs_path.write_text(json.dumps(jobs, indent=2))
    result.update(record)
    return result


GAN_STAGES = ("real", "parser", "avatar")


def retrain_scripts(pack: Pack, config: str, work: Path, baseline: bool, no_augment: bool,
                    train_real: bool, partition: str | None, time_limit: str | None, gpus: int,
                    cpus: int, folder: Path, real_labels: bool = True) -> list[tuple[str, str]]:
    """One (stage, script) per retraining stage; each runs `likeness retrain --until STAGE`, which
    skips the stages before it (finished by earlier jobs) and records its own."""
    from ..training.pipeline.retrain import get_config, stages_for, uses_device
    cfg = get_config(config)
    base = [sys.executable, "-m", "likeness.cli", "retrain", "--pack", str(pack.root), "--config",
            config, "--work", str(work)]
    base += ["--baseline"] if baseline else []
    base += ["--no-augment"] if no_augment else []
    base += ["--train-real"] if train_real else []
    base += [] if real_labels else ["--no-real-labels"]
    scripts = []
    for stage in stages_for(baseline):
        # Only the stages that put models on the device get GPUs (training.pipeline.retrain.uses_device: not
        # rendering, the calibration, labels, the pair check, export, the shape table, the bundle,
        # validation, nor G_real / the parsers when shipped weights stand in for them); every job
        # says where it trains.
        gpu = bool(gpus) and uses_device(stage, config, train_real)
        extra = [f"--gres=gpu:{gpus}"] if gpu else []
        device = ["--device", "cuda" if gpu else "cpu"]
        lines = _header(f"likeness-{stage}", folder / "logs" / f"retrain-{stage}-%j.out", partition,
                        time_limit, cpus, extra)
        if gpus > 1 and gpu and stage in GAN_STAGES:
            # Multi-GPU: train the stage with torchrun first; the retrain call then finds it done.
            steps = {"real": cfg.real_steps, "parser": cfg.parser_steps, "avatar": cfg.avatar_steps}[stage]
            gan = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={gpus}", "-m", "likeness.training.generators.train_gan", "--stage", stage,
                   "--config", cfg.gan, "--work", str(work / stage), "--steps", str(steps), *device]
            if stage == "avatar":
                gan += ["--data", str(work / "render"), "--init", str(work / "real")]
            lines += [f"R=; ls {shlex.quote(str(work / stage))}/checkpoints/step_* >/dev/null 2>&1 && R=--resume",
                      " ".join(shlex.quote(x) for x in gan) + " $R"]
        lines.append(" ".join(shlex.quote(x) for x in base + device + ["--until", stage]))
        scripts.append((stage, "\n".join(lines) + "\n"))
    return scripts


def farm_retrain(pack_name: str, config: str, work: str, *, baseline: bool = False,
                 no_augment: bool = False, train_real: bool = False, real_labels: bool = True,
                 partition: str | None = None, time_limit: str | None = None, gpus: int = 0,
                 cpus: int = 2, dry_run: bool = False) -> dict:
    from ..training.pipeline.retrain import get_config
    pack = find_pack(pack_name)
    get_config(config)                                  # unknown config: clear error first
    if baseline and no_augment:
        raise UserError("--baseline and --no-augment are different ablation rows; choose one")
    work_path = Path(work).resolve()
    if not dry_run:
        check_scheduler(partition)
    folder = work_path / ".farm"
    scripts = retrain_scripts(pack, config, work_path, baseline, no_augment, train_real, partition,
                              time_limit, gpus, cpus, folder, real_labels=real_labels)
    result = {"work": str(work_path), "stages": [s for s, _ in scripts],
              "scripts": {s: text for s, text in scripts}}
    if dry_run:
        return result
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    jobs, previous = {}, None
    for k, (stage, text) in enumerate(scripts):
        path = folder / f"retrain-{stamp}-{k:02d}-{stage}.sbatch"
        path.write_text(text)
        dep = f"afterok:{previous}" if previous else None
        previous = jobs[stage] = sbatch(path, dependency=dep, kill_on_invalid_dep=dep is not None)
    record = {"kind": "retrain", "time": stamp, "config": config, "jobs": jobs}
    jobs_path = folder / "jobs.json"
    history = json.loads(jobs_path.read_text()) if jobs_path.is_file() else []
    history.append(record)
    jobs_path.write_text(json.dumps(history, indent=2))
    result["jobs"] = jobs
    return result


def retrain_status(work: str) -> dict:
    """Per stage: done (its record says so), running/pending (scheduler), failed (with log tail)."""
    work_path = Path(work)
    jobs_path = work_path / ".farm" / "jobs.json"
    records = [r for r in (json.loads(jobs_path.read_text()) if jobs_path.is_file() else [])
               if r.get("kind") == "retrain"]
    last = records[-1]["jobs"] if records else {}
    try:
        states = queue_states(list(last.values()))
    except UserError:
        states = {}
    out = {}
    for stage, job in last.items():
        rec_path = work_path / stage / "stage.json"
        done = rec_path.is_file() and json.loads(rec_path.read_text()).get("done")
        state = states.get(job)
        if done:
            out[stage] = {"state": "done", "job": job}
        elif state:
            out[stage] = {"state": state.lower(), "job": job}
        else:
            logs = sorted((work_path / ".farm" / "logs").glob(f"retrain-{stage}-{job}.out"))
            out[stage] = {"state": "failed" if logs else "cancelled", "job": job,
                          "log_tail": _log_tail(logs[0]) if logs else ""}
    return out


def finish(out: str) -> dict:
    """The finishing job: every sample present once, no half-written files, manifest consistent."""
    from ..render_engine.dataset import dataset_status
    out_path = Path(out)
    st = dataset_status(out_path)
    problems = []
    if st["missing"]:
        shown = ", ".join(map(str, st["missing"][:20]))
        problems.append(f"{len(st['missing'])} samples missing (indices {shown}"
                        f"{', ...' if len(st['missing']) > 20 else ''})")
    if st.get("damaged"):
        problems.append(f"{len(st['damaged'])} of them damaged: files differ from what their vector "
                        f"record says ({', '.join(st['damaged'][:10])}); resubmit to render them again")
    if st["stray"]:
        problems.append(f"files that belong to no sample: {', '.join(st['stray'][:10])}")
    if st["temp_files"]:
        problems.append(f"half-written temp files left: {', '.join(st['temp_files'][:10])}")
    # Every vector file must parse and belong to this pack, seed and index.
    man = st["manifest"]
    width = man["layout"]["index_width"]
    bad = []
    for i in range(st["count"]):
        p = out_path / "vectors" / f"{i:0{width}d}.json"
        if not p.is_file():
            continue
        try:
            rec = json.loads(p.read_text())
            if rec["index"] != i or rec["seed"] != man["seed"] or rec["vector"]["pack"] != man["pack"]:
                bad.append(p.name)
        except (OSError, ValueError, KeyError):
            bad.append(p.name)
    if bad:
        problems.append(f"inconsistent vector files: {', '.join(bad[:10])}")
    if problems:
        raise UserError(f"dataset {out} is incomplete:\n  " + "\n  ".join(problems))
    done = {"complete": True, "count": st["count"], "checked": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (out_path / "COMPLETE.json").write_text(json.dumps(done, indent=2))
    return done


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def status(out: str) -> dict:
    """Done, running, failed and remaining work of a farm job folder."""
    from ..render_engine.dataset import dataset_status
    out_path = Path(out)
    st = dataset_status(out_path)
    jobs_path = out_path / ".farm" / "jobs.json"
    jobs = json.loads(jobs_path.read_text()) if jobs_path.is_file() else []
    report = {"count": st["count"], "complete_samples": st["complete_samples"],
              "missing_samples": len(st["missing"]), "damaged_samples": len(st.get("damaged", [])),
              "complete": st["complete"], "running": [], "pending": [], "failed": []}
    if not jobs:
        return report
    last = jobs[-1]
    shards = last["shards"]
    missing_by_shard = {}
    for i in st["missing"]:
        missing_by_shard[i % shards] = missing_by_shard.get(i % shards, 0) + 1
    ids = [j for j in (last.get("array_job"), last.get("finish_job")) if j]
    try:
        states = queue_states(ids)
    except UserError:
        states = {}
        report["scheduler"] = "unreachable"
    for shard in last.get("submitted_shards", []):
        key = f"{last.get('array_job')}_{shard}"
        state = states.get(key)
        if state is None and any(k.startswith(f"{last.get('array_job')}_[") for k in states):
            state = "PENDING"   # array tasks not yet started are listed as one range
        entry = {"shard": shard, "missing": missing_by_shard.get(shard, 0)}
        if state in ("RUNNING", "COMPLETING", "CONFIGURING"):
            report["running"].append(entry)
        elif state == "PENDING":
            report["pending"].append(entry)
        elif missing_by_shard.get(shard):
            log = out_path / ".farm" / "logs" / f"render-{last.get('array_job')}_{shard}.out"
            entry["log"] = str(log)
            entry["log_tail"] = _log_tail(log)
            report["failed"].append(entry)
    report["remaining_shards"] = sorted(missing_by_shard)
    return report


# ---- CLI -------------------------------------------------------------------------------------

def cli_farm_render(args) -> int:
    res = farm_render(args.pack, args.count, args.out, args.shards, seed=args.seed,
                      resolution=args.resolution, partition=args.partition, time_limit=args.time,
                      blender=args.blender, cpus=args.cpus, jitter=args.jitter, dry_run=args.dry_run)
    if args.dry_run:
        print(f"# job array ({len(res['submit_shards'])} of {res['shards']} shards to render)")
        print(res["array"])
        print("# finishing job (afterok on the array)")
        print(res["finish"])
    else:
        print(json.dumps({k: v for k, v in res.items() if k not in ("array", "finish")}))
    return 0


def cli_farm_retrain(args) -> int:
    res = farm_retrain(args.pack, args.config, args.work, baseline=args.baseline,
                       no_augment=args.no_augment, train_real=args.train_real,
                       real_labels=not args.no_real_labels, partition=args.partition,
                       time_limit=args.time, gpus=args.gpus, cpus=args.cpus, dry_run=args.dry_run)
    if args.dry_run:
        for stage, text in res["scripts"].items():
            print(f"# stage {stage} (afterok on the previous stage)")
            print(text)
    else:
        print(json.dumps({"work": res["work"], "jobs": res["jobs"]}))
    return 0


def cli_farm_finish(args) -> int:
    print(json.dumps(finish(args.out)))
    return 0


def cli_farm_status(args) -> int:
    if (Path(args.out) / "pipeline.json").is_file():          # a retrain work folder
        rep = retrain_status(args.out)
        if args.json:
            print(json.dumps(rep, indent=2))
            return 0
        for stage, e in rep.items():
            print(f"{stage:10s} {e['state']:10s} job {e['job']}")
            if e.get("log_tail"):
                print("    " + e["log_tail"].replace("\n", "\n    "))
        return 0
    rep = status(args.out)
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    print(f"{rep['complete_samples']}/{rep['count']} samples complete"
          + (" (dataset complete)" if rep["complete"] else ""))
    if rep.get("damaged_samples"):
        print(f"{rep['damaged_samples']} samples damaged (files differ from their vector records): "
              "counted as missing, rendered again by a rerun")
    for key in ("running", "pending"):
        if rep[key]:
            print(f"{key}: shards " + ", ".join(str(e["shard"]) for e in rep[key]))
    for e in rep["failed"]:
        print(f"failed: shard {e['shard']} ({e['missing']} samples missing); log {e['log']}:")
        print("    " + e["log_tail"].replace("\n", "\n    "))
    if rep.get("remaining_shards") and not rep["running"] and not rep["pending"]:
        print("resubmit the same `likeness farm render` command to render what is missing")
    return 0
