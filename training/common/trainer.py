"""The one training loop: a model's step function in; resume, checkpoints, SIGINT/SIGTERM, progress,
device and logging out.

Each model (GAN, face parser, inversion encoder, estimator, mapper, imitator, F2P v2) keeps only its
own step and losses::

    t = Trainer("estimator", work / "checkpoint", state, modules={"model": net}, optimizers={"opt": opt},
                device=device, total=total, checkpoint_every=500, log=log)
    t.resume(check=lambda saved: ...)      # loads weights, optimisers and state when the folder has them
    t.run(step, steps_per_epoch=n, epoch_start=..., epoch_end=..., max_steps=...)

``step(t)`` runs one optimisation step and returns its stats ({name: float or 0-d tensor}); every
stat must be finite or the run stops with a ``UserError`` (nothing saved for that step; the last
checkpoint stays). The loop keeps ``state[step_key]`` (the global step) and, with
``steps_per_epoch``, ``state["epoch"]`` and ``state["step_in_epoch"]``: steps depend only on these
and on what the model seeds from them, so a resumed run reproduces the uninterrupted one.

Stops: ``max_steps`` (a checkpoint, then ``run`` returns "max_steps"); SIGINT or SIGTERM (the
current step finishes, a checkpoint is written, then ``run`` returns "stopped" or, with
``raise_on_stop``, raises KeyboardInterrupt so a pipeline does not record the stage as done; a
second SIGINT interrupts at once); the end ("done").
"""
from __future__ import annotations

import math
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Mapping

import torch

from ...backend.errors import UserError
from ...backend.progress import Progress
from . import checkpoint as ckpt_mod


class StopFlag:
    """SIGINT/SIGTERM set ``stop``; the loop checkpoints and exits after the current step. A second
    SIGINT interrupts at once. Outside the main thread signals cannot be caught: a no-op."""

    def __init__(self):
        self.stop, self._old = False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "--:--:--"
    s = int(s)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Trainer:
    def __init__(self, name: str, folder, state: dict, *, modules: Mapping[str, torch.nn.Module] | None = None,
                 optimizers: Mapping[str, object] | None = None, device: torch.device | None = None,
                 total: int, checkpoint_every: int = 0, log: Callable[[str], None] = print,
                 progress: bool = True, step_key: str = "global_step", tensors: Callable[[], dict] | None = None,
                 images_per_step: int | None = None, log_every: int = 0,
                 save: Callable[["Trainer"], Path] | None = None, reduce: Callable[[dict, bool], tuple] | None = None,
                 diverged_hint: str = "lower the learning rate", rank: int = 0,
                 on_diverged: Callable[[int, dict], None] | None = None):
        self.name, self.folder, self.state = name, Path(folder), state
        self.modules, self.optimizers = dict(modules or {}), dict(optimizers or {})
        self.device = device or torch.device("cpu")
        self.total, self.checkpoint_every = int(total), int(checkpoint_every)
        self.log, self.progress, self.step_key = log, progress, step_key
        self.tensors, self.images_per_step, self.log_every = tensors, images_per_step, log_every
        self._save, self._reduce, self.hint, self.rank = save, reduce, diverged_hint, rank
        self.on_diverged = on_diverged
        self.state.setdefault(step_key, 0)
        self.last_checkpoint: Path | None = None
        self.stats: dict = {}

    # ---- checkpoints --------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return int(self.state[self.step_key])

    def resume(self, check: Callable[[dict], None] | None = None) -> dict | None:
        """Load the folder's checkpoint (after ``check(saved_state)``, which raises to refuse it) onto
        the device; -> the other saved tensors, or None when there is no checkpoint."""
        if not (self.folder / ckpt_mod.STATE).is_file():
            return None
        saved = ckpt_mod.read_state(self.folder)
        if check is not None:
            check(saved)
        state, tensors = ckpt_mod.load(self.folder, self.modules, self.optimizers, self.device)
        self.state.clear()
        self.state.update(state)
        return tensors

    def save(self) -> Path:
        if self._save is not None:
            self.last_checkpoint = self._save(self)
        else:
            self.last_checkpoint = ckpt_mod.save(self.folder, self.state, self.modules, self.optimizers,
                                                 self.tensors() if self.tensors else None, rank=self.rank)
        return self.last_checkpoint

    # ---- the loop -----------------------------------------------------------------------------
    def _check_finite(self, stats: dict):
        bad = [k for k, v in stats.items() if not math.isfinite(v)]
        if bad:
            where = self.last_checkpoint or (self.folder if (self.folder / ckpt_mod.STATE).is_file() else None)
            if where is None:
                try:
                    where = ckpt_mod.find(self.folder)
                except UserError:
                    pass
            msg = (f"{self.name} training diverged at step {self.step}: "
                   f"{', '.join(f'{k}={stats[k]}' for k in bad)}. Nothing was saved for this step; "
                   f"the last good checkpoint is {where or 'none'}. Resume from it after you {self.hint}.")
            self.log(msg)
            if self.on_diverged is not None:
                self.on_diverged(self.step, stats)
            raise UserError(msg)

    def run(self, step: Callable[["Trainer"], dict], *, steps_per_epoch: int | None = None,
            epoch_start: Callable[[int], None] | None = None, epoch_end: Callable[[int], None] | None = None,
            after_step: Callable[[int, dict], None] | None = None, max_steps: int | None = None,
            raise_on_stop: bool = False) -> str:
        st, key = self.state, self.step_key
        epochs = steps_per_epoch is not None
        if epochs:
            st.setdefault("epoch", 0)
            st.setdefault("step_in_epoch", 0)
        bar = Progress(self.total, self.name, enabled=self.progress and self.rank == 0)
        bar.n = self.step
        t0 = time.monotonic()
        win_step, win_t, sums, counts = self.step, t0, {}, {}
        started_epoch = None
        result = "done"

        def finish_epoch():
            if epoch_end is not None:
                epoch_end(st["epoch"])
            st["epoch"] += 1
            st["step_in_epoch"] = 0

        with StopFlag() as flag:
            while self.step < self.total:
                if epochs and st["step_in_epoch"] >= steps_per_epoch:    # an older checkpoint, saved
                    finish_epoch()                                      # before its epoch's end
                    self.save()
                    continue
                if epochs and started_epoch != st["epoch"]:
                    started_epoch = st["epoch"]
                    if epoch_start is not None:
                        epoch_start(st["epoch"])
                raw = step(self)
                stats = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in raw.items()}
                stop = flag.stop
                if self._reduce is not None:                      # DDP: the ranks' mean, and one stop
                    stats, stop = self._reduce(stats, stop)
                self._check_finite(stats)
                self.stats = stats
                st[key] = self.step + 1
                if epochs:
                    st["step_in_epoch"] += 1
                bar.update()
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
                n = self.step
                if self.log_every and (n % self.log_every == 0 or n == self.total or stop):
                    now = time.monotonic()
                    per = self.images_per_step or 1
                    rate = (n - win_step) * per / max(now - win_t, 1e-9)
                    eta = (self.total - n) * per / rate if rate > 0 else float("inf")
                    avg = "  ".join(f"{k} {v / counts[k]:.4f}" for k, v in sorted(sums.items()))
                    self.log(f"step {n}/{self.total}  {avg}  {rate:.1f} img/s  elapsed {fmt_time(now - t0)}"
                             f"  ETA {fmt_time(eta)}")
                    win_step, win_t, sums, counts = n, now, {}, {}
                if after_step is not None:
                    after_step(n, stats)
                end_of_epoch = epochs and st["step_in_epoch"] >= steps_per_epoch
                if end_of_epoch:
                    finish_epoch()
                if (end_of_epoch or (self.checkpoint_every and n % self.checkpoint_every == 0)
                        or n == self.total or stop or (max_steps is not None and n >= max_steps)):
                    self.save()
                if max_steps is not None and n >= max_steps and n < self.total:
                    result = "max_steps"
                    break
                if stop:
                    result = "stopped"
                    self.log(f"{self.name} stopped at step {n} on request; the same command resumes it")
                    break
            if result == "done" and epochs and st["step_in_epoch"] >= steps_per_epoch:
                finish_epoch()                                          # (the older checkpoint again)
                self.save()
        bar.close()
        if result == "stopped" and raise_on_stop:
            raise KeyboardInterrupt(f"{self.name} stopped at step {self.step}")
        return result
