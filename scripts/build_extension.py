"""Build the installable Blender extension zips, one per platform
(``likeness-<version>-<platform>.zip``: linux_x64, linux_arm64, windows_x64, macos_arm64).

    python scripts/build_extension.py --out dist
    likeness build-extension --out dist                 # the same
    python scripts/build_extension.py --out dist --platforms linux-x64

1. ``blender_manifest.toml`` declares the platforms and lists, pinned, the runtime wheels Blender
   does not ship for all of them (onnxruntime and Pillow once per platform, their pure-Python
   dependencies once; CPython 3.11, which Blender 4.2 to 5.0 bundle).
2. Missing wheels are downloaded with ``pip download --only-binary=:all: --platform TAG
   --python-version 3.11 --no-deps`` (TAG from each file name) into a cache
   (``$LIKENESS_WHEELS`` or ``~/.cache/likeness/wheels``), so rebuilds do not download again.
3. The source tree is staged with a ``wheels/`` folder and a copy of the manifest whose
   ``platforms`` and ``wheels`` name what is built; Blender's ``blender_ext.py build
   --split-platforms`` (from the bpy module, or ``--blender-ext``) makes one zip per platform with
   only that platform's wheels, and ``blender_ext.py validate`` checks every zip.
"""
from __future__ import annotations

import argparse
import json
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
PYTHON_VERSION = "3.11"
# Blender platform -> the end of a compatible wheel platform tag
PLATFORM_TAGS = {
    "linux-x64": ("manylinux", "_x86_64"),
    "linux-arm64": ("manylinux", "_aarch64"),
    "windows-x64": ("win_amd64", ""),
    "macos-arm64": ("macosx_", "_arm64"),
    "macos-x64": ("macosx_", "_x86_64"),
    "windows-arm64": ("win_arm64", ""),
}
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


def wheel_platform_tag(wheel_filename: str) -> str | None:
    """The platform tag pip downloads the wheel for ('win_amd64'; the last of several such as
    'manylinux_2_27_x86_64.manylinux_2_28_x86_64'), None for a pure 'any' wheel."""
    tag = wheel_filename[:-len(".whl")].split("-")[-1]
    return None if tag == "any" else tag.split(".")[-1]


def wheel_fits(wheel_filename: str, platform: str) -> bool:
    """Whether the wheel installs on a Blender platform ('linux-x64'); pure wheels fit all."""
    tag = wheel_platform_tag(wheel_filename)
    if tag is None:
        return True
    try:
        head, tail = PLATFORM_TAGS[platform]
    except KeyError:
        raise BuildError(f"unknown Blender platform '{platform}' "
                         f"(known: {', '.join(PLATFORM_TAGS)})") from None
    return any(t.startswith(head) and t.endswith(tail) for t in tag.split("."))


def zip_name(manifest: dict, platform: str) -> str:
    """The file ``blender_ext.py build --split-platforms`` writes for a platform."""
    return f"{manifest['id']}-{manifest['version']}-{platform.replace('-', '_')}.zip"


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
        by_tag: dict[str | None, list[str]] = {}
        for n in missing:
            by_tag.setdefault(wheel_platform_tag(n), []).append(requirement_of(n))
        for tag, reqs in by_tag.items():
            log(f"downloading {len(reqs)} wheels ({tag or 'any platform'}) into {cache}: "
                f"{' '.join(reqs)}")
            cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
                   # pure wheels with --platform any: without it pip prefers a binary wheel of
                   # the same release for this machine (protobuf 7.36.2 has both)
                   "--only-binary=:all:", "--platform", tag or "any",
                   "--python-version", PYTHON_VERSION, "--no-deps", "-d", str(cache), *reqs]
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


def manifest_with_platforms(text: str, platforms: list[str]) -> str:
    """The manifest text with its top-level ``platforms = [...]`` replaced."""
    pattern = re.compile(r"^platforms\s*=\s*\[.*?\]", re.S | re.M)
    if not pattern.search(text):
        raise BuildError("the manifest has no platforms list")
    return pattern.sub(lambda _m: "platforms = " + json.dumps(platforms), text, count=1)


def stage(root: Path, dest: Path, wheels: list[Path], platforms: list[str] | None = None) -> Path:
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns(*STAGE_IGNORE), symlinks=False)
    (dest / "wheels").mkdir()
    rel = []
    for w in wheels:
        shutil.copy2(w, dest / "wheels" / w.name)
        rel.append(f"./wheels/{w.name}")
    text = manifest_with_wheels((root / MANIFEST).read_text(encoding="utf-8"), rel)
    if platforms is not None:
        text = manifest_with_platforms(text, platforms)
    (dest / MANIFEST).write_text(text, encoding="utf-8")
    return dest


def _run_ext(blender_ext: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(blender_ext), *args], capture_output=True, text=True)
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise BuildError(f"blender_ext.py {args[0]} failed:\n{out}")
    return out


def build(out_dir: str | os.PathLike = "dist", root: Path = ROOT, cache: Path | None = None,
          download: bool = True, blender_ext: Path | None = None, log=print,
          platforms: list[str] | None = None) -> dict[str, Path]:
    """Build one zip per platform (default: all the manifest declares) into ``out_dir``;
    returns {platform: zip path}."""
    manifest = read_manifest(root)
    declared = list(manifest.get("platforms") or [])
    platforms = list(platforms or declared)
    unknown = [p for p in platforms if p not in declared]
    if unknown:
        raise BuildError(f"platform(s) {', '.join(unknown)} not in the manifest's platforms "
                         f"({', '.join(declared)})")
    names = [Path(w).name for w in manifest.get("wheels", [])]
    names = [n for n in names if any(wheel_fits(n, p) for p in platforms)]
    wheels = fetch_wheels(names, cache or wheel_cache(), download, log)
    blender_ext = blender_ext or find_blender_ext()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    zips = {p: out_dir / zip_name(manifest, p) for p in platforms}
    with tempfile.TemporaryDirectory(prefix="likeness-ext-") as tmp:
        src = stage(root, Path(tmp) / manifest["id"], wheels, platforms)
        _run_ext(blender_ext, "validate", str(src))
        built = Path(tmp) / "out"
        built.mkdir()
        _run_ext(blender_ext, "build", "--source-dir", str(src), "--output-dir", str(built),
                 "--split-platforms")
        for p, path in zips.items():
            os.replace(built / path.name, path)
    for p, path in zips.items():
        _run_ext(blender_ext, "validate", str(path))
        with zipfile.ZipFile(path) as z:
            shipped = [n for n in z.namelist() if n.startswith("wheels/")]
        log(f"built {path} ({path.stat().st_size / 1e6:.1f} MB, {len(shipped)} wheels); it validates")
    return zips


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="dist", help="output folder (default: dist)")
    ap.add_argument("--wheels", help="wheel cache folder (default: ~/.cache/likeness/wheels)")
    ap.add_argument("--no-download", action="store_true", help="only use cached wheels")
    ap.add_argument("--blender-ext", help="path of Blender's blender_ext.py")
    ap.add_argument("--platforms", help="comma-separated Blender platforms to build "
                    "(default: all the manifest declares)")
    args = ap.parse_args(argv)
    try:
        zips = build(args.out, cache=Path(args.wheels) if args.wheels else None,
                     download=not args.no_download,
                     blender_ext=Path(args.blender_ext) if args.blender_ext else None,
                     platforms=args.platforms.split(",") if args.platforms else None)
    except BuildError as e:
        print(f"build-extension: error: {e}", file=sys.stderr)
        return 1
    for path in zips.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
