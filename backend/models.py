"""Where a pack's models live, so ``likeness create`` and the add-on find them.

Search order for pack P: ``$LIKENESS_MODELS_PATH`` folders (each holding ``P/estimator.onnx``), the
user's installed models (``likeness retrain --install`` puts them in
``$XDG_DATA_HOME/likeness/models/P/``; inside Blender the extension's user folder comes first,
``backend.cache``), then the models shipped with the package (``models/P/``).

**Bundles.** Everything the backend reads for a pack lives in the estimator's folder: the estimator
(``estimator.onnx``), the pack's colour calibration (``calibration.json``, what the colour reads and
the attribute reader's colour categories reach the pack through), the photo-shape and hair table
(``shape.json``) and, only when the retrain fine-tuned or refitted it, the pack's own face parser
(``parser.onnx``). A folder with a ``manifest.json`` (``BUNDLE_KIND``) is a bundle: its files are
those the manifest lists with their hashes and the stage that made each, its pack id and schema
hash, and the shared models it was made with (the face parser ``parser/parser.onnx`` and the
attribute reader ``attributes/``, pack-independent, by sha256). ``likeness retrain`` makes one
(its ``bundle`` stage) and ``--install`` installs it whole (``install_bundle``). For a bundle's
estimator, ``find_calibration``, ``find_shape`` and ``find_parser`` look in the bundle only (a file
it does not list is not there); for an estimator outside a bundle (``--model FILE``) they look
beside it, then in the search folders (``P/calibration.json``, ``P/shape.json``,
``parser/parser.onnx``), and a calibration or table for another pack or schema is refused when
loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from .cache import data_root, xdg_data_root
from .errors import UserError
from .schema import Pack

SHIPPED = Path(__file__).resolve().parent.parent / "models"
FILENAME = "estimator.onnx"
CALIBRATION = "calibration.json"
SHAPE = "shape.json"
PARSER = Path("parser") / "parser.onnx"
BUNDLE_PARSER = "parser.onnx"             # a bundle's own face parser (fine-tuned or refitted)
MANIFEST = "manifest.json"
BUNDLE_KIND, BUNDLE_FORMAT = "likeness.model_bundle", 1
ATTRIBUTES = "attributes"


def user_models_dir() -> Path:
    """Where installed models go: the extension's user folder inside Blender, else
    ``$XDG_DATA_HOME/likeness/models`` (``backend.cache.data_root``)."""
    return data_root() / "models"


def search_path() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("LIKENESS_MODELS_PATH", "").split(os.pathsep) if p]
    user = [user_models_dir()]
    if xdg_data_root() / "models" != user[0]:       # inside Blender: also what the CLI installed
        user.append(xdg_data_root() / "models")
    return extra + user + [SHIPPED]


def find_model(pack: Pack) -> Path:
    for folder in search_path():
        path = folder / pack.id / FILENAME
        if path.is_file():
            return path
    raise UserError(f"no estimator model for pack '{pack.id}' (looked in "
                    + ", ".join(str(f / pack.id) for f in search_path())
                    + "); train one with `likeness retrain --pack "
                    + f"{pack.id} --install` or pass --model")


def read_bundle(folder: str | os.PathLike) -> dict | None:
    """The manifest of the bundle in ``folder`` (None: not a bundle). A manifest of another kind
    or format is a ``UserError``."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    from .errors import read_json
    man = read_json(path, "the model bundle's manifest")
    if man.get("kind") != BUNDLE_KIND or man.get("format") != BUNDLE_FORMAT:
        raise UserError(f"{path}: not a Likeness model bundle of format {BUNDLE_FORMAT} "
                        f"(kind {man.get('kind')!r}, format {man.get('format')!r})")
    return man


def _bundle_of(pack: Pack, model_path) -> tuple[Path | None, dict | None]:
    """(the estimator's folder, its bundle manifest or None); the estimator found for ``pack``
    when ``model_path`` is None (no folder when there is none)."""
    if model_path is None:
        try:
            model_path = find_model(pack)
        except UserError:
            return None, None
    folder = Path(model_path).parent
    return folder, read_bundle(folder)


def _find(pack: Pack, model_path, name: str) -> Path | None:
    folder, man = _bundle_of(pack, model_path)
    if man is not None:                     # a bundle: its own files, nothing from elsewhere
        return folder / name if name in man.get("files", {}) and (folder / name).is_file() else None
    near = [folder / name] if folder is not None and model_path is not None else []
    for path in near + [f / pack.id / name for f in search_path()]:
        if path.is_file():
            return path
    return None


def find_calibration(pack: Pack, model_path: str | os.PathLike | None = None) -> Path | None:
    """The pack's colour calibration for the estimator ``model_path`` (default: the one
    ``find_model`` finds): in its bundle, else beside it, else in the model folders; None."""
    return _find(pack, model_path, CALIBRATION)


def find_shape(pack: Pack, model_path: str | os.PathLike | None = None) -> Path | None:
    """The pack's photo-shape table (backend.shape_match), found as ``find_calibration`` finds the
    calibration; None."""
    return _find(pack, model_path, SHAPE)


def find_parser(pack: Pack | None = None, model_path: str | os.PathLike | None = None) -> Path | None:
    """The face parser: a bundle's own (when its retrain fine-tuned or refitted one) for the
    estimator ``model_path`` of ``pack`` (default: the one ``find_model`` finds), else the shared
    ``parser/parser.onnx`` of the first model folder that has one; None."""
    if pack is not None:
        folder, man = _bundle_of(pack, model_path)
        if man is not None and BUNDLE_PARSER in man.get("files", {}):
            return folder / BUNDLE_PARSER
    for folder in search_path():
        if (folder / PARSER).is_file():
            return folder / PARSER
    return None


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_bundle_manifest(folder: str | os.PathLike, pack: Pack, made_by: dict[str, str],
                          made: dict, parser: str | os.PathLike | None = None,
                          reader: str | os.PathLike | None = None) -> Path:
    """Write ``folder/manifest.json`` for the files ``made_by`` names (file name -> what made it,
    e.g. the retrain stage), with their sizes and hashes, the pack's id, schema hash and
    ``pack.toml`` hash, the shared models the files were made with (the face parser ``parser``
    unless the bundle holds its own, the attribute reader folder ``reader``) by sha256, and
    ``made`` (the command, config and stage keys). Written last, via a temporary name."""
    folder = Path(folder)
    files = {}
    for name, by in made_by.items():
        path = folder / name
        files[name] = {"sha256": sha256(path), "bytes": path.stat().st_size, "made_by": by}
    def where(path) -> str:
        """A shared model's place: under the shipped ``models/`` as ``models/...``, else its path."""
        try:
            return "models/" + Path(path).resolve().relative_to(SHIPPED).as_posix()
        except ValueError:
            return str(path)

    shared = {}
    if parser is not None and BUNDLE_PARSER not in files:
        shared["parser"] = {"path": where(parser), "sha256": sha256(parser),
                            "role": "the face parser the colours, hats, fringes and shape are read with"}
    if reader is not None:
        reader = Path(reader)
        shared["attributes"] = {
            "path": where(reader), "role": "the attribute reader (pack-independent; it reaches this "
            "pack through the options' tags and the colour calibration)",
            "files": {f.name: sha256(f) for f in sorted(reader.iterdir())
                      if f.suffix in (".json", ".onnx")}}
    toml = pack.root / "pack.toml" if pack.root is not None else None
    man = {"kind": BUNDLE_KIND, "format": BUNDLE_FORMAT, "pack": pack.id, "schema": pack.schema_hash,
           "pack_toml_sha256": sha256(toml) if toml is not None and toml.is_file() else None,
           "files": files, "shared": shared, "made": made}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(man, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST


def check_bundle(folder: str | os.PathLike, pack: Pack) -> list[str]:
    """What is wrong with the bundle in ``folder`` for ``pack`` ([] when nothing): its manifest,
    pack and schema, each listed file's presence, size and sha256, the estimator's contract."""
    folder = Path(folder)
    try:
        man = read_bundle(folder)
    except UserError as e:
        return [str(e)]
    if man is None:
        return [f"{folder}: no {MANIFEST} (not a model bundle)"]
    problems = []
    if man.get("pack") != pack.id or man.get("schema") != pack.schema_hash:
        problems.append(f"{folder}: a bundle for pack {man.get('pack')} schema {man.get('schema')}, "
                        f"not pack {pack.id} schema {pack.schema_hash}")
    files = man.get("files") or {}
    if FILENAME not in files:
        problems.append(f"{folder}: the manifest lists no {FILENAME}")
    for name, entry in files.items():
        path = folder / name
        if Path(name).name != name or name == MANIFEST:
            problems.append(f"{folder}: the manifest lists {name!r}, not a file name of a bundle")
        elif not path.is_file():
            problems.append(f"{path}: listed in the manifest but missing")
        elif path.stat().st_size != entry.get("bytes") or sha256(path) != entry.get("sha256"):
            problems.append(f"{path}: differs from the manifest (size or sha256)")
    if not problems:
        from .contract import check_compatible, read_info
        try:
            check_compatible(read_info(folder / FILENAME), pack)
        except UserError as e:
            problems.append(str(e))
    return problems


def install_bundle(folder: str | os.PathLike, pack: Pack) -> Path:
    """Install the bundle in ``folder`` (checked first: ``check_bundle``) as the pack's models
    where ``find_model`` looks first for the user, whole: copied beside, checked again, then
    swapped in, so a reader sees the old bundle or the new one, never a mix. Returns the folder."""
    problems = check_bundle(folder, pack)
    if problems:
        raise UserError("cannot install the model bundle:\n  - " + "\n  - ".join(problems))
    dest = user_models_dir() / pack.id
    dest.parent.mkdir(parents=True, exist_ok=True)
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    tmp = dest.with_name(f".{pack.id}.new-{stamp}")
    names = list((read_bundle(folder) or {}).get("files", {})) + [MANIFEST]
    tmp.mkdir()
    try:
        for name in names:
            shutil.copyfile(Path(folder) / name, tmp / name)
        problems = check_bundle(tmp, pack)
        if problems:
            raise UserError("the copied model bundle does not match its manifest:\n  - "
                            + "\n  - ".join(problems))
        old = dest.with_name(f".{pack.id}.old-{stamp}")
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
