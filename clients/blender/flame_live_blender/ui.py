"""The add-on's panel (3D view sidebar, "flame-live" tab), its settings and its operators.

Every user mistake (no rig selected, a port in use, a folder that holds no tracking) becomes one Blender
report and a cancelled operator; nothing raises into Blender. There is no ``from __future__ import
annotations`` here: Blender reads the property definitions from the class annotations as objects.
"""

from pathlib import Path

import bpy
from bpy.props import IntProperty, PointerProperty, StringProperty

from . import live
from .animation import key_motion
from .recordings import RecordingError, load_motion
from .rig import FlameRig, RigError
from .stream import DEFAULT_HOST, DEFAULT_PORT, StreamError


def _scene_fps(scene: bpy.types.Scene) -> float:
    return scene.render.fps / scene.render.fps_base


def _selected_rig(context: bpy.types.Context) -> FlameRig:
    objects = list(context.selected_objects)
    if context.active_object is not None and context.active_object not in objects:
        objects.insert(0, context.active_object)
    return FlameRig.from_objects(objects)


def _extend_scene(scene: bpy.types.Scene, last_frame: int) -> None:
    scene.frame_end = max(scene.frame_end, last_frame)


class FlameLiveSettings(bpy.types.PropertyGroup):
    host: StringProperty(
        name="Address", default=DEFAULT_HOST, description="Address to listen on (127.0.0.1: this machine only)"
    )
    port: IntProperty(
        name="Port",
        default=DEFAULT_PORT,
        min=1,
        max=65535,
        description="UDP port flame-live sends OSC to (live/replay --osc HOST:PORT)",
    )


class FLAMELIVE_OT_connect(bpy.types.Operator):
    """Listen for flame-live's OSC stream and drive the selected FLAME rig with it"""

    bl_idname = "flame_live.connect"
    bl_label = "Connect"

    def execute(self, context: bpy.types.Context) -> set[str]:
        settings = context.scene.flame_live
        try:
            link = live.connect(_selected_rig(context), settings.host, settings.port)
        except (RigError, StreamError) as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        detached = link.rig.detach_actions()
        kept = f"; its actions {', '.join(detached)} are unassigned (kept)" if detached else ""
        self.report(
            {"INFO"}, f"listening on {link.receiver.host}:{link.receiver.port}, driving {link.rig.armature.name}{kept}"
        )
        return {"FINISHED"}


class FLAMELIVE_OT_disconnect(bpy.types.Operator):
    """Stop listening (a running recording is keyed first)"""

    bl_idname = "flame_live.disconnect"
    bl_label = "Disconnect"

    def execute(self, context: bpy.types.Context) -> set[str]:
        link = live.current()
        if link is not None and link.recording is not None:
            _finish_recording(self, context, link)
        live.disconnect()
        return {"FINISHED"}


def _finish_recording(operator: bpy.types.Operator, context: bpy.types.Context, link: live.LiveLink) -> None:
    keyed = link.stop_recording(_scene_fps(context.scene), "flame-live recording")
    if keyed.keyed_frames:
        _extend_scene(context.scene, keyed.last_frame)
        operator.report(
            {"INFO"},
            f"recorded {keyed.keyed_frames} frames ({keyed.first_frame}-{keyed.last_frame}) "
            f"onto {link.rig.armature.name}",
        )
    else:
        operator.report({"WARNING"}, "nothing recorded: no frame with a face arrived while recording")


class FLAMELIVE_OT_record(bpy.types.Operator):
    """Start, or stop and key, a recording of the live stream at the scene's frame rate from the current frame"""

    bl_idname = "flame_live.record"
    bl_label = "Record"

    def execute(self, context: bpy.types.Context) -> set[str]:
        link = live.current()
        if link is None:
            self.report({"ERROR"}, "not connected: press Connect first, then Record")
            return {"CANCELLED"}
        if link.recording is None:
            detached = link.start_recording(context.scene.frame_current)
            kept = f"; the rig's actions {', '.join(detached)} are unassigned (kept)" if detached else ""
            self.report({"INFO"}, f"recording from frame {context.scene.frame_current}{kept}")
        else:
            _finish_recording(self, context, link)
        return {"FINISHED"}


class FLAMELIVE_OT_import_tracking(bpy.types.Operator):
    """Key a 'track' output folder or a 'live --record' session onto the selected FLAME rig"""

    bl_idname = "flame_live.import_tracking"
    bl_label = "Import tracking"
    bl_options = {"REGISTER", "UNDO"}

    directory: StringProperty(
        name="Folder", subtype="DIR_PATH", description="'track' output folder or recorded session"
    )

    def invoke(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def execute(self, context: bpy.types.Context) -> set[str]:
        try:
            flame_rig = _selected_rig(context)
            motion = load_motion(Path(bpy.path.abspath(self.directory)))
        except (RigError, RecordingError) as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        scene = context.scene
        keyed = key_motion(
            flame_rig, motion.times, motion.poses, scene.frame_current, _scene_fps(scene), Path(motion.source).name
        )
        if not keyed.keyed_frames:
            self.report({"ERROR"}, f"{motion.source}: no frame with a face to key")
            return {"CANCELLED"}
        _extend_scene(scene, keyed.last_frame)
        held = f", {keyed.held_frames} without a face hold the last pose" if keyed.held_frames else ""
        self.report(
            {"INFO"},
            f"keyed {keyed.keyed_frames} frames ({keyed.first_frame}-{keyed.last_frame}) "
            f"onto {flame_rig.armature.name}{held}",
        )
        return {"FINISHED"}


class VIEW3D_PT_flame_live(bpy.types.Panel):
    bl_label = "flame-live"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "flame-live"

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        settings = context.scene.flame_live
        link = live.current()
        column = layout.column()
        column.enabled = link is None
        column.prop(settings, "host")
        column.prop(settings, "port")
        if link is None:
            layout.operator(FLAMELIVE_OT_connect.bl_idname, icon="LINKED")
            if live.stopped_because():
                layout.label(text=live.stopped_because(), icon="ERROR")
        else:
            layout.operator(FLAMELIVE_OT_disconnect.bl_idname, icon="UNLINKED")
            recording = link.recording is not None
            layout.operator(
                FLAMELIVE_OT_record.bl_idname,
                text="Stop and key" if recording else "Record",
                icon="REC",
                depress=recording,
            )
            counts = link.counts
            box = layout.box()
            box.label(
                text=f"{link.rig.armature.name}: frame {link.applied_seq if link.applied_seq is not None else '-'}"
            )
            box.label(text=f"frames {counts.frames}, no face {counts.no_face}, late {counts.late}")
            if counts.foreign or counts.invalid:
                box.label(text=f"ignored: {counts.foreign} foreign, {counts.invalid} invalid", icon="ERROR")
        layout.separator()
        layout.operator(FLAMELIVE_OT_import_tracking.bl_idname, icon="IMPORT")


CLASSES = (
    FlameLiveSettings,
    FLAMELIVE_OT_connect,
    FLAMELIVE_OT_disconnect,
    FLAMELIVE_OT_record,
    FLAMELIVE_OT_import_tracking,
    VIEW3D_PT_flame_live,
)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.flame_live = PointerProperty(type=FlameLiveSettings)


def unregister() -> None:
    live.disconnect()
    del bpy.types.Scene.flame_live
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
