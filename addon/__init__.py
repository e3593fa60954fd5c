"""Blender UI: thin panels and operators over backend and render_engine services."""


def register():
    pass


def unregister():
    pass
