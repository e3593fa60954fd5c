"""Where estimator models live, so ``likeness create`` and the add-on find one per pack.

Search order for pack P: ``$LIKENESS_MODELS_PATH`` folders (each holding ``P/estimator.onnx``), the
user's installed models (``likeness retrain --install`` puts them in
``$XDG_DATA_HOME/likeness/models/P/``), then the models shipped with the package (``models/P/``).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import UserError
from .schema import Pack

SHIPPED = Path(__file__).resolve().parent.parent / "models"
FILENAME = "estimator.onnx"


def user_models_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "likeness" / "models"


def search_path() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("LIKENESS_MODELS_PATH", "").split(os.pathsep) if p]
    return extra + [user_models_dir(), SHIPPED]


def find_model(pack: Pack) -> Path:
    for folder in search_path():
        path = folder / pack.id / FILENAME
        if path.is_file():
            return path
    raise UserError(f"no estimator model for pack '{pack.id}' (looked in "
                    + ", ".join(str(f / pack.id) for f in search_path())
                    + "); train one with `likeness retrain --pack "
                    + f"{pack.id} --install` or pass --model")


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
