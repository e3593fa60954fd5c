"""Which of the dlib descriptor network's inner activations help the reader's heads (TRAIN photos only).

    python scripts/descriptor_map_study.py features --out FEATS.npz
    python scripts/descriptor_map_study.py score --features FEATS.npz --cache CACHE \
        --attributes hat,glasses,bangs --blocks crown_q8,descriptor_q8 [--seeds 100,101,102] [--json out.json]

The descriptor (128-d) is trained to name a person whatever they wear, so what a viewer labels
(glasses, a hat, a fringe) is what it learns to discard; the network's inner levels still hold it.
``features`` runs ``--reader``'s ``descriptor.onnx`` (an export with the ``map`` output: the shipped
one) with three inner tensors as extra outputs on every
TRAIN photo's views (``backend.attributes.DESCRIPTOR_VIEWS``, through the reader's own path: detect,
align, the colour crop) and stores, per view V:

* ``V_pool``: the 256 values the descriptor's last layer projects (before the fc);
* ``V_q4`` / ``V_r4``: the 256-channel level (4 x 4) on 2 x 2 cells / on its 4 rows;
* ``V_q8``: the 128-channel level (8 x 8) on 4 x 4 cells: what ``descriptor.onnx`` now gives as
  its ``map`` output (``descriptor_map``, ``crown_map``).

``score``: for each attribute, ``--reader``'s head's blocks U against U + each candidate block,
standardised, 5-fold cross-validated balanced accuracy as the mean over ``--seeds``' fold
assignments (the L2 weight chosen among ``LAMBDAS``), on the features of ``CACHE`` (the reader's
cached TRAIN features, each photo parsed by the cross-fitted parser that never saw it).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import head_study  # noqa: E402  (scripts/ is not a package)

def inner_tensors(model) -> dict[str, str]:
    """The graph's names of the three inner tensors: the descriptor's input (256, before the fc),
    the last 256-channel block's output (4 x 4) and the 128-channel level (8 x 8, the input of
    ``map``'s pooling)."""
    made = {o: n for n in model.graph.node for o in n.output}
    level4 = [o for o in made if o.endswith("blocks.12/Relu_1_output_0")]
    if len(level4) != 1:
        raise SystemExit("descriptor.onnx: not the graph training/readout/dlib_port.py exports")
    return {"pool": made["descriptor"].input[0], "level4": level4[0], "level3": made["map"].input[0]}


def inner_session(path: Path):
    """``descriptor.onnx`` with the ``inner_tensors`` as extra outputs."""
    import onnx
    import onnxruntime as ort
    model = onnx.load(str(path))
    names = inner_tensors(model)
    for name in names.values():
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    session.inner = list(names.values())
    return session


def inner_blocks(session, chip: np.ndarray) -> dict[str, np.ndarray]:
    """One normalised chip [1, 3, 150, 150] -> the candidate blocks of one view."""
    pool, l4, l3 = session.run(session.inner, {"images": chip})
    l4, l3 = l4[0], l3[0]                                                    # [256,4,4], [128,8,8]
    return {"pool": pool[0].ravel(),
            "q4": l4.reshape(256, 2, 2, 2, 2).mean((2, 4)).ravel(),
            "r4": l4.mean(2).ravel(),
            "q8": l3.reshape(128, 4, 2, 4, 2).mean((2, 4)).ravel()}


def features(reader: Path, out: Path, log=print) -> None:
    from likeness.backend import attributes as A
    from likeness.backend import realfaces
    from likeness.training.readout import attributes as T
    root = realfaces.default_root()
    stems = T.train_stems(root)
    session = inner_session(reader / "descriptor.onnx")
    rows: dict[str, list] = {}
    kept = []
    for i, s, prep in T.prepared_photos(stems, root, T.photo_predictor(), log):
        big = prep.colour_crop if prep.colour_crop is not None else prep.crop
        for view, box in A.DESCRIPTOR_VIEWS.items():
            for k, v in inner_blocks(session, A.face_chip(big, 150, box)).items():
                rows.setdefault(f"{view}_{k}", []).append(v)
        kept.append(s)
        if (i + 1) % 100 == 0:
            log(f"  {i + 1}/{len(stems)} photos")
    np.savez(out, stems=np.array(kept), **{k: np.array(v) for k, v in rows.items()})


def score(reader: Path, feats: Path, cache: Path, attributes, candidates, seeds, log=print) -> dict:
    from likeness.backend import attributes as A
    shipped = json.loads((reader / "reader.json").read_text())["heads"]
    raw, Xs, blocks, targets = head_study.train_features(cache)
    extra = np.load(feats)
    if list(extra["stems"]) != list(raw["stems"]):
        raise SystemExit(f"{feats} and {cache} hold different photos")
    from likeness.training.readout.attributes import standardise
    parts = [Xs] + [(extra[c] - mu) / sd for c in candidates for mu, sd in [standardise(extra[c])]]
    X = np.concatenate(parts, 1)
    masks = {b: np.concatenate([m, np.zeros(X.shape[1] - len(m), bool)]) for b, m in blocks.items()}
    start = Xs.shape[1]
    for c, p in zip(candidates, parts[1:]):
        masks[c] = np.zeros(X.shape[1], bool)
        masks[c][start:start + p.shape[1]] = True
        start += p.shape[1]
    rows = {}
    for attr in attributes:
        y = targets[attr]
        keep, k = y >= 0, len(A.HEAD_CLASSES[attr])
        base = shipped[attr]["features"].split("+")
        row = {}
        for name, bl in [("U", base)] + [(f"U+{c}", base + [c]) for c in candidates]:
            lam, cv, per = head_study.score_blocks(X[keep], y[keep], k,
                                                   np.any([masks[b] for b in bl], 0), seeds=seeds)
            row[name] = {"lambda": lam, "cv": cv, "per_seed": per}
            log(f"{attr:13s} {name:22s} {cv:.4f} (L2 {lam:g}; per assignment "
                f"{', '.join(f'{p:.3f}' for p in per)})")
        rows[attr] = row
    return {"photos": len(raw["stems"]), "seeds": list(seeds), "attributes": rows,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("features", "score"))
    ap.add_argument("--reader", default="models/attributes", help="the shipped reader's folder")
    ap.add_argument("--out", help="features: the .npz to write")
    ap.add_argument("--features", help="score: the .npz that features wrote")
    ap.add_argument("--cache", help="score: the reader's --cache folder (its format-8 or -9 TRAIN features)")
    ap.add_argument("--attributes", default="hat,glasses,bangs")
    ap.add_argument("--blocks", default="crown_q8,descriptor_q8", help="candidates, VIEW_KIND")
    ap.add_argument("--seeds", default="100,101,102")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if a.step == "features":
        if not a.out:
            ap.error("features needs --out")
        features(Path(a.reader), Path(a.out))
        return 0
    if not (a.features and a.cache):
        ap.error("score needs --features and --cache")
    out = score(Path(a.reader), Path(a.features), Path(a.cache).expanduser(), a.attributes.split(","),
                a.blocks.split(","), tuple(int(s) for s in a.seeds.split(",")))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
