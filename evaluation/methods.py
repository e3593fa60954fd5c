"""Every competing photo -> vector method behind one interface.

A method gets the face already detected and aligned (``backend.align``, the CelebA-HQ frame) as a
uint8 RGB array, so every method sees exactly the same pixels and detection is counted once:

    method = load_method("onnx:models/stylized/estimator.onnx", pack)
    vector = method.predict(aligned)          # aligned: uint8 [S, S, 3], any S >= 64

Specs (``likeness eval --methods``), each optionally followed by ``=label``:
  ``default``          the estimator ``likeness create`` would use for the pack (installed or shipped)
  ``onnx:PATH``        any exported estimator (SwiftAvatar, the baseline, the ablation rows)
  ``f2p:DIR``          F2P: per-photo optimisation through the imitator (``training.baselines.f2p``)
  ``f2pv2:DIR``        F2P v2: a feed-forward predictor trained through the imitator
  ``mapper:DIR``       AgileAvatar's mapper over W+ codes of the photo (``training.baselines.mapper``)
``default`` and ``onnx:PATH`` are decoded as ``likeness create`` decodes them (photo colours, the
shape table, the attribute reader); ``@alone`` after either (``onnx:PATH@alone``) takes every option,
slider and colour from the estimator itself, the paper's setting (as ``likeness validate
--attributes model --shape model --colours model`` judges it).
Torch methods are imported only when asked for, so ONNX-only evaluation needs no torch.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..backend.errors import UserError
from ..backend.schema import AvatarVector, Pack


@runtime_checkable
class Method(Protocol):
    name: str

    def predict(self, aligned: np.ndarray) -> AvatarVector:
        """One aligned face (uint8 [S, S, 3]) -> avatar vector of the method's pack."""
        ...


class OnnxEstimator:
    """An exported estimator (the SwiftAvatar model, the baseline, any ablation row), decoded exactly
    as ``likeness create`` decodes it: presence-first options and, when the face parser and the
    pack's calibration are found, hair / skin / lip colours, a hat the parse shows and (with the
    pack's shape table) the shape sliders read from the photo (``colours="model"`` keeps the
    estimator's)."""

    def __init__(self, path: str | Path, pack: Pack, name: str | None = None, threads: int = 0,
                 colours: str | None = None, alone: bool = False):
        from ..backend.predict import Predictor
        self.path = Path(path)
        self.pack = pack
        self.name = name or self.path.stem
        modes = {"colours": "model", "shape": "model", "attributes": "model"} if alone else \
            {"colours": colours}
        self.predictor = Predictor(pack, self.path, device="cpu", threads=threads, **modes)

    def describe(self) -> str:
        return f"{self.path} ({self.predictor.colour_note})"

    def predict(self, aligned: np.ndarray) -> AvatarVector:
        from ..backend.predict import _Prepared
        from ..backend.visual import resize_square
        aligned = np.asarray(aligned, np.uint8)
        pr = self.predictor
        crop = resize_square(aligned, pr.input_size)
        cont, probs = pr.run_estimator(crop[None])
        parts, soft = pr._parse(crop[None])
        prep = _Prepared(self.name, crop, None, None, aligned.shape[:2], 1, [], {},
                         colour_crop=aligned)
        return pr._decode(prep, cont[0], [p[0] for p in probs], None if parts is None else parts[0],
                          None if soft is None else soft[0]).vector


# kind -> "module:function" taking (path, pack, name) and returning a Method
TORCH_LOADERS = {
    "f2p": "likeness.training.baselines.f2p:load_f2p_method",
    "f2pv2": "likeness.training.baselines.f2p:load_f2p_v2_method",
    "mapper": "likeness.training.baselines.mapper:load_mapper_method",
}


ALONE = "@alone"


def parse_spec(spec: str) -> tuple[str, str, str]:
    """'kind:path[@alone]=label' -> (kind, path[@alone], label)."""
    body, _, label = spec.partition("=")
    kind, sep, path = body.partition(":")
    if not sep:
        kind, path = ("default", "") if body == "default" else \
            ("default", ALONE) if body == "default" + ALONE else ("onnx", body)
    kind = kind.strip().lower()
    if path.endswith(ALONE) and kind not in ("default", "onnx"):
        raise UserError(f"method '{spec}': {ALONE} applies to default and onnx:PATH only")
    if kind not in ("default", "onnx", *TORCH_LOADERS):
        raise UserError(f"unknown method '{spec}': use default, onnx:PATH, "
                        + ", ".join(f"{k}:DIR" for k in TORCH_LOADERS) + " (each optionally =label)")
    alone = ALONE if path.endswith(ALONE) else ""
    return kind, path, label or ((kind if kind != "onnx" else Path(path[:len(path) - len(alone)]).stem)
                                 + ("-alone" if alone else ""))


def load_method(spec: str, pack: Pack, threads: int = 0) -> Method:
    kind, path, label = parse_spec(spec)
    alone = path.endswith(ALONE)
    path = path[:len(path) - len(ALONE)] if alone else path
    if kind == "default":
        from ..backend.models import find_model
        return OnnxEstimator(find_model(pack), pack, name=label, threads=threads, alone=alone)
    if kind == "onnx":
        if not Path(path).is_file():
            raise UserError(f"method '{spec}': no model file {path}")
        return OnnxEstimator(path, pack, name=label, threads=threads, alone=alone)
    if not Path(path).exists():
        raise UserError(f"method '{spec}': no such folder {path}")
    module, _, func = TORCH_LOADERS[kind].partition(":")
    try:
        loader = getattr(importlib.import_module(module), func)
    except ImportError as e:
        raise UserError(f"method '{spec}' needs the training extras (torch): {e}") from None
    return loader(path, pack, label)
