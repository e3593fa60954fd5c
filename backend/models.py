"""Where estimator models live, so ``likeness create`` and the add-on find one per pack.

Search order for pack P: ``$LIKENESS_MODELS_PATH`` folders (each holding ``P/estimator.onnx``), the
user's installed models (``likeness retrain --install`` puts them in
``$XDG_DATA_HOME/likeness/models/P/``; inside Blender the extension's user folder comes first,
``backend.cache``), then the models shipped with the package (``models/P/``).

Photo colours (``backend.colour_match``) need two more files: the face parser, ``parser/parser.onnx``
in the same folders (pack-independent), and the pack's colour calibration, ``calibration.json``
beside the estimator, else ``P/calibration.json`` in the same folders (it belongs to the pack, not
to one estimator; a calibration for another pack or schema is refused when loaded).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .cache import data_root, xdg_data_root
from .errors import UserError
from .schema import Pack

SHIPPED = Path(__file__).resolve().parent.parent / "models"
FILENAME = "estimator.onnx"
CALIBRATION = "calibration.json"
PARSER = Path("parser") / "parser.onnx"


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


def find_calibration(pack: Pack, model_path: str | os.PathLike | None = None) -> Path | None:
    """The pack's colour calibration: beside the estimator, else in the model folders; None."""
    near = [Path(model_path).parent / CALIBRATION] if model_path else []
    for path in near + [folder / pack.id / CALIBRATION for folder in search_path()]:
        if path.is_file():
            return path
    return None


SHAPE = "shape.json"


def find_shape(pack: Pack, model_path: str | os.PathLike | None = None) -> Path | None:
    """The pack's photo-shape table (backend.shape_match): beside the estimator, else in the model
    folders; None."""
    near = [Path(model_path).parent / SHAPE] if model_path else []
    for path in near + [folder / pack.id / SHAPE for folder in search_path()]:
        if path.is_file():
            return path
    return None


def find_parser() -> Path | None:
    """The face parser ONNX file of the first model folder that has one; None."""
    for folder in search_path():
        if (folder / PARSER).is_file():
            return folder / PARSER
    return None


def install_model(model: str | os.PathLike, pack: Pack) -> Path:
    """Copy a trained model where ``find_model`` looks first for the user (atomic)."""
    from .contract import check_compatible, read_info
    check_compatible(read_info(model), pack)
    dest = user_models_dir() / pack.id / FILENAME
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    shutil.copyfile(model, tmp)
    os.replace(tmp, dest)
    return dest
