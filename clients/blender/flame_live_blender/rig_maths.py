"""The FLAME rig maths every client shares, ``flame_client.rig`` and ``flame_client.rotations`` (numpy only).

The add-on zip carries a copy of those two modules in ``vendored/flame_client`` (``run_stream.py blender-addon``
puts it there), because Blender's Python has neither pyzmq nor msgpack, which the full package imports. From a
repository checkout the installed ``flame_client`` is used instead; either way it is the same code.
"""

try:
    from .vendored.flame_client import rig, rotations
except ImportError:  # a repository checkout, where flame_client is installed with the project
    from flame_client import rig, rotations  # type: ignore[no-redef]

__all__ = ["rig", "rotations"]
