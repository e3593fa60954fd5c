"""Where Likeness keeps what it can rebuild (built packs, decoded arrays, calibrations, runs) and
the user's own files (installed models).

Inside Blender, as an installed extension (this package is ``bl_ext.<repo>.likeness``), both live
in the extension's user folder, ``bpy.utils.extension_path_user(...)`` (e.g.
``~/.config/blender/5.0/extensions/.user/user_default/likeness/`` on Linux,
``%APPDATA%\\Blender Foundation\\Blender\\5.0\\extensions\\.user\\...`` on Windows): Blender keeps
it across updates of the extension and removes it with the extension's user data. Outside Blender
(the ``likeness`` command, a source checkout) they follow XDG: ``~/.cache/likeness`` and
``~/.local/share/likeness``. ``$LIKENESS_CACHE`` overrides the cache everywhere.
"""
from __future__ import annotations

import os
from pathlib import Path

# "bl_ext.user_default.likeness" inside an installed extension, "likeness" in a checkout
PACKAGE = __package__.rpartition(".")[0] if __package__ else ""


def extension_package() -> str | None:
    """This extension's ``__package__`` when it runs as an installed Blender extension, else None."""
    return PACKAGE if PACKAGE.startswith("bl_ext.") else None


def extension_user_dir(sub: str) -> Path | None:
    """``sub`` inside the extension's Blender user folder (created), or None outside Blender."""
    package = extension_package()
    if package is None:
        return None
    import bpy                               # only ever reached inside Blender
    return Path(bpy.utils.extension_path_user(package, path=sub, create=True))


def cache_root() -> Path:
    """$LIKENESS_CACHE, else the extension's user folder's ``cache`` inside Blender, else
    $XDG_CACHE_HOME/likeness, else ~/.cache/likeness."""
    env = os.environ.get("LIKENESS_CACHE")
    if env:
        return Path(env)
    inside = extension_user_dir("cache")
    if inside is not None:
        return inside
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "likeness"


def xdg_data_root() -> Path:
    """$XDG_DATA_HOME/likeness, else ~/.local/share/likeness (the command line's user data)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "likeness"


def data_root() -> Path:
    """The user's own files: the extension's user folder's ``data`` inside Blender, else XDG."""
    inside = extension_user_dir("data")
    return inside if inside is not None else xdg_data_root()
