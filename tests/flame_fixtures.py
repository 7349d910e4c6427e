"""Synthetic FLAME files for tests: FLAME's exact layout and file formats, random but well-conditioned arrays.

FLAME may not be redistributed, so tests build their own. The head is a deformed ellipsoid (~16 x 23 x 20
cm) with nose, brows, lips and chin bumps on its +z face, a neck opening, and two eyeball spheres, meshed so
that V = 5023 and F = 9976 exactly: a UV grid of 60 segments x 74 rings plus a top pole, whose 60-edge neck
rim makes F = 2V - 70 together with the two closed eyeballs. Shape and expression bases are orthogonal,
smooth random fields (a few mm, decaying), expressions confined to the face, eyeballs moving rigidly with shape.

Files are written the way users have them: ``generic_model.pkl`` as a Python 2 protocol-2 pickle of chumpy
``Ch`` objects and a ``scipy.sparse.csc.csc_matrix`` naming ``numpy.core.multiarray`` (written without
chumpy or scipy by a pickler that emits those global names), DECA's ``landmark_embedding.npy`` with torch
tensors in torch's legacy storage format (without importing torch), the RingNet pair, metrical-tracker's
MediaPipe embedding and eyelid blendshapes, a texture space and ``head_template.obj``.

Landmarks come from MediaPipe's canonical face (frontal x, y in cm) projected onto the head; the 17 jaw
contour points follow the silhouette per yaw row using smplx's row convention: row r is yaw angle a = r for
r <= 39 and a = 39 - r above, where a = -(head rotation about +y, degrees).
"""

from __future__ import annotations

import collections
import functools
import io
import pickle
import shutil
import struct
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

N_VERTICES, N_FACES, N_JOINTS = 5023, 9976, 5
N_SHAPE, N_EXP = 300, 100
HEAD_SEGMENTS, HEAD_RINGS = 60, 74
EYE_SEGMENTS, EYE_RINGS = 17, 17
HEAD_POLAR_MAX = np.radians(160.0)
SEMI_AXES = np.array([0.08, 0.12, 0.10])  # x (ear to ear), y (up), z (towards the face), metres
HEAD_CENTRE = np.array([0.0, -0.01, 0.0])  # low enough that the chin (y = -9.4 cm) clears the neck rim
FRONT_DENSITY = 0.5  # azimuth samples are (1 + d) / (1 - d) times denser on the face than at the back
EYE_RADIUS = 0.0122
EYE_CENTRES_XY = {"left": (0.0315, 0.026), "right": (-0.0315, 0.026)}  # the subject's left is +x
OPEN_METADATA_KEY = "supr_expression_metadata"  # the key only FLAME 2023 Open's pickle has
ROOT_SENTINEL = 4294967295  # kintree_table[0, 0] in the files: 2**32 - 1, "no parent"

N_HEAD_VERTICES = 1 + HEAD_SEGMENTS * HEAD_RINGS
N_EYE_VERTICES = 2 + EYE_SEGMENTS * EYE_RINGS
TEXTURE_SIZE, N_TEXTURE_COMPONENTS = 32, 5

# Frontal (x, y) in cm of MediaPipe canonical-face landmarks (face_landmarker.task's canonical mesh):
# the 105 the MediaPipe embedding uses (lips, eyes, brows, nose; no iris) plus 97 and 326 for iBUG 33/35.
_CANONICAL_XY_CM = {
    61: (-2.46, -4.34), 146: (-2.20, -4.60), 91: (-1.84, -4.83), 181: (-1.33, -5.11), 84: (-0.70, -5.29),
    17: (0.00, -5.37), 314: (0.70, -5.29), 405: (1.33, -5.11), 321: (1.84, -4.83), 375: (2.20, -4.60),
    291: (2.46, -4.34), 409: (2.29, -4.05), 270: (1.91, -3.80), 269: (1.43, -3.50), 267: (0.71, -3.33),
    0: (0.00, -3.41), 37: (-0.71, -3.33), 39: (-1.43, -3.50), 40: (-1.91, -3.80), 185: (-2.29, -4.05),
    78: (-2.15, -4.28), 95: (-1.83, -4.40), 88: (-1.54, -4.42), 178: (-1.10, -4.46), 87: (-0.58, -4.52),
    14: (0.00, -4.54), 317: (0.58, -4.52), 402: (1.10, -4.46), 318: (1.54, -4.42), 324: (1.83, -4.40),
    308: (2.15, -4.28), 415: (1.85, -4.10), 310: (1.47, -4.04), 311: (1.02, -3.99), 312: (0.53, -3.99),
    13: (0.00, -3.99), 82: (-0.53, -3.99), 81: (-1.02, -3.99), 80: (-1.47, -4.04), 191: (-1.85, -4.10),
    33: (-4.45, 2.66), 7: (-4.25, 2.58), 163: (-4.02, 2.48), 144: (-3.67, 2.36), 145: (-3.18, 2.29),
    153: (-2.72, 2.32), 154: (-2.29, 2.40), 155: (-2.00, 2.50), 133: (-1.86, 2.59), 173: (-2.00, 2.74),
    157: (-2.29, 2.89), 158: (-2.72, 2.96), 159: (-3.18, 2.96), 160: (-3.67, 2.93), 161: (-4.02, 2.86),
    246: (-4.25, 2.77), 263: (4.45, 2.66), 249: (4.25, 2.58), 390: (4.02, 2.48), 373: (3.67, 2.36),
    374: (3.18, 2.29), 380: (2.72, 2.32), 381: (2.29, 2.40), 382: (2.00, 2.50), 362: (1.86, 2.59),
    398: (2.00, 2.74), 384: (2.29, 2.89), 385: (2.72, 2.96), 386: (3.18, 2.96), 387: (3.67, 2.93),
    388: (4.02, 2.86), 466: (4.25, 2.77), 46: (-5.25, 3.88), 53: (-4.59, 4.30), 52: (-3.73, 4.51),
    65: (-2.64, 4.52), 55: (-1.22, 4.14), 70: (-5.72, 4.25), 63: (-4.99, 4.80), 105: (-3.99, 5.11),
    66: (-2.76, 5.10), 107: (-1.40, 5.01), 276: (5.25, 3.88), 283: (4.59, 4.30), 282: (3.73, 4.51),
    295: (2.64, 4.52), 285: (1.22, 4.14), 300: (5.72, 4.25), 293: (4.99, 4.80), 334: (3.99, 5.11),
    296: (2.76, 5.10), 336: (1.40, 5.01), 168: (0.00, 3.27), 6: (0.00, 2.47), 197: (0.00, 1.73),
    195: (0.00, 1.06), 5: (0.00, 0.37), 4: (0.00, -0.46), 1: (0.00, -1.13), 19: (0.00, -1.50),
    94: (0.00, -1.72), 2: (0.00, -2.09), 98: (-1.41, -1.71), 327: (1.41, -1.71), 164: (0.00, -2.52),
    97: (-0.83, -1.96), 326: (0.83, -1.96),
}
MEDIAPIPE_INDICES = tuple(index for index in _CANONICAL_XY_CM if index not in (97, 326))
# iBUG points 18..68 (brows, nose, eyes, lips) as MediaPipe landmarks, in iBUG order.
STATIC_AS_MEDIAPIPE = (
    70, 63, 105, 66, 107, 336, 296, 334, 293, 300,  # brows 18-27
    6, 197, 195, 4, 98, 97, 2, 326, 327,  # nose 28-36
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,  # eyes 37-48
    61, 40, 37, 0, 267, 270, 291, 321, 314, 17, 84, 91,  # outer lips 49-60
    78, 81, 13, 311, 308, 402, 14, 178,  # inner lips 61-68
)

# Radial bumps on the face: centre x, y, spread x, y, height (metres).
_FACE_BUMPS = (
    (0.0, -0.002, 0.010, 0.017, 0.025),  # nose
    (0.0315, 0.026, 0.013, 0.009, -0.008),  # eye sockets
    (-0.0315, 0.026, 0.013, 0.009, -0.008),
    (0.033, 0.045, 0.020, 0.006, 0.004),  # brow ridges
    (-0.033, 0.045, 0.020, 0.006, 0.004),
    (0.050, 0.000, 0.015, 0.015, 0.004),  # cheekbones
    (-0.050, 0.000, 0.015, 0.015, 0.004),
    (0.0, -0.043, 0.020, 0.008, 0.006),  # lips
    (0.0, -0.082, 0.018, 0.012, 0.008),  # chin
)


@dataclass(frozen=True)
class FlameArrays:
    """The ground truth behind the written files (float64, int64); treat as read-only."""

    v_template: np.ndarray  # (5023, 3)
    shapedirs: np.ndarray  # (5023, 3, 400): 300 shape then 100 expression
    posedirs: np.ndarray  # (5023, 3, 36)
    j_regressor: np.ndarray  # (5, 5023) dense
    weights: np.ndarray  # (5023, 5)
    kintree_table: np.ndarray  # (2, 5) with ROOT_SENTINEL as the root's parent
    faces: np.ndarray  # (9976, 3)
    joints: np.ndarray  # (5, 3) = j_regressor @ v_template
    static_idx: np.ndarray  # (51,)
    static_bary: np.ndarray  # (51, 3)
    contour_idx: np.ndarray  # (79, 17)
    contour_bary: np.ndarray  # (79, 17, 3)
    full_idx: np.ndarray  # (68,)
    full_bary: np.ndarray  # (68, 3)
    mediapipe_idx: np.ndarray  # (105,)
    mediapipe_bary: np.ndarray  # (105, 3)
    mediapipe_landmarks: np.ndarray  # (105,) into MediaPipe's 478
    uv_coords: np.ndarray  # (Vt, 2)
    uv_faces: np.ndarray  # (9976, 3)
    texture_mean: np.ndarray  # (32, 32, 3) RGB in [0, 1]
    texture_basis: np.ndarray  # (32, 32, 3, 5)


# ---------------------------------------------------------------------------------------------- geometry


_GRID_U = -1.0 + 2.0 * np.arange(HEAD_SEGMENTS) / HEAD_SEGMENTS  # head grid columns, 0 is the face centre


def _azimuth(u: np.ndarray) -> np.ndarray:
    """Azimuth from the +z face towards +x for grid coordinate u in [-1, 1] (0: front, +-1: back)."""
    return np.pi * u - FRONT_DENSITY * np.sin(np.pi * u)


def _grid_u(azimuth: np.ndarray) -> np.ndarray:
    table = np.linspace(-1.0, 1.0, 4001)
    return np.interp(np.angle(np.exp(1j * azimuth)), _azimuth(table), table)


def _ring_polar(i: np.ndarray | int) -> np.ndarray:
    return HEAD_POLAR_MAX * np.asarray(i, dtype=np.float64) / HEAD_RINGS


def _head_surface(polar: np.ndarray, azimuth: np.ndarray) -> np.ndarray:
    """Ellipsoid point pushed outwards by the face bumps (only on the front half)."""
    offset = SEMI_AXES * np.stack(
        [np.sin(polar) * np.sin(azimuth), np.cos(polar), np.sin(polar) * np.cos(azimuth)], axis=-1
    )
    base = HEAD_CENTRE + offset
    frontness = np.clip((offset[..., 2] / SEMI_AXES[2] - 0.2) / 0.4, 0.0, 1.0)
    height = sum(
        amp * np.exp(-0.5 * (((base[..., 0] - cx) / sx) ** 2 + ((base[..., 1] - cy) / sy) ** 2))
        for cx, cy, sx, sy, amp in _FACE_BUMPS
    )
    direction = offset / np.linalg.norm(offset, axis=-1, keepdims=True)
    return base + (frontness * height)[..., None] * direction


def _head_index(ring: np.ndarray, column: np.ndarray) -> np.ndarray:
    """Vertex index of the head grid: 0 is the top pole, rings 1..74 follow with 60 columns each."""
    return 1 + (ring - 1) * HEAD_SEGMENTS + column % HEAD_SEGMENTS


def _eye_index(ring: np.ndarray, column: np.ndarray) -> np.ndarray:
    """Vertex index within an eyeball: 0 is the front pole, rings 0..16 follow, the back pole is last."""
    return 1 + ring * EYE_SEGMENTS + column % EYE_SEGMENTS


def _grid_triangles(index, rings: np.ndarray, n_columns: int) -> np.ndarray:
    """Two triangles (a, b, c) and (a, c, d) per quad between ring i and i + 1; outward for both grids."""
    i, j = (grid.ravel() for grid in np.meshgrid(rings, np.arange(n_columns), indexing="ij"))
    a, b, c, d = index(i, j), index(i + 1, j), index(i + 1, j + 1), index(i, j + 1)
    return np.stack([np.stack([a, b, c], 1), np.stack([a, c, d], 1)], axis=1).reshape(-1, 3)


def _head_mesh() -> tuple[np.ndarray, np.ndarray]:
    """Vertices (pole, then ring by ring) and outward triangles: the top fan, then two per grid quad."""
    polar, azimuth = np.meshgrid(_ring_polar(np.arange(1, HEAD_RINGS + 1)), _azimuth(_GRID_U), indexing="ij")
    pole = _head_surface(np.zeros(1), np.zeros(1))
    vertices = np.concatenate([pole, _head_surface(polar, azimuth).reshape(-1, 3)])
    column = np.arange(HEAD_SEGMENTS)
    fan = np.stack([np.zeros_like(column), _head_index(1, column), _head_index(1, column + 1)], axis=1)
    return vertices, np.concatenate([fan, _grid_triangles(_head_index, np.arange(1, HEAD_RINGS), HEAD_SEGMENTS)])


def _eyeball_mesh(centre: np.ndarray, first_index: int) -> tuple[np.ndarray, np.ndarray]:
    """A UV sphere with its poles on the z axis (the front pole is the pupil), outward triangles."""
    polar, around = np.meshgrid(
        np.pi * np.arange(1, EYE_RINGS + 1) / (EYE_RINGS + 1), 2.0 * np.pi * np.arange(EYE_SEGMENTS) / EYE_SEGMENTS,
        indexing="ij",
    )
    rings = np.stack([np.sin(polar) * np.cos(around), np.sin(polar) * np.sin(around), np.cos(polar)], -1)
    unit = np.concatenate([[[0.0, 0.0, 1.0]], rings.reshape(-1, 3), [[0.0, 0.0, -1.0]]])
    column, last = np.arange(EYE_SEGMENTS), EYE_RINGS - 1
    front = np.stack([np.zeros_like(column), _eye_index(0, column), _eye_index(0, column + 1)], axis=1)
    back = np.stack([np.full_like(column, len(unit) - 1), _eye_index(last, column + 1), _eye_index(last, column)], 1)
    faces = np.concatenate([front, _grid_triangles(_eye_index, np.arange(last), EYE_SEGMENTS), back])
    return centre + EYE_RADIUS * unit, faces + first_index


def _surface_embedding(polar: np.ndarray, azimuth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Triangle index and barycentric weights of the head-grid point at (polar, azimuth) (any shape)."""
    polar = np.clip(polar, 1e-9, HEAD_POLAR_MAX - 1e-9)
    position = (_grid_u(azimuth) + 1.0) * HEAD_SEGMENTS / 2.0
    j = np.floor(position).astype(np.int64) % HEAD_SEGMENTS
    t = position - np.floor(position)
    ring_float = polar / HEAD_POLAR_MAX * HEAD_RINGS
    i = np.floor(ring_float).astype(np.int64)
    s = ring_float - i
    in_fan = i == 0
    lower = t <= s  # triangle (a, b, c) of the quad, else (a, c, d)
    quad_face = HEAD_SEGMENTS + 2 * ((i - 1) * HEAD_SEGMENTS + j) + np.where(lower, 0, 1)
    face = np.where(in_fan, j, quad_face)
    bary = np.where(
        in_fan[..., None],
        np.stack([1 - s, s * (1 - t), s * t], -1),
        np.where(lower[..., None], np.stack([1 - s, s - t, t], -1), np.stack([1 - t, s, t - s], -1)),
    )
    return face, bary


def _frontal_to_surface(xy_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(polar, azimuth) of the ellipsoid point seen at frontal position (x, y)."""
    polar = np.arccos(np.clip((xy_m[..., 1] - HEAD_CENTRE[1]) / SEMI_AXES[1], -1.0, 1.0))
    azimuth = np.arcsin(np.clip(xy_m[..., 0] / (SEMI_AXES[0] * np.sin(polar)), -1.0, 1.0))
    return polar, azimuth


def _jaw_contour_rows() -> tuple[np.ndarray, np.ndarray]:
    """Polar and azimuth of the 17 jaw points (iBUG 1-17, subject's right to left) for each of the 79 rows."""
    sweep = np.pi * np.arange(17) / 16
    xy = np.stack([-0.070 * np.cos(sweep), 0.010 - 0.104 * np.sin(sweep)], axis=-1)
    polar, azimuth = _frontal_to_surface(xy)
    rows = np.arange(79)
    yaw_deg = np.where(rows <= 39, rows, 39 - rows)
    azimuth_rows = np.clip(azimuth[None, :] + np.radians(yaw_deg)[:, None], -np.radians(150), np.radians(150))
    return np.broadcast_to(polar, azimuth_rows.shape), azimuth_rows


# -------------------------------------------------------------------------------------- model arrays


def _smooth_fields(
    rng: np.random.Generator, anchors: np.ndarray, n_fields: int, scales_m: tuple[float, ...]
) -> np.ndarray:
    """(V, 3, n) random smooth vector fields: one random Fourier feature each, in a random direction."""
    frequencies = rng.normal(0.0, 1.0, (n_fields, 3)) / rng.choice(scales_m, n_fields)[:, None]
    phases = rng.uniform(0.0, 2.0 * np.pi, n_fields)
    directions = rng.normal(0.0, 1.0, (3, n_fields))
    directions /= np.linalg.norm(directions, axis=0)
    return np.sin(anchors @ frequencies.T + phases)[:, None, :] * directions[None]


def _orthogonal_basis(fields: np.ndarray, rms_m: np.ndarray) -> np.ndarray:
    """Orthogonalise the fields over all coordinates, component k then having RMS displacement rms_m[k]."""
    n_vertices, _, n_fields = fields.shape
    matrix = fields.reshape(-1, n_fields)
    # Cholesky of the Gram matrix: the same Q as a QR decomposition, at a fraction of numpy's QR time.
    cholesky = np.linalg.cholesky(matrix.T @ matrix)
    q = matrix @ np.linalg.inv(cholesky).T
    return (q * rms_m * np.sqrt(3 * n_vertices)).reshape(n_vertices, 3, n_fields)


@functools.lru_cache(maxsize=4)
def flame_arrays(seed: int = 0) -> FlameArrays:
    """The synthetic FLAME model for ``seed`` (deterministic; cached, so treat the arrays as read-only)."""
    rng = np.random.default_rng(seed)
    head_vertices, head_faces = _head_mesh()
    eye_centres = [
        _head_surface(*_frontal_to_surface(np.array(xy))) - np.array([0.0, 0.0, 0.55 * EYE_RADIUS])
        for xy in (EYE_CENTRES_XY["left"], EYE_CENTRES_XY["right"])
    ]
    left_v, left_f = _eyeball_mesh(eye_centres[0], N_HEAD_VERTICES)
    right_v, right_f = _eyeball_mesh(eye_centres[1], N_HEAD_VERTICES + N_EYE_VERTICES)
    v_template = np.concatenate([head_vertices, left_v, right_v])
    faces = np.concatenate([head_faces, left_f, right_f]).astype(np.int64)
    j_regressor, weights = _rig(v_template)
    joints = j_regressor @ v_template

    # Eyeballs move rigidly with identity (fields sampled at their centres) and not with expression.
    on_head = np.arange(N_VERTICES) < N_HEAD_VERTICES
    eye_joint = np.repeat([3, 4], N_EYE_VERTICES)
    anchors = v_template.copy()
    anchors[~on_head] = joints[eye_joint]
    shape_fields = _smooth_fields(rng, anchors, N_SHAPE, (0.06, 0.035))
    shape_basis = _orthogonal_basis(shape_fields, 0.004 * np.arange(1, N_SHAPE + 1) ** -0.4)
    face_offset = (v_template - np.array([0.0, -0.015, 0.09])) / [0.05, 0.06, 0.06]
    face_mask = on_head * np.exp(-0.5 * np.sum(face_offset**2, axis=1))
    exp_fields = _smooth_fields(rng, v_template, N_EXP, (0.03, 0.02)) * face_mask[:, None, None]
    exp_basis = _orthogonal_basis(exp_fields, 0.003 * np.arange(1, N_EXP + 1) ** -0.4)
    posedirs = 0.002 * _smooth_fields(rng, anchors, 9 * (N_JOINTS - 1), (0.05,))

    static_xy = np.array([_CANONICAL_XY_CM[i] for i in STATIC_AS_MEDIAPIPE]) / 100.0
    static_idx, static_bary = _surface_embedding(*_frontal_to_surface(static_xy))
    contour_idx, contour_bary = _surface_embedding(*_jaw_contour_rows())
    mp_xy = np.array([_CANONICAL_XY_CM[i] for i in MEDIAPIPE_INDICES]) / 100.0
    mp_idx, mp_bary = _surface_embedding(*_frontal_to_surface(mp_xy))
    uv_coords, uv_faces = _uv_layout(faces)
    tex_mean, tex_basis = _texture(rng)
    return FlameArrays(
        v_template=v_template,
        shapedirs=np.concatenate([shape_basis, exp_basis], axis=2),
        posedirs=posedirs,
        j_regressor=j_regressor,
        weights=weights,
        kintree_table=np.array([[ROOT_SENTINEL, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        faces=faces,
        joints=joints,
        static_idx=static_idx,
        static_bary=static_bary,
        contour_idx=contour_idx,
        contour_bary=contour_bary,
        full_idx=np.concatenate([contour_idx[0], static_idx]),
        full_bary=np.concatenate([contour_bary[0], static_bary]),
        mediapipe_idx=mp_idx,
        mediapipe_bary=mp_bary,
        mediapipe_landmarks=np.array(MEDIAPIPE_INDICES, dtype=np.int64),
        uv_coords=uv_coords,
        uv_faces=uv_faces,
        texture_mean=tex_mean,
        texture_basis=tex_basis,
    )


# Upper and lower lid heights (frontal y, metres) of the canonical face's eye outlines above (159/145, 386/374).
_UPPER_LID_Y, _LOWER_LID_Y = 0.0296, 0.0229


@functools.lru_cache(maxsize=4)
def eyelid_blendshapes(seed: int = 0) -> np.ndarray:
    """(5023, 3, 2) eyelid blendshapes in metrical-tracker's form (l_eyelid.npy, then r_eyelid.npy): at weight 1
    each brings its eye's upper lid down onto the lower one.

    The skin around the eye is drawn onto the lower lid's line (moved by its height above it: a field linear
    in y, so the coarse mesh interpolates it exactly), fading out towards the brow, the cheek and beyond the
    eye's corners, plus a little smooth random field so that no expression component reproduces it.
    """
    rng = np.random.default_rng(seed + 1000)
    v_template = flame_arrays(seed).v_template
    on_head = np.arange(N_VERTICES) < N_HEAD_VERTICES
    front = on_head & (v_template[:, 2] > 0.0)
    x, y = v_template[:, 0], v_template[:, 1]
    shapes = []
    for centre_x, _ in (EYE_CENTRES_XY["left"], EYE_CENTRES_XY["right"]):
        across = np.exp(-0.5 * ((x - centre_x) / 0.014) ** 4)
        height = y - _LOWER_LID_Y
        fade = (1.0 - _smoothstep((y - _UPPER_LID_Y - 0.004) / 0.008)) * (1.0 - _smoothstep((_LOWER_LID_Y - 0.004 - y) / 0.008))
        offsets = np.zeros((N_VERTICES, 3))
        offsets[:, 1] = -height * fade * across * front
        offsets[:, 2] = -0.3 * offsets[:, 1]  # the closing lid moves forward, over the eyeball
        noise = _smooth_fields(rng, v_template, 3, (0.02,)).sum(axis=2)
        shapes.append(offsets + 2e-4 * noise * (across * front)[:, None])
    return np.stack(shapes, axis=2)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _rig(v_template: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Joint regressor and skinning weights.

    The regressor averages the neck rim (root), a ring just above it (neck), patches in front of both ears
    (jaw hinge) and each eyeball; the joints are whatever it gives for the template. The head follows the
    neck, blending into the root towards the rim; the lower front of the face follows the jaw.
    """
    ring = np.zeros(N_VERTICES, dtype=np.int64)
    ring[1:N_HEAD_VERTICES] = 1 + np.arange(N_HEAD_VERTICES - 1) // HEAD_SEGMENTS
    azimuth_deg = np.zeros(N_VERTICES)
    azimuth_deg[1:N_HEAD_VERTICES] = np.tile(np.degrees(_azimuth(_GRID_U)), HEAD_RINGS)
    polar_deg = np.degrees(_ring_polar(ring))
    on_head = np.arange(N_VERTICES) < N_HEAD_VERTICES
    left_eye = ~on_head & (np.arange(N_VERTICES) < N_HEAD_VERTICES + N_EYE_VERTICES)
    right_eye = ~on_head & ~left_eye
    ear_patches = on_head & (np.abs(np.abs(azimuth_deg) - 90) <= 10) & (np.abs(polar_deg - 95) <= 5)
    members = [on_head & (ring == HEAD_RINGS), on_head & (ring == HEAD_RINGS - 6), ear_patches, left_eye, right_eye]
    j_regressor = np.stack([member / member.sum() for member in members])
    joints = j_regressor @ v_template

    y = v_template[:, 1]
    from_centre = v_template - HEAD_CENTRE
    facing = from_centre[:, 2] / np.linalg.norm(from_centre, axis=1)
    w_root = 1.0 - _smoothstep((y - joints[0, 1]) / (joints[1, 1] - joints[0, 1]))
    w_jaw = (1.0 - w_root) * _smoothstep((-0.036 - y) / 0.02) * _smoothstep((facing + 0.1) / 0.5)
    weights = np.zeros((N_VERTICES, N_JOINTS))
    weights[on_head, 0] = w_root[on_head]
    weights[on_head, 2] = w_jaw[on_head]
    weights[on_head, 1] = 1.0 - w_root[on_head] - w_jaw[on_head]
    weights[left_eye, 3] = weights[right_eye, 4] = 1.0
    return j_regressor, weights


def _uv_layout(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Head grid unrolled over the UV square (seam column duplicated); eyeballs in small squares below."""
    ring, column = np.meshgrid(np.arange(HEAD_RINGS + 1), np.arange(HEAD_SEGMENTS + 1), indexing="ij")
    head_uv = np.stack([column / HEAD_SEGMENTS, 1.0 - 0.9 * ring / HEAD_RINGS], -1).reshape(-1, 2)
    eye_uv = []
    for square in range(2):
        unit = np.linspace(0, 1, N_EYE_VERTICES)  # eyeball texture is uniform: any spread of coordinates works
        eye_uv.append(np.stack([0.05 * square + 0.04 * unit, 0.04 * unit[::-1]], -1))
    uv_coords = np.concatenate([head_uv, *eye_uv])
    head_vt = np.empty(N_HEAD_VERTICES, dtype=np.int64)
    head_vt[0] = 0
    head_vt[1:] = (np.arange(1, HEAD_RINGS + 1)[:, None] * (HEAD_SEGMENTS + 1) + np.arange(HEAD_SEGMENTS)).ravel()
    uv_faces = np.empty_like(faces)
    head = faces[:, 0] < N_HEAD_VERTICES
    uv_faces[head] = head_vt[faces[head]]
    # Triangles crossing the seam (last column to column 0) use the duplicated column instead.
    column = np.where(faces[head] > 0, (faces[head] - 1) % HEAD_SEGMENTS, -1)
    wraps = (column == 0) & (column.max(axis=1, keepdims=True) == HEAD_SEGMENTS - 1)
    uv_faces[head] += np.where(wraps, HEAD_SEGMENTS, 0)
    fan = np.flatnonzero(head)[:HEAD_SEGMENTS]
    uv_faces[fan, 0] = np.arange(HEAD_SEGMENTS)  # the pole gets one coordinate per fan triangle
    uv_faces[~head] = faces[~head] - N_HEAD_VERTICES + len(head_uv)
    return uv_coords, uv_faces


def _texture(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    grid = np.stack(np.meshgrid(*[np.linspace(0, 1, TEXTURE_SIZE)] * 2, indexing="ij"), -1)
    skin = np.array([0.78, 0.58, 0.48])
    mean = np.clip(skin + 0.05 * np.sin(3 * grid[..., :1] + 2 * grid[..., 1:]), 0, 1)
    frequencies = rng.normal(0, 4, (N_TEXTURE_COMPONENTS, 2))
    basis = 0.03 * np.sin(grid @ frequencies.T)[:, :, None, :] * rng.normal(0, 1, (3, N_TEXTURE_COMPONENTS))
    return mean, basis


# ------------------------------------------------------------------------------ writing legacy pickles


class _ChumpyCh:
    """Pickles as ``chumpy.ch.Ch`` does: NEWOBJ of the class, then its __dict__ (the array under 'x')."""

    def __init__(self, array: np.ndarray) -> None:
        self.x = array
        self._dirty_vars: set[str] = set()
        self._itr = None
        self._depends_on_deps: dict[str, object] = {}
        self._make_dense = False
        self._make_sparse = False


class _ScipyCsc:
    """Pickles as an old ``scipy.sparse.csc.csc_matrix``: NEWOBJ, then data/indices/indptr/_shape/maxprint."""

    def __init__(self, dense: np.ndarray) -> None:
        columns, rows = np.nonzero(dense.T)  # sorted by column, then row, as csc stores them
        self.data = dense[rows, columns]
        self.indices = rows.astype(np.int32)
        self.indptr = np.searchsorted(columns, np.arange(dense.shape[1] + 1)).astype(np.int32)
        self._shape = dense.shape
        self.maxprint = 50


def _rebuild_tensor_v2(*args: object) -> None:
    """Name holder for ``torch._utils._rebuild_tensor_v2``; the files only refer to it."""


def _load_from_bytes(data: bytes) -> None:
    """Name holder for ``torch.storage._load_from_bytes``; the files only refer to it."""


class _TorchTensor:
    """Pickles as a CPU torch tensor under plain pickle: _rebuild_tensor_v2(storage, 0, size, stride, ...)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = np.ascontiguousarray(array)

    def __reduce__(self) -> tuple[object, ...]:
        stride = tuple(s // self.array.itemsize for s in self.array.strides)
        storage = _TorchStorage(self.array.ravel())
        return _rebuild_tensor_v2, (storage, 0, self.array.shape, stride, False, collections.OrderedDict())


class _TorchStorage:
    def __init__(self, flat: np.ndarray) -> None:
        self.flat = flat

    def __reduce__(self) -> tuple[object, ...]:
        return _load_from_bytes, (torch_legacy_storage_bytes(self.flat),)


_TORCH_STORAGE_CLASSES = {
    np.dtype(np.int64): type("LongStorage", (), {}),
    np.dtype(np.float32): type("FloatStorage", (), {}),
}

_LEGACY_GLOBALS: dict[object, tuple[str, str]] = {
    np.ndarray.__reduce__(np.zeros(1))[0]: ("numpy.core.multiarray", "_reconstruct"),
    np.float64(0).__reduce__()[0]: ("numpy.core.multiarray", "scalar"),
    np.ndarray: ("numpy", "ndarray"),
    np.dtype: ("numpy", "dtype"),
    _ChumpyCh: ("chumpy.ch", "Ch"),
    _ScipyCsc: ("scipy.sparse.csc", "csc_matrix"),
    _rebuild_tensor_v2: ("torch._utils", "_rebuild_tensor_v2"),
    _load_from_bytes: ("torch.storage", "_load_from_bytes"),
    **{cls: ("torch", cls.__name__) for cls in _TORCH_STORAGE_CLASSES.values()},
}


class _LegacyPickler(pickle._Pickler):
    """Writes globals under the names old files use, and (py2_strings) str/bytes as Python 2 ``str``."""

    def __init__(self, stream: io.BufferedIOBase, protocol: int, py2_strings: bool) -> None:
        super().__init__(stream, protocol=protocol)
        self.py2_strings = py2_strings
        self.storages: list[tuple[str, np.ndarray]] = []

    def save_global(self, obj: object, name: str | None = None) -> None:
        legacy = _LEGACY_GLOBALS.get(obj) if _hashable(obj) else None
        if legacy is None:
            super().save_global(obj, name)
            return
        self.write(pickle.GLOBAL + f"{legacy[0]}\n{legacy[1]}\n".encode())
        self.memoize(obj)

    def _save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)

    def save_bytes(self, obj: bytes) -> None:
        if not self.py2_strings:
            super().save_bytes(obj)
            return
        self._save_py2_str(obj)
        self.memoize(obj)

    def save_str(self, obj: str) -> None:
        if not (self.py2_strings and obj.isascii()):
            super().save_str(obj)
            return
        self._save_py2_str(obj.encode("ascii"))
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes
    dispatch[str] = save_str
    dispatch[types.FunctionType] = save_global


def _hashable(obj: object) -> bool:
    try:
        hash(obj)
    except TypeError:
        return False
    return True


class _StorageRecordPickler(_LegacyPickler):
    """The storage record of torch's legacy format: the storage is a persistent id, its bytes follow."""

    def persistent_id(self, obj: object) -> tuple[object, ...] | None:
        if isinstance(obj, np.ndarray):
            return ("storage", _TORCH_STORAGE_CLASSES[obj.dtype], "0", "cpu", obj.size, None)
        return None


def torch_legacy_storage_bytes(flat: np.ndarray) -> bytes:
    stream = io.BytesIO()
    system_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    for header in (0x1950A86A20F9469CFC6C, 1001, system_info):  # magic number, protocol version, system info
        pickle.dump(header, stream, protocol=2)
    _StorageRecordPickler(stream, protocol=2, py2_strings=False).dump(flat)
    pickle.dump(["0"], stream, protocol=2)
    stream.write(struct.pack("<q", flat.size) + flat.astype(flat.dtype.newbyteorder("<")).tobytes())
    return stream.getvalue()


def _legacy_pickle(obj: object, protocol: int = 2, py2_strings: bool = True) -> bytes:
    stream = io.BytesIO()
    _LegacyPickler(stream, protocol=protocol, py2_strings=py2_strings).dump(obj)
    return stream.getvalue()


def _object_npy(obj: object, protocol: int, py2_strings: bool) -> bytes:
    """An .npy file holding ``obj`` in a 0-d object array, as ``np.save(path, a_dict)`` writes it."""
    holder = np.empty((), dtype=object)
    holder[()] = obj
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": "|O", "fortran_order": False, "shape": ()})
    return stream.getvalue() + _legacy_pickle(holder, protocol=protocol, py2_strings=py2_strings)


# -------------------------------------------------------------------------------------------- folders


def write_flame_folder(
    out_dir: Path,
    seed: int = 0,
    model_format: str = "pkl",
    embeddings: tuple[str, ...] = ("deca", "ringnet", "mediapipe"),
    texture: str | None = "flame",
    head_template: bool = False,
    eyelids: bool = False,
) -> Path:
    """Write a complete FLAME-format folder and return it.

    model_format: "pkl" (generic_model.pkl as FLAME ships it), "npz", "open" (flame2023_Open.pkl, FLAME 2023
    Open's layout: the same arrays plus its ``supr_expression_metadata``) or "open_zip" (that pickle inside
    FLAME2023Open.zip, beside a readme, as downloaded); embeddings: any of "deca",
    "ringnet", "mediapipe"; texture: "flame" (FLAME_texture.npz with vt/ft), "bfm"
    (FLAME_albedo_from_BFM.npz) or None; head_template: also write head_template.obj (v, vt, f v/vt);
    eyelids: also write metrical-tracker's l_eyelid.npy and r_eyelid.npy ((5023, 3) float32 each).
    """
    arrays = flame_arrays(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_model(
        out_dir, model_format, arrays.v_template, arrays.shapedirs, arrays.posedirs, arrays.weights,
        arrays.joints, arrays.kintree_table, arrays.faces, arrays.j_regressor,
    )
    if "deca" in embeddings:
        deca = {
            "static_lmk_faces_idx": arrays.static_idx,
            "static_lmk_bary_coords": arrays.static_bary,
            "dynamic_lmk_faces_idx": _TorchTensor(arrays.contour_idx),
            "dynamic_lmk_bary_coords": _TorchTensor(arrays.contour_bary.astype(np.float32)),
            "full_lmk_faces_idx": arrays.full_idx[None],
            "full_lmk_bary_coords": arrays.full_bary[None],
        }
        (out_dir / "landmark_embedding.npy").write_bytes(_object_npy(deca, protocol=3, py2_strings=False))
    if "ringnet" in embeddings:
        static = {"lmk_face_idx": arrays.static_idx, "lmk_b_coords": arrays.static_bary}
        dynamic = {"lmk_face_idx": arrays.contour_idx, "lmk_b_coords": arrays.contour_bary}
        (out_dir / "flame_static_embedding.pkl").write_bytes(_legacy_pickle(static))
        (out_dir / "flame_dynamic_embedding.npy").write_bytes(_object_npy(dynamic, protocol=2, py2_strings=True))
    if "mediapipe" in embeddings:
        np.savez(
            out_dir / "mediapipe_landmark_embedding.npz",
            lmk_face_idx=arrays.mediapipe_idx,
            lmk_b_coords=arrays.mediapipe_bary,
            landmark_indices=arrays.mediapipe_landmarks,
        )
    mean_bgr, basis_bgr = arrays.texture_mean[..., ::-1], arrays.texture_basis[..., ::-1, :]
    if texture == "flame":
        np.savez(
            out_dir / "FLAME_texture.npz",
            mean=255.0 * mean_bgr,
            tex_dir=255.0 * basis_bgr,
            vt=arrays.uv_coords,
            ft=arrays.uv_faces,
        )
    elif texture == "bfm":
        basis_columns = basis_bgr.reshape(-1, basis_bgr.shape[-1])
        np.savez(out_dir / "FLAME_albedo_from_BFM.npz", MU=mean_bgr.ravel(), PC=basis_columns)
    if head_template:
        _write_obj(out_dir / "head_template.obj", arrays)
    if eyelids:
        shapes = eyelid_blendshapes(seed).astype(np.float32)
        np.save(out_dir / "l_eyelid.npy", shapes[:, :, 0])
        np.save(out_dir / "r_eyelid.npy", shapes[:, :, 1])
    return out_dir


def _write_model(
    out_dir: Path,
    model_format: str,
    v_template: np.ndarray,
    shapedirs: np.ndarray,
    posedirs: np.ndarray,
    weights: np.ndarray,
    joints: np.ndarray,
    kintree_table: np.ndarray,
    faces: np.ndarray,
    j_regressor: np.ndarray,
) -> None:
    """generic_model.pkl as FLAME ships it (chumpy arrays, a csc J_regressor), generic_model.npz, or FLAME 2023
    Open's layout: the same arrays plus its ``supr_expression_metadata``, as flame2023_Open.pkl ("open") or
    inside FLAME2023Open.zip beside a readme ("open_zip"), as downloaded."""
    model = {
        "v_template": v_template,
        "shapedirs": shapedirs,
        "posedirs": posedirs,
        "weights": weights,
        "J": joints,
        "kintree_table": kintree_table,
        "f": faces.astype(np.uint32),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }
    if model_format in ("pkl", "open", "open_zip"):
        chumpy_keys = ("v_template", "shapedirs", "posedirs", "weights", "J")
        pickled = {k: _ChumpyCh(v) if k in chumpy_keys else v for k, v in model.items()}
        pickled["J_regressor"] = _ScipyCsc(j_regressor)
        if model_format == "pkl":
            (out_dir / "generic_model.pkl").write_bytes(_legacy_pickle(pickled))
            return
        # Made-up contents under the real key: only its presence identifies the release.
        pickled[OPEN_METADATA_KEY] = {"basis": "fixture", "n_expression": np.array(N_EXP)}
        payload = _legacy_pickle(pickled)
        if model_format == "open":
            (out_dir / "flame2023_Open.pkl").write_bytes(payload)
        else:
            with zipfile.ZipFile(out_dir / "FLAME2023Open.zip", "w") as archive:
                archive.writestr("FLAME2023Open/readme.txt", "FLAME 2023 Open (fixture)\n")
                archive.writestr("FLAME2023Open/flame2023_Open.pkl", payload)
    elif model_format == "npz":
        np.savez(out_dir / "generic_model.npz", J_regressor=j_regressor, **model)
    else:
        raise ValueError(f"model_format must be 'pkl', 'npz', 'open' or 'open_zip', not {model_format!r}")


def write_small_model(out_dir: Path, model_format: str = "pkl", n_vertices: int = 12, seed: int = 0) -> Path:
    """A FLAME-layout model of a few vertices in FLAME's own file formats and key names, loadable in
    milliseconds: for tests that load many damaged copies. Returns out_dir."""
    rng = np.random.default_rng(seed)
    n_components = N_SHAPE + 10
    weights = rng.random((n_vertices, N_JOINTS)) + 0.1
    j_regressor = np.where(rng.random((N_JOINTS, n_vertices)) < 0.5, rng.random((N_JOINTS, n_vertices)), 0.0)
    j_regressor[:, 0] += 0.1
    kintree = np.array([[ROOT_SENTINEL, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_model(
        out_dir,
        model_format,
        v_template=rng.normal(0.0, 0.05, (n_vertices, 3)),
        shapedirs=rng.normal(0.0, 1e-3, (n_vertices, 3, n_components)),
        posedirs=rng.normal(0.0, 1e-3, (n_vertices, 3, 9 * (N_JOINTS - 1))),
        weights=weights / weights.sum(axis=1, keepdims=True),
        joints=rng.normal(0.0, 0.05, (N_JOINTS, 3)),
        kintree_table=kintree,
        faces=np.stack([np.arange(n_vertices), np.roll(np.arange(n_vertices), 1), np.roll(np.arange(n_vertices), 2)], 1),
        j_regressor=j_regressor / j_regressor.sum(axis=1, keepdims=True),
    )
    return out_dir


def _write_obj(path: Path, arrays: FlameArrays) -> None:
    lines = [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in arrays.v_template]
    lines += [f"vt {u:.6f} {v:.6f}" for u, v in arrays.uv_coords]
    lines += [
        "f " + " ".join(f"{v + 1}/{t + 1}" for v, t in zip(face, uv_face))
        for face, uv_face in zip(arrays.faces, arrays.uv_faces)
    ]
    path.write_text("\n".join(lines) + "\n")


def write_smplx_copy(flame_dir: Path, out_dir: Path) -> Path:
    """Write what ``smplx.create(out_dir, model_type='flame', use_face_contour=True)`` reads; return out_dir.

    smplx unpickles ``out_dir/flame/FLAME_NEUTRAL.pkl`` with plain pickle, so the copy holds plain numpy
    arrays (dense J_regressor); the RingNet embeddings are copied beside it unchanged.
    """
    from engine.safe_pickle import load_npz, load_pickle

    model_pkl = flame_dir / "generic_model.pkl"
    if model_pkl.is_file():
        with model_pkl.open("rb") as stream:
            model = load_pickle(stream)
    else:
        arrays = load_npz(flame_dir / "generic_model.npz")
        model = {key: value.item() if value.dtype.kind == "U" else value for key, value in arrays.items()}
    target = out_dir / "flame"
    target.mkdir(parents=True, exist_ok=True)
    with (target / "FLAME_NEUTRAL.pkl").open("wb") as stream:
        pickle.dump(model, stream, protocol=pickle.HIGHEST_PROTOCOL)
    for name in ("flame_static_embedding.pkl", "flame_dynamic_embedding.npy"):
        shutil.copyfile(flame_dir / name, target / name)
    return out_dir
