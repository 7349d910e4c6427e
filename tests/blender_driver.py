"""Runs inside Blender (``bpy`` as a Python module, see tests/test_blender_addon.py): installs the add-on zip,
imports a rig .glb with Blender's glTF importer and exercises the add-on as a user would, writing what Blender
evaluated to an .npz that the test compares with our FLAME layer.

    python tests/blender_driver.py live   --addon Z.zip --glb RIG.glb --port P --out OUT.npz
    python tests/blender_driver.py import --addon Z.zip --glb RIG.glb --tracking DIR --fps F --out OUT.npz \
        --export-dir D

``live``: checks the bad-input reports (no rig selected, port in use), connects, starts Record, prints READY
and runs the add-on's update step until stdin closes (the test closes it when ``replay`` has ended), then saves
the evaluated mesh of the newest frame, stops Record and saves the mesh of the last keyed frame.
``import``: Import tracking onto the rig at F fps from frame 1, the mesh evaluated at every keyed frame, then
Blender's FBX and glTF exporters write the animated head to D.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import sys
from pathlib import Path

import bpy
import numpy as np


def setup(addon_zip: Path, glb: Path) -> bpy.types.Object:
    """A fresh scene with the add-on installed from its zip and the rig imported; returns the armature."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.preferences.addon_install(filepath=str(addon_zip), overwrite=True)
    bpy.ops.preferences.addon_enable(module="flame_live_blender")
    bpy.ops.import_scene.gltf(filepath=str(glb))
    return next(obj for obj in bpy.data.objects if obj.type == "ARMATURE")


def select_only(objects: list[bpy.types.Object]) -> None:
    for obj in bpy.context.view_layer.objects:
        obj.select_set(obj in objects)
    bpy.context.view_layer.objects.active = objects[0] if objects else None


def outcome(operator, **arguments) -> str:
    """ "FINISHED", or the operator's error report, which bpy raises as RuntimeError outside Blender's UI."""
    try:
        return ",".join(sorted(operator(**arguments)))
    except RuntimeError as error:
        return str(error)


def rig_mesh() -> bpy.types.Object:
    return next(obj for obj in bpy.data.objects if obj.type == "MESH" and obj.data.shape_keys is not None)


def stdin_open() -> bool:
    """False once the test closed our stdin; waits at most 5 ms."""
    readable = select.select([sys.stdin], [], [], 0.005)[0]
    return not readable or bool(sys.stdin.readline())


def evaluated_vertices() -> np.ndarray:
    """World coordinates of the rig's mesh as the depsgraph evaluates it (armature, shape keys and all)."""
    mesh_object = rig_mesh()
    depsgraph = bpy.context.evaluated_depsgraph_get()
    evaluated = mesh_object.evaluated_get(depsgraph)
    mesh = evaluated.to_mesh()
    local = np.empty(len(mesh.vertices) * 3)
    mesh.vertices.foreach_get("co", local)
    evaluated.to_mesh_clear()
    matrix = np.array(mesh_object.matrix_world)
    return local.reshape(-1, 3) @ matrix[:3, :3].T + matrix[:3, 3]


def run_live(args: argparse.Namespace) -> None:
    armature = setup(args.addon, args.glb)
    from flame_live_blender import live  # importable once the add-on is installed

    scene = bpy.context.scene
    select_only([])
    no_rig = outcome(bpy.ops.flame_live.connect)
    select_only([armature])
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind(("127.0.0.1", 0))
    scene.flame_live.port = blocker.getsockname()[1]
    port_in_use = outcome(bpy.ops.flame_live.connect)
    blocker.close()
    not_connected = outcome(bpy.ops.flame_live.record)
    scene.flame_live.port = args.port
    imported_actions = {action.name for action in bpy.data.actions}
    connected = outcome(bpy.ops.flame_live.connect)
    detached = armature.animation_data.action is None and all(
        bpy.data.actions[name].use_fake_user for name in imported_actions
    )
    scene.frame_set(1)
    bpy.ops.flame_live.record()
    link = live.current()
    print("READY", flush=True)
    updates = 0
    while stdin_open():
        updates += link.update()
    link.update()
    live_vertices = evaluated_vertices()
    applied_seq, counts, recorded = link.applied_seq, link.counts, len(link.recording.poses)
    bpy.ops.flame_live.record()  # stop: keys the recording
    fcurves = armature.animation_data.action.fcurves
    last_key = int(max(point.co[0] for curve in fcurves for point in curve.keyframe_points))
    scene.frame_set(last_key)
    np.savez(
        args.out, live_vertices=live_vertices, recorded_last_vertices=evaluated_vertices(), applied_seq=applied_seq,
        frames=counts.frames, foreign=counts.foreign, invalid=counts.invalid, updates=updates, recorded=recorded,
        keyed_frames=len(fcurves[0].keyframe_points), bone_curves=len(fcurves),
        shape_curves=len(rig_mesh().data.shape_keys.animation_data.action.fcurves),
        results=np.array([no_rig, port_in_use, not_connected, connected]), imported_actions=len(imported_actions),
        detached=detached,
    )  # fmt: skip
    bpy.ops.flame_live.disconnect()
    bpy.ops.preferences.addon_disable(module="flame_live_blender")  # unregisters cleanly


def run_import(args: argparse.Namespace) -> None:
    armature = setup(args.addon, args.glb)
    scene = bpy.context.scene
    scene.render.fps, scene.render.fps_base = args.fps, 1.0
    scene.frame_set(1)
    select_only([])
    no_rig = outcome(bpy.ops.flame_live.import_tracking, directory=str(args.tracking))
    select_only([armature])
    not_tracking = outcome(bpy.ops.flame_live.import_tracking, directory=str(args.export_dir))
    mesh_object = rig_mesh()
    rest = np.empty(len(mesh_object.data.vertices) * 3)
    mesh_object.data.vertices.foreach_get("co", rest)
    world = np.array(mesh_object.matrix_world)
    rest_vertices = rest.reshape(-1, 3) @ world[:3, :3].T + world[:3, 3]
    imported = outcome(bpy.ops.flame_live.import_tracking, directory=str(args.tracking))
    fcurves = armature.animation_data.action.fcurves
    frames = sorted({int(point.co[0]) for point in fcurves[0].keyframe_points})
    vertices = []
    for frame in frames:
        scene.frame_set(frame)
        vertices.append(evaluated_vertices())
    args.export_dir.mkdir(parents=True, exist_ok=True)
    bpy.ops.export_scene.fbx(
        filepath=str(args.export_dir / "head.fbx"), bake_anim=True, object_types={"ARMATURE", "MESH"}
    )
    bpy.ops.export_scene.gltf(
        filepath=str(args.export_dir / "head.glb"), export_format="GLB", export_animations=True, export_morph=True
    )
    np.savez(
        args.out, frames=np.array(frames), vertices=np.stack(vertices), rest_vertices=rest_vertices,
        results=np.array([no_rig, not_tracking, imported]),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("live", "import"):
        command = commands.add_parser(name)
        command.add_argument("--addon", type=Path, required=True)
        command.add_argument("--glb", type=Path, required=True)
        command.add_argument("--out", type=Path, required=True)
    commands.choices["live"].add_argument("--port", type=int, required=True)
    commands.choices["import"].add_argument("--tracking", type=Path, required=True)
    commands.choices["import"].add_argument("--fps", type=int, required=True)
    commands.choices["import"].add_argument("--export-dir", type=Path, required=True)
    args = parser.parse_args()
    run_live(args) if args.command == "live" else run_import(args)
    # bpy 4.2 as a Python module crashes in its exit handlers once the glTF add-on has run (a segfault after
    # Python's own shutdown, also without our add-on); everything is written, so leave without them.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
