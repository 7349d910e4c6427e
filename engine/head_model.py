"""The in-memory description of a FLAME-layout head model.

Both the user's FLAME files (``engine.assets``) and the demo head built from MediaPipe's canonical face
(``engine.demo_head``) are turned into a :class:`HeadModel`; everything downstream (the FLAME layer, the
fitting engine, exporters) sees only this type.  Arrays are plain numpy, float64 where they come from the
files; the FLAME layer converts them to torch tensors of the chosen dtype and device once.

Conventions (README.md, "Architecture"): model space is FLAME's, y up, z toward the viewer, metres.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.errors import UserError

#: Joint order of FLAME's kinematic tree. The demo head uses the same names and order.
JOINT_NAMES: tuple[str, ...] = ("root", "neck", "jaw", "left_eye", "right_eye")
#: Their indices in a pose (J, 3) or rotations (J, 3, 3); the root joint's rotation is the head's.
ROOT, NECK, JAW, LEFT_EYE, RIGHT_EYE = range(len(JOINT_NAMES))


def has_eyes(n_joints: int) -> bool:
    """Whether a model with this many joints has FLAME's two eye joints (FLAME and the demo head do)."""
    return n_joints > RIGHT_EYE


class ModelFileError(UserError):
    """A model file is missing, unreadable or malformed. The message is one line meant for the user."""


@dataclass(frozen=True)
class Embedding:
    """Landmarks as barycentric points on mesh triangles: point = sum_k bary[:, k] * v[faces[face_idx, k]]."""

    face_idx: np.ndarray  # (L,) int64
    bary: np.ndarray  # (L, 3) float64


@dataclass(frozen=True)
class ContourEmbedding:
    """FLAME's 17 jaw-contour landmarks, one row of candidates per head yaw (rows as DECA orders them)."""

    face_idx: np.ndarray  # (79, 17) int64
    bary: np.ndarray  # (79, 17, 3) float64


@dataclass(frozen=True)
class MediapipeEmbedding:
    """Points on the mesh that correspond to MediaPipe Face Landmarker's 478 landmarks."""

    face_idx: np.ndarray  # (K,) int64
    bary: np.ndarray  # (K, 3) float64
    landmark_indices: np.ndarray  # (K,) int64 into MediaPipe's 478


@dataclass(frozen=True)
class TextureSpace:
    """A linear albedo model over a UV map: albedo = mean + basis @ tex, values in [0, 1], RGB."""

    mean: np.ndarray  # (H, W, 3)
    basis: np.ndarray  # (H, W, 3, T)
    name: str


@dataclass
class HeadModel:
    """A head model with FLAME's layout: blendshapes, pose correctives and linear blend skinning.

    The 68-point landmark set is 17 contour points (``contour68``, chosen by head yaw) followed by the 51
    static points (``static68``); models without a contour table use ``full68`` for all 68.
    """

    name: str  # what the user sees: "FLAME 2020", "FLAME 2023", "demo head (not FLAME)"
    is_demo: bool
    v_template: np.ndarray  # (V, 3)
    shapedirs: np.ndarray  # (V, 3, S) identity basis
    exprdirs: np.ndarray  # (V, 3, E) expression basis
    posedirs: np.ndarray  # (V, 3, 9 * (J - 1)) correctives for the non-root joints' (R - I)
    j_regressor: np.ndarray  # (J, V) dense
    lbs_weights: np.ndarray  # (V, J)
    parents: np.ndarray  # (J,) int64, parents[0] == -1
    faces: np.ndarray  # (F, 3) int64
    static68: Embedding | None = None  # 51 points: iBUG 68 points 18..68
    contour68: ContourEmbedding | None = None
    full68: Embedding | None = None  # 68 points without yaw-dependent contour
    mediapipe: MediapipeEmbedding | None = None
    uv_coords: np.ndarray | None = None  # (Vt, 2) texture coordinates in [0, 1], v up
    uv_faces: np.ndarray | None = None  # (F, 3) indices into uv_coords
    texture: TextureSpace | None = None
    #: (V, 3, 2) metrical-tracker's eyelid blendshapes (subject's left, then right): rest-space vertex offsets
    #: that close each eye fully at weight 1; extra expression components, None without the files.
    eyelids: np.ndarray | None = None
    #: file name -> sha256 of every file the model was read from, for meta.json and flame.shape messages.
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def n_vertices(self) -> int:
        return int(self.v_template.shape[0])

    @property
    def n_joints(self) -> int:
        return int(self.parents.shape[0])

    @property
    def n_shape(self) -> int:
        return int(self.shapedirs.shape[2])

    @property
    def n_exp(self) -> int:
        return int(self.exprdirs.shape[2])

    @property
    def n_eyelids(self) -> int:
        return 0 if self.eyelids is None else int(self.eyelids.shape[2])

    @property
    def checksum(self) -> str:
        """One short identifier of the model files, stable across runs."""
        import hashlib

        digest = hashlib.sha256()
        for name in sorted(self.sources):
            digest.update(f"{name}:{self.sources[name]}\n".encode())
        return digest.hexdigest()[:16]

    def describe(self) -> dict[str, object]:
        """Which model a result was made with, as meta.json and session.json record it."""
        return {"name": self.name, "checksum": self.checksum, "is_demo": self.is_demo, "files": self.sources}

    def validate(self) -> None:
        """Check every array's shape against the others; raise ModelFileError naming the first bad one."""
        n_vertices, n_joints = self.n_vertices, self.n_joints
        expected = {
            "v_template": (self.v_template, (n_vertices, 3)),
            "shapedirs": (self.shapedirs, (n_vertices, 3, None)),
            "exprdirs": (self.exprdirs, (n_vertices, 3, None)),
            "posedirs": (self.posedirs, (n_vertices, 3, 9 * (n_joints - 1))),
            "J_regressor": (self.j_regressor, (n_joints, n_vertices)),
            "weights": (self.lbs_weights, (n_vertices, n_joints)),
            "faces": (self.faces, (None, 3)),
        }
        if self.eyelids is not None:
            expected["eyelids"] = (self.eyelids, (n_vertices, 3, 2))
        for key, (array, shape) in expected.items():
            if array.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, array.shape)):
                pretty = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"
                raise ModelFileError(f"{self.name}: '{key}' has shape {array.shape}, expected {pretty}")
            if not np.all(np.isfinite(array)):
                raise ModelFileError(f"{self.name}: '{key}' contains NaN or infinite values")
        if self.parents[0] != -1 or np.any(self.parents[1:] < 0) or np.any(self.parents[1:] >= np.arange(1, n_joints)):
            raise ModelFileError(f"{self.name}: kintree_table is not a tree rooted at joint 0")
        if self.faces.min() < 0 or self.faces.max() >= n_vertices:
            raise ModelFileError(f"{self.name}: 'f' refers to vertices outside 0..{n_vertices - 1}")
        n_faces = self.faces.shape[0]
        for key, emb in (("static68", self.static68), ("full68", self.full68), ("mediapipe", self.mediapipe)):
            if emb is not None and (emb.face_idx.min() < 0 or emb.face_idx.max() >= n_faces):
                raise ModelFileError(
                    f"{self.name}: landmark embedding '{key}' uses triangle {int(emb.face_idx.max())}, "
                    f"but the mesh has {n_faces} triangles: the embedding belongs to another model"
                )
        if self.contour68 is not None and (self.contour68.face_idx.min() < 0 or self.contour68.face_idx.max() >= n_faces):
            raise ModelFileError(
                f"{self.name}: contour landmark embedding uses triangle {int(self.contour68.face_idx.max())}, "
                f"but the mesh has {n_faces} triangles: the embedding belongs to another model"
            )
