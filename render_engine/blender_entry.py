"""Run a ``likeness`` command inside a Blender binary (farms without the bpy module):

    blender -b --python /path/to/likeness/render_engine/blender_entry.py -- render --pack default ...

Everything after ``--`` is the usual ``likeness`` command line. The package is loaded from the
folder this file lives in, whatever that folder is called, so a plain checkout works.
"""
import importlib.util
import sys
from pathlib import Path

MIN_BLENDER = (4, 2, 0)


def _load_package():
    root = Path(__file__).resolve().parent.parent
    if "likeness" in sys.modules:
        return sys.modules["likeness"]
    spec = importlib.util.spec_from_file_location(
        "likeness", root / "__init__.py", submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["likeness"] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    import bpy
    if bpy.app.version < MIN_BLENDER:
        print(f"likeness: Blender {bpy.app.version_string} is too old; "
              f"{'.'.join(map(str, MIN_BLENDER))} or newer is needed", file=sys.stderr)
        return 2
    argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    _load_package()
    from likeness.cli import main as cli_main
    # A Blender binary cannot spawn bpy worker processes: one process per shard instead.
    if argv and argv[0] == "render" and "--workers" not in argv:
        argv += ["--workers", "1"]
    return cli_main(argv)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.exit(code)
