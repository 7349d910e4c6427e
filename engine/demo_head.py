"""The demo head: a head model with FLAME's layout, built at run time from MediaPipe's canonical face.

It lets the tracker, the live demo and the clients run for anyone who has not registered for FLAME. It is
*not* FLAME and is labelled so everywhere (``name``, ``is_demo``). What it is made of:

- geometry: the 468 vertices and 898 triangles of the canonical face inside ``face_landmarker.task``
  (:mod:`engine.canonical_face`), plus the 10 iris points, so that vertex ``i`` is MediaPipe landmark ``i``
  for all 478 landmarks; the iris fans come after the 898 mesh triangles, whose indices stay MediaPipe's;
- joints root, neck, jaw, left eye, right eye ("left" is the subject's left, +x, as in FLAME), regressed
  from the vertices so that they follow the identity shape;
- skinning: the face on the neck joint, a smooth jaw region on the jaw joint, each iris on its eye joint;
- a small procedural identity basis (:data:`DEMO_SHAPES`) and expression basis (:data:`DEMO_EXPRESSIONS`),
  each component's unit coefficient being about one standard deviation (identity) or one full expression;
- no pose correctives.

Model space as everywhere: metres, y up, z toward the viewer; the origin is midway between the points
where the mesh meets the ears (landmarks 234 and 454).
"""

from __future__ import annotations

import copy
import hashlib
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.canonical_face import CanonicalFace, load_canonical_face
from engine.head_model import JOINT_NAMES, Embedding, HeadModel, MediapipeEmbedding, ModelFileError
from engine.landmarks import LEFT_IRIS, MAPPING_FILE, N_LANDMARKS, N_MESH_LANDMARKS, RIGHT_IRIS, load_mediapipe_to_68

DEMO_HEAD_NAME = "demo head (not FLAME)"

#: Identity components, in shapedirs order; unit coefficient = about one standard deviation (a few mm).
DEMO_SHAPES: tuple[str, ...] = (
    "head_width", "head_height", "head_depth", "face_length", "jaw_width",
    "nose_length", "nose_width", "eye_spacing", "brow_height", "mouth_width",
)  # fmt: skip

#: Expression components, in exprdirs order; unit coefficient = the full expression. Left/right are the
#: subject's. ``mouth_open`` parts the lips only: the jaw joint drops the jaw, as in FLAME.
DEMO_EXPRESSIONS: tuple[str, ...] = (
    "mouth_open", "eye_close_left", "eye_close_right", "eye_wide_left", "eye_wide_right",
    "smile_left", "smile_right", "mouth_frown", "brow_raise_left", "brow_raise_right",
    "brow_lower_left", "brow_lower_right", "pucker", "mouth_stretch", "mouth_left", "cheek_puff",
)  # fmt: skip

IRIS_RADIUS_M = 0.0058
#: How far each eye's rotation centre lies behind its iris centre.
EYE_CENTRE_DEPTH_M = 0.012
#: Joint locations relative to the origin (between the ears), for the template; the regressor keeps them
#: in place relative to the face as the identity changes.
_ROOT_OFFSET_M = (0.0, -0.08, -0.015)  # low in the neck
_NECK_OFFSET_M = (0.0, -0.03, -0.01)  # skull base, below and behind the ears
_JAW_OFFSET_M = (0.0, -0.01, 0.005)  # jaw hinge, just in front of the ears

# MediaPipe landmark groups; "left" is the subject's left (+x in model space).
_EAR_POINTS = (234, 454)
_NOSE_TIP, _SUBNASALE, _CHIN = 4, 2, 152
_NOSTRILS = (98, 327)
# Eye openings as closed loops: outer corner, lower lid (outer to inner), inner corner, upper lid (inner to outer).
_RIGHT_EYE_LOOP = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246)
_LEFT_EYE_LOOP = (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466)
# Lid interiors, outer to inner; upper[k] lies above lower[k].
_RIGHT_UPPER_LID = (246, 161, 160, 159, 158, 157, 173)
_RIGHT_LOWER_LID = (7, 163, 144, 145, 153, 154, 155)
_LEFT_UPPER_LID = (466, 388, 387, 386, 385, 384, 398)
_LEFT_LOWER_LID = (249, 390, 373, 374, 380, 381, 382)
_RIGHT_EYE_CORNERS = (33, 133)
_LEFT_EYE_CORNERS = (263, 362)
_RIGHT_BROW = (70, 63, 105, 66, 107, 46, 53, 52, 65, 55)
_LEFT_BROW = (300, 293, 334, 296, 336, 276, 283, 282, 295, 285)
_RIGHT_INNER_BROW = (107, 66, 55, 65)
_LEFT_INNER_BROW = (336, 296, 285, 295)
# The mouth opening as a closed loop, and the lips without their corners.
_INNER_LIP_LOOP = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191)
_UPPER_LIP = (191, 80, 81, 82, 13, 312, 311, 310, 415, 185, 40, 39, 37, 0, 267, 269, 270, 409)
_LOWER_LIP = (95, 88, 178, 87, 14, 317, 402, 318, 324, 146, 91, 181, 84, 17, 314, 405, 321, 375)
_RIGHT_MOUTH_CORNER = (61, 78)
_LEFT_MOUTH_CORNER = (291, 308)
_RIGHT_CHEEK = (50, 205, 187)
_LEFT_CHEEK = (280, 425, 411)
# The face outline, the lower part of which lies on the mandible.
_FACE_OVAL = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
    152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)  # fmt: skip
_JAWLINE = (172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397)
_UNDER_LIP = (199, 175, 18, 200)
_ABOVE_JAW_ANGLE = (132, 361)

_cache: dict[tuple[str, int, int], HeadModel] = {}
_cache_lock = threading.Lock()


def build_demo_head(task_path: Path) -> HeadModel:
    """The demo head from a MediaPipe ``face_landmarker.task``; ModelFileError if the file is unusable.

    Built once per file path and modification time in this process; every call returns its own copy.
    """
    task_path = Path(task_path)
    try:
        stat = task_path.stat()
    except OSError:
        return _build(task_path)  # raises the loader's one-line ModelFileError
    key = (str(task_path.resolve()), stat.st_mtime_ns, stat.st_size)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = _build(task_path)
        return copy.deepcopy(_cache[key])


def _build(task_path: Path) -> HeadModel:
    face = load_canonical_face(task_path)
    mesh = (face.vertices - face.vertices[list(_EAR_POINTS)].mean(axis=0)) * 0.01  # cm -> m, origin between ears
    graph = _FaceGraph(mesh, face.triangles, openings=(_RIGHT_EYE_LOOP, _LEFT_EYE_LOOP, _INNER_LIP_LOOP))
    vertices = np.concatenate([mesh, _iris_vertices(mesh, _RIGHT_EYE_LOOP), _iris_vertices(mesh, _LEFT_EYE_LOOP)])
    faces = np.concatenate([face.triangles, _iris_fan(RIGHT_IRIS), _iris_fan(LEFT_IRIS)])
    full68 = _full68_embedding(face)
    expressions = np.stack([graph.deform(deformation) for deformation in _expression_deformations(mesh)], axis=-1)
    model = HeadModel(
        name=DEMO_HEAD_NAME,
        is_demo=True,
        v_template=vertices,
        shapedirs=_with_irises(_identity_basis(mesh), follow_eyes=True),
        exprdirs=_with_irises(expressions, follow_eyes=False),
        posedirs=np.zeros((N_LANDMARKS, 3, 9 * (len(JOINT_NAMES) - 1))),
        j_regressor=_joint_regressor(vertices),
        lbs_weights=_skinning_weights(graph),
        parents=np.array([-1, 0, 1, 1, 1], dtype=np.int64),
        faces=faces,
        static68=Embedding(full68.face_idx[17:].copy(), full68.bary[17:].copy()),  # iBUG 18..68
        full68=full68,
        mediapipe=_mediapipe_embedding(faces),
        uv_coords=_uv_coords(face, vertices),
        uv_faces=faces.copy(),
        sources={task_path.name: hashlib.sha256(task_path.read_bytes()).hexdigest()},
    )
    model.validate()
    return model


# ------------------------------------------------------------------------------------------------ geometry
def _iris_vertices(mesh: np.ndarray, eye_loop: Sequence[int]) -> np.ndarray:
    """(5, 3) iris centre then boundary at +x, +y, -x, -y: MediaPipe's order for both eyes (checked on images)."""
    centre = mesh[list(eye_loop)].mean(axis=0)
    offsets = IRIS_RADIUS_M * np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [-1, 0, 0], [0, -1, 0]], dtype=np.float64)
    return centre + offsets


def _iris_fan(iris: Sequence[int]) -> np.ndarray:
    """Four triangles around the iris centre, counter-clockwise seen from the front like the face mesh."""
    centre, ring = iris[0], list(iris[1:])
    return np.array([[centre, ring[k], ring[(k + 1) % 4]] for k in range(4)], dtype=np.int64)


def _with_irises(mesh_basis: np.ndarray, follow_eyes: bool) -> np.ndarray:
    """Extend a (468, 3, K) basis to 478 vertices: irises follow their eye opening, or stay still."""
    iris_rows = np.zeros((N_LANDMARKS - N_MESH_LANDMARKS, 3, mesh_basis.shape[2]))
    if follow_eyes:
        iris_rows[:5] = mesh_basis[list(_RIGHT_EYE_LOOP)].mean(axis=0)
        iris_rows[5:] = mesh_basis[list(_LEFT_EYE_LOOP)].mean(axis=0)
    return np.concatenate([mesh_basis, iris_rows])


def _uv_coords(face: CanonicalFace, vertices: np.ndarray) -> np.ndarray:
    """MediaPipe's uv with v flipped to point up; iris uv mapped from positions by each eye's local fit."""
    uv = np.column_stack([face.uv[:, 0], 1.0 - face.uv[:, 1]])
    iris_uv = []
    for loop, iris in ((_RIGHT_EYE_LOOP, RIGHT_IRIS), (_LEFT_EYE_LOOP, LEFT_IRIS)):
        # An affine map xy -> uv fitted on the eye opening; it places the iris disc inside the eye's texture.
        xy1 = np.column_stack([vertices[list(loop), :2], np.ones(len(loop))])
        affine, *_ = np.linalg.lstsq(xy1, uv[list(loop)], rcond=None)
        iris_uv.append(np.column_stack([vertices[list(iris), :2], np.ones(len(iris))]) @ affine)
    return np.clip(np.concatenate([uv, *iris_uv]), 0.0, 1.0)


class _FaceGraph:
    """Smooth fields over the canonical mesh, with the eye and mouth openings cut open.

    MediaPipe's mesh is triangulated across the eyes and the mouth; dropping those chords lets a field
    (an eyelid's motion, the jaw's weight) differ on either side of an opening, as on a real face.
    """

    def __init__(self, vertices: np.ndarray, triangles: np.ndarray, openings: Iterable[Sequence[int]]) -> None:
        self.vertices = vertices
        edges = np.unique(np.sort(triangles[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1), axis=0)
        chords = set()
        for loop in openings:
            rim = {frozenset(pair) for pair in zip(loop, (*loop[1:], loop[0]))}
            members = set(loop)
            chords |= {(a, b) for a, b in edges.tolist() if {a, b} <= members and frozenset((a, b)) not in rim}
        edges = np.array([edge for edge in map(tuple, edges.tolist()) if edge not in chords])
        count = len(vertices)
        adjacency = np.zeros((count, count))
        # Inverse edge lengths keep fields smooth where the mesh is dense (around eyes and lips).
        weights = 1.0 / np.linalg.norm(vertices[edges[:, 0]] - vertices[edges[:, 1]], axis=1)
        adjacency[edges[:, 0], edges[:, 1]] = weights
        adjacency[edges[:, 1], edges[:, 0]] = weights
        self.laplacian = np.eye(count) - adjacency / adjacency.sum(axis=1, keepdims=True)
        self.bilaplacian = self.laplacian.T @ self.laplacian

    @staticmethod
    def _solve(operator: np.ndarray, known: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Field equal to ``values`` on ``known`` vertices, minimising ``operator``'s energy elsewhere."""
        free = np.setdiff1d(np.arange(operator.shape[0]), known)
        field = np.zeros((operator.shape[0],) + values.shape[1:])
        field[known] = values
        field[free] = np.linalg.solve(operator[np.ix_(free, free)], -operator[np.ix_(free, known)] @ values)
        return field

    def harmonic(self, known: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Interpolation that stays within the known values' range (for skinning weights)."""
        return self._solve(self.laplacian, known, values)

    def deform(self, deformation: _Deformation) -> np.ndarray:
        """(V, 3) displacement: smooth (biharmonic), exact at the anchors, zero when pinned or out of reach."""
        anchors = np.asarray(deformation.anchors)
        distance = np.linalg.norm(self.vertices[:, None] - self.vertices[anchors][None], axis=2).min(axis=1)
        # The face outline (hairline, ears, jaw edge) stays put in every expression.
        pinned = np.asarray(deformation.pinned + _FACE_OVAL, dtype=np.int64)
        still = np.union1d(pinned, np.flatnonzero(distance > deformation.reach))
        still = np.setdiff1d(still, anchors)
        known = np.concatenate([anchors, still])
        values = np.concatenate([deformation.displacement, np.zeros((len(still), 3))])
        return self._solve(self.bilaplacian, known, values)


# ------------------------------------------------------------------------------------------------ identity
def _gaussian(points: np.ndarray, centre: np.ndarray, sigma: float) -> np.ndarray:
    return np.exp(-np.sum((points - centre) ** 2, axis=-1) / (2 * sigma**2))


def _ramp(value: np.ndarray, start: float, end: float) -> np.ndarray:
    """Smoothstep from 0 at ``start`` to 1 at ``end``."""
    t = np.clip((value - start) / (end - start), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _identity_basis(mesh: np.ndarray) -> np.ndarray:
    """(468, 3, 10) smooth identity fields in metres, one per DEMO_SHAPES name, about 1 SD each."""
    x, y, z = mesh.T
    zeros = np.zeros_like(x)
    mouth_centre = mesh[[13, 14]].mean(axis=0)
    mouth_level, subnasale, chin = mesh[list(_RIGHT_MOUTH_CORNER), 1].mean(), mesh[_SUBNASALE, 1], mesh[_CHIN, 1]
    eye_right, eye_left = mesh[list(_RIGHT_EYE_LOOP)].mean(axis=0), mesh[list(_LEFT_EYE_LOOP)].mean(axis=0)
    lid_top, brow_level = mesh[list(_RIGHT_UPPER_LID), 1].max(), mesh[list(_RIGHT_BROW), 1].mean()
    lower_face = _ramp(-y, -subnasale, -chin)  # 0 at the nose base, 1 at the chin
    below_mouth = _ramp(-y, -mouth_level, -chin)
    nose = _gaussian(mesh, mesh[_NOSE_TIP], 0.015)
    nose_base = _gaussian(mesh, mesh[list(_NOSTRILS)].mean(axis=0), 0.018)
    fields = {
        "head_width": (0.04 * x, zeros, zeros),
        "head_height": (zeros, 0.03 * y, zeros),
        "head_depth": (zeros, zeros, 0.04 * z),
        "face_length": (zeros, -0.004 * lower_face, zeros),
        "jaw_width": (0.06 * x * below_mouth, zeros, zeros),
        "nose_length": (zeros, -0.0015 * nose, 0.003 * nose),
        "nose_width": (0.16 * x * nose_base, zeros, zeros),
        "eye_spacing": (0.0025 * (_gaussian(mesh, eye_left, 0.018) - _gaussian(mesh, eye_right, 0.018)), zeros, zeros),
        "brow_height": (zeros, 0.003 * _ramp(y, lid_top, brow_level + 0.008), zeros),
        "mouth_width": (0.15 * (x - mouth_centre[0]) * _gaussian(mesh, mouth_centre, 0.022), zeros, zeros),
    }
    return np.stack([np.stack(fields[name], axis=-1) for name in DEMO_SHAPES], axis=-1)


# ---------------------------------------------------------------------------------------------- expression
@dataclass(frozen=True)
class _Deformation:
    """A smooth displacement field given by where some vertices go and which stay."""

    anchors: tuple[int, ...]
    displacement: np.ndarray  # (len(anchors), 3) metres
    pinned: tuple[int, ...] = ()
    reach: float = 0.035  # vertices farther than this from every anchor stay still


_Group = tuple[Sequence[int], Sequence[float] | np.ndarray]  # vertices, displacement for all or for each


def _moving(groups: Sequence[_Group], pinned: tuple[int, ...] = (), reach: float = 0.035) -> _Deformation:
    """A deformation from (vertex group, displacement for the whole group or per vertex) pairs."""
    anchors = tuple(i for indices, _ in groups for i in indices)
    displacement = np.concatenate([np.broadcast_to(np.asarray(d, dtype=np.float64), (len(i), 3)) for i, d in groups])
    return _Deformation(anchors, displacement, pinned, reach)


@dataclass(frozen=True)
class _Side:
    """The landmark groups of one side of the face; ``sign`` is the side's direction along x."""

    sign: float
    eye_loop: tuple[int, ...]
    upper_lid: tuple[int, ...]
    lower_lid: tuple[int, ...]
    eye_corners: tuple[int, ...]
    brow: tuple[int, ...]
    inner_brow: tuple[int, ...]
    mouth_corner: tuple[int, ...]
    cheek: tuple[int, ...]


_LEFT = _Side(
    1.0, _LEFT_EYE_LOOP, _LEFT_UPPER_LID, _LEFT_LOWER_LID, _LEFT_EYE_CORNERS,
    _LEFT_BROW, _LEFT_INNER_BROW, _LEFT_MOUTH_CORNER, _LEFT_CHEEK,
)  # fmt: skip
_RIGHT = _Side(
    -1.0, _RIGHT_EYE_LOOP, _RIGHT_UPPER_LID, _RIGHT_LOWER_LID, _RIGHT_EYE_CORNERS,
    _RIGHT_BROW, _RIGHT_INNER_BROW, _RIGHT_MOUTH_CORNER, _RIGHT_CHEEK,
)  # fmt: skip


def _eye_close(mesh: np.ndarray, side: _Side) -> _Deformation:
    # The lids meet 85 % of the way down, bulging a little forward over the cornea.
    gap = mesh[list(side.lower_lid)] - mesh[list(side.upper_lid)]
    forward = [0.0, 0.0, 0.001]
    groups = [(side.upper_lid, 0.85 * gap + forward), (side.lower_lid, -0.15 * gap + forward), (side.eye_corners, 0.0)]
    return _moving(groups, pinned=side.brow, reach=0.03)


def _eye_wide(side: _Side) -> _Deformation:
    groups = [(side.upper_lid, [0.0, 0.0025, 0.0003]), (side.lower_lid, [0.0, -0.0008, 0.0]), (side.eye_corners, 0.0)]
    return _moving(groups, pinned=side.brow, reach=0.03)


def _smile(side: _Side, other: _Side) -> _Deformation:
    # The corner goes up, out and back around the teeth; the cheek rises with it.
    groups = [(side.mouth_corner, [side.sign * 0.005, 0.006, -0.002]), (side.cheek, [0.0, 0.003, 0.001])]
    return _moving(groups, pinned=other.mouth_corner + side.eye_loop, reach=0.04)


def _brow_raise(side: _Side, other: _Side) -> _Deformation:
    return _moving([(side.brow, [0.0, 0.008, 0.001])], pinned=side.eye_loop + other.brow)


def _brow_lower(side: _Side, other: _Side) -> _Deformation:
    # Frowning pulls the inner brow toward the midline as well as down.
    outer = tuple(i for i in side.brow if i not in side.inner_brow)
    groups = [(outer, [0.0, -0.005, 0.001]), (side.inner_brow, [-side.sign * 0.0025, -0.005, 0.001])]
    return _moving(groups, pinned=side.eye_loop + other.brow)


def _expression_deformations(mesh: np.ndarray) -> list[_Deformation]:
    """One deformation per DEMO_EXPRESSIONS name, in that order."""
    corners = _LEFT_MOUTH_CORNER + _RIGHT_MOUTH_CORNER
    lips = _UPPER_LIP + _LOWER_LIP + corners
    lip_offsets = mesh[list(lips)] - mesh[list(_INNER_LIP_LOOP)].mean(axis=0)
    # Mirrors x for the right corner's two vertices, so one displacement describes both corners.
    both_sides = np.array([[side.sign, 1.0, 1.0] for side in (_LEFT, _LEFT, _RIGHT, _RIGHT)])
    deformations = {
        "mouth_open": _moving(
            [
                (_LOWER_LIP, [0.0, -0.006, 0.0005]),
                (_UPPER_LIP, [0.0, 0.003, 0.0]),
                (corners, both_sides * [-0.001, -0.0015, 0.0]),
            ]
        ),
        "eye_close_left": _eye_close(mesh, _LEFT),
        "eye_close_right": _eye_close(mesh, _RIGHT),
        "eye_wide_left": _eye_wide(_LEFT),
        "eye_wide_right": _eye_wide(_RIGHT),
        "smile_left": _smile(_LEFT, _RIGHT),
        "smile_right": _smile(_RIGHT, _LEFT),
        "mouth_frown": _moving([(corners, both_sides * [0.001, -0.005, 0.0])]),
        "brow_raise_left": _brow_raise(_LEFT, _RIGHT),
        "brow_raise_right": _brow_raise(_RIGHT, _LEFT),
        "brow_lower_left": _brow_lower(_LEFT, _RIGHT),
        "brow_lower_right": _brow_lower(_RIGHT, _LEFT),
        # Lips forward and gathered toward the mouth's centre.
        "pucker": _moving([(lips, lip_offsets * [-0.35, -0.25, 0.0] + [0.0, 0.0, 0.007])]),
        "mouth_stretch": _moving([(corners, both_sides * [0.006, -0.0015, -0.001])]),
        "mouth_left": _moving([(lips, [0.005, 0.0, 0.0])]),
        "cheek_puff": _moving(
            [(_LEFT.cheek + _RIGHT.cheek, np.repeat([[0.004, 0.0, 0.003], [-0.004, 0.0, 0.003]], 3, axis=0))],
            pinned=lips + _LEFT_EYE_LOOP + _RIGHT_EYE_LOOP,
        ),
    }
    return [deformations[name] for name in DEMO_EXPRESSIONS]


# ------------------------------------------------------------------------------------------ joints, skinning
def _affine_regressor(
    vertices: np.ndarray, support: Sequence[int], prior: np.ndarray, target: np.ndarray
) -> np.ndarray:
    """Weights on ``support`` closest to ``prior`` that sum to 1 and reproduce ``target`` exactly.

    Affine weights make the joint move with the vertices: scale or shift the face and the joint follows.
    Some weights are negative, because the joints lie outside the face mask (behind it).
    """
    system = np.vstack([vertices[list(support)].T, np.ones(len(support))])  # (4, n)
    residual = np.append(target, 1.0) - system @ prior
    return prior + system.T @ np.linalg.solve(system @ system.T, residual)


def _joint_regressor(vertices: np.ndarray) -> np.ndarray:
    """(5, 478) J_regressor on the face outline and the iris centres, which no expression moves."""
    regressor = np.zeros((len(JOINT_NAMES), len(vertices)))
    oval = list(_FACE_OVAL)
    uniform = np.full(len(oval), 1.0 / len(oval))
    for name, offset in (("root", _ROOT_OFFSET_M), ("neck", _NECK_OFFSET_M), ("jaw", _JAW_OFFSET_M)):
        regressor[JOINT_NAMES.index(name), oval] = _affine_regressor(vertices, oval, uniform, np.asarray(offset))
    for name, iris in (("left_eye", LEFT_IRIS), ("right_eye", RIGHT_IRIS)):
        # Anchored on the iris centre; the outline supplies the "backwards" direction at the head's scale.
        support = [iris[0], *oval]
        prior = np.zeros(len(support))
        prior[0] = 1.0
        target = vertices[iris[0]] - [0.0, 0.0, EYE_CENTRE_DEPTH_M]
        regressor[JOINT_NAMES.index(name), support] = _affine_regressor(vertices, support, prior, target)
    return regressor


def _skinning_weights(graph: _FaceGraph) -> np.ndarray:
    """(478, 5): the face on the neck, blending into the jaw below the mouth; each iris on its eye joint."""
    mesh = graph.vertices
    on_jaw = np.unique(_LOWER_LIP + _JAWLINE + _UNDER_LIP)
    above_mouth = np.flatnonzero(mesh[:, 1] >= mesh[_SUBNASALE, 1])
    off_jaw = np.setdiff1d(np.union1d(np.array(_UPPER_LIP + _ABOVE_JAW_ANGLE), above_mouth), on_jaw)
    known = np.concatenate([on_jaw, off_jaw])
    jaw = graph.harmonic(known, np.concatenate([np.ones(len(on_jaw)), np.zeros(len(off_jaw))]))
    weights = np.zeros((N_LANDMARKS, len(JOINT_NAMES)))
    weights[:N_MESH_LANDMARKS, JOINT_NAMES.index("jaw")] = jaw
    weights[:N_MESH_LANDMARKS, JOINT_NAMES.index("neck")] = 1.0 - jaw
    weights[list(LEFT_IRIS), JOINT_NAMES.index("left_eye")] = 1.0
    weights[list(RIGHT_IRIS), JOINT_NAMES.index("right_eye")] = 1.0
    return weights


# ------------------------------------------------------------------------------------------------ landmarks
def _mediapipe_embedding(faces: np.ndarray) -> MediapipeEmbedding:
    """Landmark i is vertex i: for each vertex, a triangle that uses it and a one-hot barycentric weight."""
    vertex_ids, first_use = np.unique(faces.ravel(), return_index=True)
    if len(vertex_ids) != N_LANDMARKS:
        raise ModelFileError(
            "the canonical face mesh leaves some landmarks outside every triangle: download face_landmarker.task again"
        )
    bary = np.zeros((N_LANDMARKS, 3))
    bary[vertex_ids, first_use % 3] = 1.0
    return MediapipeEmbedding(face_idx=first_use // 3, bary=bary, landmark_indices=vertex_ids.astype(np.int64))


def _full68_embedding(face: CanonicalFace) -> Embedding:
    """The iBUG 68 points from engine/data's MediaPipe -> 68 table, whose triangles are the canonical mesh's."""
    mapping = load_mediapipe_to_68()
    if not np.array_equal(face.triangles[mapping.face_idx], mapping.triangles):
        raise ModelFileError(
            f"{MAPPING_FILE} was made for another canonical face mesh than this face_landmarker.task: "
            "use the face_landmarker.task named in models/README.md"
        )
    return Embedding(face_idx=mapping.face_idx.copy(), bary=mapping.bary.copy())
