"""One avatar, one object to move: every part of the default pack's avatar is under its ``Root``,
moving the root moves all of it (neck and clothes included), and new avatars land at the 3D
cursor (API and operator), in real bpy."""
from __future__ import annotations

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")

from mathutils import Vector  # noqa: E402

from likeness.render_engine import avatar  # noqa: E402
from test_addon import fresh_file  # noqa: E402


def world_bounds(coll) -> dict[str, np.ndarray]:
    """Per shown mesh object: (min, max) of its evaluated vertices in world space (hidden options
    are not evaluated)."""
    dg = bpy.context.evaluated_depsgraph_get()
    out = {}
    for ob in coll.all_objects:
        if ob.type != "MESH" or ob.hide_viewport:
            continue
        ev = ob.evaluated_get(dg)
        me = ev.to_mesh()
        co = np.empty(len(me.vertices) * 3)
        me.vertices.foreach_get("co", co)
        ev.to_mesh_clear()
        m = np.array(ev.matrix_world)
        w = co.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]
        out[avatar.rig.original_name(ob)] = np.stack([w.min(0), w.max(0)])
    return out


def test_every_part_is_under_the_root_and_moves_with_it():
    fresh_file()
    coll = avatar.add_avatar("default", location=(0, 0, 0))
    root = avatar.root_object(coll)
    assert avatar.rig.original_name(root) == "Root" and root.parent is None
    assert [o for o in coll.all_objects if o.parent is None] == [root]
    names = {avatar.rig.original_name(o) for o in coll.all_objects}
    assert {"Neck", "Top.Crew", "Top.Hoodie", "HeadRoot", "Head", "Hat.Cap", "Glasses.Round", "Earring.Hoops.L"} <= names
    for ob in coll.all_objects:                      # every object has Root as an ancestor
        top = ob
        while top.parent is not None:
            top = top.parent
        assert top == root, ob.name
    before = world_bounds(coll)
    root.location = root.location + Vector((1.5, -2.0, 0.25))
    bpy.context.view_layer.update()
    after = world_bounds(coll)
    assert set(after) == set(before) and {"Neck", "Top.Crew", "Head"} <= set(before)
    for name in before:
        assert np.allclose(after[name] - before[name], [[1.5, -2.0, 0.25]] * 2, atol=1e-5), name


def test_new_avatars_land_at_the_3d_cursor():
    fresh_file()
    scene = bpy.context.scene
    scene.cursor.location = (0, 0, 0)
    a = avatar.add_avatar("default")
    bpy.context.view_layer.update()
    rest = world_bounds(a)
    assert tuple(avatar.root_object(a).matrix_world.translation) == pytest.approx((0, 0, 0))
    # the root is the bottom of the torso, on the centre line: the avatar stands on the cursor
    low = min(b[0][2] for b in rest.values())
    assert low == pytest.approx(0.0, abs=0.1)
    scene.cursor.location = (4.0, 1.0, 2.0)
    b = avatar.add_avatar("default")
    bpy.context.view_layer.update()
    assert tuple(avatar.root_object(b).matrix_world.translation) == pytest.approx((4, 1, 2))
    moved = world_bounds(b)
    for name in rest:
        assert np.allclose(moved[name] - rest[name], [[4, 1, 2]] * 2, atol=1e-5), name
    # the operator does the same, and selects the root
    scene.cursor.location = (-3.0, 0.0, 0.0)
    assert bpy.ops.likeness.add_avatar() == {"FINISHED"}
    c = avatar.avatars()[-1]
    bpy.context.view_layer.update()
    assert tuple(avatar.root_object(c).matrix_world.translation) == pytest.approx((-3, 0, 0))
    assert bpy.context.view_layer.objects.active == avatar.root_object(c)
    # an explicit location wins over the cursor
    d = avatar.add_avatar("default", location=(0, 5, 0))
    bpy.context.view_layer.update()
    assert tuple(avatar.root_object(d).matrix_world.translation) == pytest.approx((0, 5, 0))
