"""Resumable pipeline stages: each owns a folder in the work dir with a small record.

``work/<stage>/stage.json`` holds the hash of the stage's inputs (its config and the records of the
stages it reads), whether it finished, its result summary and timings. A stage is skipped when
finished and current, resumed when partial (the stage's own code resumes from its checkpoints),
and redone when its inputs changed; the stale folder is moved aside, never deleted.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ...backend.errors import UserError


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json(path: Path, data: dict):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def stage_result(work, stage: str) -> dict:
    """The result a finished or partial stage recorded in ``work/<stage>/stage.json`` ({} when none)."""
    try:
        return json.loads((Path(work) / stage / "stage.json").read_text())["result"] or {}
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return {}


def render_folder(work) -> Path:
    """A retrain's rendered dataset: ``work/render``, or the folder its render stage recorded when the
    renders were made elsewhere (``likeness retrain --renders DIR``)."""
    external = stage_result(work, "render").get("external")
    return Path(external) if external else Path(work) / "render"


def _output_key(record: dict) -> str | None:
    """What a later stage depends on: the stage's ``content`` digest when its result names one (a
    stage redone with new inputs that made the same output leaves later stages current: the real
    labels remade after a code edit that did not change them), else the key of its inputs."""
    content = (record.get("result") or {}).get("content") if record.get("done") else None
    return f"content:{content}" if content else record.get("key")


def _key_without_new_defaults(inputs: dict, had: Any, upstream: dict) -> str | None:
    """The key ``inputs`` would have had without the settings a stage's record lacks whose value
    is off (0, False, "", None): a config field added by a newer Likeness at its default leaves
    finished and partial stages current (a TD's hours of training survive an update)."""
    if not isinstance(had, dict):
        return None
    new = [k for k, v in inputs.items() if k not in had and not v]
    if not new:
        return None
    return _hash({"inputs": {k: v for k, v in inputs.items() if k not in new}, "upstream": upstream})


class StopPipeline(Exception):
    """Raised after the stage named ``stop_after`` has finished (farm jobs run one stage each)."""


class Pipeline:
    """The work folder of one retraining job (one pack, one config)."""

    def __init__(self, work: str | os.PathLike, identity: dict, log: Callable[[str], None] = print,
                 stop_after: str | None = None):
        self.stop_after = stop_after
        self.work = Path(work)
        self.log = log
        self.identity = identity
        self.work.mkdir(parents=True, exist_ok=True)
        path = self.work / "pipeline.json"
        if path.is_file():
            have = json.loads(path.read_text())
            diff = [f"{k}: folder has {have.get(k)!r}, this run wants {v!r}"
                    for k, v in identity.items() if have.get(k) != v]
            if diff:
                raise UserError(f"work folder {self.work} belongs to another job; use another "
                                "--work folder:\n  " + "\n  ".join(diff))
        else:
            write_json(path, identity)
        self.records: dict[str, dict] = {}
        self.heartbeat_seconds = 30.0

    def folder(self, name: str) -> Path:
        return self.work / name

    def record(self, name: str) -> dict | None:
        path = self.folder(name) / "stage.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def run(self, name: str, inputs: dict, fn: Callable[[Path], dict], depends: tuple[str, ...] = ()) -> dict:
        """Run stage ``name`` unless it is finished and current; returns its result summary."""
        result = self._run(name, inputs, fn, depends)
        if name == self.stop_after:
            raise StopPipeline(name)
        return result

    def _run(self, name: str, inputs: dict, fn: Callable[[Path], dict], depends: tuple[str, ...]) -> dict:
        upstream = {d: _output_key(self.records.get(d) or self.record(d) or {}) for d in depends}
        key = _hash({"inputs": inputs, "upstream": upstream})
        folder = self.folder(name)
        rec = self.record(name)
        if rec and rec.get("key") != key and rec.get("key") == _key_without_new_defaults(
                inputs, rec.get("inputs"), upstream):
            self.log(f"[{name}] new settings at their defaults since it ran: still current")
        elif rec and rec.get("key") != key:
            stale = self.work / f"{name}.stale-{time.strftime('%Y%m%d-%H%M%S')}"
            n = 1
            while stale.exists():          # two redos within a second
                n += 1
                stale = stale.with_name(f"{name}.stale-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
            self.log(f"[{name}] inputs changed since it ran; moving the old folder to {stale.name}")
            folder.rename(stale)
            rec = None
        if rec and rec.get("done"):
            self.log(f"[{name}] current, skipped ({rec.get('seconds', 0):.0f} s when it ran)")
            self.records[name] = rec
            return rec["result"]
        folder.mkdir(parents=True, exist_ok=True)
        resumed = rec is not None
        started = time.time()
        previous = rec.get("seconds", 0.0) if rec else 0.0
        rec = {"stage": name, "key": key, "inputs": inputs, "upstream": upstream, "done": False,
               "started": started, "seconds": previous}
        write_json(folder / "stage.json", rec)
        self.log(f"[{name}] {'resuming' if resumed else 'starting'}")
        # A long stage may be stopped (a session ends, a job is preempted) and resumed: the record's
        # time is kept current so the report's stage timings add up every sitting's work.
        stop = threading.Event()
        lock = threading.Lock()

        def heartbeat():
            while not stop.wait(self.heartbeat_seconds):
                with lock:
                    if not stop.is_set():
                        write_json(folder / "stage.json",
                                    {**rec, "seconds": previous + time.time() - started})

        beat = threading.Thread(target=heartbeat, daemon=True)
        beat.start()
        try:
            result = fn(folder)
        finally:
            with lock:
                stop.set()
            beat.join()
        rec.update(done=True, result=result, seconds=previous + time.time() - started)
        write_json(folder / "stage.json", rec)
        self.records[name] = rec
        self.log(f"[{name}] done in {rec['seconds']:.0f} s")
        return result

    def timings(self) -> dict[str, float]:
        recs = [json.loads(p.read_text()) for p in self.work.glob("*/stage.json")]
        return {r["stage"]: round(r.get("seconds", 0.0), 1)
                for r in sorted(recs, key=lambda r: r.get("started", 0))}
