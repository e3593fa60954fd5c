"""Built-in builders for packs made by code (``builder = "..."`` in a pack's ``[pack]`` table).

A builder module exposes ``build(pack, scene=None)``: it builds the whole avatar into the current,
empty scene (a collection named ``pack.collection`` linked to the scene, holding every mesh, with
materials named for the pack's ``[segmentation]``) and returns that collection. It does not touch
the camera or render settings (``render_engine.render`` does, from the manifest).

A builder may also have a rig module ``<name>_rig`` with ``refresh(collection)``: what must be
remade on an avatar after its identity changes (the default pack's expression keys), called by
``render_engine.avatar.apply`` through ``refresh`` below.
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


def refresh(pack, collection) -> None:
    """After an apply: let the pack's builder remake what follows the identity (nothing for packs
    that ship a .blend or whose builder has no rig module)."""
    if pack.builder not in BUILDERS:
        return
    try:
        rig_module = importlib.import_module(f"{__name__}.{pack.builder}_rig")
    except ModuleNotFoundError:
        return
    rig_module.refresh(collection)
