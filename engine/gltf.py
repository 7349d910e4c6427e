"""The FLAME rig as glTF 2.0 binary (.glb): mesh, morph targets, skin and an optional animation.

Fixed names, which the Blender and Unity clients rely on (the maths is in ``flame_client.rig``):

- one mesh node ``flame_head`` (mesh ``flame_head``), skinned; vertices in FLAME model space (y up, z toward
  the viewer, metres) with the identity baked in, split where the UV map has seams;
- joints ``root``, ``neck``, ``jaw``, ``left_eye``, ``right_eye`` (FLAME's joint order 0..4; neck under root,
  jaw and eyes under neck) at the identity's joint positions, FLAME's skinning weights in ``JOINTS_0``/
  ``WEIGHTS_0`` and, where a vertex has more than four influences, ``JOINTS_1``/``WEIGHTS_1``;
- morph targets ``exp_000`` ... ``exp_{n-1}`` (weight = expression coefficient) then ``pose_000`` ...
  ``pose_035`` (weight = FLAME's pose feature, ``flame_client.rig.pose_corrective_weights``), then, when the
  model has metrical-tracker's eyelid blendshapes, ``eyelid_left`` and ``eyelid_right``, named in
  ``mesh.extras.targetNames``; ``mesh.extras`` also holds ``flameJointRest``, ``flameJointExpBasis`` (how the
  joints move with the expression), ``flameModel`` and ``flameModelChecksum``;
- with a sequence, one animation ``flame_tracking``: the mesh node's morph weights and every joint's
  translation and rotation per frame (the root joint carries the head transform), LINEAR between frames;
  and a camera node ``camera`` at the origin looking down -Z with the sequence's field of view.

glTF world = ``diag(1, -1, -1)`` x OpenCV camera space (an OpenGL camera at the origin), see
``flame_client.rig``. Evaluated at a frame's time with glTF's morph and skinning formulas, the mesh is FLAME's
posed mesh for that frame, placed in that world.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from engine.errors import UserError
from engine.head_model import JOINT_NAMES, HeadModel
from flame_client.rig import (
    JOINT_PARENTS,
    MESH_NODE_NAME,
    Skeleton,
    joint_transforms,
    pose_corrective_weights,
    target_names,
)

ANIMATION_NAME = "flame_tracking"
CAMERA_NODE_NAME = "camera"
_FLOAT, _UNSIGNED_BYTE, _UNSIGNED_SHORT, _UNSIGNED_INT = 5126, 5121, 5123, 5125
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_TYPE_OF_WIDTH = {1: "SCALAR", 2: "VEC2", 3: "VEC3", 4: "VEC4", 16: "MAT4"}
_SKIN_COLOUR = [0.80, 0.66, 0.58, 1.0]


@dataclass(frozen=True)
class RigAnimation:
    """Per-frame rig parameters. Rotations map FLAME model space to glTF world: ``x = R x_model + t``."""

    times: np.ndarray  # (T,) seconds, increasing, first 0
    exp: np.ndarray  # (T, n_exp)
    joint_poses: np.ndarray  # (T, 4, 3) axis-angle of neck, jaw, left eye, right eye
    head_rotation: np.ndarray  # (T, 3, 3)
    head_translation: np.ndarray  # (T, 3) metres
    valid: np.ndarray  # (T,) bool
    eyelids: np.ndarray | None = None  # (T, 2) left, right (0 open, 1 closed); None: tracked without eyelids

    def held(self) -> RigAnimation:
        """Invalid frames take the last valid frame's pose (those before the first valid one, the first's)."""
        valid = np.flatnonzero(self.valid)
        if valid.size == 0:
            raise UserError("no frame of the sequence has a tracked face: there is no pose to export")
        source = np.maximum.accumulate(np.where(self.valid, np.arange(self.valid.size), -1))
        source[source < 0] = valid[0]
        return replace(
            self, exp=self.exp[source], joint_poses=self.joint_poses[source], head_rotation=self.head_rotation[source],
            head_translation=self.head_translation[source], valid=np.ones_like(self.valid),
            eyelids=None if self.eyelids is None else self.eyelids[source],
        )  # fmt: skip


@dataclass(frozen=True)
class CameraView:
    """The camera a sequence was tracked with: vertical field of view and the image's width / height."""

    fov_deg: float
    aspect: float | None


def skeleton_of(head: HeadModel, shape: np.ndarray, n_exp: int) -> Skeleton:
    """The identity's rest joints (expression zero) and how they move with the first ``n_exp`` expressions."""
    rest = head.j_regressor @ shaped_template(head, shape)
    basis = np.einsum("jv,vce->jce", head.j_regressor, head.exprdirs[:, :, :n_exp])
    return Skeleton(rest=rest, exp_basis=basis)


def shaped_template(head: HeadModel, shape: np.ndarray) -> np.ndarray:
    """(V, 3) the neutral mesh of an identity: FLAME's template plus the shape blendshapes."""
    return head.v_template + head.shapedirs[:, :, : shape.size] @ shape


def build_glb(
    head: HeadModel,
    shape: np.ndarray,
    n_exp: int,
    animation: RigAnimation | None = None,
    texture_png: bytes | None = None,
    camera: CameraView | None = None,
) -> bytes:
    """The rig of ``head`` with identity ``shape`` and ``n_exp`` expression targets as .glb bytes (and the
    two eyelid targets when the head has eyelid blendshapes)."""
    if tuple(int(p) for p in head.parents) != JOINT_PARENTS or tuple(JOINT_NAMES) != ("root", "neck", "jaw", "left_eye", "right_eye"):
        raise UserError(f"the {head.name} does not have FLAME's five-joint tree; a glTF rig cannot be made from it")
    shape = np.asarray(shape, dtype=np.float64).reshape(-1)
    builder = _GlbBuilder()
    skeleton = skeleton_of(head, shape, n_exp)
    vertex_source, texcoords, corner_faces = _split_seams(head)
    mesh_index = _add_mesh(builder, head, shape, n_exp, skeleton, vertex_source, texcoords, corner_faces, texture_png)
    joint_nodes = list(range(1, 1 + len(JOINT_NAMES)))
    nodes: list[dict[str, Any]] = [{"name": MESH_NODE_NAME, "mesh": mesh_index, "skin": 0}]
    for joint, name in enumerate(JOINT_NAMES):
        parent = JOINT_PARENTS[joint]
        offset = skeleton.rest[joint] - (skeleton.rest[parent] if parent >= 0 else 0.0)
        node: dict[str, Any] = {"name": name, "translation": offset.tolist()}
        children = [joint_nodes[child] for child in range(len(JOINT_NAMES)) if JOINT_PARENTS[child] == joint]
        if children:
            node["children"] = children
        nodes.append(node)
    inverse_bind = np.zeros((len(JOINT_NAMES), 4, 4))
    inverse_bind[:] = np.eye(4)
    inverse_bind[:, :3, 3] = -skeleton.rest
    # glTF matrices are column-major: write each matrix transposed, row-major.
    bind_accessor = builder.accessor(inverse_bind.transpose(0, 2, 1).reshape(-1, 16), _FLOAT)
    builder.document["skins"] = [{"name": "flame_skeleton", "joints": joint_nodes, "skeleton": joint_nodes[0], "inverseBindMatrices": bind_accessor}]
    scene_nodes = [0, joint_nodes[0]]
    if camera is not None:
        projection: dict[str, Any] = {"yfov": float(np.radians(camera.fov_deg)), "znear": 0.01}
        if camera.aspect:
            projection["aspectRatio"] = float(camera.aspect)
        builder.document["cameras"] = [{"name": CAMERA_NODE_NAME, "type": "perspective", "perspective": projection}]
        nodes.append({"name": CAMERA_NODE_NAME, "camera": 0})
        scene_nodes.append(len(nodes) - 1)
    builder.document["nodes"] = nodes
    builder.document["scenes"] = [{"name": "flame_live", "nodes": scene_nodes}]
    builder.document["scene"] = 0
    if animation is not None:
        _add_animation(builder, skeleton, n_exp, head.n_eyelids, animation.held(), joint_nodes)
    return builder.glb()


# ---------------------------------------------------------------------------------------------------------------
# Mesh


def _split_seams(head: HeadModel) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """glTF stores one UV per vertex: a FLAME vertex on a UV seam becomes one glTF vertex per UV it uses.

    Returns the FLAME vertex of each glTF vertex, their UVs (glTF's: v down) or None, and the glTF triangles.
    """
    if head.uv_coords is None or head.uv_faces is None:
        return np.arange(head.n_vertices), None, head.faces
    pairs = np.stack([head.faces.reshape(-1), head.uv_faces.reshape(-1)], axis=1)
    unique, corner_index = np.unique(pairs, axis=0, return_inverse=True)
    # Vertices that no triangle uses keep their own glTF vertex (with a UV of 0), so every FLAME vertex exists.
    unused = np.setdiff1d(np.arange(head.n_vertices), unique[:, 0])
    source = np.concatenate([unique[:, 0], unused])
    uv = np.concatenate([head.uv_coords[unique[:, 1]], np.zeros((unused.size, 2))])
    return source, np.stack([uv[:, 0], 1.0 - uv[:, 1]], axis=1), corner_index.reshape(-1, 3)


def _vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit normals; a vertex on no triangle gets +y so every normal has unit length."""
    corners = vertices[faces]
    face_normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normals = np.zeros_like(vertices)
    for corner in range(3):
        np.add.at(normals, faces[:, corner], face_normals)
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    return np.where(length > 1e-12, normals / np.maximum(length, 1e-12), [0.0, 1.0, 0.0])


def _skin_sets(weights: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """FLAME's (V, J) weights as glTF sets of four (joints uint8, weights float32), largest first, each vertex
    summing to 1 in float32 as the validator checks."""
    order = np.argsort(-weights, axis=1, kind="stable")
    sorted_weights = np.take_along_axis(weights, order, axis=1)
    influences = int((sorted_weights > 0).sum(axis=1).max())
    width = 4 * max(1, -(-influences // 4))
    joints = np.zeros((weights.shape[0], width), np.uint8)
    values = np.zeros((weights.shape[0], width))
    used = min(width, weights.shape[1])
    joints[:, :used], values[:, :used] = order[:, :used], sorted_weights[:, :used]
    joints[values == 0] = 0
    values /= values.sum(axis=1, keepdims=True)
    values = values.astype(np.float32)
    # Put the float32 rounding of the sum onto the largest weight.
    values[:, 0] = (1.0 - values[:, 1:].astype(np.float64).sum(axis=1)).astype(np.float32)
    return [(joints[:, k : k + 4], values[:, k : k + 4]) for k in range(0, width, 4)]


def _add_mesh(
    builder: _GlbBuilder,
    head: HeadModel,
    shape: np.ndarray,
    n_exp: int,
    skeleton: Skeleton,
    source: np.ndarray,
    texcoords: np.ndarray | None,
    faces: np.ndarray,
    texture_png: bytes | None,
) -> int:
    neutral = shaped_template(head, shape)
    attributes = {
        "POSITION": builder.accessor(neutral[source], _FLOAT, _ARRAY_BUFFER, bounds=True),
        "NORMAL": builder.accessor(_vertex_normals(neutral, head.faces)[source], _FLOAT, _ARRAY_BUFFER),
    }
    if texcoords is not None:
        attributes["TEXCOORD_0"] = builder.accessor(texcoords, _FLOAT, _ARRAY_BUFFER)
    for index, (joints, weights) in enumerate(_skin_sets(head.lbs_weights[source])):
        attributes[f"JOINTS_{index}"] = builder.accessor(joints, _UNSIGNED_BYTE, _ARRAY_BUFFER)
        attributes[f"WEIGHTS_{index}"] = builder.accessor(weights, _FLOAT, _ARRAY_BUFFER)
    bases = [head.exprdirs[:, :, :n_exp], head.posedirs] + ([head.eyelids] if head.eyelids is not None else [])
    directions = np.concatenate(bases, axis=2)[source]
    targets = [{"POSITION": builder.accessor(directions[:, :, k], _FLOAT, _ARRAY_BUFFER, bounds=True)} for k in range(directions.shape[2])]
    index_type = _UNSIGNED_SHORT if len(source) <= 0xFFFF else _UNSIGNED_INT
    indices = faces.astype(np.uint16 if index_type == _UNSIGNED_SHORT else np.uint32).reshape(-1, 1)
    primitive = {
        "attributes": attributes, "indices": builder.accessor(indices, index_type, _ELEMENT_ARRAY_BUFFER),
        "material": _add_material(builder, texture_png if texcoords is not None else None), "targets": targets, "mode": 4,
    }  # fmt: skip
    extras = {
        "targetNames": list(target_names(n_exp, head.eyelids is not None)), **skeleton.to_extras(),
        "flameModel": head.name, "flameModelChecksum": head.checksum,
    }  # fmt: skip
    builder.document["meshes"] = [{"name": MESH_NODE_NAME, "primitives": [primitive], "weights": [0.0] * len(targets), "extras": extras}]
    return 0


def _add_material(builder: _GlbBuilder, texture_png: bytes | None) -> int:
    pbr: dict[str, Any] = {"metallicFactor": 0.0, "roughnessFactor": 0.7}
    if texture_png is None:
        pbr["baseColorFactor"] = _SKIN_COLOUR
    else:
        builder.document["images"] = [{"name": "texture", "mimeType": "image/png", "bufferView": builder.view(texture_png)}]
        builder.document["samplers"] = [{"magFilter": 9729, "minFilter": 9987, "wrapS": 33071, "wrapT": 33071}]
        builder.document["textures"] = [{"source": 0, "sampler": 0}]
        pbr["baseColorTexture"] = {"index": 0}
    builder.document["materials"] = [{"name": "flame_skin", "pbrMetallicRoughness": pbr}]
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Animation


def _add_animation(
    builder: _GlbBuilder, skeleton: Skeleton, n_exp: int, n_eyelids: int, animation: RigAnimation, joint_nodes: list[int]
) -> None:
    frames = animation.times.size
    weights = np.zeros((frames, n_exp + 36 + n_eyelids))
    translations = np.empty((frames, len(JOINT_NAMES), 3))
    rotations = np.empty((frames, len(JOINT_NAMES), 4))
    for frame in range(frames):
        exp = animation.exp[frame]
        weights[frame, : n_exp + 36] = np.concatenate([exp, pose_corrective_weights(*animation.joint_poses[frame])])
        translations[frame], rotations[frame] = joint_transforms(
            skeleton, exp, animation.head_rotation[frame], animation.head_translation[frame], animation.joint_poses[frame]
        )
    if n_eyelids and animation.eyelids is not None:  # else the lids stay open
        weights[:, n_exp + 36 :] = animation.eyelids
    # q and -q are the same rotation; keep neighbours in the same hemisphere so interpolation takes the short way.
    for frame in range(1, frames):
        flip = np.einsum("jc,jc->j", rotations[frame], rotations[frame - 1]) < 0
        rotations[frame, flip] *= -1
    times = builder.accessor(animation.times.reshape(-1, 1), _FLOAT, bounds=True)
    samplers = [{"input": times, "output": builder.accessor(weights.reshape(-1, 1), _FLOAT), "interpolation": "LINEAR"}]
    channels = [{"sampler": 0, "target": {"node": 0, "path": "weights"}}]
    for joint, node in enumerate(joint_nodes):
        for path, values in (("translation", translations[:, joint]), ("rotation", rotations[:, joint])):
            samplers.append({"input": times, "output": builder.accessor(values, _FLOAT), "interpolation": "LINEAR"})
            channels.append({"sampler": len(samplers) - 1, "target": {"node": node, "path": path}})
    builder.document["animations"] = [{"name": ANIMATION_NAME, "samplers": samplers, "channels": channels}]


# ---------------------------------------------------------------------------------------------------------------
# Binary container


class _GlbBuilder:
    """Accumulates the JSON document and the binary chunk; every buffer view starts 4-byte aligned."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"asset": {"version": "2.0", "generator": "flame-live"}, "accessors": [], "bufferViews": []}
        self._chunks: list[bytes] = []
        self._length = 0

    def view(self, data: bytes, target: int | None = None) -> int:
        view: dict[str, Any] = {"buffer": 0, "byteOffset": self._length, "byteLength": len(data)}
        if target is not None:
            view["target"] = target
        padded = data + b"\0" * (-len(data) % 4)
        self._chunks.append(padded)
        self._length += len(padded)
        self.document["bufferViews"].append(view)
        return len(self.document["bufferViews"]) - 1

    def accessor(self, values: np.ndarray, component: int, target: int | None = None, bounds: bool = False) -> int:
        """An accessor over ``values`` (N, width) stored as ``component``; ``bounds`` adds min/max (POSITION)."""
        dtype = {_FLOAT: np.float32, _UNSIGNED_BYTE: np.uint8, _UNSIGNED_SHORT: np.uint16, _UNSIGNED_INT: np.uint32}[component]
        array = np.ascontiguousarray(values, dtype=dtype)
        array = array.reshape(array.shape[0], -1)
        accessor: dict[str, Any] = {
            "bufferView": self.view(array.tobytes(), target), "componentType": component,
            "count": int(array.shape[0]), "type": _TYPE_OF_WIDTH[array.shape[1]],
        }  # fmt: skip
        if bounds:
            accessor["min"] = array.min(axis=0).astype(np.float64).tolist()
            accessor["max"] = array.max(axis=0).astype(np.float64).tolist()
        self.document["accessors"].append(accessor)
        return len(self.document["accessors"]) - 1

    def glb(self) -> bytes:
        binary = b"".join(self._chunks)
        self.document["buffers"] = [{"byteLength": len(binary)}]
        text = json.dumps(self.document, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 4)
        total = 12 + 8 + len(text) + 8 + len(binary)
        return (
            struct.pack("<4sII", b"glTF", 2, total)
            + struct.pack("<I4s", len(text), b"JSON") + text
            + struct.pack("<I4s", len(binary), b"BIN\0") + binary
        )  # fmt: skip
