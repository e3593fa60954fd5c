"""Export a trained torch estimator to an ONNX file that follows the model contract.

THE TORCH INTERFACE an estimator implements::

    class MyEstimator(torch.nn.Module):
        def forward(self, x):               # x: float32 [B, 3, S, S], RGB, normalised:
            ...                             #    (pixels / 255 - mean) / std
            return continuous, logits       # continuous: [B, pack.n_continuous], already in [0, 1]
                                            #   (end with a sigmoid), parameters in pack order;
                                            # logits: list/tuple with one [B, n_options] tensor per
                                            #   slot, in pack.slots order (no softmax)

S, mean and std are given to ``export_estimator`` and written into the file; the backend aligns the
face to an S x S crop and normalises it the same way (``backend/contract.py`` documents the file
format: input ``input``, outputs ``continuous`` and ``logits_<slot>``, ``likeness.*`` metadata).

``export_estimator`` exports with a dynamic batch dimension, writes the metadata, then checks
onnxruntime against torch on random inputs at two batch sizes (max abs diff < 1e-4) and raises
``ExportError`` otherwise.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ...backend import contract
from ...backend.schema import Pack

OPSET = 17
PARITY_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The exported ONNX file does not reproduce the torch model."""


class _Flat(nn.Module):
    """(continuous, [logits...]) -> a flat tuple matching the contract's output order."""

    def __init__(self, model: nn.Module, with_continuous: bool):
        super().__init__()
        self.model = model
        self.with_continuous = with_continuous

    def forward(self, x):
        continuous, logits = self.model(x)
        outs = tuple(logits)
        return ((continuous,) + outs) if self.with_continuous else outs


def _check_outputs(model: nn.Module, pack: Pack, x: torch.Tensor):
    with torch.no_grad():
        out = model(x)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ValueError("the estimator's forward must return (continuous, [logits per slot])")
    cont, logits = out
    B = x.shape[0]
    if tuple(cont.shape) != (B, pack.n_continuous):
        raise ValueError(f"continuous output has shape {tuple(cont.shape)}, pack '{pack.id}' needs "
                         f"({B}, {pack.n_continuous})")
    if len(logits) != len(pack.slots):
        raise ValueError(f"{len(logits)} logits tensors for {len(pack.slots)} slots of pack '{pack.id}'")
    for s, lg in zip(pack.slots, logits):
        if tuple(lg.shape) != (B, len(s.options)):
            raise ValueError(f"slot '{s.name}': logits shape {tuple(lg.shape)}, expected ({B}, {len(s.options)})")
    if cont.numel() and (float(cont.min()) < -1e-6 or float(cont.max()) > 1 + 1e-6):
        raise ValueError("continuous outputs must lie in [0, 1] (end the head with a sigmoid)")


def export_estimator(model: nn.Module, pack: Pack, path: str | os.PathLike, input_size: int,
                     mean: Sequence[float], std: Sequence[float], report: dict | None = None,
                     *, tolerance: float = PARITY_TOLERANCE, seed: int = 0,
                     half_weights: bool = False, half_tolerance: float = 2e-2) -> Path:
    """Write ``model`` as a contract-following ONNX estimator for ``pack`` at ``path``.

    Returns the path. Raises ``ValueError`` when the model's outputs do not fit the pack and
    ``ExportError`` when onnxruntime and torch disagree by more than ``tolerance``.
    ``half_weights``: store large weights as float16 (cast back to float32 inside the graph), halving
    the file for shipping; parity is then checked against ``half_tolerance``.
    """
    import onnx
    import onnxruntime as ort

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = contract.metadata_for(pack, input_size, mean, std, report)
    was_training = model.training
    model.eval()
    try:
        gen = torch.Generator().manual_seed(seed)
        probe = torch.randn(2, 3, input_size, input_size, generator=gen)
        _check_outputs(model, pack, probe)
        with_cont = pack.n_continuous > 0
        flat = _Flat(model, with_cont).eval()
        names = contract.output_names(pack)
        dynamic = {contract.INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in names}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # TorchScript exporter deprecation notices
            torch.onnx.export(flat, (probe,), str(path), dynamo=False, opset_version=OPSET,
                              input_names=[contract.INPUT_NAME], output_names=names,
                              dynamic_axes=dynamic, do_constant_folding=True)
        proto = onnx.load(str(path))
        del proto.metadata_props[:]
        for k, v in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        proto.producer_name = "likeness"
        proto.doc_string = f"Likeness estimator for pack '{pack.id}' (schema {pack.schema_hash})"
        if half_weights:
            proto = halve_weights(proto)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(path))
        tolerance = half_tolerance if half_weights else tolerance

        # parity: onnxruntime vs torch at two batch sizes
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        worst = 0.0
        for batch in (1, 3):
            x = torch.rand(batch, 3, input_size, input_size, generator=gen) * 4 - 2
            with torch.no_grad():
                ref = [t.numpy() for t in flat(x)]
            got = sess.run(names, {contract.INPUT_NAME: x.numpy()})
            for name, r, g in zip(names, ref, got):
                if r.shape != g.shape:
                    raise ExportError(f"{path}: output '{name}' has shape {g.shape} in onnxruntime, "
                                      f"{r.shape} in torch (batch {batch})")
                worst = max(worst, float(np.abs(r - g).max()))
        if not worst < tolerance:
            raise ExportError(f"{path}: onnxruntime differs from torch by {worst:.3g} "
                              f"(tolerance {tolerance:g})")
    finally:
        model.train(was_training)
    return path


def halve_weights(proto, min_elements: int = 1024):
    """Store float32 initializers of at least ``min_elements`` as float16 plus a Cast to float32.

    Computation stays float32 (the Cast runs once per session on the CPU provider's constant
    folding), only the file shrinks: a ResNet-18 estimator goes from ~45 MB to ~23 MB.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    graph = proto.graph
    keep, casts = [], []
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and np.prod(init.dims) >= min_elements:
            half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16),
                                           name=init.name + "__fp16")
            keep.append(half)
            casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT,
                                          name=init.name + "__cast"))
        else:
            keep.append(init)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    return proto


def export_stand_in(pack: Pack, path, input_size: int = 128):
    """The real estimator architecture (``model.Estimator``) with random weights (seed 0), exported
    under the contract: a model whose choices mean nothing but whose cost equals a trained one's
    (benchmarks and demos without a trained model)."""
    from .model import IMAGENET_MEAN, IMAGENET_STD, Estimator
    torch.manual_seed(0)
    return export_estimator(Estimator(pack.n_continuous, pack.slot_sizes), pack, path, input_size,
                            IMAGENET_MEAN, IMAGENET_STD)
