"""Built-in builders for packs made by code (``builder = "..."`` in a pack's ``[pack]`` table).

A builder module exposes ``build(pack, scene=None)``: it builds the whole avatar into the current,
empty scene (a collection named ``pack.collection`` linked to the scene, holding every mesh, with
materials named for the pack's ``[segmentation]``) and returns that collection. It does not touch
the camera or render settings (``render_engine.render`` does, from the manifest).
"""
from __future__ import annotations

import importlib

BUILDERS = ("stylized",)


def get_builder(name: str):
    """The ``build`` function of a built-in builder."""
    from ...backend.errors import UserError
    if name not in BUILDERS:
        raise UserError(f"unknown builder '{name}' (known: {', '.join(BUILDERS)})")
    return importlib.import_module(f"{__name__}.{name}").build


def build(pack, scene=None):
    """Build ``pack`` with its builder into the current scene; returns the avatar collection."""
    from ...backend.errors import UserError
    if not pack.builder:
        raise UserError(f"pack '{pack.id}' has no builder (it ships a .blend: {pack.blend})")
    return get_builder(pack.builder)(pack, scene=scene)
