"""``likeness retrain``: one command from an asset pack to an installed bundle of everything the
backend reads for it.

Stages, each a folder of the work dir with a record (training/pipeline/stages.py), skipped when current,
resumed when partial, redone when its inputs changed:

    render    the pack's dataset (seeded, jittered)                       render_engine.dataset
    calibration  the pack's colour calibration (Blender; cached)          render_engine.calibration
    photo_parser the photo face parser, shared by every pack: the shipped  training.readout.photo_parser
              models/parser/parser.onnx, or fine-tuned / refitted
              (``photo_parser_steps``)
    labels    partial labels of the real TRAIN photos: the calibration,    training.estimator.real_labels
              shape surrogate on the renders, mask labels
    real      G_real on real faces (or the shipped weights)               training.generators.train_gan
    parser    the face parser on real faces (or the shipped weights)      training.generators.train_gan
    avatar    G_avatar transfer-learned from G_real on the renders        training.generators.train_gan
    encoder   inversion encoder on G_avatar's own samples                 training.pairs.invert
    invert    encoder + short optimisation for every render               training.pairs.invert
    pairs     G_real(w*) + semantic augmentation -> paired set            training.pairs.paired_data
    check     the face parser reads each realistic face; presence, hair    training.pairs.pair_check
              length and fringe labels it contradicts are left out of the
              loss (beyond the papers)
    estimator ResNet-18 estimator on the paired set                       training.estimator.model
    export    ONNX with the model contract                                training.estimator.export
    shape     the table that reads face shape and hair amount from the     training.readout.photo_shape
              photo (``shape.json``), for this estimator and parser
    bundle    estimator.onnx, calibration.json, shape.json (and the        backend.models
              parser when it was trained) with one manifest.json
    validate  the bundle on the real validation photos, as a user gets it  render_engine.validate_job

``--install`` installs the bundle whole where the backend looks first (``backend.models.
install_bundle``); the attribute reader (``models/attributes/``) is shared by every pack and reaches
this one through its option tags and the calibration, so the manifest names it, and the shared
parser, by hash.

``--baseline`` replaces real/parser/avatar/encoder/invert/pairs with the renders themselves (the
ablation's first row); ``--no-augment`` keeps domain adaptation but no semantic augmentation (the
second row). Both rows keep the real-photo labels (they are independent of the domain part);
``--no-real-labels`` trains the estimator on the pairs alone (the with/without row), and without the
shared real faces (``backend.realfaces.default_root()``) the labels stage records that it was skipped.
The report (report.md / report.json) has counts, timings and metrics.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

from ...backend.errors import UserError
from ...backend.models import SHIPPED          # models/: the shipped weights a retrain starts from
from ...backend.schema import Pack, find_pack
from ..common.provenance import licence, machine
from .stages import Pipeline, StopPipeline, write_json


@dataclass(frozen=True)
class RetrainConfig:
    name: str
    render_count: int
    render_resolution: int
    gan: str                          # training/generators/gan_configs.py
    real_steps: int
    parser_steps: int
    avatar_steps: int
    invert: str                       # training/pairs/invert.py
    paired: str                       # training/pairs/paired_data.py
    estimator: str                    # training/estimator/model.py
    estimator_epochs: int | None = None
    estimator_input: int | None = None
    validate_limit: int | None = None  # validation photos (None: all 256)
    seed: int = 0
    # Auxiliary real-photo labels (the labels stage; training.estimator.real_labels): this share of every
    # estimator batch is real TRAIN photos, scored on what their masks say.
    real_fraction: float = 0.25
    real_limit: int | None = None      # real TRAIN photos labelled (None: all 744)
    calibration_res: int = 128         # colour calibration renders (render_engine.calibration)
    calibration_points: int | None = None   # cap on a region's calibration grid (None: its default)
    invert_steps: int | None = None    # optimisation steps after the encoder (None: the invert config's)
    pair_check: bool = True            # the check stage (training.pairs.pair_check); False: keep every label
    pair_check_labels: str = "glasses,headwear,hair_length,fringe"   # which labels it checks
    half_weights: bool = False         # export float16 weights (half the file: what ships)
    augment_parts: str = ""            # "background=1,eyeglasses=0.06": the parts and λ of semantic
                                       # augmentation ("": the paired config's, the paper's defaults)
    estimator_epoch_images: int | None = None   # synthetic images per estimator epoch (None: all)
    avatar_layout: float = 0.0         # G_avatar's layout-agreement loss weight (gan lambda_layout)
    render_share: float = 0.0          # share of the estimator's synthetic images from the renders
                                       # beside the pairs (domain modes; 0: the pairs alone, the paper)
    # The photo face parser (the photo_parser stage): 0 steps keeps the shared one (by default the
    # shipped models/parser/parser.onnx); N > 0 fine-tunes it (init "shipped") or refits it (init
    # "scratch", or a parser .onnx to start from) on the real TRAIN photos, and the bundle carries it.
    photo_parser_steps: int = 0
    photo_parser_init: str = "shipped"
    photo_parser_batch: int = 16
    photo_parser_lr: float | None = None   # None: the parser config's (cosine to 5 %)
    # The shape table (the shape stage, training.readout.photo_shape)
    shape_prior: float = 0.05          # weight of staying near the estimator's sliders
    shape_hair: bool = True            # the hair entry: the hairstyle follows the photo's hair amount
    shape_limit: int | None = None     # TRAIN photos its statistics are measured on (None: real_limit)


CONFIGS = {
    "tiny": RetrainConfig("tiny", render_count=50, render_resolution=64, gan="tiny", real_steps=30,
                          parser_steps=30, avatar_steps=30, invert="tiny", paired="tiny",
                          estimator="tiny", estimator_epochs=1, estimator_input=32, validate_limit=4,
                          real_limit=64, calibration_res=64, calibration_points=8),
    # Sized for a TD's 8 hours on a 2-core CPU with the shipped G_real. Measured end to end here
    # (beside other jobs): render 35 min, G_avatar 39, encoder 14.5, inversion 1.8, pairs 14.6,
    # pair check 5, estimator 74, validation 1: 3.1 hours.
    # G_avatar: 4,000 steps with the layout loss, the twin the ablation measured (longer runs
    # drift further from G_real's layouts: README, the generators measured).
    "cpu": RetrainConfig("cpu", render_count=20000, render_resolution=256, gan="cpu",
                         real_steps=100000, parser_steps=4000, avatar_steps=4000, invert="cpu",
                         paired="cpu", estimator="cpu", estimator_epochs=10,
                         invert_steps=0, estimator_epoch_images=12000, avatar_layout=1.0),
    "small": RetrainConfig("small", render_count=50000, render_resolution=256, gan="small",
                           real_steps=200000, parser_steps=8000, avatar_steps=40000, invert="cpu",
                           paired="cpu", estimator="small"),
    "paper": RetrainConfig("paper", render_count=50000, render_resolution=512, gan="paper",
                           real_steps=800000, parser_steps=20000, avatar_steps=100000,
                           invert="paper", paired="paper", estimator="paper"),
}


def get_config(name, **overrides) -> RetrainConfig:
    """A named config (or a config) with field overrides (``--set FIELD=VALUE``)."""
    from ..common.presets import pick
    return pick(CONFIGS, name, overrides, "retrain")


def _unless_stopped(summary: dict) -> dict:
    """A GAN stage stopped by SIGINT/SIGTERM (a session's end, a preempted farm job) has written its
    checkpoint but is not finished: interrupt the pipeline so the stage is not recorded as done and
    the same command resumes it."""
    summary.pop("trainer", None)
    if summary.get("stopped"):
        raise KeyboardInterrupt(f"{summary['stage']} stopped at step {summary['step']}")
    return summary


def _shipped_digest(kind: str, gan_config: str, train: bool) -> dict:
    """The shipped weights' content in a stage's key: new shipped weights redo what used them."""
    path = None if train else shipped_weights(kind, gan_config)
    if path is None:
        return {}
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.name.encode() + f.read_bytes())
    return {"shipped": h.hexdigest()[:16]}


def shipped_weights(kind: str, gan_config: str) -> Path | None:
    """Shipped G_real / parser checkpoint folders (models/<kind>_<config>/), if any."""
    path = SHIPPED / f"{kind}_{gan_config}"
    from ..common.checkpoint import is_checkpoint
    return path if is_checkpoint(path) else None


STAGES = ("render", "calibration", "photo_parser", "labels", "real", "parser", "avatar", "encoder",
          "invert", "pairs", "check", "estimator", "export", "shape", "bundle", "validate")
# The stages whose models and batches go on --device (the others run Blender, ONNX Runtime or numpy on
# CPUs); real, parser and photo_parser only when they train (not with shipped weights).
DEVICE_STAGES = ("photo_parser", "real", "parser", "avatar", "encoder", "invert", "pairs", "estimator")


def uses_device(stage: str, config: str, train_real: bool = False) -> bool:
    """Whether ``stage`` of a retrain with ``config`` puts work on the GPU (what a farm job requests)."""
    if stage not in DEVICE_STAGES:
        return False
    cfg = get_config(config)
    if stage == "photo_parser":
        return cfg.photo_parser_steps > 0
    if stage == "parser":
        from ..pairs.invert import get_config as inv_cfg
        if inv_cfg(cfg.invert, short_steps=cfg.invert_steps).short_steps == 0:
            return False                  # encoder-only inversion: the parser stage is skipped
    if stage in ("real", "parser") and not train_real:
        return shipped_weights(stage, cfg.gan) is None
    return True
BASELINE_STAGES = ("render", "calibration", "photo_parser", "labels", "pairs", "estimator", "export",
                   "shape", "bundle", "validate")


def stages_for(baseline: bool) -> tuple[str, ...]:
    return BASELINE_STAGES if baseline else STAGES


def retrain(pack_name: str, config, work: str, *, baseline: bool = False,
            augment: bool = True, install: bool = False, train_real: bool = False,
            real_labels: bool = True, until: str | None = None, progress: bool = True,
            renders: str | None = None, generators: str | None = None, log=print,
            device: str = "auto") -> dict:
    """Run (or resume) every stage; with ``until``, stop after that stage (one farm job each).
    ``real_labels=False`` (``--no-real-labels``): the estimator trains on the pairs alone.
    ``renders``: an existing dataset of the pack (a farm's ``likeness render``) instead of the render
    stage; ``generators``: an avatar-stage work dir (``likeness train gan --stage avatar``), whose
    G_avatar and frozen G_real replace the real and avatar stages. ``device``: auto | cpu | cuda, where
    the learning stages (``DEVICE_STAGES``) put their models and batches; it is not part of any stage's
    key, so a run started on a CPU resumes on a GPU (checkpoints load on either)."""
    if until is not None and until not in stages_for(baseline):
        raise UserError(f"--until {until}: not a stage of this run ({', '.join(stages_for(baseline))})")
    try:
        return _retrain(pack_name, config, work, baseline=baseline, augment=augment, install=install,
                        train_real=train_real, real_labels=real_labels, until=until,
                        progress=progress, renders=renders, generators=generators, log=log,
                        device=device)
    except StopPipeline as stop:
        return {"pack": pack_name, "config": getattr(config, "name", config), "stopped_after": str(stop)}


def _retrain(pack_name: str, config, work: str, *, baseline: bool, augment: bool, install: bool,
             train_real: bool, real_labels: bool, until: str | None, progress: bool,
             renders: str | None, generators: str | None, log, device: str = "auto") -> dict:
    import torch
    from ..common.device import describe, resolve
    torch.set_num_threads(int(os.environ.get("LIKENESS_THREADS", "1")))
    dev = resolve(device)                 # before anything runs: --device cuda without a GPU fails now
    pack = find_pack(pack_name)
    cfg = get_config(config)
    mode = "baseline" if baseline else ("domain" if not augment else "full")
    pipe = Pipeline(work, {"pack": pack.id, "schema": pack.schema_hash, "config": cfg.name,
                           "mode": mode}, log=log, stop_after=until)
    t0 = time.time()
    log(f"learning stages on {describe(dev)}")
    render_dir = pipe.folder("render")

    if renders is not None:
        render_dir = _external_renders(renders, pack, log)
        pipe.run("render", {"external": str(render_dir), "count": _count_renders(render_dir)},
                 lambda folder: {"external": str(render_dir), "count": _count_renders(render_dir)})
    else:
        def stage_render(folder: Path) -> dict:
            from ...render_engine.dataset import Job, render_dataset
            return render_dataset(Job(pack, folder, count=cfg.render_count, seed=cfg.seed,
                                      resolution=cfg.render_resolution, jitter=True), progress=progress)

        pipe.run("render", {"count": cfg.render_count, "res": cfg.render_resolution, "seed": cfg.seed},
                 stage_render)
    calibration = _calibration_stage(pipe, pack, cfg, log)
    photo_parser = _photo_parser_stage(pipe, cfg, log, dev)
    labels = _labels_stage(pipe, pack, cfg, render_dir, real_labels and cfg.real_fraction > 0, log,
                           calibration)

    if baseline:
        def stage_pairs(folder: Path) -> dict:
            from ..pairs.paired_data import renders_to_paired_set
            size = _estimator_cfg(cfg).input_size
            renders_to_paired_set(render_dir, pack, folder, size)
            return {"pairs": str(folder), "kind": "renders"}
        pipe.run("pairs", {"kind": "baseline"}, stage_pairs, depends=("render",))
    else:
        _domain_stages(pipe, pack, cfg, render_dir, augment, train_real, generators, progress, log, dev,
                       photo_parser.get("parser"))

    est_cfg = _estimator_cfg(cfg, real_fraction=cfg.real_fraction if labels.get("used") else 0.0,
                             render_share=0.0 if baseline else cfg.render_share)

    def stage_estimator(folder: Path) -> dict:
        from ..estimator.model import train_estimator
        real = load_stage_labels(pack, pipe.folder("labels"), labels, log) if labels.get("used") else None
        rendered = None
        if est_cfg.render_share > 0:      # the renders as a paired set beside the pairs
            from ..pairs.paired_data import renders_to_paired_set
            rendered = folder / "renders"
            if not (rendered / "manifest.json").is_file():
                renders_to_paired_set(render_dir, pack, rendered, est_cfg.input_size)
        result = train_estimator(pack, pipe.folder("pairs"), folder, est_cfg, progress=progress,
                                 log=log, real_labels=real, renders=rendered, device=dev)
        if real is not None:
            result["real_labels"] = {"key": real.key, "content": real.content_key(),
                                     "photos": len(real)}
        return result

    pipe.run("estimator", asdict(est_cfg), stage_estimator,
             depends=("pairs", "labels") if baseline else
             ("pairs", "check", "labels") + (("render",) if est_cfg.render_share > 0 else ()))

    model_path = pipe.work / "model.onnx"

    def stage_export(folder: Path) -> dict:
        from ..estimator.model import IMAGENET_MEAN, IMAGENET_STD, load_trained
        from ..estimator.export import export_estimator
        model, ecfg = load_trained(pack, pipe.folder("estimator"))
        report = {"config": cfg.name, "mode": mode, "estimator": asdict(ecfg),
                  "held_out": (pipe.record("estimator") or {}).get("result"),
                  "real_labels": _labels_report(labels, ecfg.real_fraction),
                  "trained_on": _machine(dev), "licence": _licence(baseline, bool(labels.get("used")))}
        export_estimator(model, pack, folder / "model.onnx", ecfg.input_size, IMAGENET_MEAN,
                         IMAGENET_STD, report=report, half_weights=cfg.half_weights)
        shutil.copyfile(folder / "model.onnx", model_path)
        return {"model": str(model_path), "bytes": model_path.stat().st_size}

    pipe.run("export", {"half_weights": True} if cfg.half_weights else {}, stage_export,
             depends=("estimator",))

    shape = _shape_stage(pipe, pack, cfg, render_dir, model_path, photo_parser.get("parser"), log)
    bundle = _bundle_stage(pipe, pack, cfg, mode, model_path, calibration, photo_parser, shape)
    bundle_model = pipe.folder("bundle") / "estimator.onnx"

    def stage_validate(folder: Path) -> dict:
        from ...render_engine.validate_job import validate
        rep = validate(str(bundle_model), str(pack.root), str(folder), limit=cfg.validate_limit, log=log)
        return {"targets": rep["targets"], "detected": rep["detected"], "photos": rep["photos"],
                "colours": rep.get("colours"), "shape": rep.get("shape")}

    val = pipe.run("validate", {"limit": cfg.validate_limit, "of": "bundle"}, stage_validate,
                   depends=("bundle",))
    installed = None
    if install:
        from ...backend.models import install_bundle
        installed = str(install_bundle(pipe.folder("bundle"), pack))
        log(f"installed the bundle {installed} ({', '.join(bundle['files'])})")
    summary = {"pack": pack.id, "config": cfg.name, "mode": mode, "device": str(dev), "model": str(model_path),
               "bundle": bundle, "installed": installed, "counts": _counts(pipe, render_dir),
               "real_labels": _labels_report(labels, est_cfg.real_fraction),
               "timings_s": pipe.timings(),
               "wall_s_this_run": round(time.time() - t0, 1), "validation": val}
    _write_report(pipe, summary)
    return summary


def _counts(pipe: Pipeline, render_dir: Path) -> dict:
    """Data counts and the estimator's held-out figures for the report."""
    out: dict[str, Any] = {"renders": _count_renders(render_dir)}
    man = pipe.folder("pairs") / "manifest.json"
    if man.is_file():
        out["pairs"] = json.loads(man.read_text()).get("count")
    held = (pipe.record("estimator") or {}).get("result") or {}
    for key in ("n", "mean_slot_accuracy", "continuous_l1"):
        if key in held:
            out[f"held_out_{key}"] = held[key]
    return out


def _estimator_cfg(cfg: RetrainConfig, **overrides):
    from ..estimator.model import get_config as est_cfg
    return est_cfg(cfg.estimator, epochs=cfg.estimator_epochs, input_size=cfg.estimator_input,
                   epoch_images=cfg.estimator_epoch_images, **overrides)


def _count_renders(folder: Path) -> int:
    return sum(1 for _ in (folder / "vectors").glob("*.json"))


def _external_renders(path: str, pack: Pack, log) -> Path:
    """An existing render dataset of ``pack``: checked before anything trains on it."""
    folder = Path(path).expanduser().resolve()
    man = folder / "manifest.json"
    if not man.is_file():
        raise UserError(f"--renders {folder}: not a render dataset (no manifest.json; make one with "
                        "`likeness render --out`)")
    have = json.loads(man.read_text())
    if have.get("schema") not in (None, pack.schema_hash) or have.get("pack") not in (None, pack.id):
        raise UserError(f"--renders {folder}: rendered for pack {have.get('pack')} schema "
                        f"{have.get('schema')}, this run is pack {pack.id} schema {pack.schema_hash}")
    n = _count_renders(folder)
    if n == 0:
        raise UserError(f"--renders {folder}: no rendered vectors yet")
    log(f"[render] using the existing dataset {folder} ({n} renders)")
    return folder


# ---- real-photo labels -----------------------------------------------------------------------

class RealLabelSet(NamedTuple):
    labels: Any                        # training.estimator.real_labels.RealLabels
    calibration: dict                  # render_engine.calibration.calibrate_colours
    surrogate: dict | None             # training.estimator.real_labels.shape_surrogate (None: no shape labels)
    summary: dict                      # counts per label, surrogate R^2, calibration, labels key


def calibration_cache_dir(resolution: int, max_points: int | None) -> Path | None:
    """Where a calibration with these settings is cached: the shared default place for the default
    settings (``calibrate_colours``'s own), a folder of its own for others, so a reduced grid (the
    tiny config's) never replaces the full one (one file per pack and schema)."""
    from ...backend.cache import cache_root
    from ...render_engine.calibration import MAX_POINTS
    if resolution == 128 and max_points in (None, MAX_POINTS):
        return None
    return cache_root() / "calibration" / f"r{resolution}-p{max_points or MAX_POINTS}"


def build_real_labels(pack: Pack, size: int, *, renders: str | os.PathLike | None = None,
                      require_shapes: bool = False, calibration_res: int = 128,
                      calibration_points: int | None = None, limit: int | None = None,
                      root: str | os.PathLike | None = None, calibration: dict | None = None,
                      log=print) -> RealLabelSet:
    """Partial labels of the real TRAIN photos for the estimator (the ``labels`` stage of
    ``likeness retrain`` and ``scripts/input_size_study.py``):

    1. the pack's colour calibration: ``calibration`` (the calibration stage's), else made here
       (``render_engine.calibration.calibrate_colours``, Blender; cached, see
       ``calibration_cache_dir``);
    2. the shape surrogate fitted on the engine renders ``renders`` (``real_labels.
       shape_surrogate``; cached). Without ``renders`` there are no shape labels; with too few
       renders (it needs 50) the surrogate is skipped with a log line, or refused with
       ``require_shapes``;
    3. ``real_labels.real_partial_labels`` of the photos at ``size`` px (cached arrays).
    ``limit``: the first N training photos only; ``root``: the faces (default: the shared ones)."""
    from ...backend import realfaces
    from ...render_engine.calibration import MAX_POINTS, calibrate_colours
    from ..estimator.real_labels import real_partial_labels, shape_surrogate
    root = Path(root) if root else realfaces.default_root()
    if size < 16:
        raise UserError(f"real labels at {size} px: the estimator input must be at least 16 px")
    if limit is not None and limit < 10:
        raise UserError(f"real labels of {limit} photos: use at least 10 (or all)")
    points = calibration_points or MAX_POINTS
    cal = calibration or calibrate_colours(pack, calibration_res, max_points=points, log=log,
                                           cache_dir=calibration_cache_dir(calibration_res, points))
    sur, sur_summary = None, None
    if renders is not None:
        try:
            sur = shape_surrogate(pack, renders, log=log)
            sur_summary = {"measures": sur["measures"], "r2": [round(r, 3) for r in sur["r2"]],
                           "n": sur["n"]}
        except UserError as e:
            if require_shapes:
                raise
            sur_summary = {"skipped": str(e)}
            log(f"shape surrogate skipped, no shape labels: {e}")
    labels = real_partial_labels(pack, cal, "train", size=size, root=root, limit=limit, shapes=sur,
                                 log=log)
    full = labels.summary()
    summary = {"photos": len(labels), "size": int(size), "key": labels.key,
               "content": labels.content_key(), "root": str(root),
               "presence": full["presence"], "hair_length": full["hair_length"],
               "colour": {k: v["valid"] for k, v in full["colour"].items()},
               "shape": {name: int(labels.shape_valid[:, j].sum())
                         for j, name in enumerate(labels.shape_names)},
               "shape_surrogate": sur_summary,
               "calibration": {"resolution": cal["resolution"], "max_points": cal.get("max_points"),
                               "renders": cal["renders"], "fingerprint": cal["fingerprint"]}}
    return RealLabelSet(labels, cal, sur, summary)


def describe_real_labels(summary: dict) -> str:
    """One line of a ``build_real_labels`` summary (counts per label)."""
    pres = ", ".join(f"{k} {v['positive']}/{v['valid']}" for k, v in summary["presence"].items())
    hair = ", ".join(f"{k} {v}" for k, v in summary["hair_length"].items())
    colour = ", ".join(f"{k} {v}" for k, v in summary["colour"].items())
    shape = ", ".join(f"{k} {v}" for k, v in summary["shape"].items()) or "none"
    sur = summary.get("shape_surrogate") or {}
    r2 = (" (surrogate R^2 " + ", ".join(f"{m} {r:.2f}" for m, r in zip(sur["measures"], sur["r2"]))
          + ")") if "r2" in sur else ""
    return (f"real labels: {summary['photos']} train photos at {summary['size']} px; presence "
            f"(positive/valid) {pres}; hair length {hair}; colour {colour}; shape {shape}{r2}")


def _code_signature() -> str:
    """The sources the labels are made by (their cache keys hash them too)."""
    from ...backend import fidelity
    from ...render_engine import calibration
    from ..estimator import real_labels
    h = hashlib.sha256()
    for mod in (real_labels, fidelity, calibration):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:16]


def _file_digest(*paths) -> str:
    """sha256 (16 hex) of files' contents, in order: a stage's ``content`` or a key's code."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def _calibration_stage(pipe: Pipeline, pack: Pack, cfg: RetrainConfig, log) -> dict:
    """The ``calibration`` stage: the pack's colour calibration (what each colour parameter renders
    as, measured in Blender; cached per pack and settings), which the labels stage labels the real
    photos with and the bundle carries: the backend reads photo colours through it."""
    from ...render_engine import calibration as cal_mod

    def stage(folder: Path) -> dict:
        points = cfg.calibration_points or cal_mod.MAX_POINTS
        cal = cal_mod.calibrate_colours(pack, cfg.calibration_res, max_points=points,
                                        log=lambda s: log(f"[calibration] {s}"),
                                        cache_dir=calibration_cache_dir(cfg.calibration_res, points))
        path = folder / "calibration.json"
        write_json(path, cal)
        return {"calibration": str(path), "resolution": cal["resolution"],
                "max_points": cal.get("max_points"), "renders": cal["renders"],
                "regions": sorted(cal.get("regions") or {}), "fingerprint": cal["fingerprint"],
                "content": _file_digest(path)}

    return pipe.run("calibration", {"res": cfg.calibration_res, "points": cfg.calibration_points,
                                    "code": _file_digest(cal_mod.__file__)}, stage)


def _photo_parser_stage(pipe: Pipeline, cfg: RetrainConfig, log, device) -> dict:
    """The ``photo_parser`` stage: the face parser the backend reads this pack's photos with (and
    the pair check and the shape table use). Shared by every pack: the one the backend finds
    (``backend.models.find_parser``: the shipped ``models/parser/parser.onnx`` unless the user
    placed another), recorded with its hash; ``photo_parser_steps`` > 0 fine-tunes or refits it
    (``training.readout.photo_parser.fit``) and the bundle then carries the result."""
    from ...backend.models import find_parser
    from ..readout import photo_parser as pp
    shared = find_parser()
    train = cfg.photo_parser_steps > 0
    inputs = {"steps": cfg.photo_parser_steps,
              "shared": pp.sha256(shared)[:16] if shared is not None else None}
    if train:
        inputs.update(init=cfg.photo_parser_init, batch=cfg.photo_parser_batch, lr=cfg.photo_parser_lr)

    def stage(folder: Path) -> dict:
        if train:
            return pp.fit(folder, cfg.photo_parser_steps, cfg.photo_parser_batch, cfg.photo_parser_init,
                          cfg.photo_parser_lr, device=device, log=lambda s: log(f"[photo_parser] {s}"))
        if shared is None:
            log("[photo_parser] no face parser (models/parser/parser.onnx): colours and shape will "
                "come from the estimator")
            return {"parser": None, "skipped": "no face parser installed"}
        d = pp.describe(shared)
        log(f"[photo_parser] the shared parser {shared} (sha256 {d['sha256'][:16]})")
        return {**d, "parser": str(shared), "shipped": True, "content": d["sha256"][:16]}

    return pipe.run("photo_parser", inputs, stage)


def _shape_stage(pipe: Pipeline, pack: Pack, cfg: RetrainConfig, render_dir: Path, model: Path,
                 parser: str | None, log) -> dict:
    """The ``shape`` stage: the table that reads face shape and hair amount from the photo for this
    estimator (its input size and held-out photos) and parser, from the renders and the real TRAIN
    photos (``training.readout.photo_shape``). Without the faces, a parser or 50 renders it records
    why there is none (the bundle then reads shape with the estimator)."""
    from ...backend import realfaces
    from ...backend import shape_match
    from ..estimator.real_labels import file_sig
    from ..readout import photo_shape
    root = realfaces.default_root()
    limit = cfg.shape_limit or cfg.real_limit
    photos = None
    if (root / "images").is_dir():
        stems = realfaces.stems(root, "train")[:limit]
        photos = file_sig(root, stems) if stems else None
    inputs = {"prior": cfg.shape_prior, "hair": cfg.shape_hair, "limit": limit, "root": str(root),
              "photos": photos, "code": _file_digest(photo_shape.__file__, shape_match.__file__)}

    def stage(folder: Path) -> dict:
        why = None
        if parser is None:
            why = "no face parser"
        elif photos is None:
            why = f"no shared real faces at {root} (set LIKENESS_CELEBAMASK)"
        elif _count_renders(render_dir) < 50:
            why = f"{_count_renders(render_dir)} renders; the shape surrogate needs 50"
        if why:
            log(f"[shape] skipped: {why}; the bundle's shape comes from the estimator")
            return {"skipped": why}
        try:
            table = photo_shape.fit_shape_table(pack, render_dir, model, parser, prior=cfg.shape_prior,
                                                limit=limit, hair=cfg.shape_hair, root=root,
                                                log=lambda s: log(f"[shape] {s}"))
        except photo_shape.TooFewMeasures as e:
            log(f"[shape] skipped: {e}; the bundle's shape comes from the estimator")
            return {"skipped": str(e)}
        path = photo_shape.write_table(table, folder / "shape.json")
        log(f"[shape] {path}: measures {', '.join(table['measures'])}"
            + ("; hair entry" if "hair" in table else "; no hair entry"))
        return {"table": str(path), "measures": table["measures"], "hair": "hair" in table,
                "fitted": table["fitted"], "content": _file_digest(path)}

    return pipe.run("shape", inputs, stage, depends=("render", "export", "photo_parser"))


def _bundle_stage(pipe: Pipeline, pack: Pack, cfg: RetrainConfig, mode: str, model: Path,
                  calibration: dict, photo_parser: dict, shape: dict) -> dict:
    """The ``bundle`` stage: everything the backend reads for the pack in one folder with one
    manifest (``backend.models.write_bundle_manifest``): what ``--install`` installs and the
    validate stage measures."""
    from ...backend import attributes
    from ...backend import models

    def stage(folder: Path) -> dict:
        for old in folder.iterdir():
            if old.name != "stage.json":
                old.unlink()
        made_by = {}

        def put(src, name: str, by: str):
            shutil.copyfile(src, folder / name)
            made_by[name] = by

        put(model, models.FILENAME, "retrain stage 'export' (training.estimator.export)")
        put(calibration["calibration"], models.CALIBRATION,
            "retrain stage 'calibration' (render_engine.calibration.calibrate_colours)")
        if shape.get("table"):
            put(shape["table"], models.SHAPE, "retrain stage 'shape' (training.readout.photo_shape)")
        if photo_parser.get("parser") and not photo_parser.get("shipped"):
            put(photo_parser["parser"], models.BUNDLE_PARSER,
                f"retrain stage 'photo_parser' (training.readout.photo_parser, from {photo_parser['init']})")
        stages = {name: (pipe.record(name) or {}).get("key") for name in stages_for(mode == "baseline")
                  if name not in ("bundle", "validate")}
        made = {"by": "likeness retrain", "config": cfg.name, "mode": mode, "work": str(pipe.work.resolve()),
                "stage_keys": stages, "made_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "without": {k: v for k, v in (("shape.json", shape.get("skipped")),
                                               ("parser", photo_parser.get("skipped"))) if v}}
        from ... import __version__
        made["likeness"] = __version__
        parser = photo_parser.get("parser") if photo_parser.get("shipped") else None
        man = models.write_bundle_manifest(folder, pack, made_by, made, parser=parser,
                                           reader=attributes.find_reader())
        return {"folder": str(folder), "files": sorted(made_by), "content": _file_digest(man)}

    return pipe.run("bundle", {"format": models.BUNDLE_FORMAT}, stage,
                    depends=("export", "calibration", "photo_parser", "shape"))


def _labels_stage(pipe: Pipeline, pack: Pack, cfg: RetrainConfig, render_dir: Path, use: bool,
                  log, calibration: dict) -> dict:
    """The ``labels`` stage; returns its result (``used`` False when off or without the faces)."""
    from ...backend import realfaces
    from ..estimator.real_labels import file_sig
    if not use:
        def stage_off(folder: Path) -> dict:
            log("[labels] real-photo labels off (--no-real-labels): the estimator trains on the "
                "pairs alone")
            return {"used": False, "reason": "--no-real-labels"}
        return pipe.run("labels", {"use": False}, stage_off)
    root = realfaces.default_root()
    photos = None
    if root.is_dir():
        stems = realfaces.stems(root, "train")[:cfg.real_limit]
        photos = file_sig(root, stems) if stems else None
    else:
        # Faces gone since the labels were made (a farm node without the share, say): keep those
        # labels rather than retrain the estimator without them; a stage that still has to read
        # the photos says so (``load_stage_labels``).
        rec = pipe.record("labels") or {}
        if rec.get("done") and (rec.get("result") or {}).get("used") \
                and rec["inputs"].get("root") == str(root):
            log(f"[labels] the shared real faces are not at {root} now; keeping the labels made "
                "from them")
            photos = rec["inputs"].get("photos")
    size = _estimator_cfg(cfg).input_size
    inputs = {"use": True, "root": str(root), "photos": photos, "limit": cfg.real_limit,
              "size": size, "calibration": [cfg.calibration_res, cfg.calibration_points],
              "code": _code_signature()}

    def stage_labels(folder: Path) -> dict:
        if photos is None or not root.is_dir():
            log(f"[labels] skipped: no shared real faces at {root} (set LIKENESS_CELEBAMASK to "
                "the CelebAMask-HQ 1k folder); the estimator trains without real-photo labels")
            return {"used": False, "reason": f"no real training photos at {root}"}
        cal = json.loads(Path(calibration["calibration"]).read_text())
        built = build_real_labels(pack, size, renders=render_dir, calibration=cal,
                                  limit=cfg.real_limit, root=root, log=lambda s: log(f"[labels] {s}"))
        write_json(folder / "calibration.json", built.calibration)
        if built.surrogate is not None:
            write_json(folder / "shape_surrogate.json", built.surrogate)
        write_json(folder / "summary.json", built.labels.summary())
        log(f"[labels] {describe_real_labels(built.summary)}")
        return {"used": True, "limit": cfg.real_limit, **built.summary}

    return pipe.run("labels", inputs, stage_labels, depends=("render", "calibration"))


def load_stage_labels(pack: Pack, folder: Path, result: dict, log=print):
    """The ``RealLabels`` a finished labels stage made (from the cache, or remade from the
    calibration and surrogate kept in its folder: no Blender needed)."""
    from ..estimator.real_labels import real_partial_labels
    if not Path(result["root"]).is_dir():
        raise UserError(f"the estimator trains on the real labels the labels stage made, but the "
                        f"shared real faces are gone from {result['root']}: make them available "
                        "again (LIKENESS_CELEBAMASK), or run with --no-real-labels")
    cal_path, sur_path = folder / "calibration.json", folder / "shape_surrogate.json"
    if not cal_path.is_file():
        raise UserError(f"{folder} has no calibration.json although its record says it finished: "
                        "delete that folder and run again")
    shapes = json.loads(sur_path.read_text()) if sur_path.is_file() else None
    labels = real_partial_labels(pack, json.loads(cal_path.read_text()), "train",
                                 size=result["size"], root=result["root"], limit=result.get("limit"),
                                 shapes=shapes, log=log)
    recorded, now = result.get("content"), labels.content_key()
    if recorded is not None and now != recorded:
        log(f"[estimator] the real labels differ from what the labels stage recorded "
            f"({now} vs {recorded}): using the labels as they are now")
    return labels


def _labels_report(result: dict, fraction: float) -> dict:
    """What the export report and the summary say about the real-photo labels."""
    if not result.get("used"):
        return {"used": False, "reason": result.get("reason")}
    return {"used": True, "real_fraction": fraction, "photos": result["photos"],
            "presence": result["presence"], "hair_length": result["hair_length"],
            "colour": result["colour"], "shape": result["shape"],
            "shape_surrogate_r2": dict(zip(result["shape_surrogate"]["measures"],
                                           result["shape_surrogate"]["r2"]))
            if "r2" in (result.get("shape_surrogate") or {}) else None}


def _domain_stages(pipe: Pipeline, pack: Pack, cfg: RetrainConfig, render_dir: Path, augment: bool,
                   train_real: bool, generators: str | None, progress: bool, log, device=None,
                   photo_parser: str | None = None):
    import torch
    device = device or torch.device("cpu")
    from ..generators import train_gan
    from ..pairs.invert import get_config as inv_cfg
    icfg = inv_cfg(cfg.invert, short_steps=cfg.invert_steps)
    if generators is not None:
        avatar_ckpt = train_gan.find_checkpoint(generators)
        if train_gan.read_state(avatar_ckpt).get("stage") != "avatar":
            raise UserError(f"--generators {generators}: not a G_avatar run (likeness train gan "
                            "--stage avatar)")
        gen_key = {"external": str(avatar_ckpt.resolve())}
        log(f"[real, avatar] using the existing generators {avatar_ckpt} (its frozen G_real)")

    def gan_stage(kind: str, steps: int, **kw):
        def run(folder: Path) -> dict:
            shipped = None if train_real else shipped_weights(kind, cfg.gan)
            if shipped is not None:
                log(f"[{kind}] using the shipped weights {shipped}")
                return {"checkpoint": str(shipped), "shipped": True}
            resume = any(folder.glob("checkpoints/step_*"))
            s = _unless_stopped(train_gan.train(kind, cfg.gan, work_dir=folder, steps=steps,
                                                resume=resume, log=log, device=device, **kw))
            return {"checkpoint": str(folder), **{k: v for k, v in s.items() if _plain(v)}}
        return run

    if generators is None:
        pipe.run("real", {"gan": cfg.gan, "steps": cfg.real_steps, "train": train_real,
                          **_shipped_digest("real", cfg.gan, train_real)},
                 gan_stage("real", cfg.real_steps))
    else:
        pipe.run("real", gen_key, lambda folder: {"checkpoint": str(avatar_ckpt), "external": True})
    if icfg.short_steps > 0:
        pipe.run("parser", {"gan": cfg.gan, "steps": cfg.parser_steps, "train": train_real,
                            **_shipped_digest("parser", cfg.gan, train_real)},
                 gan_stage("parser", cfg.parser_steps))
    else:        # the parser only serves the optimisation's perceptual fallback
        pipe.run("parser", {"needed": False},
                 lambda folder: {"skipped": "encoder-only inversion needs no perceptual term"})

    layout = {"lambda_layout": cfg.avatar_layout} if cfg.avatar_layout else {}

    def stage_avatar(folder: Path) -> dict:
        resume = any(folder.glob("checkpoints/step_*"))
        s = _unless_stopped(train_gan.train("avatar", cfg.gan, data=str(render_dir),
                                            work_dir=folder, steps=cfg.avatar_steps, resume=resume,
                                            overrides=layout, log=log, device=device,
                                            init=pipe.record("real")["result"]["checkpoint"]))
        return {"checkpoint": str(folder), **{k: v for k, v in s.items() if _plain(v)}}

    if generators is None:
        pipe.run("avatar", {"gan": cfg.gan, "steps": cfg.avatar_steps, **layout}, stage_avatar,
                 depends=("render", "real"))
    else:
        pipe.run("avatar", gen_key, lambda folder: {"checkpoint": str(avatar_ckpt), "external": True})
    avatar_run = Path(pipe.record("avatar")["result"]["checkpoint"])

    def g_avatar():
        G, _ = train_gan.load_generator(avatar_run, device=device)
        return G

    def stage_encoder(folder: Path) -> dict:
        from ..pairs.invert import train_encoder
        train_encoder(g_avatar(), icfg, folder, progress=progress, log=log, device=device)
        return {"encoder": str(folder)}

    pipe.run("encoder", {"invert": cfg.invert}, stage_encoder, depends=("avatar",))

    def stage_invert(folder: Path) -> dict:
        from ..pairs.invert import invert_dataset, load_encoder
        G = g_avatar()
        parser = None
        if icfg.short_steps > 0:
            try:
                parser, _ = train_gan.load_parser(pipe.record("parser")["result"]["checkpoint"], device)
            except (UserError, KeyError, TypeError):
                log("[invert] no face parser available: the perceptual fallback will be reported")
        path = invert_dataset(G, load_encoder(pipe.folder("encoder"), G), render_dir, folder,
                              icfg, parser=parser, progress=progress, log=log)
        return {"latents": str(path)}

    pipe.run("invert", {"invert": cfg.invert, "short_steps": icfg.short_steps}, stage_invert,
             depends=("encoder", "parser"))

    def stage_pairs(folder: Path) -> dict:
        from ..pairs.paired_data import get_config as pair_cfg, synthesize_pairs
        G_real = train_gan.load_frozen_real(avatar_run).to(device)
        pcfg = pair_cfg(cfg.paired, size=_estimator_cfg(cfg).input_size,
                        **({} if augment else {"n_aug": 0}), **_augment_parts(cfg.augment_parts))
        synthesize_pairs(G_real, pipe.record("invert")["result"]["latents"], render_dir, pack, folder,
                         pcfg, g_avatar=g_avatar(), progress=progress, log=log)
        return {"pairs": str(folder), "augment": augment}

    pipe.run("pairs", {"paired": cfg.paired, "augment": augment,
                       **({"parts": cfg.augment_parts} if cfg.augment_parts else {})}, stage_pairs,
             depends=("invert", "avatar"))

    def stage_check(folder: Path) -> dict:
        from ..pairs.pair_check import check_pairs
        parser = photo_parser           # the photo_parser stage's: what the backend reads photos with
        if not cfg.pair_check or parser is None:
            why = "pair_check=false" if not cfg.pair_check else "no face parser installed"
            log(f"[check] skipped: {why}; every label of the pairs is kept")
            return {"skipped": why}
        return check_pairs(pipe.folder("pairs"), pack, parser, progress=progress, log=log,
                           labels=cfg.pair_check_labels.split(","))

    pipe.run("check", {"on": cfg.pair_check, "parser": str(photo_parser),
                       "labels": cfg.pair_check_labels},
             stage_check,
             depends=("pairs",))


def _augment_parts(spec: str) -> dict:
    """"background=1,eyeglasses=0.06" -> {"aug_lambdas": {...}} for the paired config ("" -> {})."""
    if not spec:
        return {}
    out = {}
    for item in spec.split(","):
        part, sep, lam = item.strip().partition("=")
        try:
            out[part] = float(lam)
        except ValueError:
            sep = ""
        if not sep:
            raise UserError(f"augment_parts '{spec}': expected PART=LAMBDA[,PART=LAMBDA...]")
    return {"aug_lambdas": out}


def _plain(v) -> bool:
    return isinstance(v, (str, int, float, bool, type(None), list, dict))


_machine = machine          # the names the report code and tests use
_licence = licence


def _write_report(pipe: Pipeline, summary: dict):
    (pipe.work / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    lines = [f"# Retrain report: pack {summary['pack']}, config {summary['config']}, {summary['mode']}",
             "", f"Machine: {_machine()}", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary["timings_s"].items()]
    c = summary.get("counts") or {}
    if c:
        lines += ["", f"Data: {c['renders']:,} renders, {c.get('pairs', 0):,} pairs"
                  + (f"; estimator held out {c['held_out_n']} pairs: mean slot accuracy "
                     f"{c['held_out_mean_slot_accuracy']:.3f}, continuous L1 "
                     f"{c['held_out_continuous_l1']:.4f}" if "held_out_n" in c else "")]
    real = summary.get("real_labels") or {}
    if real.get("used"):
        lines += ["", f"Real-photo labels: {real['photos']} TRAIN photos, {real['real_fraction']:g} "
                  "of every estimator batch; presence (positive/valid) "
                  + ", ".join(f"{k} {v['positive']}/{v['valid']}" for k, v in real["presence"].items())]
    else:
        lines += ["", f"Real-photo labels: not used ({real.get('reason')})"]
    val = summary.get("validation") or {}
    if val.get("targets"):
        lines += ["", f"Validation: {val['detected']}/{val['photos']} real photos", "",
                  "| target | value | required | met |", "|---|---|---|---|"]
        for t in val["targets"]:
            v = "n/a" if t["value"] is None else f"{t['value']:.3f}"
            lines.append(f"| {t['name']} | {v} | {t['target']} | {'yes' if t['passed'] else 'no'} |")
    (pipe.work / "report.md").write_text("\n".join(lines) + "\n")


def cli_retrain(args) -> int:
    import sys
    from ...backend.outputs import check_output_dir
    from ..common.presets import parse_set
    check_output_dir(args.work, "--work")   # before hours of work: a folder we cannot write fails now
    base = get_config(args.config)
    cfg = get_config(base, **parse_set(base, args.set))
    summary = retrain(args.pack, cfg, args.work, baseline=args.baseline,
                      augment=not args.no_augment, install=args.install, train_real=args.train_real,
                      real_labels=not args.no_real_labels, until=args.until,
                      renders=args.renders, generators=args.generators,
                      device=getattr(args, "device", "auto"),
                      log=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps({k: v for k, v in summary.items() if k != "validation"}, indent=2))
    return 0
