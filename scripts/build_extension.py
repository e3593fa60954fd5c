"""Build the installable Blender extension zip (``likeness-<version>.zip``).

    python scripts/build_extension.py --out dist
    likeness build-extension --out dist                 # the same

1. ``blender_manifest.toml`` lists the runtime wheels Blender does not ship (pinned file names:
   onnxruntime and its dependencies, Pillow; Linux x86-64, CPython 3.11).
2. Missing wheels are downloaded with ``pip download --only-binary=:all: --platform
   manylinux_2_28_x86_64 --python-version 3.11 --no-deps`` into a cache
   (``$LIKENESS_WHEELS`` or ``~/.cache/likeness/wheels``), so rebuilds do not download again.
3. The source tree is staged with a ``wheels/`` folder and a copy of the manifest whose ``wheels``
   list names the files actually used; Blender's ``blender_ext.py build`` (from the bpy module, or
   ``--blender-ext``) makes the zip from the stage, and ``blender_ext.py validate`` checks the zip.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = "blender_manifest.toml"
PLATFORM = "manylinux_2_28_x86_64"
PYTHON_VERSION = "3.11"
# Copied into the stage (the manifest's [build] patterns then decide what goes into the zip);
# these are skipped already because they are large or private.
STAGE_IGNORE = (".git", ".venv", "venv", "wheels", "out", "dist", "build", "__pycache__",
                ".pytest_cache", "*.egg-info", "*.zip", "*.blend1")


class BuildError(RuntimeError):
    pass


def wheel_cache() -> Path:
    env = os.environ.get("LIKENESS_WHEELS")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "likeness" / "wheels"


def find_blender_ext() -> Path:
    """``blender_ext.py`` of the bpy module (the extension tool runs without a Blender binary)."""
    env = os.environ.get("BLENDER_EXT_PY")
    if env:
        return Path(env)
    import importlib.util
    spec = importlib.util.find_spec("bpy")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("cannot find Blender's blender_ext.py: install the bpy module "
                         "(pip install likeness[blender]) or pass --blender-ext")
    for folder in spec.submodule_search_locations:
        hits = sorted(Path(folder).glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
        if hits:
            return hits[-1]
    raise BuildError("the bpy module has no scripts/addons_core/bl_pkg/cli/blender_ext.py")


def read_manifest(root: Path = ROOT) -> dict:
    with open(root / MANIFEST, "rb") as f:
        return tomllib.load(f)


_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


def requirement_of(wheel_filename: str) -> str:
    """'pillow-13.0.0-cp311-...whl' -> 'pillow==13.0.0'."""
    m = _WHEEL.match(wheel_filename)
    if not m:
        raise BuildError(f"not a wheel file name: {wheel_filename}")
    return f"{m['name'].replace('_', '-')}=={m['version']}"


def _usable(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith(".dist-info/RECORD") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def fetch_wheels(names: list[str], cache: Path, download: bool = True, log=print) -> list[Path]:
    """The wheel files ``names`` from the cache, downloading the missing ones with pip."""
    cache.mkdir(parents=True, exist_ok=True)
    missing = [n for n in names if not _usable(cache / n)]
    if missing:
        if not download:
            raise BuildError(f"wheels not in {cache}: {', '.join(missing)} (run without --no-download)")
        reqs = [requirement_of(n) for n in missing]
        log(f"downloading {len(reqs)} wheels into {cache}: {' '.join(reqs)}")
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
               "--only-binary=:all:", "--platform", PLATFORM, "--python-version", PYTHON_VERSION,
               "--no-deps", "-d", str(cache), *reqs]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError("pip download failed:\n" + "\n".join(
                (proc.stderr or proc.stdout).strip().splitlines()[-8:]))
        still = [n for n in missing if not _usable(cache / n)]
        if still:
            got = sorted(p.name for p in cache.glob("*.whl"))
            raise BuildError(f"pip did not produce {', '.join(still)} (the cache has: {', '.join(got)}); "
                             "fix the pinned names in blender_manifest.toml")
    return [cache / n for n in names]


def _toml_list(values: list[str]) -> str:
    return "[\n" + "".join(f'  "{v}",\n' for v in values) + "]"


def manifest_with_wheels(text: str, wheels: list[str]) -> str:
    """The manifest text with its top-level ``wheels = [...]`` replaced (or added)."""
    new = f"wheels = {_toml_list(wheels)}"
    pattern = re.compile(r"^wheels\s*=\s*\[.*?\]", re.S | re.M)
    if pattern.search(text):
        return pattern.sub(lambda _m: new, text, count=1)
    head, sep, rest = text.partition("\n[")
    return f"{head.rstrip()}\n\n{new}\n{sep}{rest}" if sep else f"{text.rstrip()}\n\n{new}\n"


def stage(root: Path, dest: Path, wheels: list[Path]) -> Path:
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns(*STAGE_IGNORE), symlinks=False)
    (dest / "wheels").mkdir()
    rel = []
    for w in wheels:
        shutil.copy2(w, dest / "wheels" / w.name)
        rel.append(f"./wheels/{w.name}")
    text = (root / MANIFEST).read_text(encoding="utf-8")
    (dest / MANIFEST).write_text(manifest_with_wheels(text, rel), encoding="utf-8")
    return dest


def _run_ext(blender_ext: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(blender_ext), *args], capture_output=True, text=True)
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise BuildError(f"blender_ext.py {args[0]} failed:\n{out}")
    return out


def build(out_dir: str | os.PathLike = "dist", root: Path = ROOT, cache: Path | None = None,
          download: bool = True, blender_ext: Path | None = None, log=print) -> Path:
    """Build the zip into ``out_dir``; returns its path."""
    manifest = read_manifest(root)
    names = [Path(w).name for w in manifest.get("wheels", [])]
    wheels = fetch_wheels(names, cache or wheel_cache(), download, log)
    blender_ext = blender_ext or find_blender_ext()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    zip_path = out_dir / f"{manifest['id']}-{manifest['version']}.zip"
    with tempfile.TemporaryDirectory(prefix="likeness-ext-") as tmp:
        src = stage(root, Path(tmp) / manifest["id"], wheels)
        _run_ext(blender_ext, "validate", str(src))
        tmp_zip = out_dir / f".{zip_path.name}.part"
        _run_ext(blender_ext, "build", "--source-dir", str(src), "--output-filepath", str(tmp_zip))
        os.replace(tmp_zip, zip_path)
    _run_ext(blender_ext, "validate", str(zip_path))
    size = zip_path.stat().st_size / 1e6
    log(f"built {zip_path} ({size:.1f} MB, {len(wheels)} wheels); it validates")
    return zip_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="dist", help="output folder (default: dist)")
    ap.add_argument("--wheels", help="wheel cache folder (default: ~/.cache/likeness/wheels)")
    ap.add_argument("--no-download", action="store_true", help="only use cached wheels")
    ap.add_argument("--blender-ext", help="path of Blender's blender_ext.py")
    args = ap.parse_args(argv)
    try:
        path = build(args.out, cache=Path(args.wheels) if args.wheels else None,
                     download=not args.no_download,
                     blender_ext=Path(args.blender_ext) if args.blender_ext else None)
    except BuildError as e:
        print(f"build-extension: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
