"""The model contract: what an estimator ONNX file must carry, and loading/running one.

An estimator maps an aligned face crop to an avatar vector of one pack. It is one ONNX file:

Input
    ``input``: float32 [B, 3, S, S], RGB, S = ``likeness.input_size``; pixels scaled to [0, 1] and
    normalised per channel: ``(x - mean) / std``. The crop is ``backend.align.align_face(.., size=S)``.

Outputs (separate named outputs, batch dimension dynamic)
    ``continuous``: [B, n_continuous], the pack's parameters in declaration order, normalised to
    [0, 1] (``Parameter.normalize``); values outside are clamped when decoding. Absent when the
    pack has no parameters.
    ``logits_<slot>``: [B, n_options] for every slot, in the pack's slot order: unnormalised
    scores of the slot's options in declaration order (softmax gives probabilities).

Metadata (``metadata_props``, all values strings)
    ``likeness.format_version``  "1"
    ``likeness.pack``            pack id
    ``likeness.schema``          ``Pack.schema_hash`` the model was trained for
    ``likeness.input_size``      S, e.g. "256"
    ``likeness.mean``, ``likeness.std``  JSON lists of 3 floats (RGB)
    ``likeness.layout``          JSON list of blocks, continuous first, then one per slot in order:
        ``{"block": "continuous", "output": "continuous", "size": n}``
        ``{"block": "slot", "slot": name, "output": "logits_<name>", "size": k}``
    ``likeness.report``          optional JSON: training/evaluation summary shown to users

``training/estimator/export.py`` writes such files from a torch module. This module only needs numpy and
onnxruntime (runs inside Blender); with onnxruntime-gpu it runs on CUDA when asked or available.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import UserError
from .schema import Pack

FORMAT_VERSION = 1
INPUT_NAME = "input"
CONTINUOUS_OUTPUT = "continuous"
KEY_FORMAT = "likeness.format_version"
KEY_PACK = "likeness.pack"
KEY_SCHEMA = "likeness.schema"
KEY_INPUT_SIZE = "likeness.input_size"
KEY_MEAN = "likeness.mean"
KEY_STD = "likeness.std"
KEY_LAYOUT = "likeness.layout"
KEY_REPORT = "likeness.report"
REQUIRED_KEYS = (KEY_FORMAT, KEY_PACK, KEY_SCHEMA, KEY_INPUT_SIZE, KEY_MEAN, KEY_STD, KEY_LAYOUT)
DEVICES = ("auto", "cpu", "cuda")


def slot_output_name(slot_name: str) -> str:
    return f"logits_{slot_name}"


def layout_for(pack: Pack) -> list[dict[str, Any]]:
    """The ``likeness.layout`` blocks of an estimator for ``pack``."""
    blocks: list[dict[str, Any]] = [
        {"block": "continuous", "output": CONTINUOUS_OUTPUT, "size": pack.n_continuous}]
    for s in pack.slots:
        blocks.append({"block": "slot", "slot": s.name, "output": slot_output_name(s.name),
                       "size": len(s.options)})
    return blocks


def output_names(pack: Pack) -> list[str]:
    """The ONNX output names, in order (no ``continuous`` when the pack has no parameters)."""
    return [b["output"] for b in layout_for(pack) if b["size"] > 0 or b["block"] == "slot"]


def metadata_for(pack: Pack, input_size: int, mean: Sequence[float], std: Sequence[float],
                 report: dict | None = None) -> dict[str, str]:
    """The metadata_props an estimator for ``pack`` carries."""
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError("mean and std must be 3 RGB values, std positive")
    if int(input_size) < 16:
        raise ValueError(f"input_size {input_size} too small")
    meta = {
        KEY_FORMAT: str(FORMAT_VERSION), KEY_PACK: pack.id, KEY_SCHEMA: pack.schema_hash,
        KEY_INPUT_SIZE: str(int(input_size)), KEY_MEAN: json.dumps(mean), KEY_STD: json.dumps(std),
        KEY_LAYOUT: json.dumps(layout_for(pack)),
    }
    if report is not None:
        meta[KEY_REPORT] = json.dumps(report)
    return meta


@dataclass(frozen=True)
class ModelInfo:
    """The parsed, validated metadata of an estimator file."""
    path: Path
    pack_id: str
    schema: str
    input_size: int
    mean: np.ndarray
    std: np.ndarray
    layout: list[dict[str, Any]]
    format_version: int
    report: dict | None = None
    extra: dict[str, str] = field(default_factory=dict)


def _parse_metadata(path: Path, meta: dict[str, str]) -> ModelInfo:
    name = path.name
    if not any(k.startswith("likeness.") for k in meta):
        raise UserError(f"{path}: not a Likeness estimator (the ONNX file has no likeness.* metadata)")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise UserError(f"{path}: incomplete Likeness metadata, missing {', '.join(missing)}")
    try:
        version = int(meta[KEY_FORMAT])
    except ValueError:
        raise UserError(f"{path}: bad {KEY_FORMAT} '{meta[KEY_FORMAT]}'") from None
    if version > FORMAT_VERSION:
        raise UserError(f"{name}: model format {version} is newer than this Likeness supports "
                        f"({FORMAT_VERSION}); update Likeness")
    try:
        size = int(meta[KEY_INPUT_SIZE])
        mean = np.asarray(json.loads(meta[KEY_MEAN]), dtype=np.float32)
        std = np.asarray(json.loads(meta[KEY_STD]), dtype=np.float32)
        layout = json.loads(meta[KEY_LAYOUT])
        report = json.loads(meta[KEY_REPORT]) if KEY_REPORT in meta else None
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: malformed Likeness metadata ({e})") from None
    if mean.shape != (3,) or std.shape != (3,) or np.any(std <= 0) or size < 16:
        raise UserError(f"{path}: malformed Likeness metadata (input_size, mean or std)")
    if not isinstance(layout, list) or not all(isinstance(b, dict) for b in layout):
        raise UserError(f"{path}: malformed {KEY_LAYOUT}")
    return ModelInfo(path=path, pack_id=meta[KEY_PACK], schema=meta[KEY_SCHEMA], input_size=size,
                     mean=mean, std=std, layout=layout, format_version=version, report=report,
                     extra={k: v for k, v in meta.items() if k not in REQUIRED_KEYS and k != KEY_REPORT})


def check_compatible(info: ModelInfo, pack: Pack) -> None:
    """Refuse a model made for another pack or an older version of this pack's schema."""
    name = info.path.name
    if info.pack_id != pack.id:
        raise UserError(f"{name} is an estimator for pack '{info.pack_id}', not for pack '{pack.id}': "
                        f"choose a model trained for '{pack.id}'")
    if info.schema != pack.schema_hash:
        raise UserError(f"{name} is stale: it was trained for schema {info.schema} of pack '{pack.id}', "
                        f"the installed pack has schema {pack.schema_hash} (its parameters or options "
                        "changed); retrain or download the matching model")
    expected = layout_for(pack)
    got = [{k: b.get(k) for k in ("block", "slot", "output", "size") if k in b} for b in info.layout]
    want = [{k: b.get(k) for k in ("block", "slot", "output", "size") if k in b} for b in expected]
    if got != want:
        raise UserError(f"{name}: its output layout does not match pack '{pack.id}' "
                        "(inconsistent metadata; re-export the model)")


def choose_providers(device: str = "auto") -> list[str]:
    import onnxruntime as ort
    if device not in DEVICES:
        raise UserError(f"unknown device '{device}' (auto, cpu, cuda)")
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise UserError("device 'cuda' requested but this onnxruntime has no CUDA support "
                        "(install onnxruntime-gpu, or use device 'cpu')")
    if device in ("auto", "cuda") and has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class EstimatorModel:
    """A loaded, validated estimator. ``run`` maps aligned uint8 crops to normalised outputs."""

    def __init__(self, session, info: ModelInfo, pack: Pack, device: str, max_batch: int = 32):
        self.session = session
        self.info = info
        self.pack = pack
        self.device = device                    # "cuda" or "cpu": where it actually runs
        self.max_batch = max_batch
        self.input_size = info.input_size
        self._outputs = output_names(pack)
        self._scale = (1.0 / (255.0 * info.std)).astype(np.float32)
        self._shift = (-info.mean / info.std).astype(np.float32)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def preprocess(self, batch: np.ndarray) -> np.ndarray:
        """uint8 NxHxWx3 (resized to the input size when needed) -> normalised float32 NCHW."""
        batch = np.asarray(batch)
        if batch.ndim == 3:
            batch = batch[None]
        if batch.ndim != 4 or batch.shape[3] != 3:
            raise ValueError(f"expected uint8 NxHxWx3 crops, got shape {batch.shape}")
        S = self.input_size
        if batch.shape[1:3] != (S, S):
            from PIL import Image
            batch = np.stack([np.asarray(Image.fromarray(np.asarray(b, dtype=np.uint8)).resize(
                (S, S), Image.Resampling.BICUBIC)) for b in batch])
        x = batch.astype(np.float32) * self._scale + self._shift
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """(continuous N x n_continuous in [0, 1], [N x n_options probabilities per slot])."""
        batch = np.asarray(batch)
        if batch.ndim == 3:
            batch = batch[None]
        n = len(batch)
        conts, probs = [], [[] for _ in self.pack.slots]
        for i in range(0, n, self.max_batch):
            outs = self.session.run(self._outputs, {INPUT_NAME: self.preprocess(batch[i:i + self.max_batch])})
            broken = [name for name, o in zip(self._outputs, outs) if not np.isfinite(o).all()]
            if broken:      # a broken model: uniform probabilities would look like an answer
                raise UserError(f"{self.info.path.name}: the estimator gave NaN or infinite outputs "
                                f"({', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''}); the "
                                "model file is broken: retrain it or reinstall the shipped model")
            if self.pack.n_continuous:
                cont, logits = outs[0], outs[1:]
            else:
                cont, logits = np.zeros((len(outs[0]) if outs else 0, 0), np.float32), outs
            conts.append(np.clip(cont, 0.0, 1.0))
            for j, lg in enumerate(logits):
                probs[j].append(softmax(lg.astype(np.float64)).astype(np.float32))
        if n == 0:
            return (np.zeros((0, self.pack.n_continuous), np.float32),
                    [np.zeros((0, len(s.options)), np.float32) for s in self.pack.slots])
        return np.concatenate(conts), [np.concatenate(p) for p in probs]


def read_info(path: str | os.PathLike) -> ModelInfo:
    """The Likeness metadata of an estimator file without checking it against a pack."""
    path = Path(path)
    sess = _open_session(path, ["CPUExecutionProvider"], threads=1)
    return _parse_metadata(path, dict(sess.get_modelmeta().custom_metadata_map))


def _open_session(path: Path, providers: list[str], threads: int = 0):
    import onnxruntime as ort
    if not path.exists():
        raise UserError(f"model file not found: {path}")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected an .onnx estimator file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the model file is empty")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    # idle threads sleep instead of spinning: the add-on shares the machine with Blender's UI
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as e:   # InvalidProtobuf, Fail, ...: not a (valid) ONNX file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a valid ONNX model ({first[:200]})") from None


def load_model(path: str | os.PathLike, pack: Pack, device: str = "auto", threads: int = 0,
               max_batch: int = 32) -> EstimatorModel:
    """Load an estimator for ``pack``, validating the contract; ``device``: auto, cpu or cuda.

    ``threads``: onnxruntime intra-op threads (0 = its default, all cores); inside Blender a
    smaller number keeps the UI responsive.
    """
    path = Path(path)
    providers = choose_providers(device)
    sess = _open_session(path, providers, threads)
    info = _parse_metadata(path, dict(sess.get_modelmeta().custom_metadata_map))
    check_compatible(info, pack)
    inputs = sess.get_inputs()
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        raise UserError(f"{path.name}: expected one input named '{INPUT_NAME}', "
                        f"got {[i.name for i in inputs]}")
    shape = inputs[0].shape
    S = info.input_size
    if len(shape) != 4 or shape[1] != 3 or tuple(shape[2:]) != (S, S):
        raise UserError(f"{path.name}: input shape {shape} does not match [B, 3, {S}, {S}]")
    have = {o.name: o.shape for o in sess.get_outputs()}
    for block in layout_for(pack):
        if block["block"] == "continuous" and block["size"] == 0:
            continue
        out = block["output"]
        if out not in have:
            raise UserError(f"{path.name}: missing output '{out}' (outputs: {', '.join(have)})")
        if len(have[out]) != 2 or have[out][1] != block["size"]:
            raise UserError(f"{path.name}: output '{out}' has shape {have[out]}, "
                            f"expected [B, {block['size']}]")
    actual = "cuda" if sess.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
    if device == "cuda" and actual != "cuda":
        raise UserError("device 'cuda' requested but onnxruntime could not start CUDA "
                        "(check the CUDA and cuDNN libraries), use device 'cpu'")
    return EstimatorModel(sess, info, pack, actual, max_batch=max_batch)
