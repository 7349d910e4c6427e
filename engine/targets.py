"""Observed 2D landmarks -> the per-landmark pixel targets of a LandmarkModel.

Observations come as MediaPipe's 478 points and/or iBUG 68 points (pixels, NaN where not observed). Each
landmark group of the model takes its targets from them:
- ``lmk68``: the given 68 points, else the 68 points converted from MediaPipe (engine.landmarks.to_68);
  where the 68 points are converted and the model's MediaPipe embedding covers a feature (brows, eyes,
  nose, lips), the 68 points of that feature are left unobserved: the direct embedding already fits the same
  detector points, and their 68-point version (a table fitted on two images) would pull them elsewhere. The
  jaw contour is always kept, and 68 points given as such (another detector) are all fitted;
- ``mediapipe``: MediaPipe's points at the embedding's ``landmark_indices``;
- ``eyes``: MediaPipe's iris centres (the subject's left, then right, as FLAME orders its eye joints).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from engine.fitting import FitConfig, FrameTargets, Targets, frame_target_arrays, landmark_weights
from engine.head_model import HeadModel, MediapipeEmbedding
from engine.jit import compiled
from engine.landmark_model import LandmarkModel
from engine.landmarks import LEFT_IRIS_CENTER, N_LANDMARKS, RIGHT_IRIS_CENTER, MediapipeTo68, load_mediapipe_to_68, to_68


def groups_for(model: HeadModel) -> tuple[str, ...]:
    """Landmark groups to fit for a model.

    The demo head embeds all 478 MediaPipe points, irises included, so its 68 points and pupils would only
    repeat them. FLAME uses its 68 points, its MediaPipe embedding when the user has one, and the pupils.
    """
    if model.is_demo:
        return ("mediapipe",)
    return ("lmk68", "mediapipe", "eyes") if model.mediapipe is not None else ("lmk68", "eyes")


#: MediaPipe's feature outlines, by the name of its connection set (``FaceLandmarksConnections``): shipped as
#: data because importing MediaPipe in this process only to read them cost 0.6 to 0.7 s of CPU at every start
#: (``tests/test_landmark_consistency.py`` checks them against the installed MediaPipe).
MEDIAPIPE_OUTLINES_FILE = Path(__file__).parent / "data" / "mediapipe_outlines.json"


@lru_cache(maxsize=1)
def mediapipe_outlines() -> dict[str, frozenset[int]]:
    """The landmark indices each of MediaPipe's feature connection sets joins, by the set's name."""
    outlines = json.loads(MEDIAPIPE_OUTLINES_FILE.read_text())["outlines"]
    return {name: frozenset(indices) for name, indices in outlines.items()}


def mediapipe_contour_landmarks() -> np.ndarray:
    """MediaPipe's own feature contours (lips, eyes, brows, face oval, nose, irises): 160 of the 478 points."""
    return np.array(sorted(set().union(*mediapipe_outlines().values())))


#: iBUG 68 points (0-based) of each feature, with the MediaPipe connection set that outlines the same feature
#: (MediaPipe's "right" is the subject's right, as iBUG's first brow and eye).
_FEATURES_68 = (
    (range(17, 22), "FACE_LANDMARKS_RIGHT_EYEBROW"),
    (range(22, 27), "FACE_LANDMARKS_LEFT_EYEBROW"),
    (range(27, 36), "FACE_LANDMARKS_NOSE"),
    (range(36, 42), "FACE_LANDMARKS_RIGHT_EYE"),
    (range(42, 48), "FACE_LANDMARKS_LEFT_EYE"),
    (range(48, 68), "FACE_LANDMARKS_LIPS"),
)


def covered_68_points(landmark_indices: np.ndarray) -> np.ndarray:
    """(68,) bool: the iBUG points whose feature a MediaPipe embedding of ``landmark_indices`` covers.

    A feature counts as covered when the embedding holds at least half of MediaPipe's outline of it
    (metrical-tracker's 105 points hold all of the brows, eyes and lips and half of the nose). The jaw
    contour (iBUG 1-17) is never covered: FLAME's contour follows the silhouette as the head turns.
    """
    embedded = set(np.asarray(landmark_indices).tolist())
    covered = np.zeros(68, dtype=bool)
    for points, name in _FEATURES_68:
        outline = mediapipe_outlines()[name]
        covered[list(points)] = 2 * len(outline & embedded) >= len(outline)
    return covered


def tracking_head(head: HeadModel) -> HeadModel:
    """The head as the tracker fits it.

    An embedding of all 478 MediaPipe points (the demo head's) is reduced to MediaPipe's feature contours:
    the dense cheek and forehead points add a third of the work each and little information.
    """
    embedding = head.mediapipe
    if embedding is None or len(embedding.landmark_indices) < N_LANDMARKS:
        return head
    keep = np.isin(embedding.landmark_indices, mediapipe_contour_landmarks())
    reduced = MediapipeEmbedding(embedding.face_idx[keep], embedding.bary[keep], embedding.landmark_indices[keep])
    return replace(head, mediapipe=reduced)


@compiled
def trackable_face(
    pixels: np.ndarray, observed: np.ndarray, weighted: np.ndarray, min_fraction: float, min_size_px: float, min_aspect: float
) -> bool:
    """Whether one frame's points can be fitted: at least ``min_fraction`` of the weighted landmarks (``weighted``
    (N,) bool) observed (``observed`` (N,) bool), and those points (of pixels (N, 2) float64) able to be a face.

    Points that all coincide, lie on a line, or fit in a box a few pixels wide fix no head pose: a fit to
    them puts the head anywhere (all-equal points put it 1e14 m away), so such frames are not tracked.
    ``min_aspect`` is the smallest ratio of the points' spread across to along their main direction.
    Compiled (numba): the tracker asks it of every frame.
    """
    count = 0
    low_x = low_y = math.inf
    high_x = high_y = -math.inf
    sum_x = sum_y = 0.0
    for index in range(observed.shape[0]):
        if observed[index] and weighted[index]:
            x, y = pixels[index, 0], pixels[index, 1]
            low_x, low_y, high_x, high_y = min(low_x, x), min(low_y, y), max(high_x, x), max(high_y, y)
            sum_x, sum_y = sum_x + x, sum_y + y
            count += 1
    if count < min_fraction * observed.shape[0]:
        return False
    if count < 3 or math.hypot(high_x - low_x, high_y - low_y) < min_size_px:
        return False
    # The spreads are the square roots of the eigenvalues of the centred points' 2x2 scatter matrix.
    mean_x, mean_y = sum_x / count, sum_y / count
    xx = xy = yy = 0.0
    for index in range(observed.shape[0]):
        if observed[index] and weighted[index]:
            x, y = pixels[index, 0] - mean_x, pixels[index, 1] - mean_y
            xx, xy, yy = xx + x * x, xy + x * y, yy + y * y
    middle, radius = (xx + yy) / 2, math.hypot((xx - yy) / 2, xy)
    return max(middle - radius, 0.0) >= min_aspect**2 * (middle + radius)


class TargetBuilder:
    """Builds Targets for one LandmarkModel; reuses its index arrays for every frame."""

    def __init__(self, model: LandmarkModel, head: HeadModel, config: FitConfig, mapping: MediapipeTo68 | None = None) -> None:
        self.model = model
        #: The MediaPipe -> 68 table that converts MediaPipe points (None: the committed one).
        self.mapping = mapping
        self.weights = landmark_weights(model, config)
        self.mediapipe_indices = head.mediapipe.landmark_indices if head.mediapipe is not None else None
        fits_both = "lmk68" in model.slices and "mediapipe" in model.slices and self.mediapipe_indices is not None
        #: (68,) bool, the converted 68 points left to the MediaPipe embedding.
        self.covered68 = covered_68_points(self.mediapipe_indices) if fits_both else np.zeros(68, dtype=bool)
        self.dtype, self.device = model.joint_rest.dtype, model.joint_rest.device
        #: The model's dtype in NumPy, and the weights as arrays: what :meth:`frame` makes without tensors.
        self.numpy_dtype = torch.empty(0, dtype=self.dtype).numpy().dtype
        self.weights_array = self.weights.numpy(force=True).astype(np.float64)
        self.sources, self.source_weights = self._source_table()
        # The table's weights in each dtype MediaPipe's points come in, and the buffer they are gathered into.
        self._source_weights = {np.dtype(dtype): self.source_weights.astype(dtype) for dtype in (np.float32, np.float64)}
        self._gathered = np.empty((self.model.n_landmarks, 2), dtype=self.numpy_dtype)
        for dtype in self._source_weights:  # its kernels compiled (or loaded) now, not on the first frame
            self.frame(np.zeros((N_LANDMARKS, 2), dtype), None)
        Targets(torch.zeros(1, 1, 2, dtype=self.dtype), self.weights)  # its kernel compiled (or loaded) now, not on the first frame

    def pixels(self, mp478: np.ndarray | None, lmk68: np.ndarray | None) -> np.ndarray:
        """(B, L, 2) float pixels in the model's landmark order from (B, 478, 2) and/or (B, 68, 2) arrays."""
        if mp478 is None and lmk68 is None:
            raise ValueError("an observation needs MediaPipe 478 points or 68 points")
        batch = (mp478 if mp478 is not None else lmk68).shape[0]
        out = np.full((batch, self.model.n_landmarks, 2), np.nan, dtype=np.float64)
        for group, part in self.model.slices.items():
            if group == "lmk68":
                if lmk68 is not None:
                    out[:, part] = lmk68
                else:
                    out[:, part] = to_68(mp478, self.mapping)
                    out[:, part][:, self.covered68] = np.nan
            elif group == "mediapipe" and mp478 is not None:
                out[:, part] = mp478[:, self.mediapipe_indices]
            elif group == "eyes" and mp478 is not None and mp478.shape[1] == N_LANDMARKS:
                out[:, part] = mp478[:, [LEFT_IRIS_CENTER, RIGHT_IRIS_CENTER]]
        return out

    def _source_table(self) -> tuple[np.ndarray, np.ndarray]:
        """Where each landmark's target comes from in MediaPipe's 478 points alone (what :meth:`pixels` does,
        as a table for :func:`_gather`): (L, 3) MediaPipe indices and (L, 3) weights; a landmark with one source
        is copied from ``sources[l, 0]`` (weights NaN), with none (-1) it is unobserved."""
        sources = np.full((self.model.n_landmarks, 3), -1, dtype=np.int64)
        weights = np.full((self.model.n_landmarks, 3), np.nan)
        mapping = self.mapping or load_mediapipe_to_68()
        for group, part in self.model.slices.items():
            rows = np.arange(self.model.n_landmarks)[part]
            if group == "lmk68":
                kept = ~self.covered68
                sources[rows[kept]], weights[rows[kept]] = mapping.triangles[kept], mapping.bary[kept]
            elif group == "mediapipe":
                sources[rows, 0] = self.mediapipe_indices
            elif group == "eyes":
                sources[rows, 0] = [LEFT_IRIS_CENTER, RIGHT_IRIS_CENTER]
        return sources, weights

    def build(self, mp478: np.ndarray | None, lmk68: np.ndarray | None) -> Targets:
        """The fitting targets of a batch of frames from (B, 478, 2) and/or (B, 68, 2) pixel arrays."""
        pixels = torch.as_tensor(self.pixels(mp478, lmk68), dtype=self.dtype, device=self.device)
        return Targets(pixels, self.weights)

    def build_frame(self, mp478: np.ndarray | None, lmk68: np.ndarray | None) -> Targets:
        """The fitting targets of one frame (a batch of one) from (478, 2) and/or (68, 2) pixel arrays."""
        return self.build(None if mp478 is None else mp478[None], None if lmk68 is None else lmk68[None])

    def frame(self, mp478: np.ndarray | None, lmk68: np.ndarray | None) -> FrameTargets:
        """:meth:`build_frame`'s targets as arrays (for the per-frame solver on the CPU): no tensor made."""
        live = lmk68 is None and mp478 is not None and mp478.shape[0] == N_LANDMARKS and mp478.dtype in self._source_weights
        if live:  # MediaPipe's points alone: one compiled call gathers them into a buffer and makes the arrays
            pixels, observed, face_size = _gathered_targets(mp478, self.sources, self._source_weights[mp478.dtype], self._gathered)
            return FrameTargets(pixels, self.weights_array, observed, face_size)
        pixels = self.pixels(None if mp478 is None else mp478[None], None if lmk68 is None else lmk68[None])[0]
        return FrameTargets.of(pixels.astype(self.numpy_dtype, copy=False), self.weights_array)


@compiled
def _gathered_targets(
    points: np.ndarray, sources: np.ndarray, weights: np.ndarray, out: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """:func:`_gather` into ``out``, then :func:`engine.fitting.frame_target_arrays` of it, in one call (each
    kept a function of its own: numba compiling both as one body gave face sizes one float32 step off
    PyTorch's)."""
    _gather(points, sources, weights, out)
    return frame_target_arrays(out)


@compiled
def _gather(points: np.ndarray, sources: np.ndarray, weights: np.ndarray, out: np.ndarray) -> None:
    """MediaPipe's points (478, 2) -> the model's targets (L, 2) into ``out`` (in its dtype) by the table of
    TargetBuilder._source_table: copies, barycentric 68 points (as engine.landmarks.to_68 sums them, in the
    points' dtype) and NaN."""
    for landmark in range(sources.shape[0]):
        first = sources[landmark, 0]
        for axis in range(2):
            if first < 0:
                out[landmark, axis] = np.nan
            elif math.isnan(weights[landmark, 0]):
                out[landmark, axis] = points[first, axis]
            else:
                total = points.dtype.type(0.0)
                for corner in range(3):
                    total += points[sources[landmark, corner], axis] * weights[landmark, corner]
                out[landmark, axis] = total
