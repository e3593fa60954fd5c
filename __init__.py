"""Likeness: stylized avatars from one selfie.

The repository root is both the Python package ``likeness`` and the Blender extension root. Blender
calls ``register``/``unregister``; everything heavy is imported lazily, inside them.
"""
__version__ = "0.1.0"


def register():
    from .addon import register as _register
    _register()


def unregister():
    from .addon import unregister as _unregister
    _unregister()
