"""Where training runs: the device of ``--device auto|cpu|cuda``, mixed precision, DDP and data loading.

Every training entry point (``likeness train ...``, ``likeness retrain``) resolves its device once with
``resolve`` and hands the ``torch.device`` down; models, batches and losses live on it.

* ``auto``: the first CUDA device when PyTorch sees one, else the CPU. ``cuda`` without a CUDA device
  is a ``UserError`` saying why (a CPU-only torch build, or no device visible), never a silent CPU run.
  Under torchrun each rank takes ``cuda:LOCAL_RANK``.
* Mixed precision (``amp``, ``scaler``): float16 autocast with a GradScaler, on CUDA only, and only in
  the loops where it is safe: the estimator (ResNet-18 + MLP heads, L1 + cross-entropy), the inversion
  encoder and the face parser's cross-entropy. Not in the GAN (the R1 and path-length penalties take
  second derivatives, which overflow float16), the inversion optimisation (L-BFGS / Adam on a few
  latents: nothing to gain, and the line search needs exact losses), the mapper (an MLP: too small
  to gain) or the imitator and F2P (they backpropagate through a frozen GAN into discrete relaxations).
  On CUDA, float32 matmuls may use TF32 everywhere.
* DDP: NCCL when the ranks use CUDA, gloo on the CPU (``ddp_backend``).
* Data loading (``Prefetcher``): the next batch is read (memory-mapped arrays, the CPU side of the
  augmentation) in a background thread into pinned memory and copied with ``non_blocking`` while the
  GPU runs the current step; on the CPU it is a plain loop (same batches, same order).
* Checkpoints (``training.common.checkpoint``) are written from CPU copies and load with ``map_location``
  onto whichever device resumes them.
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
from typing import Callable, Iterable, Iterator

import torch

from ...backend.errors import UserError

CHOICES = ("auto", "cpu", "cuda")


def resolve(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` (or a device) -> torch.device, checked."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = torch.version.cuda
            why = (f"this PyTorch ({torch.__version__}) is a CPU-only build" if build is None else
                   f"PyTorch {torch.__version__} (CUDA {build}) sees no CUDA device "
                   f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}; check the "
                   "driver with nvidia-smi)")
            raise UserError(f"--device cuda: no CUDA device is available: {why}. Use --device cpu, "
                            "or --device auto to take a GPU only where there is one")
        if name == "cuda":
            local = os.environ.get("LOCAL_RANK")
            index = int(local) if local is not None else torch.cuda.current_device()
        else:
            try:
                index = int(name.split(":", 1)[1])
            except ValueError:
                raise UserError(f"--device {name}: expected cuda or cuda:N") from None
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
        torch.cuda.set_device(index)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda", index)
    raise UserError(f"--device {name}: choose one of {', '.join(CHOICES)}")


def describe(device: torch.device) -> str:
    """One line for logs and reports: what the run trained on."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{device} ({p.name}, {p.total_memory / 2 ** 30:.0f} GiB)"
    return f"cpu ({torch.get_num_threads()} thread(s))"


def ddp_backend(device: torch.device | str) -> str:
    """NCCL for CUDA ranks, gloo for CPU ranks."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def amp(device: torch.device, enabled: bool = True):
    """float16 autocast on CUDA (for the loops where it is safe: see the module docstring), nothing
    on the CPU (bfloat16 autocast on CPUs is slower than float32 for these models)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def scaler(device: torch.device, enabled: bool = True) -> "torch.amp.GradScaler":
    """The GradScaler that goes with ``amp``; a disabled one (``scale`` is the identity) elsewhere."""
    return torch.amp.GradScaler("cuda", enabled=bool(enabled and device.type == "cuda"))


def map_location(device: torch.device | str | None):
    """For torch.load / safetensors.load_file: tensors straight onto ``device`` (CPU by default)."""
    return str(torch.device(device)) if device is not None else "cpu"


def to(x, device: torch.device, non_blocking: bool = True):
    """Tensors (or tuples / lists / dicts of them) onto ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=non_blocking and device.type == "cuda")
    if isinstance(x, (list, tuple)):
        return type(x)(to(v, device, non_blocking) for v in x)
    if isinstance(x, dict):
        return {k: to(v, device, non_blocking) for k, v in x.items()}
    return x


def _pin(x):
    if isinstance(x, torch.Tensor):
        return x.pin_memory()
    if isinstance(x, (list, tuple)):
        return type(x)(_pin(v) for v in x)
    if isinstance(x, dict):
        return {k: _pin(v) for k, v in x.items()}
    return x


class Prefetcher:
    """Iterate ``make(i)`` for the given indices, with the batches on ``device``.

    On CUDA a background thread builds up to ``depth`` batches ahead (reading and CPU work overlap
    the GPU's step), pins them and the copy is non-blocking. On the CPU it calls ``make`` in the loop
    (threads would only fight the training for the cores). The order and content of batches never
    depend on the device, so resumed runs see the same batches."""

    def __init__(self, make: Callable[[int], object], indices: Iterable[int], device: torch.device,
                 depth: int = 2):
        self.make, self.indices, self.device, self.depth = make, list(indices), device, depth

    def __iter__(self) -> Iterator:
        if self.device.type != "cuda":
            for i in self.indices:
                yield self.make(i)
            return
        q: queue.Queue = queue.Queue(self.depth)
        stop = threading.Event()
        done = object()

        def work():
            try:
                for i in self.indices:
                    if stop.is_set():
                        return
                    q.put(_pin(self.make(i)))
                q.put(done)
            except BaseException as e:                 # surfaced in the training thread
                q.put(e)

        t = threading.Thread(target=work, daemon=True, name="likeness-prefetch")
        t.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield to(item, self.device)
        finally:
            stop.set()
            while t.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    t.join(0.05)


def loader_kwargs(device: torch.device, workers: int | None = None) -> dict:
    """Keyword arguments of a torch DataLoader that keeps a GPU busy: worker processes and pinned
    memory on CUDA, none on the CPU (workers there only compete with the training for cores)."""
    if device.type != "cuda":
        return {"num_workers": 0, "pin_memory": False}
    n = workers if workers is not None else min(8, max(1, (os.cpu_count() or 2) - 1))
    return {"num_workers": n, "pin_memory": True, "persistent_workers": n > 0,
            **({"prefetch_factor": 4} if n > 0 else {})}


def rng_state(device: torch.device) -> dict:
    """The global RNG states a bit-exact resume needs (the CPU's, and the CUDA device's)."""
    st = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict, device: torch.device):
    torch.set_rng_state(st["torch"].cpu())
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"].cpu(), device)


def synchronize(device: torch.device):
    """Wait for the device (timings of asynchronous CUDA work)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
