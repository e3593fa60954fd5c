"""The Blender extension package: the manifest validates, one zip per platform builds and validates
with only its own wheels, the shipped code imports no platform-only module at module level, and
the Linux x86-64 zip installs into a throw-away user repository (BLENDER_USER_RESOURCES in a temp dir, ~/.config untouched), enables,
installs its bundled wheels, and its operators work from ``bl_ext.user_default.likeness``.

The build downloads the wheels once into ~/.cache/likeness/wheels (PyPI needed the first time).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import build_extension  # noqa: E402


def _blender_ext():
    try:
        return build_extension.find_blender_ext()
    except build_extension.BuildError as e:
        pytest.skip(str(e))


def test_repository_manifest_validates():
    out = subprocess.run([sys.executable, str(_blender_ext()), "validate", str(ROOT)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    m = tomllib.loads((ROOT / "blender_manifest.toml").read_text())
    assert m["schema_version"] == "1.0.0" and m["id"] == "likeness" and m["type"] == "add-on"
    assert m["blender_version_min"] == "4.2.0" and m["license"] == ["SPDX:GPL-3.0-or-later"]
    assert len(m["tagline"]) <= 64 and m["tagline"][-1].isalnum()
    assert set(m["permissions"]) == {"files"}                      # no network
    names = [Path(w).name for w in m["wheels"]]
    assert {build_extension.requirement_of(n).split("==")[0] for n in names} == {
        "onnxruntime", "pillow", "flatbuffers", "packaging", "protobuf"}
    assert not any(n.startswith("numpy") for n in names)           # Blender ships numpy
    # every platform Blender 5.0 runs on (it has no Intel-Mac build) gets exactly one
    # onnxruntime and one Pillow wheel, and the pure-Python ones
    assert m["platforms"] == ["linux-x64", "linux-arm64", "windows-x64", "windows-arm64",
                             "macos-arm64"]
    for platform in m["platforms"]:
        fits = [build_extension.requirement_of(n) for n in names
                if build_extension.wheel_fits(n, platform)]
        assert sorted(fits) == ["flatbuffers==25.12.19", "onnxruntime==1.32.0",
                                "packaging==26.4", "pillow==13.0.0", "protobuf==7.36.2"], platform
    assert all(any(build_extension.wheel_fits(n, p) for p in m["platforms"]) for n in names)


def test_wheel_platform_tags():
    fits = build_extension.wheel_fits
    linux = "pillow-13.0.0-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl"
    assert build_extension.wheel_platform_tag(linux) == "manylinux_2_28_x86_64"
    assert build_extension.wheel_platform_tag("packaging-26.4-py3-none-any.whl") is None
    assert fits(linux, "linux-x64") and not fits(linux, "linux-arm64")
    assert not fits(linux, "windows-x64") and not fits(linux, "macos-arm64")
    mac = "onnxruntime-1.32.0-cp311-cp311-macosx_14_0_arm64.whl"
    assert fits(mac, "macos-arm64") and not fits(mac, "macos-x64") and not fits(mac, "linux-arm64")
    assert fits("onnxruntime-1.32.0-cp311-cp311-win_amd64.whl", "windows-x64")
    assert fits("packaging-26.4-py3-none-any.whl", "windows-x64")
    with pytest.raises(build_extension.BuildError, match="unknown Blender platform"):
        fits(linux, "amiga-m68k")


def test_manifest_wheel_rewrite():
    text = (ROOT / "blender_manifest.toml").read_text()
    new = build_extension.manifest_with_wheels(text, ["./wheels/a-1.0-py3-none-any.whl"])
    data = tomllib.loads(new)
    assert data["wheels"] == ["./wheels/a-1.0-py3-none-any.whl"]
    assert data["build"] == tomllib.loads(text)["build"]
    assert build_extension.requirement_of(
        "pillow-13.0.0-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl") == "pillow==13.0.0"
    with pytest.raises(build_extension.BuildError):
        build_extension.requirement_of("not-a-wheel.zip")
    # a manifest without a wheels list gets one before its first table
    plain = 'id = "x"\n\n[build]\npaths = ["a"]\n'
    assert tomllib.loads(build_extension.manifest_with_wheels(plain, ["./w/b-2-py3-none-any.whl"])) == {
        "id": "x", "wheels": ["./w/b-2-py3-none-any.whl"], "build": {"paths": ["a"]}}


@pytest.fixture(scope="module")
def built_zips(tmp_path_factory):
    out = tmp_path_factory.mktemp("ext")
    try:
        return build_extension.build(out, log=lambda *a: None)
    except build_extension.BuildError as e:
        if "pip download failed" in str(e):
            pytest.skip(f"wheels not cached and PyPI unreachable: {e}")
        raise


@pytest.fixture(scope="module")
def built_zip(built_zips):
    """The zip for this machine (Linux x86-64)."""
    return built_zips["linux-x64"]


def test_built_zips_validate_and_ship_what_runs(built_zips):
    repo = tomllib.loads((ROOT / "blender_manifest.toml").read_text())
    assert sorted(built_zips) == sorted(repo["platforms"])
    for platform, path in built_zips.items():
        assert path.name == f"likeness-0.1.0-{platform.replace('-', '_')}.zip"
        out = subprocess.run([sys.executable, str(_blender_ext()), "validate", str(path)],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            manifest = tomllib.loads(z.read("blender_manifest.toml").decode())
        tops = {n.split("/")[0] for n in names}
        assert {"__init__.py", "cli.py", "addon", "backend", "render_engine", "packs", "models",
                "wheels", "blender_manifest.toml"} <= tops
        assert not tops & {"tests", "training", "farm", "docs", "scripts", ".ci", ".git", "out"}
        assert not any("__pycache__" in n or n.endswith(".pyc") or ".egg-info" in n for n in names)
        assert "packs/stylized/pack.toml" in names and "models/mtcnn/pnet.onnx" in names
        assert "render_engine/avatar.py" in names and "addon/photo.py" in names
        assert "models/parser/parser.onnx" in names                # the add-on's photo colours
        assert "models/parser/parser.rules.json" in names          # its rules without the reader
        reader = __import__("json").loads((ROOT / "models/attributes/reader.json").read_text())
        assert reader["parsers"] and all(f"models/attributes/{n}" in names   # the reader parses with them
                                         for n in reader["parsers"] + ["reader.json", "descriptor.onnx"])
        assert not any(n.startswith(("models/real_", "models/parser_")) for n in names)
        # the platform's own wheels, and only those: Blender reads platforms and wheels from
        # the [build.generated] table the split build appends
        generated = manifest["build"]["generated"]
        assert generated["platforms"] == [platform]
        mine = [w for w in repo["wheels"] if build_extension.wheel_fits(Path(w).name, platform)]
        assert generated["wheels"] == mine and len(mine) == 5
        assert sorted(n for n in names if n.startswith("wheels/")) == sorted(w[2:] for w in mine)
        assert path.stat().st_size < 90e6


POSIX_ONLY = {"fcntl", "termios", "tty", "pty", "pwd", "grp", "resource", "posix", "syslog"}
WINDOWS_ONLY = {"msvcrt", "winreg", "winsound", "_winapi"}


def test_shipped_code_imports_no_platform_only_module_at_module_level(built_zip):
    """Every .py file in the extension imports POSIX- or Windows-only modules (fcntl, msvcrt,
    ...) only inside functions, so it imports on every platform the manifest declares."""
    import ast
    found = []
    with zipfile.ZipFile(built_zip) as z:
        sources = {n: z.read(n) for n in z.namelist()
                   if n.endswith(".py") and not n.startswith("wheels/")}
    assert "render_engine/dataset.py" in sources and len(sources) > 30
    for name, src in sources.items():
        for node in ast.parse(src, name).body:           # module level, not in def / try / if
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                mods = [node.module.split(".")[0]]
            found += [f"{name}:{node.lineno} {m}" for m in mods if m in POSIX_ONLY | WINDOWS_ONLY]
    assert found == []


INSTALL_SCRIPT = r"""
import json, os, sys, time
import importlib.machinery
sys.modules["likeness"] = None            # the installed extension must not lean on the checkout
RESOURCES = os.environ["BLENDER_USER_RESOURCES"]


class OnlyFromExtension:
    # Pillow and ONNX Runtime may come only from the wheels the extension installed (this
    # Python has its own copies, which would hide a missing wheel)
    def find_spec(self, name, path=None, target=None):
        if name not in ("PIL", "onnxruntime"):
            return None               # their submodules search the package's own folder
        spec = importlib.machinery.PathFinder.find_spec(
            name, [p for p in sys.path if p.startswith(RESOURCES)])
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r} in the extension", name=name)
        return spec


sys.meta_path.insert(0, OnlyFromExtension())
import bpy
zip_path, photo, model, readme_example = sys.argv[1:5]
SITE = os.path.join(RESOURCES, "extensions", ".local", "lib", "python3.11", "site-packages")


def wheels():
    return sorted(os.listdir(SITE)) if os.path.isdir(SITE) else []


out = {"preloaded": [n for n in ("PIL", "onnxruntime") if n in sys.modules]}
t = time.perf_counter()
res = bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default",
                                               enable_on_install=True)
out["install"] = sorted(res)
out["install_s"] = round(time.perf_counter() - t, 2)
out["enabled"] = "bl_ext.user_default.likeness" in bpy.context.preferences.addons
ext = sys.modules["bl_ext.user_default.likeness"]
out["module_file"] = ext.__file__
prefs = bpy.context.preferences.addons["bl_ext.user_default.likeness"].preferences
out["prefs"] = [type(prefs).bl_idname, len(prefs.models), prefs.device]
out["site"] = [p for p in sys.path if p.startswith(RESOURCES)]
out["wheels_installed"] = wheels()
from bl_ext.user_default.likeness.backend.cache import cache_root
out["cache"] = str(cache_root())
out["add"] = sorted(bpy.ops.likeness.add_avatar("EXEC_DEFAULT", True))    # builds the pack
out["wheels_after_add"] = wheels()
out["built"] = sorted(p.name for p in (cache_root() / "packs").glob("*.blend"))
out["add2"] = sorted(bpy.ops.likeness.add_avatar("EXEC_DEFAULT", True))
out["randomize"] = sorted(bpy.ops.likeness.randomize("EXEC_DEFAULT", True, seed=3))
from bl_ext.user_default.likeness.render_engine import avatar
colls = avatar.avatars()
out["avatars"] = [c.name for c in colls]
out["vectors_differ"] = avatar.read(colls[0]) != avatar.read(colls[1])
before_photo = avatar.read(avatar.active_avatar())
out["photo"] = sorted(bpy.ops.likeness.create_from_photo("EXEC_DEFAULT", True, filepath=photo,
                                                          model=model))
import onnxruntime, PIL
out["onnxruntime"] = onnxruntime.__file__
out["PIL"] = PIL.__file__
out["prediction_model"] = avatar.prediction_info(avatar.active_avatar())["model"]
out["changed_by_photo"] = avatar.read(avatar.active_avatar()) != before_photo
out["crop"] = avatar.crop_image(avatar.active_avatar()) is not None
try:
    bpy.ops.likeness.create_from_photo(filepath=photo + ".missing.jpg", model=model)
    out["missing_photo"] = "no error"
except RuntimeError as e:
    out["missing_photo"] = str(e)
# the README's scripting example, as a user runs it, drives the avatar the panel shows
scope = {}
exec(compile(readme_example, "README example", "exec"), scope)
from bl_ext.user_default.likeness.addon import props
coll = scope["coll"]
values = props.values_of(coll)
out["readme"] = [coll.name, round(values.p_face_width, 3), values.s_glasses,
                 avatar.active_avatar() == coll or coll in avatar.avatars()]
out["readme_module"] = scope["avatar"].__name__
from bl_ext.user_default.likeness.addon import _cli
out["cli_pack_info"] = _cli(["pack", "info", "--pack", "default"])
out["cli_farm"] = _cli(["farm", "status", "/nonexistent"])
# `blender -c likeness pack build --force` rebuilds in this process: the file is replaced,
# the preferences (and so the extension and its wheels) stay
out["cli_build"] = _cli(["pack", "build", "--pack", "default", "--force"])
out["wheels_after_build"] = wheels()
out["enabled_after_build"] = "bl_ext.user_default.likeness" in bpy.context.preferences.addons
out["add3"] = sorted(bpy.ops.likeness.add_avatar("EXEC_DEFAULT", True))
out["photo2"] = sorted(bpy.ops.likeness.create_from_photo("EXEC_DEFAULT", True, filepath=photo,
                                                           model=model))
# disabling removes everything it registered
bpy.ops.preferences.addon_disable(module="bl_ext.user_default.likeness")
out["left_types"] = [n for n in dir(bpy.types) if n.upper().startswith("LIKENESS")]
out["left_props"] = [n for n in dir(bpy.types.Collection) if n.startswith("likeness")]
print("RESULT " + json.dumps(out))
"""


def readme_scripting_example() -> str:
    """The first ```python block of the README's Scripting section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Scripting", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_zip_installs_enables_and_runs_in_blender(built_zip, tmp_path):
    """Installed the way Blender installs it, into a clean user folder, with Pillow and ONNX
    Runtime importable only from the extension's wheels: adding the first avatar (which builds
    the pack in a child process) keeps every wheel, Create from Photo runs, the README's scripting
    example drives the panel's avatar, and an in-process pack rebuild keeps them too."""
    pytest.importorskip("bpy")
    pytest.importorskip("torch")
    from test_addon import make_tiny_estimator, real_photo
    from likeness.backend.schema import find_pack
    model = make_tiny_estimator(find_pack("default"), tmp_path / "tiny.onnx")
    photo = real_photo()
    resources = tmp_path / "blender-user"
    env = {k: v for k, v in os.environ.items() if k != "LIKENESS_CACHE"}
    env.update(BLENDER_USER_RESOURCES=str(resources), XDG_CACHE_HOME=str(tmp_path / "xdg-cache"),
               XDG_DATA_HOME=str(tmp_path / "xdg-data"))
    proc = subprocess.run([sys.executable, "-c", INSTALL_SCRIPT, str(built_zip), str(photo),
                           str(model), readme_scripting_example()], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["preloaded"] == []
    assert r["install"] == ["FINISHED"] and r["enabled"]
    installed = resources / "extensions" / "user_default" / "likeness"
    assert Path(r["module_file"]) == installed / "__init__.py"
    assert r["prefs"] == ["bl_ext.user_default.likeness", 0, "AUTO"]
    assert r["site"] and all(str(resources) in p for p in r["site"])
    # the wheels survive the first Add Avatar (it built the pack) and the in-process rebuild
    assert {"PIL", "onnxruntime"} <= set(r["wheels_installed"])
    assert r["wheels_after_add"] == r["wheels_installed"]
    assert r["wheels_after_build"] == r["wheels_installed"] and r["enabled_after_build"]
    # the pack cache lives in the extension's user folder, not in the XDG cache
    user_dir = resources / "extensions" / ".user" / "user_default" / "likeness"
    assert Path(r["cache"]) == user_dir / "cache"
    assert len(r["built"]) == 1 and r["built"][0].startswith("stylized-")
    assert not (tmp_path / "xdg-cache" / "likeness").exists()
    site = str(resources / "extensions" / ".local" / "lib" / "python3.11" / "site-packages")
    assert site in r["site"]
    assert r["onnxruntime"].startswith(site) and r["PIL"].startswith(site)
    assert r["add"] == ["FINISHED"] and r["add2"] == ["FINISHED"] and r["randomize"] == ["FINISHED"]
    assert r["avatars"] == ["Likeness", "Likeness.001"] and r["vectors_differ"]
    assert r["photo"] == ["FINISHED"] and r["crop"] and r["changed_by_photo"]
    assert r["prediction_model"] == str(model)
    assert "missing.jpg" in r["missing_photo"]
    assert r["readme"] == ["Likeness.002", 0.5, "round", True]
    assert r["readme_module"] == "bl_ext.user_default.likeness.render_engine.avatar"
    assert r["cli_pack_info"] == 0 and r["cli_build"] == 0
    assert r["cli_farm"] == 1 and "not part of the Blender extension" in proc.stderr
    assert r["add3"] == ["FINISHED"] and r["photo2"] == ["FINISHED"]
    assert r["left_types"] == [] and r["left_props"] == []
