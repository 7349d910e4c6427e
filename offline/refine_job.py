"""Offline photometric refinement of a tracked video or a recorded live session into per-frame .npz files.

Everything starts from the landmark-only fit of the same frames (``track``'s), and stays anchored to it.
Appearance (albedo, lighting) is fitted once on the most diverse tracked frames (keyframes), with the
landmark calibration's shape; without a texture space a detailed albedo map is then gathered from the
keyframes' pixels. Every frame is then corrected in windows of consecutive frames, each window's corrections
tied to the one before it, so smoothness runs across the whole sequence. A window whose landmark error rises
above the landmark fit's by more than a margin is rejected (logged and counted in ``meta.json``): its frames
keep the landmark fit. Once every frame is refined, the corrections to the landmark fit are smoothed over the
whole sequence (past and future frames), as little as two guards allow: the landmarks move no more than the
landmark fit's where the detector's are stillest, and their error stays within the margins of the landmark
fit's (else every frame keeps the landmark fit). The landmark fit refinement starts from is itself ``track``'s
smoothed one. Output in ``DIR`` (format version in ``meta.json``):

- ``identity.npz``: ``shape``, ``tex`` (texture-space coefficients, or the coarse estimated albedo map),
  ``light`` (9, 3) SH coefficients, and ``albedo_map`` (the detailed map, when gathered); written first,
  reused when a run is resumed;
- ``{frame:06d}.npz``: the reference format of ``offline.track_job`` plus ``tex``, ``light``,
  ``image_error`` (of the refinement, before smoothing) and ``refined`` (False where the window was
  rejected or every frame keeps the landmark fit after smoothing); frames whose file exists are skipped, so an
  interrupted run resumes where it stopped;
- ``unsmoothed.npz``: with smoothing, once every frame is refined, the refined frames stacked before the
  smoothing pass rewrites every frame file; an interrupted pass starts again from it (as ``track``'s does);
- ``texture.png`` (the albedo UV map, when the model has UVs), ``tracking.npz`` (all frames), ``meta.json``.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Annotated
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.atomic import write_json_atomic, write_npz_atomic, write_png_atomic
from engine.config import Range, to_tree
from engine.errors import UserError
from engine.evaluation import errors_over_iod, interocular_distance, model_landmark_pixels, still_jitter
from engine.frames import FrameParams, FrameState, stack_reference, unstack_reference
from engine.photometric import PhotometricConfig, PhotometricFitter
from engine.rig import HeadRig
from engine.smoothing import SmoothingConfig, smooth_linear, valid_runs
from engine.tracker import Tracker, diversity_feature, select_diverse
from engine.versions import software_versions
from offline.track_job import UNSMOOTHED_FILE, LandmarkSequence, track_sequence

log = logging.getLogger(__name__)

REFINE_FORMAT_VERSION = 1
#: Texture-space components refinement fits when the model has a texture space (as the reference tracker does).
TEXTURE_COMPONENTS = 50
IDENTITY_FILE = "identity.npz"
#: The refinement's corrections are smoothed at track's strengths times CORRECTION_STRENGTH_FACTOR**k,
#: k = 0..CORRECTION_STRENGTH_STEPS (the last: all but a linear trend), or held constant, for the head pose and
#: the face each.
CORRECTION_STRENGTH_FACTOR = 10.0
CORRECTION_STRENGTH_STEPS = 5
#: The smoothed refinement's still-frames jitter must stay this fraction below the landmark fit's, so that
#: rounding (frame files hold float32) never puts it above.
_JITTER_TOLERANCE = 1e-5

#: One frame's input: RGB image, MediaPipe 478 landmarks (pixels, NaN unobserved) or None.
FrameInput = tuple[np.ndarray, np.ndarray | None]


@dataclass
class RefineOptions:
    photometric: PhotometricConfig = field(default_factory=PhotometricConfig)
    keyframes: Annotated[int, Range(1)] = 8
    window: Annotated[int, Range(1)] = 8
    #: A window is rejected when its mean landmark error rises more than this above the landmark fit's
    #: (fraction of the inter-ocular distance), or any of its frames rises more than ``frame_margin``.
    landmark_margin: float = 0.001
    frame_margin: float = 0.005
    #: The final pass over the whole refined sequence: its corrections to the landmark fit are smoothed at
    #: these strengths or stronger, as the guards demand (None: the per-window fits are the result).
    smoothing: SmoothingConfig | None = field(default_factory=SmoothingConfig)


def state_from_reference(rig: HeadRig, arrays: dict[str, np.ndarray]) -> FrameState | None:
    """A frame's parameters from the reference-format arrays of ``track_job`` (None when not valid)."""
    if not bool(arrays["valid"][0]):
        return None
    return rig.params_from_reference(arrays).as_state()


def load_appearance(fitter: PhotometricFitter, path: Path) -> None:
    """Give a fitter the lighting and albedo of a refinement's ``identity.npz``."""
    options = {"dtype": fitter.dtype, "device": fitter.device}
    with np.load(path) as saved:
        fitter.light = torch.as_tensor(saved["light"], **options)
        fitter.appearance.load_state(saved["tex"])
        if "albedo_map" in saved.files:
            fitter.appearance.detail = torch.as_tensor(saved["albedo_map"], **options)


class SequenceRefiner:
    """Refines one sequence into an output folder; see the module docstring."""

    def __init__(
        self, tracker: Tracker, out_dir: Path, options: RefineOptions | None = None, fps: float | None = None,
        source: str | None = None,
    ) -> None:
        self.tracker = tracker
        self.out_dir = Path(out_dir)
        self.options = options or RefineOptions()
        self.fps = fps  # of the frames, recorded in meta.json so the sequence can be animated at its own rate
        self.source = source  # the refined video, recorded in meta.json so `render` finds its frames
        self.fitter = PhotometricFitter(tracker.rig, self.options.photometric)
        self.timings: dict[str, float] = {}
        self.rejected_windows: list[tuple[int, int]] = []  # (first, last) frame of each rejected window
        self.windows = 0
        # The strengths the corrections were smoothed with (None: every frame kept the landmark fit).
        self.correction_smoothing: SmoothingConfig | None = None
        self._landmarks: list[np.ndarray | None] = []  # each frame's detector landmarks, for the smoothing guard
        self._refined_now: set[int] = set()  # frames refined by this run (not resumed from their files)

    def run(
        self, states: list[FrameState | None], frames: Callable[[], Iterator[FrameInput]], progress: bool = True
    ) -> dict[str, float]:
        """Refine every frame. ``frames()`` yields each frame's (image, landmarks) in order, once per call."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        valid = [i for i, s in enumerate(states) if s is not None]
        if not valid:
            raise UserError("no frame of the input was tracked, so there is nothing to refine")
        self._identity(states, valid, frames, progress)
        started, cpu_started = time.perf_counter(), time.process_time()
        refined, n_seen = self._refine_frames(states, frames, progress)
        self.timings["frames_s"] = time.perf_counter() - started
        self.timings["seconds_per_frame"] = self.timings["frames_s"] / max(refined, 1)
        # CPU time of this process: what a frame costs when the machine is shared (wall time is not).
        self.timings["cpu_seconds_per_frame"] = (time.process_time() - cpu_started) / max(refined, 1)
        self.timings["windows"] = self.windows
        self.timings["rejected_windows"] = len(self.rejected_windows)
        if self.rejected_windows:
            log.warning("%d of %d windows were rejected (landmark error rose above the landmark fit's by more than "
                        "the margin); their frames keep the landmark fit", len(self.rejected_windows), self.windows)
        if n_seen < len(states):
            log.warning("the input ended after %d of %d frames: the rest is skipped", n_seen, len(states))
        if self.options.smoothing is not None:
            self._smooth_and_rewrite(states[:n_seen], progress)
        self._write_summary(n_seen)
        return self.timings

    # ---------------------------------------------------------------------------------------------- identity
    def _identity(self, states: list[FrameState | None], valid: list[int], frames: Callable[[], Iterator[FrameInput]],
                  progress: bool) -> None:
        path = self.out_dir / IDENTITY_FILE
        if path.is_file():
            load_appearance(self.fitter, path)
            log.info("resuming with the identity in %s", path)
            return
        started = time.perf_counter()
        features = [diversity_feature(states[i].pose[0].cpu().numpy(), states[i].exp[0].cpu().numpy()) for i in valid]
        chosen = {valid[k] for k in select_diverse(features, self.options.keyframes)}
        images, landmarks, chosen_states = [], [], []
        for index, (image, points) in enumerate(frames()):
            if index in chosen:
                chosen.discard(index)
                if points is not None and np.isfinite(points).all(axis=1).any():
                    images.append(image)
                    landmarks.append(points)
                    chosen_states.append(states[index])
            if not chosen:
                break
        if not images:
            raise UserError("the keyframes have no landmarks: the session cannot be refined")
        log.info("fitting albedo and light on %d keyframes", len(images))
        config = self.options.photometric
        bar = tqdm(total=config.identity_iterations + 2, desc="identity", unit="step", disable=not progress)
        batch = self.fitter.prepare(images, landmarks)
        # The shape stays the landmark calibration's: every frame's landmark fit was made with it.
        result = self._with_memory_guard(
            lambda: self.fitter.fit_identity(batch, FrameState.cat(chosen_states), fit_shape=False, on_step=lambda: bar.update(1)))
        detailed = self.fitter.prepare(images, landmarks, size=self.fitter.detail_size)
        self._with_memory_guard(lambda: self.fitter.gather_albedo(detailed, result.frames))
        bar.update(1)
        bar.close()
        self.timings["identity_s"] = time.perf_counter() - started
        self.timings["identity_image_error"] = float(result.image_error.mean())
        arrays = {"shape": self.fitter.shape.cpu().numpy(), "tex": self.fitter.appearance.state(),
                  "light": self.fitter.light.cpu().numpy()}
        if self.fitter.appearance.detail is not None:
            arrays["albedo_map"] = self.fitter.appearance.detail.cpu().numpy()
        write_npz_atomic(path, arrays)
        texture = self.fitter.appearance.texture_image()
        if texture is not None:
            write_png_atomic(self.out_dir / "texture.png", texture)

    # ------------------------------------------------------------------------------------------------ frames
    def _frame_path(self, index: int) -> Path:
        return self.out_dir / f"{index:06d}.npz"

    def _refine_frames(
        self, states: list[FrameState | None], frames: Callable[[], Iterator[FrameInput]], progress: bool
    ) -> tuple[int, int]:
        """Refine and write every frame ``frames()`` yields; return how many were refined and how many seen."""
        window: list[tuple[int, np.ndarray, np.ndarray, FrameState]] = []
        self._landmarks, self._refined_now = [], set()
        previous: FrameState | None = None  # the correction (refined minus landmark fit) of the frame before
        refined = n_seen = 0
        bar = tqdm(total=len(states), desc="refine", unit="frame", disable=not progress)
        for index, (image, points) in enumerate(frames()):
            if index >= len(states):
                break
            n_seen = index + 1
            self._landmarks.append(points)
            done = self._frame_path(index).is_file()
            usable = states[index] is not None and points is not None and np.isfinite(points).all(axis=1).any()
            if window and (done or not usable):
                previous = self._flush(window, previous)
                refined += len(window)
                bar.update(len(window))
                window = []
            if done:
                loaded = self._load_state(index)
                previous = None if loaded is None or states[index] is None else loaded.minus(states[index])
                bar.update(1)
            elif not usable:
                previous = None
                self._write(index, states[index], None, refined=False)
                self._refined_now.add(index)
                bar.update(1)
            else:
                window.append((index, image, points, states[index]))
                if len(window) == self.options.window:
                    previous = self._flush(window, previous)
                    refined += len(window)
                    bar.update(len(window))
                    window = []
        if window:
            self._flush(window, previous)
            refined += len(window)
            bar.update(len(window))
        bar.close()
        return refined, n_seen

    def _flush(self, window: list, previous: FrameState | None) -> FrameState:
        """Refine one window of consecutive frames, write them, and return the last frame's correction.

        The window is rejected, and its frames keep the landmark fit, when its landmark error rises above the
        landmark fit's by more than the margin (or any frame's by more than the frame margin).
        """
        batch = self.fitter.prepare([w[1] for w in window], [w[2] for w in window])
        initial = FrameState.cat([w[3] for w in window])
        result = self._with_memory_guard(lambda: self.fitter.fit_frames(batch, initial, previous))
        rise = result.landmark_error - result.initial_landmark_error
        self.windows += 1
        accepted = bool(np.isfinite(rise).all() and rise.mean() <= self.options.landmark_margin
                        and rise.max() <= self.options.frame_margin)
        if accepted:
            frames, image_error = result.frames, result.image_error
        else:
            first, last = window[0][0], window[-1][0]
            self.rejected_windows.append((first, last))
            log.warning("frames %d-%d: photometric refinement raised the landmark error by %.2f %% of the inter-ocular "
                        "distance (at most %.2f %% in one frame); keeping the landmark fit", first, last,
                        100 * float(np.nanmean(rise)), 100 * float(np.nanmax(rise)))
            frames, image_error = initial, self.fitter.image_error(initial, batch)
        for row, (index, *_rest) in enumerate(window):
            self._write(index, frames.index(slice(row, row + 1)), float(image_error[row]), refined=accepted)
            self._refined_now.add(index)
        return frames.minus(initial).index(slice(len(window) - 1, len(window)))

    # --------------------------------------------------------------------------------------------- smoothing
    def _smooth_and_rewrite(self, states: list[FrameState | None], progress: bool) -> None:
        """Smooth the refinement's corrections to the landmark fit over the whole sequence, as little as the
        guards allow (:meth:`_smooth_corrections`), and rewrite every refined frame file; the refined frames
        are kept first, so an interrupted pass starts again from them."""
        started = time.perf_counter()
        unsmoothed = self.out_dir / UNSMOOTHED_FILE
        raw: list[dict[str, np.ndarray]] = []
        if unsmoothed.is_file():  # an earlier smoothing pass: frame files it reached hold smoothed parameters
            with np.load(unsmoothed, allow_pickle=False) as saved:
                raw = unstack_reference({key: saved[key] for key in saved.files})
        if len(raw) != len(states) or self._refined_now:
            # Frames refined by this run replace their earlier versions; the others are the earlier refinement.
            raw = [self._load_arrays(i) if i in self._refined_now or i >= len(raw) else raw[i] for i in range(len(states))]
            write_npz_atomic(unsmoothed, stack_reference(raw))
        final = self._smooth_corrections(states, [state_from_reference(self.tracker.rig, arrays) for arrays in raw], progress)
        kept_landmark_fit = self.correction_smoothing is None
        for index, state in enumerate(final):
            if state is not None:
                refined = bool(raw[index]["refined"][0]) and not kept_landmark_fit
                self._write(index, state, float(raw[index]["image_error"][0]), refined=refined)
        self.timings["smoothing_s"] = time.perf_counter() - started
        used = self.correction_smoothing
        self.timings["correction_strength"] = float("nan") if used is None else used.strength
        self.timings["correction_pose_strength"] = float("nan") if used is None else used.pose_strength
        if kept_landmark_fit:
            log.warning("every frame keeps the landmark fit: even its most smoothed refinement moved the landmarks "
                        "more than track's where the face is still, or raised their error above the margin")

    def _smooth_corrections(self, states: list[FrameState | None], raw: list[FrameState | None],
                            progress: bool) -> list[FrameState | None]:
        """The landmark fit plus the refinement's corrections to it, smoothed over the whole sequence.

        The corrections (refined minus landmark fit: photometry moves what drifts slowly, and partly undoes
        the detector's lag behind motion) are smoothed linearly (:func:`engine.smoothing.smooth_linear`),
        the head pose and the face each at ``track``'s strength times 1, 10, ... 10^5. Of these candidates the
        one whose landmarks stay closest to the unsmoothed refinement's is kept among those that pass both
        guards: the landmarks move no more than the landmark fit's over the frames where the detector's are
        stillest (:func:`engine.evaluation.still_jitter`), and their error (distance to the detector's over
        the inter-ocular distance) rises at most ``landmark_margin`` on average and ``frame_margin`` in any
        frame. When none passes, every frame keeps the landmark fit.
        """
        rig, config = self.tracker.rig, self.options.smoothing
        fps = self.fps or 25.0
        both = np.array([s is not None and r is not None for s, r in zip(states, raw)])
        measured = both & np.array([points is not None for points in self._landmarks])
        if not measured.any():
            self.correction_smoothing = None
            return states
        filler = next(s for s, ok in zip(states, both) if ok)
        anchor = FrameState.cat([s if ok else filler for s, ok in zip(states, both)])
        corrections = FrameState.cat([r.minus(s) if ok else filler.minus(filler) for s, r, ok in zip(states, raw, both)]).columns()
        judge = _LandmarkJudge(rig, self._landmarks, measured)
        fitted_pixels, fitted_errors = judge.measure(anchor)
        allowed_jitter = (1.0 - _JITTER_TOLERANCE) * judge.jitter(fitted_pixels)
        raw_pixels, _ = judge.measure(anchor.plus(FrameState.from_columns(corrections, anchor)))
        pose_columns = anchor.head_pose_columns()
        best: tuple[float, FrameState, SmoothingConfig] | None = None
        candidates = list(_correction_settings(config))
        for used in tqdm(candidates, desc="smooth", unit="setting", disable=not progress, leave=False):
            strengths = np.where(pose_columns, used.strength_at(fps, pose=True), used.strength_at(fps))
            smoothed = corrections.copy()
            for run in valid_runs(both):
                smoothed[run] = smooth_linear(corrections[run], np.where(np.isinf(strengths), 0.0, strengths), config.order)
                # An infinite strength: one constant correction over the run.
                smoothed[run][:, np.isinf(strengths)] = corrections[run][:, np.isinf(strengths)].mean(axis=0)
            candidate = anchor.plus(FrameState.from_columns(smoothed, anchor))
            pixels, errors = judge.measure(candidate)
            rise = errors - fitted_errors
            passes = (judge.jitter(pixels) <= allowed_jitter and np.nanmean(rise) <= self.options.landmark_margin
                      and np.nanmax(rise) <= self.options.frame_margin)
            distance = judge.distance(pixels, raw_pixels)
            if passes and (best is None or distance < best[0]):
                best = (distance, candidate, used)
        if best is None:
            self.correction_smoothing = None
            return states
        _, chosen, self.correction_smoothing = best
        log.info("refinement's corrections smoothed with strength %.3g (head pose %.3g)",
                 self.correction_smoothing.strength, self.correction_smoothing.pose_strength)
        return [chosen.index(slice(i, i + 1)) if ok else None for i, ok in enumerate(both)]

    def _with_memory_guard(self, fit: Callable):
        try:
            return fit()
        except torch.OutOfMemoryError:
            raise UserError(
                f"the GPU ran out of memory refining {self.options.window} frames at "
                f"{self.options.photometric.size} px; use a smaller --window or --size, or --device cpu"
            ) from None

    def _write(self, index: int, state: FrameState | None, image_error: float | None, refined: bool) -> None:
        if state is None:
            frame = self.tracker.frame_from(self._neutral())
            frame.valid = False
        else:
            frame = self.tracker.frame_from(state.as_params())
        arrays = self.tracker.rig.reference_arrays(frame)
        arrays["tex"] = self.fitter.appearance.state()[None].astype(np.float32)
        arrays["light"] = self.fitter.light.cpu().numpy()[None].astype(np.float32)
        arrays["image_error"] = np.array([np.nan if image_error is None else image_error], np.float32)
        arrays["refined"] = np.array([refined])
        write_npz_atomic(self._frame_path(index), arrays)

    def _neutral(self) -> FrameParams:
        layer = self.tracker.rig.layer
        return FrameParams.neutral(1, layer.n_expression, layer.n_joints, self.fitter.dtype, self.fitter.device)

    def _load_state(self, index: int) -> FrameState | None:
        return state_from_reference(self.tracker.rig, self._load_arrays(index))

    def _load_arrays(self, index: int) -> dict[str, np.ndarray]:
        with np.load(self._frame_path(index)) as saved:
            return {key: saved[key] for key in saved.files}

    def _write_summary(self, n_frames: int) -> None:
        loaded = [self._load_arrays(i) for i in range(n_frames)]
        write_npz_atomic(self.out_dir / "tracking.npz", stack_reference(loaded))
        appearance = self.fitter.appearance
        meta = {
            "format": "flame-live photometric refinement",
            "format_version": REFINE_FORMAT_VERSION,
            "model": self.tracker.rig.head.describe(),
            "source": self.source,
            "frames": n_frames,
            "fps": self.fps,
            "valid_frames": int(sum(bool(a["valid"][0]) for a in loaded)),
            "appearance": {"kind": appearance.kind, "name": appearance.space_name},
            "crop_size": self.options.photometric.size,
            "keyframes": self.options.keyframes,
            "window": self.options.window,
            "frame_iterations": self.options.photometric.frame_iterations,
            "windows": self.windows,
            "rejected_windows": [list(pair) for pair in self.rejected_windows],
            "landmark_margin_iod": self.options.landmark_margin,
            "smoothing": None if self.options.smoothing is None else self.options.smoothing.describe(),
            # How it was made, as `refine --config` (and `track --config`) read it.
            "config": {"tracker": to_tree(self.tracker.config), "refine": to_tree(self.options)},
            "correction_smoothing": None if self.options.smoothing is None else {
                "kept_landmark_fit": self.correction_smoothing is None,
                "strength": None if self.correction_smoothing is None else self.correction_smoothing.strength,
                "pose_strength": None if self.correction_smoothing is None else self.correction_smoothing.pose_strength,
            },
            "light": "9 SH coefficients per RGB channel, DECA's basis order and constants (engine.render)",
            "timings": self.timings,
            "versions": software_versions(),
        }
        write_json_atomic(self.out_dir / "meta.json", meta)


def _correction_settings(config: SmoothingConfig) -> Iterator[SmoothingConfig]:
    """``config`` with its face and head-pose strengths each raised by every power of
    :data:`CORRECTION_STRENGTH_FACTOR` up to :data:`CORRECTION_STRENGTH_STEPS`, then to infinity (a
    constant correction)."""
    factors = [CORRECTION_STRENGTH_FACTOR**k for k in range(CORRECTION_STRENGTH_STEPS + 1)] + [math.inf]
    for face, pose in itertools.product(factors, repeat=2):
        yield replace(config, strength=config.strength * face, pose_strength=config.pose_strength * pose)


class _LandmarkJudge:
    """A sequence's fitted landmarks against the detector's, as ``bench --accuracy --refine`` scores them."""

    def __init__(self, rig: HeadRig, landmarks: list[np.ndarray | None], measured: np.ndarray) -> None:
        self.rig = rig
        mp478 = np.stack([np.full((478, 2), np.nan) if points is None else points for points in landmarks])
        self.observed = rig.targets.pixels(mp478, None)
        self.iod = interocular_distance(mp478)
        self.measured = measured
        self.shape = rig.shape.cpu().numpy()

    def measure(self, frames: FrameState) -> tuple[np.ndarray, np.ndarray]:
        """The frames' landmark pixels (NaN in frames not measured) and each frame's error over the IOD."""
        exp, pose, transl = (part.detach().cpu().numpy() for part in (frames.exp, frames.pose, frames.transl))
        pixels = model_landmark_pixels(self.rig, self.shape, exp, pose, transl)
        pixels[~self.measured] = np.nan
        return pixels, errors_over_iod(pixels, self.observed, self.iod)

    def jitter(self, pixels: np.ndarray) -> float:
        return still_jitter(pixels, self.observed)

    def distance(self, pixels: np.ndarray, other: np.ndarray) -> float:
        """Mean distance (pixels) between two fits' landmarks."""
        return float(np.nanmean(np.linalg.norm(pixels - other, axis=-1)))


def refine_video(
    source: str, tracker: Tracker, results: list[dict[str, np.ndarray]], mp478: np.ndarray | None, out_dir: Path,
    options: RefineOptions | None = None, progress: bool = True,
) -> dict[str, float]:
    """Refine a video or image folder tracked by ``track_job.track_sequence`` (its reference arrays)."""
    from realtime.sources import iter_frames, open_source

    if mp478 is None:
        raise UserError("--photometric needs MediaPipe landmarks: give the video or images, not a 68-point landmarks file")
    states = [state_from_reference(tracker.rig, arrays) for arrays in results]

    def frames() -> Iterator[FrameInput]:
        for frame in iter_frames(source):
            if frame.index >= len(mp478):
                return
            yield frame.image, mp478[frame.index]

    with open_source(source, realtime=False) as probe:
        fps = probe.fps
    recorded = source if "://" in source else str(Path(source).resolve())
    return SequenceRefiner(tracker, out_dir, options, fps, recorded).run(states, frames, progress)


def refine_session(
    session_dir: Path, tracker_factory: Callable[[tuple[int, int], int, int, float | None], Tracker], out_dir: Path,
    landmarker_task: Path | None, options: RefineOptions | None = None, progress: bool = True,
) -> dict[str, float]:
    """Refine a recorded live session (realtime.session): its video frames and recorded ``flame.frame`` messages.

    ``tracker_factory(image_size (h, w), n_shape, n_exp, known_fov_deg)`` makes the tracker for the recorded camera
    (``known_fov_deg`` None: estimate the field of view).
    Landmarks come from the messages when they were recorded, else MediaPipe runs on the video
    (``landmarker_task``); the recording is tracked again from them, landmarks only and offline (with the
    recorded field of view when the live run was given it, else estimated again), and refinement starts from that fit.
    """
    from flame_client.messages import TOPIC_FRAME
    from realtime.session import SessionReader

    reader = SessionReader(session_dir)
    if reader.frame_size is None:
        raise UserError(f"session {session_dir} was recorded without video, which photometric refinement needs")
    messages: dict[int, dict] = {}
    for record in reader.messages():
        if record.topic == TOPIC_FRAME and record.video_frame is not None:
            messages[record.video_frame] = record.message
    messages = reader.frames_with_video(messages)
    if not messages:
        raise UserError(f"session {session_dir} holds no tracked frames with video; it cannot be refined")
    metadata = reader.metadata
    width, height = reader.frame_size
    tracker_info = metadata.get("tracker") or {}
    camera = metadata.get("camera") or {}
    fov = camera.get("fov_deg")
    if not isinstance(fov, int | float):
        raise UserError(f"session {session_dir}: session.json lacks the camera's field of view; the session is incomplete")
    # A FOV the live run was given stays known; one it estimated (from its first seconds) or defaulted to is
    # estimated again, from the whole recording, as `track` would.
    given = metadata.get("fov_fixed") is True or (camera.get("fov") or {}).get("source") == "given"
    n_shape, n_exp = int(tracker_info.get("n_shape", 100)), int(tracker_info.get("n_exp", 50))
    tracker = tracker_factory((height, width), n_shape, n_exp, float(fov) if given else None)
    recorded_model = (metadata.get("model") or {}).get("checksum")
    if recorded_model is not None and recorded_model != tracker.rig.head.checksum:
        raise UserError(
            f"session {session_dir} was tracked with the {(metadata.get('model') or {}).get('name')}, not the "
            f"{tracker.rig.head.name}: pass the same --flame as when recording"
        )
    n_frames = max(messages) + 1
    # The anchor is the landmark-only fit of the whole recording, as `track` makes it, not the live messages:
    # live frames before calibration were fitted with the mean face, and live output may be filtered.
    landmarks = _session_landmarks(reader, messages, n_frames, landmarker_task)
    sequence = LandmarkSequence(landmarks, None, (height, width), reader.fps or 25.0, str(session_dir))
    options = options or RefineOptions()
    tracker, results, _ = track_sequence(sequence, tracker.rig.head, tracker.config, progress, options.smoothing)
    states = [state_from_reference(tracker.rig, arrays) for arrays in results]

    def frames() -> Iterator[FrameInput]:
        for frame in reader.video_frames():
            if frame.index >= n_frames:
                return
            points = landmarks[frame.index]
            yield frame.image, points if np.isfinite(points).any() else None

    video = str(reader.video_path.resolve())
    return SequenceRefiner(tracker, out_dir, options, reader.fps, video).run(states, frames, progress)


def _session_landmarks(reader, messages: dict[int, dict], n_frames: int, landmarker_task: Path | None) -> np.ndarray:
    """(n_frames, 478, 2) MediaPipe landmarks of a session's video frames: recorded ones, else MediaPipe's."""
    landmarks = np.full((n_frames, 478, 2), np.nan)
    missing = []
    for index in range(n_frames):
        recorded = (messages.get(index) or {}).get("landmarks")
        if recorded is not None and len(recorded) == 478 * 2:
            landmarks[index] = np.asarray(recorded, dtype=np.float64).reshape(478, 2)
        else:
            missing.append(index)
    if missing:
        landmarker = _open_landmarker(landmarker_task)
        try:
            for frame in reader.video_frames():
                if frame.index >= n_frames:
                    break
                if frame.index in messages and not np.isfinite(landmarks[frame.index]).any():
                    observation = landmarker.detect(frame.image, int(round(frame.t_monotonic * 1000.0)))
                    if observation is not None:
                        landmarks[frame.index] = observation.points
        finally:
            landmarker.close()
    return landmarks


def _open_landmarker(task: Path | None):
    from engine.landmarks import FaceLandmarker, LandmarkerConfig

    if task is None:
        raise UserError("the session was recorded without landmarks; MediaPipe's face_landmarker.task is needed to find them")
    return FaceLandmarker(LandmarkerConfig(task, running_mode="video")).__enter__()
