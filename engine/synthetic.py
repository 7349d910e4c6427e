"""Synthetic ground truth: landmark sequences rendered from a head model with known parameters.

Used by the accuracy tests and the benchmarks. A sequence has a known identity, smooth expression, jaw and
eye motion, blinks (for a model with eyelid blendshapes), head yaw and pitch within given limits, and
observations with Gaussian pixel noise plus a fraction of wild outliers, laid out exactly as real input is
(MediaPipe 478 and/or 68 points, NaN where a point is not observed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from engine.camera import Camera, project
from engine.flame import FlameLayer, rodrigues
from engine.head_model import JAW, LEFT_EYE, RIGHT_EYE, ROOT, has_eyes
from engine.landmark_model import LandmarkModel
from engine.landmarks import LEFT_IRIS_CENTER, N_LANDMARKS, RIGHT_IRIS_CENTER
from engine.targets import groups_for


@dataclass
class SyntheticMotion:
    frames: int = 60
    image_size: tuple[int, int] = (512, 512)  # (height, width)
    fov_deg: float = 30.0
    distance: float = 0.6  # metres from the camera
    max_yaw_deg: float = 30.0
    max_pitch_deg: float = 15.0
    shape_std: float = 0.7
    exp_std: float = 0.8
    max_jaw_rad: float = 0.25
    noise_px: float = 0.5
    outlier_fraction: float = 0.02
    outlier_px: float = 25.0
    #: Blinks spread over the sequence, each closing both eyelids fully for a frame (models with eyelids only).
    blinks: int = 0
    blink_frames: int = 7
    seed: int = 0


@dataclass
class SyntheticSequence:
    mp478: np.ndarray | None  # (T, 478, 2) observed, NaN where the model has no such point
    lmk68: np.ndarray | None  # (T, 68, 2) observed
    clean: np.ndarray  # (T, L, 2) noise-free pixels of the LandmarkModel's landmarks
    shape: np.ndarray  # (S,)
    exp: np.ndarray  # (T, E)
    pose: np.ndarray  # (T, J, 3) axis-angle
    transl: np.ndarray  # (T, 3)
    camera: Camera
    fps: float = 25.0
    eyelids: np.ndarray | None = None  # (T, 2) left, right (0 open, 1 closed); None for a model without eyelids


def synthetic_sequence(layer: FlameLayer, motion: SyntheticMotion) -> SyntheticSequence:
    rng = np.random.default_rng(motion.seed)
    frames = motion.frames
    options = {"dtype": torch.float64, "device": "cpu"}
    time_axis = np.linspace(0, 1, frames)
    shape = rng.normal(0, motion.shape_std, layer.n_shape)
    exp = np.zeros((frames, layer.n_exp))
    for component in range(min(layer.n_exp, 10)):
        phase, speed = rng.uniform(0, 2 * math.pi), rng.uniform(0.5, 2.0)
        exp[:, component] = motion.exp_std * np.sin(2 * math.pi * speed * time_axis + phase) / (1 + 0.3 * component)
    pose = np.zeros((frames, layer.n_joints, 3))
    pose[:, ROOT, 1] = math.radians(motion.max_yaw_deg) * np.sin(2 * math.pi * time_axis)
    pose[:, ROOT, 0] = math.radians(motion.max_pitch_deg) * np.sin(4 * math.pi * time_axis + 1.0)
    pose[:, ROOT, 2] = math.radians(5) * np.sin(2 * math.pi * time_axis + 2.0)
    pose[:, JAW, 0] = motion.max_jaw_rad * 0.5 * (1 - np.cos(6 * math.pi * time_axis))
    if has_eyes(layer.n_joints):
        gaze = 0.15 * np.stack([np.sin(3 * math.pi * time_axis), np.cos(5 * math.pi * time_axis), 0 * time_axis], axis=1)
        pose[:, LEFT_EYE] = pose[:, RIGHT_EYE] = gaze
    eyelids = _blinks(frames, motion) if layer.n_eyelids else None
    transl = np.zeros((frames, 3))
    transl[:, 2] = -motion.distance
    transl[:, 0] = 0.02 * np.sin(2 * math.pi * time_axis)

    height, width = motion.image_size
    camera = Camera.from_fov(width, height, motion.fov_deg)
    model = LandmarkModel(_float64(layer), groups_for(layer.model))
    with torch.no_grad():
        columns = [np.repeat(shape[None], frames, 0), exp] + ([eyelids] if eyelids is not None else [])
        coeffs = torch.as_tensor(np.concatenate(columns, axis=1), **options)
        points = model.evaluate(coeffs, rodrigues(torch.as_tensor(pose, **options)), torch.as_tensor(transl, **options), jacobians=False).points
        clean = project(points, torch.tensor(camera.focal, **options), camera.center).numpy()
    noisy = clean + rng.normal(0, motion.noise_px, clean.shape)
    outliers = rng.random(clean.shape[:2]) < motion.outlier_fraction
    directions = rng.normal(size=(int(outliers.sum()), 2))
    noisy[outliers] += motion.outlier_px * directions / np.linalg.norm(directions, axis=1, keepdims=True)

    mp478 = lmk68 = None
    for group, part in model.slices.items():
        if group == "lmk68":
            lmk68 = noisy[:, part]
            continue
        if mp478 is None:
            mp478 = np.full((frames, N_LANDMARKS, 2), np.nan)
        if group == "mediapipe":
            mp478[:, layer.model.mediapipe.landmark_indices] = noisy[:, part]
        elif group == "eyes":
            mp478[:, [LEFT_IRIS_CENTER, RIGHT_IRIS_CENTER]] = noisy[:, part]
    return SyntheticSequence(mp478, lmk68, clean, shape, exp, pose, transl, camera, eyelids=eyelids)


def _blinks(frames: int, motion: SyntheticMotion) -> np.ndarray:
    """(T, 2) eyelid weights: ``motion.blinks`` blinks evenly spread, each a raised cosine reaching 1."""
    eyelids = np.zeros((frames, 2))
    for centre in np.linspace(0, frames, motion.blinks + 2)[1:-1]:
        offset = np.arange(frames) - round(centre)
        inside = np.abs(offset) < motion.blink_frames / 2
        eyelids[inside] = 0.5 * (1 + np.cos(2 * math.pi * offset[inside] / motion.blink_frames))[:, None]
    return eyelids


def _float64(layer: FlameLayer) -> FlameLayer:
    """The same model in float64 on the CPU, so ground truth carries no rounding of its own."""
    return FlameLayer(layer.model, layer.n_shape, layer.n_exp, device="cpu", dtype=torch.float64)
