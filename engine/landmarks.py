"""MediaPipe Face Landmarker (Tasks API) as numpy observations, and MediaPipe 478 -> iBUG 68 conversion.

Coordinates: ``points`` are pixels of the input image, x right, y down, MediaPipe's normalized coordinates
times width/height (so the image spans [0, W] x [0, H]). Left/right in names is the *subject's*: in an
unmirrored camera image the subject's right eye appears on the image's left.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from engine.head_model import ModelFileError
from flame_client.messages import BLENDSHAPE_NAMES  # the wire schema's list is MediaPipe's output order

if TYPE_CHECKING:
    from mediapipe.tasks.python.vision.face_landmarker import FaceLandmarkerResult

log = logging.getLogger(__name__)

N_LANDMARKS = 478
N_MESH_LANDMARKS = 468  # 0..467 are the vertices of MediaPipe's canonical face mesh; 468..477 the irises

#: MediaPipe's iris landmarks: centre first, then four points on the iris boundary (MediaPipe's
#: FACE_LANDMARKS_RIGHT_IRIS / LEFT_IRIS connections; checked on a real image: 468 lies in the image-left eye).
RIGHT_IRIS_CENTER = 468
RIGHT_IRIS = (468, 469, 470, 471, 472)
LEFT_IRIS_CENTER = 473
LEFT_IRIS = (473, 474, 475, 476, 477)

MAPPING_FILE = "mediapipe_to_68.npz"
MAPPING_FORMAT_VERSION = 1


@dataclass(frozen=True)
class LandmarkerConfig:
    """How to run MediaPipe Face Landmarker. VIDEO mode tracks between frames and needs rising timestamps."""

    task_path: Path
    running_mode: Literal["image", "video"] = "video"
    num_faces: int = 1
    min_face_detection_confidence: float = 0.5
    min_face_presence_confidence: float = 0.5
    min_tracking_confidence: float = 0.5
    output_blendshapes: bool = True
    output_transform: bool = True


@dataclass(frozen=True)
class FaceObservation:
    """One face as MediaPipe saw it in one image."""

    points: np.ndarray  # (478, 2) float32, pixels of the input image
    depth: np.ndarray  # (478,) float32, MediaPipe's relative z (scaled like x; smaller = closer to camera)
    blendshapes: np.ndarray  # (52,) float32 in [0, 1], order of flame_client's BLENDSHAPE_NAMES; NaN when not requested
    transform: np.ndarray  # (4, 4) float64 facial transformation matrix (canonical face cm -> camera); NaN if off
    image_size: tuple[int, int]  # (height, width)
    timestamp_ms: int  # the timestamp MediaPipe was given (after the rising-timestamp guard); 0 in IMAGE mode


class FaceLandmarker:
    """A MediaPipe Face Landmarker. Use as a context manager or call :meth:`close`.

    When MediaPipe finds several faces (``num_faces > 1``) the largest one is returned.
    """

    def __init__(self, config: LandmarkerConfig) -> None:
        from mediapipe.tasks.python import vision
        from mediapipe.tasks.python.core.base_options import BaseOptions

        task_path = Path(config.task_path)
        if not task_path.is_file():
            raise ModelFileError(f"{task_path} does not exist: download face_landmarker.task (see models/README.md)")
        modes = {"image": vision.RunningMode.IMAGE, "video": vision.RunningMode.VIDEO}
        if config.running_mode not in modes:
            raise ValueError(f"running_mode must be 'image' or 'video', not {config.running_mode!r}")
        options = vision.FaceLandmarkerOptions(
            # A buffer, not a path: MediaPipe's own file access fails on some non-ASCII Windows paths.
            base_options=BaseOptions(model_asset_buffer=task_path.read_bytes()),
            running_mode=modes[config.running_mode],
            num_faces=config.num_faces,
            min_face_detection_confidence=config.min_face_detection_confidence,
            min_face_presence_confidence=config.min_face_presence_confidence,
            min_tracking_confidence=config.min_tracking_confidence,
            output_face_blendshapes=config.output_blendshapes,
            output_facial_transformation_matrixes=config.output_transform,
        )
        try:
            with _native_stderr_silenced(unless=log.isEnabledFor(logging.DEBUG)):
                self._landmarker = vision.FaceLandmarker.create_from_options(options)
        except (RuntimeError, ValueError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelFileError(
                f"{task_path} is not a usable MediaPipe face landmarker model ({first_line}): download it again"
            ) from None
        import mediapipe

        self._image_class, self._srgb = mediapipe.Image, mediapipe.ImageFormat.SRGB
        self._video = config.running_mode == "video"
        self._last_timestamp_ms: int | None = None
        self._clock_origin = time.monotonic()

    def detect(self, image_rgb: np.ndarray, timestamp_ms: int | None = None) -> FaceObservation | None:
        """Find the face in an (H, W, 3) uint8 RGB image; None when there is none.

        In VIDEO mode ``timestamp_ms`` is the frame's time (a monotonic clock when None); a timestamp not
        above the previous one is bumped to previous + 1 ms, because MediaPipe rejects it otherwise.
        """
        if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image_rgb.shape} {image_rgb.dtype}")
        image = self._image_class(image_format=self._srgb, data=np.ascontiguousarray(image_rgb))
        if self._video:
            timestamp_ms = self._rising_timestamp(timestamp_ms)
            result = self._landmarker.detect_for_video(image, timestamp_ms)
        else:
            timestamp_ms = 0
            result = self._landmarker.detect(image)
        if not result.face_landmarks:
            return None
        face = _largest_face(result.face_landmarks) if len(result.face_landmarks) > 1 else 0
        height, width = image_rgb.shape[:2]
        return self._observation(result, face, (height, width), timestamp_ms)

    def _rising_timestamp(self, timestamp_ms: int | None) -> int:
        if timestamp_ms is None:
            timestamp_ms = int((time.monotonic() - self._clock_origin) * 1000.0)
        timestamp_ms = int(timestamp_ms)
        if self._last_timestamp_ms is not None and timestamp_ms <= self._last_timestamp_ms:
            log.debug("timestamp %d ms not after %d ms; bumped", timestamp_ms, self._last_timestamp_ms)
            timestamp_ms = self._last_timestamp_ms + 1
        self._last_timestamp_ms = timestamp_ms
        return timestamp_ms

    def _observation(
        self, result: FaceLandmarkerResult, face: int, image_size: tuple[int, int], timestamp_ms: int
    ) -> FaceObservation:
        height, width = image_size
        xyz = np.array([(p.x, p.y, p.z) for p in result.face_landmarks[face]], dtype=np.float32)
        points = xyz[:, :2] * np.array([width, height], dtype=np.float32)
        blendshapes = np.full(len(BLENDSHAPE_NAMES), np.nan, dtype=np.float32)
        if result.face_blendshapes:
            for category in result.face_blendshapes[face]:
                blendshapes[category.index] = category.score
        transform = np.full((4, 4), np.nan)
        if result.facial_transformation_matrixes:
            transform = np.asarray(result.facial_transformation_matrixes[face], dtype=np.float64).reshape(4, 4)
        return FaceObservation(
            points=points,
            depth=xyz[:, 2].copy(),
            blendshapes=blendshapes,
            transform=transform,
            image_size=image_size,
            timestamp_ms=timestamp_ms,
        )

    def close(self) -> None:
        self._landmarker.close()

    def __enter__(self) -> FaceLandmarker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def _native_stderr_silenced(unless: bool) -> Iterator[None]:
    """Send the process's C-level stderr (file descriptor 2) to /dev/null for the duration.

    MediaPipe's graph and TFLite write five lines of start-up notes there while a landmarker is created
    (absl logging ignores GLOG_* and TF_CPP_* variables), which no Python setting reaches. ``-v`` keeps them.
    """
    if unless:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _largest_face(faces: list) -> int:
    """Index of the face whose landmarks span the largest normalized area."""
    areas = []
    for landmarks in faces:
        xs = [p.x for p in landmarks]
        ys = [p.y for p in landmarks]
        areas.append((max(xs) - min(xs)) * (max(ys) - min(ys)))
    return int(np.argmax(areas))


@dataclass(frozen=True)
class MediapipeTo68:
    """iBUG 68 points as barycentric points on MediaPipe's canonical face mesh (see engine/data/README.md).

    ``triangles[i]`` = canonical mesh ``triangles[face_idx[i]]``, vertices are MediaPipe landmark indices,
    so the same table converts observed landmarks and embeds the 68 points in a mesh whose vertex i is
    MediaPipe landmark i.
    """

    face_idx: np.ndarray  # (68,) int64 into the canonical face's 898 triangles
    bary: np.ndarray  # (68, 3) float64
    triangles: np.ndarray  # (68, 3) int64 MediaPipe landmark indices
    version: int


@lru_cache(maxsize=1)
def load_mediapipe_to_68() -> MediapipeTo68:
    """The committed MediaPipe -> 68 table from engine/data/ (regenerate: python -m engine.landmark_mapping)."""
    with resources.files("engine").joinpath("data", MAPPING_FILE).open("rb") as handle, np.load(handle) as data:
        version = int(data["version"])
        if version != MAPPING_FORMAT_VERSION:
            raise ModelFileError(f"{MAPPING_FILE} has format version {version}, expected {MAPPING_FORMAT_VERSION}")
        mapping = MediapipeTo68(
            face_idx=data["face_idx"].astype(np.int64),
            bary=data["bary"].astype(np.float64),
            triangles=data["triangles"].astype(np.int64),
            version=version,
        )
    for array in (mapping.face_idx, mapping.bary, mapping.triangles):
        array.setflags(write=False)
    return mapping


def to_68(points478: np.ndarray, mapping: MediapipeTo68 | None = None) -> np.ndarray:
    """MediaPipe landmarks (..., 478 or 468, D) -> iBUG 68 points (..., 68, D), 0-based iBUG order.

    A NaN in any of a point's three source landmarks makes that point NaN; other points are unaffected.
    ``mapping`` defaults to the committed table.
    """
    mapping = mapping or load_mediapipe_to_68()
    corners = points478[..., mapping.triangles, :]  # (..., 68, 3, D)
    return np.einsum("...kcd,kc->...kd", corners, mapping.bary.astype(corners.dtype, copy=False))
