"""Where results go: output folders and files checked before the work, and unique result names.

Every command that writes checks its destination first (``check_output_dir``, ``check_output_file``)
so that a folder that cannot be written costs a one-line message, not a finished computation and a
traceback. ``result_names`` gives each input photo of a batch its own, stable output name.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Sequence

from .errors import UserError

# Exit code of a batch command (`create --photos`, `predict`) where some photos failed and others
# were done; 1 means nothing was done (or a usage error), 0 that every photo was done.
EXIT_PARTIAL = 3


def _reason(e: OSError) -> str:
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno == errno.EROFS:
        return "read-only file system"
    if e.errno == errno.ENOSPC:
        return "disk full"
    return e.strerror or str(e)


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create ``path`` (and its parents) if needed and prove a file can be written in it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: is an existing file, not a folder; name a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{flag} {path}: a part of this path is a file, not a folder") from None
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create the folder ({_reason(e)})") from None
    probe = path / f".likeness-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in this folder ({_reason(e)}); "
                        "choose a folder you can write to") from None
    return path


def check_output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Prove ``path`` can be written as a file (its folder is created if needed); nothing is left."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; name a file")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path}: the file exists and cannot be overwritten (permission denied)")
    check_output_dir(path.parent if str(path.parent) else Path("."), flag=f"{flag} {path}: its folder")
    return path


def result_names(sources: Sequence[str]) -> list[str]:
    """A unique, stable output name per input: the file name with its extension's dot made an
    underscore (``face.jpg`` -> ``face_jpg``, ``face.png`` -> ``face_png``), so photos that share a
    stem never share a result, and a photo's name does not depend on which others are in the batch.
    The same file name from two folders gets ``-2``, ``-3`` ... in input order."""
    names, seen = [], set()
    for s in sources:
        p = Path(str(s))
        base = p.stem + ("_" + p.suffix[1:] if p.suffix else "") if p.name else "photo"
        name, k = base, 1
        while name.lower() in seen:
            k += 1
            name = f"{base}-{k}"
        seen.add(name.lower())
        names.append(name)
    return names
