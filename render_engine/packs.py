"""Opening a pack's scene in Blender: code-built packs are built once and cached as .blend,
TD packs open their own .blend. Also the ``likeness pack ...`` commands.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..backend.cache import cache_root
from ..backend.errors import UserError
from ..backend.schema import Pack, find_pack

ENGINE_VERSION = "1"


def build_hash(pack: Pack) -> str:
    """Changes when any builder code, the engine version or the manifest changes."""
    from . import builders
    builders.get_builder(pack.builder)          # unknown builder: a clear error first
    h = hashlib.sha256()
    h.update((pack.root / "pack.toml").read_bytes())
    for path in sorted(Path(builders.__file__).parent.glob("*.py")):
        h.update(path.read_bytes())
    h.update(ENGINE_VERSION.encode())
    return h.hexdigest()[:16]


def built_blend_path(pack: Pack) -> Path:
    return cache_root() / "packs" / f"{pack.id}-{build_hash(pack)}.blend"


def empty_scene() -> None:
    """Replace the current file with an empty one, leaving the preferences alone.

    Not ``read_factory_settings``: that also resets the preferences, so Blender disables every
    extension and then deletes the wheels no enabled extension needs (all of them), taking
    Pillow and ONNX Runtime away from the running add-on."""
    import bpy
    bpy.ops.wm.read_homefile(use_empty=True, use_factory_startup=True)


def _blender_error(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[-1] if lines else type(e).__name__
    return text[len("Error: "):] if text.startswith("Error: ") else text


def _open_blend(path: Path) -> str | None:
    """Open a .blend as the current file; None, or why Blender could not read it."""
    import bpy
    from .render import quiet_stdout
    try:
        with quiet_stdout():
            bpy.ops.wm.open_mainfile(filepath=str(path), load_ui=False)
    except RuntimeError as e:
        return _blender_error(e)
    return None


def _build_into_cache(pack: Pack, path: Path):
    import bpy
    from .builders import build
    from .render import quiet_stdout
    empty_scene()
    build(pack)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.blend")
    with quiet_stdout():
        bpy.ops.wm.save_as_mainfile(filepath=str(tmp), compress=True, copy=True)
    os.replace(tmp, path)


def open_pack_scene(pack: Pack, *, check: bool = True, rebuild: bool = False):
    """Replace the current Blender file with the pack's scene; return the scene.

    Code-built packs are built into an empty file and cached; the cache is keyed by the builder's
    code and manifest, so edits rebuild automatically. A cached build that Blender cannot read,
    or that no longer matches the manifest (damaged by something else), is rebuilt with a note;
    a TD pack's own .blend that cannot be read is a ``UserError`` naming the file.
    """
    import sys
    import bpy
    if pack.builder and not pack.blend:
        path = built_blend_path(pack)
        built = False
        if path.is_file() and not rebuild:
            reason = _open_blend(path)
            if reason is None and check:
                from .rig import check_scene
                reason = "; ".join(check_scene(pack)[:3]) or None
            if reason is not None:
                print(f"likeness: the cached build of pack '{pack.id}' ({path}) is damaged "
                      f"({reason}); rebuilding it", file=sys.stderr)
                _build_into_cache(pack, path)
                built = True
        else:
            _build_into_cache(pack, path)
            built = True
        if not built:
            return bpy.context.scene            # opened and checked above
    else:
        blend = pack.blend_path()
        if blend is None or not blend.is_file():
            raise UserError(f"pack '{pack.id}': blend file {blend} not found")
        reason = _open_blend(blend)
        if reason is not None:
            raise UserError(f"pack '{pack.id}': Blender cannot open its .blend {blend} ({reason}); "
                            "the file is damaged or not a .blend: restore it from the pack's source")
    if check:
        from .rig import check_scene
        problems = check_scene(pack)
        if problems:
            raise UserError(f"pack '{pack.id}' does not match its scene:\n  - "
                            + "\n  - ".join(problems))
    return bpy.context.scene


# ---- CLI handlers ------------------------------------------------------------------------------

def vector_from_arg(pack: Pack, spec: str):
    """The vector a command line names: ``default``, ``random:SEED``, ``-`` (JSON on stdin) or a
    JSON file; a clear message for anything else."""
    import sys
    from ..backend.schema import SchemaError
    if spec == "default":
        return pack.default_vector()
    if spec.startswith("random:"):
        try:
            return pack.sample_seeded(int(spec.split(":", 1)[1]), 0)
        except ValueError:
            raise UserError(f"'{spec}': the seed after 'random:' must be a whole number, "
                            "e.g. random:7") from None
    try:
        data = sys.stdin.buffer.read() if spec == "-" else Path(spec).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read vector {spec}: {e.strerror}") from None
    try:
        return pack.vector_from_json(data)
    except SchemaError as e:
        raise UserError(f"vector {spec}: {e}") from None


def cli_pack_info(args) -> int:
    pack = find_pack(args.pack)
    info = pack.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c = info["counts"]
    print(f"{pack.name} ({pack.id} {pack.version}), schema {pack.schema_hash}")
    print(f"  {c['parameters']} parameters, {c['slots']} slots, {c['options']} options")
    groups: dict[str, list[str]] = {}
    for p in pack.parameters:
        groups.setdefault(p.group, []).append(p.name)
    for g, names in groups.items():
        print(f"  [{g}] " + ", ".join(names))
    for s in pack.slots:
        print(f"  {s.name}: " + ", ".join(s.option_ids))
    return 0


def cli_pack_build(args) -> int:
    pack = find_pack(args.pack)
    if not pack.builder:
        raise UserError(f"pack '{pack.id}' is not built by code (it ships {pack.blend})")
    open_pack_scene(pack, rebuild=args.force)
    print(built_blend_path(pack))
    return 0


def cli_pack_check(args) -> int:
    pack = find_pack(args.pack)
    open_pack_scene(pack, check=True)
    print(f"pack '{pack.id}': manifest and scene agree "
          f"({pack.n_continuous} parameters, {len(pack.slots)} slots, {pack.n_options} options)")
    return 0
