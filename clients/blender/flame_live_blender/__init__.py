"""flame-live for Blender: drive a FLAME head rig imported from glTF, live over OSC or from tracking files.

Install the zip that ``python run_stream.py blender-addon --out flame_live_blender.zip`` builds
(Edit > Preferences > Add-ons > Install from Disk), import the rig that ``run_stream.py export --gltf`` writes
(File > Import > glTF 2.0), then use the "flame-live" tab of the 3D view's sidebar.

The modules that do not touch Blender (``osc``, ``stream``, ``msgpack_reader``, ``poses``, ``recordings``) need
only the standard library and numpy, so they are tested outside Blender too; ``bpy`` is imported only when
Blender registers the add-on.
"""

bl_info = {
    "name": "flame-live",
    "author": "flame-live contributors",
    "version": (0, 1, 0),
    "blender": (4, 2, 0),
    "location": "View3D > Sidebar > flame-live",
    "description": "Live link and tracking import for FLAME head rigs exported by flame-live (glTF)",
    "category": "Animation",
}


def register() -> None:
    from . import ui

    ui.register()


def unregister() -> None:
    from . import ui

    ui.unregister()
