"""Blender UI: thin panels and operators over ``render_engine.avatar`` and the backend.

Registering imports only bpy, the stdlib and the pack schema: onnxruntime, numpy-heavy backend
modules and Pillow are imported inside the operators that need them. ``unregister`` removes
every class, property, handler, hook and the ``likeness`` command line entry it added.

Command line: ``blender -c likeness render --count 10 --out DIR`` runs the same CLI as the
``likeness`` script (``cli.py``).
"""
from __future__ import annotations

import bpy

from . import operators, panels, photo, prefs, props

_MODULES = (prefs, props, operators, photo, panels)
_CLI_HANDLES: list = []


def _cli(argv) -> int:
    """``blender -c likeness ARGS``: the ``likeness`` command line inside Blender."""
    import sys
    from ..cli import main
    argv = list(argv)
    # a Blender binary cannot start bpy worker processes: render in this process
    if argv[:1] == ["render"] and bpy.app.binary_path and not any(
            a == "--workers" or a.startswith("--workers=") for a in argv):
        argv += ["--workers", "1"]
    try:
        return main(argv)
    except ModuleNotFoundError as e:      # training/, farm/ are not part of the extension
        print(f"likeness: this command needs the full Likeness package ({e.name} is not part of "
              "the Blender extension): pip install likeness", file=sys.stderr)
        return 1


def register():
    done = []
    try:
        for module in _MODULES:
            module.register()
            done.append(module)
        if hasattr(bpy.utils, "register_cli_command"):
            _CLI_HANDLES.append(bpy.utils.register_cli_command("likeness", _cli))
    except Exception:
        for module in reversed(done):        # leave nothing half-registered
            module.unregister()
        raise


def unregister():
    while _CLI_HANDLES:
        bpy.utils.unregister_cli_command(_CLI_HANDLES.pop())
    for module in reversed(_MODULES):
        module.unregister()
