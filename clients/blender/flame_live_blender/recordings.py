"""Reading tracked motion from disk for "Import tracking": a ``track`` output folder or a ``live --record`` session.

``track`` writes ``tracking.npz`` (every frame's arrays stacked; per-frame ``NNNNNN.npz`` files as well) and
``meta.json`` with the fps. A session holds ``session.json`` and ``frames.msgpack``, the published
``flame.frame`` messages with their capture times. Both become a :class:`Motion`: a time in seconds and a
:class:`FramePose` per frame, None where no face was tracked. Problems raise :class:`RecordingError` with
one line that says what to pick instead.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .msgpack_reader import MsgpackError, iter_objects
from .poses import FramePose, pose_from_axis_angles, pose_from_tracking
from .stream import MAX_EXPRESSION

TRACKING_KEYS = ("exp", "jaw_pose", "neck_pose", "eye_pose", "cam")
DEFAULT_FPS = 25.0


class RecordingError(Exception):
    """The folder is not something "Import tracking" reads; one line for a Blender report."""


@dataclass(frozen=True)
class Motion:
    times: list[float]  # seconds from the first frame
    poses: list[FramePose | None]  # None: no face in that frame
    source: str

    @property
    def valid_frames(self) -> int:
        return sum(pose is not None for pose in self.poses)


def poses_on_frames(
    times: Sequence[float], poses: Sequence[FramePose | None], start_frame: int, fps: float
) -> tuple[dict[int, FramePose], int]:
    """Which pose each scene frame gets, and how many faceless samples held the pose before them.

    Sample i lands on frame ``start_frame + round(times[i] * fps)``; when several land on one frame the last
    wins. A sample without a face holds the last pose, as the glTF export does; before the first face there
    is nothing to hold and nothing is keyed.
    """
    by_frame: dict[int, FramePose] = {}
    held = 0
    last: FramePose | None = None
    for time, pose in zip(times, poses, strict=True):
        if pose is None:
            if last is None:
                continue
            held += 1
            pose = last
        last = pose
        by_frame[start_frame + math.floor(time * fps + 0.5)] = pose
    return by_frame, held


def load_motion(folder: str | Path) -> Motion:
    """The motion in a ``track`` output folder or a recorded session folder."""
    path = Path(folder)
    if path.is_file() and path.name in ("tracking.npz", "session.json", "frames.msgpack"):
        path = path.parent
    if not path.is_dir():
        raise RecordingError(f"{path} is not a folder: pick the output folder of 'track' or a 'live --record' session")
    if (path / "tracking.npz").is_file():
        return _load_tracking(path)
    if (path / "session.json").is_file():
        return _load_session(path)
    raise RecordingError(f"{path} holds neither tracking.npz ('track' output) nor session.json ('live --record')")


def _load_tracking(folder: Path) -> Motion:
    path = folder / "tracking.npz"
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: np.asarray(data[key], dtype=np.float64) for key in (*TRACKING_KEYS, "valid", "eyelids") if key in data}
    except (OSError, ValueError) as error:
        raise RecordingError(f"{path} is not readable ({error})") from None
    missing = [key for key in TRACKING_KEYS if key not in arrays]
    if missing:
        raise RecordingError(f"{path} lacks {', '.join(missing)}: expected the output of 'run_stream.py track'")
    count = len(arrays["exp"])
    expected = {"jaw_pose": 3, "neck_pose": 3, "eye_pose": 6, "cam": 6}
    for key, size in expected.items():
        if arrays[key].reshape(len(arrays[key]), -1).shape != (count, size):
            raise RecordingError(f"{path}: {key} has shape {arrays[key].shape}, expected ({count}, {size})")
    if "eyelids" in arrays and arrays["eyelids"].shape != (count, 2):
        raise RecordingError(f"{path}: eyelids has shape {arrays['eyelids'].shape}, expected ({count}, 2)")
    if count == 0:
        raise RecordingError(f"{path} holds no frames")
    valid = arrays.get("valid", np.ones(count)).reshape(-1) > 0.5
    fps = _tracking_fps(folder)
    poses: list[FramePose | None] = []
    for index in range(count):
        values = [arrays[key][index] for key in TRACKING_KEYS]
        if not valid[index] or not all(np.all(np.isfinite(value)) for value in values):
            poses.append(None)
            continue
        exp, jaw, neck, eyes, cam = values
        eyelids = arrays["eyelids"][index] if "eyelids" in arrays else None
        if eyelids is not None and not np.all(np.isfinite(eyelids)):
            eyelids = None
        poses.append(pose_from_tracking(cam, neck, jaw, eyes, exp, eyelids))
    return Motion([index / fps for index in range(count)], poses, str(folder))


def _tracking_fps(folder: Path) -> float:
    try:
        fps = json.loads((folder / "meta.json").read_text(encoding="utf-8")).get("fps")
    except (OSError, ValueError, AttributeError):
        return DEFAULT_FPS
    return float(fps) if isinstance(fps, int | float) and math.isfinite(fps) and fps > 0 else DEFAULT_FPS


def _load_session(folder: Path) -> Motion:
    messages_path = folder / "frames.msgpack"
    try:
        data = messages_path.read_bytes()
    except OSError as error:
        raise RecordingError(f"session {folder} is incomplete: cannot read frames.msgpack ({error.strerror})") from None
    times: list[float] = []
    poses: list[FramePose | None] = []
    try:
        for record in iter_objects(data):
            if not isinstance(record, dict) or record.get("topic") != "flame.frame":
                continue
            t_capture, pose = _session_frame(record)
            if t_capture is not None:
                times.append(t_capture)
                poses.append(pose)
    except MsgpackError as error:
        if not times:
            raise RecordingError(f"{messages_path} is damaged ({error})") from None
    if not times:
        raise RecordingError(f"session {folder} holds no frames: record with 'live --record' while a face is tracked")
    start = times[0]
    return Motion([t - start for t in times], poses, str(folder))


def _session_frame(record: dict) -> tuple[float | None, FramePose | None]:
    """(capture time, pose) of one recorded flame.frame; (None, None) for a record that breaks the schema."""
    message = record.get("msg")
    t_capture = record.get("t")
    if not isinstance(message, dict) or not isinstance(t_capture, int | float) or not math.isfinite(t_capture):
        return None, None
    if not message.get("valid"):
        return float(t_capture), None
    try:
        arrays = {
            key: np.asarray(message[key], dtype=np.float64)
            for key in ("head_rot", "head_trans", "neck_pose", "jaw_pose", "eye_pose", "exp")
        }
    except (KeyError, TypeError, ValueError):
        return None, None
    sizes = {"head_rot": 3, "head_trans": 3, "neck_pose": 3, "jaw_pose": 3, "eye_pose": 6}
    if any(arrays[key].shape != (size,) for key, size in sizes.items()) or not 0 < arrays["exp"].size <= MAX_EXPRESSION:
        return None, None
    if not all(np.all(np.isfinite(value)) for value in arrays.values()):
        return None, None
    eyelids = _session_eyelids(message.get("eyelids"))
    return float(t_capture), pose_from_axis_angles(
        arrays["head_rot"],
        arrays["head_trans"],
        arrays["neck_pose"],
        arrays["jaw_pose"],
        arrays["eye_pose"],
        arrays["exp"],
        eyelids,
    )


def _session_eyelids(value: object) -> np.ndarray | None:
    """A recorded frame's eyelid weights, or None when it has none or they break the schema (lids open)."""
    if value is None:
        return None
    try:
        eyelids = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return eyelids if eyelids.shape == (2,) and np.all(np.isfinite(eyelids)) else None
