"""The one checkpoint format of everything ``training/`` trains.

A checkpoint is a folder::

    <module>.safetensors   the weights of each module, by name (``model``, ``G``, ``G_ema``, ``D``, ...)
    optim.pt               the optimiser's state dict (torch.save; loaded with weights_only=True);
                           more than one optimiser: optim_<name>.pt each (the GAN's optim_g.pt, optim_d.pt)
    tensors.pt             optional: other tensors of the run's state ({name: tensor}, e.g. the GAN's
                           path-length mean)
    rng_rank<r>.pt         optional: rank r's RNG states (``device.rng_state``), for a bit-exact resume
    state.json             plain JSON (step, config, history, ...), written last: it marks the
                           checkpoint complete

Tensors are written from CPU copies and load with ``map_location`` onto the device that resumes
them, so a checkpoint made on a GPU resumes on a CPU and the other way round. Every file is written
to a temporary name first and renamed, so a run killed while saving leaves the previous checkpoint.

The estimator's, encoder's, mapper's, imitator's and F2P's folders written before this module already
had this layout. Older GAN runs still load: their ``state.pt`` held state and optimisers in one torch
file (the shipped ``models/real_*`` and ``models/parser_*`` are such folders).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ...backend.errors import UserError
from .device import map_location

STATE = "state.json"
OPTIM = "optim.pt"
TENSORS = "tensors.pt"
LEGACY_STATE = "state.pt"


def _replace(tmp: Path, final: Path):
    os.replace(tmp, final)


def save_weights(module: nn.Module, path: Path, metadata: Mapping[str, object] | None = None):
    """One module's weights as safetensors (CPU, contiguous), atomically; ``metadata`` values are
    stored as JSON strings."""
    from safetensors.torch import save_file
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    sd = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()} or None
    save_file(sd, str(tmp), metadata=meta)
    _replace(tmp, path)


def read_metadata(path: Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


def load_weights(module: nn.Module, path: Path, what: str = "", device=None):
    """Weights of a .safetensors file into ``module`` (strict), onto ``device`` (default: where the
    module is). Unreadable files and weights that do not fit are ``UserError``s naming the file."""
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: missing ({what or type(module).__name__})")
    if device is None:
        p = next(iter(module.parameters()), None)
        device = p.device if p is not None else "cpu"
    dev = torch.device(device)
    try:
        if dev.type in ("cpu", "cuda"):
            sd = load_file(str(path), device=map_location(dev))
        else:                               # e.g. "meta" (shapes only): safetensors reads to the CPU
            sd = {k: v.to(dev) for k, v in load_file(str(path)).items()}
    except Exception as e:
        raise UserError(f"{path}: unreadable weights ({type(e).__name__}: {e})") from None
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(f"{path}: weights do not fit {what or type(module).__name__} "
                        f"({first[1].strip() if len(first) > 1 else first[0]})") from None


def save(folder, state: dict, modules: Mapping[str, nn.Module] | None = None,
         optimizers: Mapping[str, object] | None = None, tensors: Mapping[str, torch.Tensor] | None = None,
         rng: dict | None = None, rank: int = 0) -> Path:
    """Write a checkpoint folder (module docstring). Rank ``rank`` != 0 writes only its RNG file
    (weights are identical across DDP ranks)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if rng is not None:
        tmp = folder / f".rng_rank{rank}.tmp"
        torch.save({k: v.cpu() for k, v in rng.items()}, tmp)
        _replace(tmp, folder / f"rng_rank{rank}.pt")
    if rank != 0:
        return folder
    for name, mod in (modules or {}).items():
        save_weights(mod, folder / f"{name}.safetensors")
    for name, opt in (optimizers or {}).items():
        tmp = folder / f".{optim_file(name)}.tmp"
        torch.save(opt.state_dict(), tmp)
        _replace(tmp, folder / optim_file(name))
    if tensors:
        tmp = folder / f".{TENSORS}.tmp"
        torch.save({k: v.detach().cpu() for k, v in tensors.items()}, tmp)
        _replace(tmp, folder / TENSORS)
    tmp = folder / ".state.tmp"
    tmp.write_text(json.dumps(state, default=str))
    _replace(tmp, folder / STATE)
    return folder


def is_checkpoint(folder) -> bool:
    folder = Path(folder)
    return (folder / STATE).is_file() or (folder / LEGACY_STATE).is_file()


def read_state(folder) -> dict:
    """The JSON state of a checkpoint (a legacy GAN folder: its state.pt, optimisers included)."""
    folder = Path(folder)
    try:
        if (folder / STATE).is_file():
            return json.loads((folder / STATE).read_text())
        return torch.load(folder / LEGACY_STATE, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise UserError(f"{folder}: no checkpoint ({STATE})") from None
    except Exception as e:
        raise UserError(f"{folder}: unreadable checkpoint state ({type(e).__name__}: {e})") from None


def optim_file(name: str) -> str:
    return OPTIM if name == "opt" else f"optim_{name}.pt"


def _torch_load(path: Path, device):
    try:
        return torch.load(path, weights_only=True, map_location=map_location(device))
    except Exception as e:
        raise UserError(f"{path}: unreadable checkpoint file ({type(e).__name__}: {e})") from None


def load(folder, modules: Mapping[str, nn.Module] | None = None, optimizers: Mapping[str, object] | None = None,
         device=None) -> tuple[dict, dict]:
    """Load a checkpoint into ``modules`` and ``optimizers`` (by name) with every tensor on
    ``device``. -> (state, other tensors). A legacy GAN folder's state.pt holds the optimisers as
    ``opt_<name>`` and its tensors beside the state."""
    folder = Path(folder)
    state = read_state(folder)
    for name, mod in (modules or {}).items():
        load_weights(mod, folder / f"{name}.safetensors", name, device)
    legacy = not (folder / STATE).is_file()
    blob = _torch_load(folder / LEGACY_STATE, device) if legacy else None
    for name, opt in (optimizers or {}).items():
        if legacy:
            sd = blob.get(name if name.startswith("opt") else f"opt_{name}")
            if sd is None:
                raise UserError(f"{folder}: no optimiser state '{name}' (weights only: start a new run "
                                "from it with --init, not --resume)")
        else:
            path = folder / optim_file(name)
            if not path.is_file():
                raise UserError(f"{path}: missing (optimiser state '{name}')")
            sd = _torch_load(path, device)
        opt.load_state_dict(sd)
    if legacy:
        tensors = {k: v for k, v in blob.items() if isinstance(v, torch.Tensor)}
    else:
        tensors = _torch_load(folder / TENSORS, device) if (folder / TENSORS).is_file() else {}
    return state, tensors


def read_rng(folder, rank: int = 0) -> dict:
    path = Path(folder) / f"rng_rank{rank}.pt"
    if not path.is_file():
        raise UserError(f"{folder}: no RNG state for rank {rank} (interrupted checkpoint?)")
    return torch.load(path, weights_only=True, map_location="cpu")


def find(path) -> Path:
    """A checkpoint folder from itself or from a work dir (its latest.json points at the newest)."""
    path = Path(path).expanduser()
    if is_checkpoint(path):
        return path
    latest = path / "latest.json"
    if latest.is_file():
        try:
            folder = path / json.loads(latest.read_text())["path"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{latest}: unreadable") from None
        if is_checkpoint(folder):
            return folder
    raise UserError(f"{path}: no checkpoint (neither a checkpoint folder nor a work dir with latest.json)")
