"""``likeness retrain``: one command from an asset pack to an installed estimator.

Stages, each a folder of the work dir with a record (training/stages.py), skipped when current,
resumed when partial, redone when its inputs changed:

    render    the pack's dataset (seeded, jittered)                       render_engine.dataset
    real      G_real on real faces (or the shipped weights)               training.train_gan
    parser    the face parser on real faces (or the shipped weights)      training.train_gan
    avatar    G_avatar transfer-learned from G_real on the renders        training.train_gan
    encoder   inversion encoder on G_avatar's own samples                 training.invert
    invert    encoder + short optimisation for every render               training.invert
    pairs     G_real(w*) + semantic augmentation -> paired set            training.paired_data
    estimator ResNet-18 estimator on the paired set                       training.estimator
    export    ONNX with the model contract                                training.export
    validate  fidelity on the real validation photos                      render_engine.validate_job

``--baseline`` replaces real/parser/avatar/encoder/invert/pairs with the renders themselves (the
ablation's first row); ``--no-augment`` keeps domain adaptation but no semantic augmentation (the
second row). The report (report.md / report.json) has counts, timings and metrics.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..backend.errors import UserError
from ..backend.schema import Pack, find_pack
from .stages import Pipeline, StopPipeline

SHIPPED = Path(__file__).resolve().parent.parent / "models"


@dataclass(frozen=True)
class RetrainConfig:
    name: str
    render_count: int
    render_resolution: int
    gan: str                          # training/gan_configs.py
    real_steps: int
    parser_steps: int
    avatar_steps: int
    invert: str                       # training/invert.py
    paired: str                       # training/paired_data.py
    estimator: str                    # training/estimator.py
    estimator_epochs: int | None = None
    estimator_input: int | None = None
    validate_limit: int | None = None  # validation photos (None: all 256)
    seed: int = 0


CONFIGS = {
    "tiny": RetrainConfig("tiny", render_count=48, render_resolution=64, gan="tiny", real_steps=30,
                          parser_steps=30, avatar_steps=30, invert="tiny", paired="tiny",
                          estimator="tiny", estimator_epochs=1, estimator_input=32, validate_limit=4),
    "cpu": RetrainConfig("cpu", render_count=20000, render_resolution=256, gan="cpu",
                         real_steps=100000, parser_steps=4000, avatar_steps=20000, invert="cpu",
                         paired="cpu", estimator="cpu"),
    "small": RetrainConfig("small", render_count=50000, render_resolution=256, gan="small",
                           real_steps=200000, parser_steps=8000, avatar_steps=40000, invert="cpu",
                           paired="cpu", estimator="small"),
    "paper": RetrainConfig("paper", render_count=50000, render_resolution=512, gan="paper",
                           real_steps=800000, parser_steps=20000, avatar_steps=100000,
                           invert="paper", paired="paper", estimator="paper"),
}


def get_config(name: str) -> RetrainConfig:
    if name not in CONFIGS:
        raise UserError(f"unknown retrain config '{name}' ({', '.join(CONFIGS)})")
    return CONFIGS[name]


def shipped_weights(kind: str, gan_config: str) -> Path | None:
    """Shipped G_real / parser checkpoint folders (models/<kind>_<config>/), if any."""
    path = SHIPPED / f"{kind}_{gan_config}"
    return path if (path / "state.json").is_file() else None


STAGES = ("render", "real", "parser", "avatar", "encoder", "invert", "pairs", "estimator", "export",
          "validate")
BASELINE_STAGES = ("render", "pairs", "estimator", "export", "validate")


def stages_for(baseline: bool) -> tuple[str, ...]:
    return BASELINE_STAGES if baseline else STAGES


def retrain(pack_name: str, config: str, work: str, *, baseline: bool = False,
            augment: bool = True, install: bool = False, train_real: bool = False,
            until: str | None = None, progress: bool = True, log=print) -> dict:
    """Run (or resume) every stage; with ``until``, stop after that stage (one farm job each)."""
    if until is not None and until not in stages_for(baseline):
        raise UserError(f"--until {until}: not a stage of this run ({', '.join(stages_for(baseline))})")
    try:
        return _retrain(pack_name, config, work, baseline=baseline, augment=augment, install=install,
                        train_real=train_real, until=until, progress=progress, log=log)
    except StopPipeline as stop:
        return {"pack": pack_name, "config": config, "stopped_after": str(stop)}


def _retrain(pack_name: str, config: str, work: str, *, baseline: bool, augment: bool, install: bool,
             train_real: bool, until: str | None, progress: bool, log) -> dict:
    import torch
    torch.set_num_threads(int(os.environ.get("LIKENESS_THREADS", "1")))
    pack = find_pack(pack_name)
    cfg = get_config(config)
    mode = "baseline" if baseline else ("domain" if not augment else "full")
    pipe = Pipeline(work, {"pack": pack.id, "schema": pack.schema_hash, "config": cfg.name,
                           "mode": mode}, log=log, stop_after=until)
    t0 = time.time()
    render_dir = pipe.folder("render")

    def stage_render(folder: Path) -> dict:
        from ..render_engine.dataset import Job, render_dataset
        return render_dataset(Job(pack, folder, count=cfg.render_count, seed=cfg.seed,
                                  resolution=cfg.render_resolution, jitter=True), progress=progress)

    pipe.run("render", {"count": cfg.render_count, "res": cfg.render_resolution, "seed": cfg.seed},
             stage_render)

    if baseline:
        def stage_pairs(folder: Path) -> dict:
            from .paired_data import renders_to_paired_set
            size = _estimator_cfg(cfg).input_size
            renders_to_paired_set(render_dir, pack, folder, size)
            return {"pairs": str(folder), "kind": "renders"}
        pipe.run("pairs", {"kind": "baseline"}, stage_pairs, depends=("render",))
    else:
        _domain_stages(pipe, pack, cfg, render_dir, augment, train_real, progress, log)

    est_cfg = _estimator_cfg(cfg)

    def stage_estimator(folder: Path) -> dict:
        from .estimator import train_estimator
        return train_estimator(pack, pipe.folder("pairs"), folder, est_cfg, progress=progress, log=log)

    pipe.run("estimator", asdict(est_cfg), stage_estimator, depends=("pairs",))

    model_path = pipe.work / "model.onnx"

    def stage_export(folder: Path) -> dict:
        from .estimator import IMAGENET_MEAN, IMAGENET_STD, load_trained
        from .export import export_estimator
        model, ecfg = load_trained(pack, pipe.folder("estimator"))
        report = {"config": cfg.name, "mode": mode, "estimator": asdict(ecfg),
                  "held_out": (pipe.record("estimator") or {}).get("result"),
                  "trained_on": _machine(), "licence": _licence(baseline)}
        export_estimator(model, pack, folder / "model.onnx", ecfg.input_size, IMAGENET_MEAN,
                         IMAGENET_STD, report=report)
        shutil.copyfile(folder / "model.onnx", model_path)
        return {"model": str(model_path), "bytes": model_path.stat().st_size}

    pipe.run("export", {}, stage_export, depends=("estimator",))

    def stage_validate(folder: Path) -> dict:
        from ..render_engine.validate_job import validate
        rep = validate(str(model_path), str(pack.root), str(folder), limit=cfg.validate_limit, log=log)
        return {"targets": rep["targets"], "detected": rep["detected"], "photos": rep["photos"]}

    val = pipe.run("validate", {"limit": cfg.validate_limit}, stage_validate, depends=("export",))
    installed = None
    if install:
        from ..backend.models import install_model
        installed = str(install_model(model_path, pack))
        log(f"installed {installed}")
    summary = {"pack": pack.id, "config": cfg.name, "mode": mode, "model": str(model_path),
               "installed": installed, "timings_s": pipe.timings(),
               "wall_s_this_run": round(time.time() - t0, 1), "validation": val}
    _write_report(pipe, summary)
    return summary


def _estimator_cfg(cfg: RetrainConfig):
    from .estimator import get_config as est_cfg
    return est_cfg(cfg.estimator, epochs=cfg.estimator_epochs, input_size=cfg.estimator_input)


def _domain_stages(pipe: Pipeline, pack: Pack, cfg: RetrainConfig, render_dir: Path, augment: bool,
                   train_real: bool, progress: bool, log):
    from . import train_gan

    def gan_stage(kind: str, steps: int, **kw):
        def run(folder: Path) -> dict:
            shipped = None if train_real else shipped_weights(kind, cfg.gan)
            if shipped is not None:
                log(f"[{kind}] using the shipped weights {shipped}")
                return {"checkpoint": str(shipped), "shipped": True}
            resume = any(folder.glob("checkpoints/step_*"))
            s = train_gan.train(kind, cfg.gan, work_dir=folder, steps=steps, resume=resume, log=log, **kw)
            s.pop("trainer", None)
            return {"checkpoint": str(folder), **{k: v for k, v in s.items() if _plain(v)}}
        return run

    pipe.run("real", {"gan": cfg.gan, "steps": cfg.real_steps, "train": train_real},
             gan_stage("real", cfg.real_steps))
    pipe.run("parser", {"gan": cfg.gan, "steps": cfg.parser_steps, "train": train_real},
             gan_stage("parser", cfg.parser_steps))
    real_ckpt = pipe.record("real")["result"]["checkpoint"]

    def stage_avatar(folder: Path) -> dict:
        resume = any(folder.glob("checkpoints/step_*"))
        s = train_gan.train("avatar", cfg.gan, data=str(render_dir), work_dir=folder,
                            steps=cfg.avatar_steps, resume=resume, init=real_ckpt, log=log)
        s.pop("trainer", None)
        return {"checkpoint": str(folder), **{k: v for k, v in s.items() if _plain(v)}}

    pipe.run("avatar", {"gan": cfg.gan, "steps": cfg.avatar_steps}, stage_avatar,
             depends=("render", "real"))

    def g_avatar():
        G, _ = train_gan.load_generator(pipe.folder("avatar"))
        return G

    def stage_encoder(folder: Path) -> dict:
        from .invert import get_config as inv_cfg, train_encoder
        train_encoder(g_avatar(), inv_cfg(cfg.invert), folder, progress=progress, log=log)
        return {"encoder": str(folder)}

    pipe.run("encoder", {"invert": cfg.invert}, stage_encoder, depends=("avatar",))

    def stage_invert(folder: Path) -> dict:
        from .invert import get_config as inv_cfg, invert_dataset, load_encoder
        G = g_avatar()
        parser = None
        try:
            parser, _ = train_gan.load_parser(pipe.record("parser")["result"]["checkpoint"])
        except (UserError, KeyError, TypeError):
            log("[invert] no face parser available: the perceptual fallback will be reported")
        path = invert_dataset(G, load_encoder(pipe.folder("encoder"), G), render_dir, folder,
                              inv_cfg(cfg.invert), parser=parser, progress=progress, log=log)
        return {"latents": str(path)}

    pipe.run("invert", {"invert": cfg.invert}, stage_invert, depends=("encoder", "parser"))

    def stage_pairs(folder: Path) -> dict:
        from .paired_data import get_config as pair_cfg, synthesize_pairs
        G_real, _ = train_gan.load_generator(real_ckpt)
        pcfg = pair_cfg(cfg.paired, size=_estimator_cfg(cfg).input_size,
                        **({} if augment else {"n_aug": 0}))
        synthesize_pairs(G_real, pipe.record("invert")["result"]["latents"], render_dir, pack, folder,
                         pcfg, g_avatar=g_avatar(), progress=progress, log=log)
        return {"pairs": str(folder), "augment": augment}

    pipe.run("pairs", {"paired": cfg.paired, "augment": augment}, stage_pairs,
             depends=("invert", "real"))


def _plain(v) -> bool:
    return isinstance(v, (str, int, float, bool, type(None), list, dict))


def _machine() -> str:
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({platform.processor() or 'unknown'})"


def _licence(baseline: bool) -> str:
    if baseline:
        return "trained on engine renders only"
    return ("trained with generators fitted to CelebAMask-HQ faces: non-commercial research use only "
            "(CelebAMask-HQ licence)")


def _write_report(pipe: Pipeline, summary: dict):
    (pipe.work / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    lines = [f"# Retrain report: pack {summary['pack']}, config {summary['config']}, {summary['mode']}",
             "", f"Machine: {_machine()}", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary["timings_s"].items()]
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
    summary = retrain(args.pack, args.config, args.work, baseline=args.baseline,
                      augment=not args.no_augment, install=args.install, train_real=args.train_real,
                      until=args.until, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps({k: v for k, v in summary.items() if k != "validation"}, indent=2))
    return 0
