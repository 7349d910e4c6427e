"""Building the installable add-on zip (``python run_stream.py blender-addon --out flame_live_blender.zip``).

The zip holds the folder ``flame_live_blender/`` as Blender's "Install from Disk" expects, with this package's
modules (this builder excepted) and a copy of ``flame_client.rig`` and ``flame_client.rotations`` in
``vendored/flame_client/``: the rig maths every client shares, which need only numpy. The copy is checked to
import nothing beyond numpy and the standard library, since Blender's Python has nothing else.
"""

from __future__ import annotations

import ast
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import flame_client

PACKAGE_DIR = Path(__file__).resolve().parent
ADDON_NAME = PACKAGE_DIR.name
VENDORED_MODULES = ("rig.py", "rotations.py")
VENDORED_INIT = (
    '"""Copy of flame_client\'s pure maths (rig, rotations) for Blender, which lacks pyzmq and msgpack."""\n'
)
ALLOWED_IMPORTS = {"numpy", "__future__"} | set(sys.stdlib_module_names)


class PackagingError(Exception):
    """The add-on cannot be built; one line."""


def addon_files() -> dict[str, bytes]:
    """Archive name -> content of every file of the add-on zip."""
    files = {
        f"{ADDON_NAME}/{path.name}": path.read_bytes()
        for path in sorted(PACKAGE_DIR.glob("*.py"))
        if path.name != Path(__file__).name
    }
    client_dir = Path(flame_client.__file__).resolve().parent
    vendored = f"{ADDON_NAME}/vendored"
    files[f"{vendored}/__init__.py"] = VENDORED_INIT.encode()
    files[f"{vendored}/flame_client/__init__.py"] = VENDORED_INIT.encode()
    for name in VENDORED_MODULES:
        source = (client_dir / name).read_bytes()
        _check_imports(name, source)
        files[f"{vendored}/flame_client/{name}"] = source
    return files


def _check_imports(name: str, source: bytes) -> None:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules = [node.module or ""]
        else:
            continue
        for module in modules:
            if module.split(".")[0] not in ALLOWED_IMPORTS:
                raise PackagingError(
                    f"flame_client/{name} imports {module}, which Blender lacks: "
                    "keep its imports to numpy and relative ones"
                )


def build_addon_zip(out: Path) -> int:
    """Write the zip atomically; returns the number of files in it."""
    files = addon_files()
    out.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as stream, zipfile.ZipFile(stream, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, content in files.items():
                archive.writestr(name, content)
        os.chmod(temporary, 0o644)
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return len(files)
