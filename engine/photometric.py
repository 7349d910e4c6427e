"""Photometric refinement: fit identity, appearance, lighting, expression and pose to the pixels of frames.

Starts from the landmark tracker's result and minimises, with Adam on a small parameter set,

- a robust (Charbonnier) RGB difference between each frame crop and the rendered head (albedo times
  9-coefficient SH shading, :mod:`engine.render`), inside a face mask: the convex hull of the observed
  landmarks, eroded, intersected with the rendered head;
- the tracker's landmark residuals (Cauchy-robust, normalised by the crop size);
- Gaussian priors on shape, expression, texture and lighting, priors holding the joints near the tracker's
  estimate, and, for sequences, temporal smoothness between consecutive frames (also across windows: the
  first frame of a window is tied to the last refined frame before it).

Appearance is the model's texture space when the user has one (``HeadModel.texture`` over its UV map);
otherwise a free low-resolution UV albedo map (or per-vertex albedo without a UV map) estimated from the
frames under a smoothness prior. Each frame is cropped around its landmarks and resized to ``size`` pixels;
the crop's intrinsics follow from the tracker's camera, so the fit happens in the tracker's world frame.

Two problems:
- :meth:`PhotometricFitter.fit_identity`: several keyframes jointly for one shape, albedo and lighting;
- :meth:`PhotometricFitter.fit_frames`: per-frame parameters of a window of consecutive frames with the
  identity fixed.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from engine.camera import FLIP
from engine.flame import rodrigues
from engine.head_model import JOINT_NAMES, HeadModel
from engine.render import SH_CONSTANTS, render
from engine.tracker import TrackedFrame, Tracker

log = logging.getLogger(__name__)

ROOT, NECK, JAW, LEFT_EYE, RIGHT_EYE = range(len(JOINT_NAMES))
#: SH coefficient 0 that makes the shading exactly 1 (a white ambient light).
UNIT_AMBIENT = 1.0 / SH_CONSTANTS[0]


@dataclass
class PhotometricWeights:
    """Loss weights, relative to the mean robust RGB error (0..1 per channel) of the masked pixels."""

    landmarks: float = 2e-4
    shape: float = 2e-5
    exp: float = 2e-5
    tex: float = 2e-5
    light: float = 1e-4  # on the non-ambient SH coefficients
    albedo_smoothness: float = 1.0  # free albedo map / vertex colours: squared neighbour differences
    joints: float = 1e-2  # jaw, neck and eyes held near the tracker's estimate (per radian^2)
    temporal_exp: float = 2e-3
    temporal_rotation: float = 1.0  # per radian^2
    temporal_translation: float = 100.0  # per metre^2


@dataclass
class PhotometricConfig:
    size: int = 256
    """Side of the square crop around the face, in pixels, that is rendered and compared."""
    crop_scale: float = 1.5
    """Crop side as a multiple of the landmarks' bounding box."""
    identity_iterations: int = 60
    frame_iterations: int = 10
    #: Adam step sizes: coefficients, radians, metres, SH coefficients, albedo values.
    lr_coeffs: float = 0.05
    lr_rotation: float = 0.005
    lr_translation: float = 0.001
    lr_light: float = 0.05
    lr_albedo: float = 0.02
    charbonnier_eps: float = 0.01
    landmark_noise: float = 0.005  # expected landmark error as a fraction of the crop side
    landmark_robust_scale: float = 3.0
    mask_erosion: float = 0.03  # of the crop side
    texture_size: int = 256  # texture spaces larger than this are resampled down
    albedo_map_size: int = 64  # the free UV albedo map's resolution when no texture space exists
    weights: PhotometricWeights = field(default_factory=PhotometricWeights)


@dataclass
class FrameBatch:
    """Frames prepared for the fit: crops, their intrinsics, landmark targets and face masks."""

    images: torch.Tensor  # (B, S, S, 3) RGB in [0, 1]
    K: torch.Tensor  # (B, 3, 3) intrinsics of the crops
    targets: torch.Tensor  # (B, L, 2) landmark pixels in the crops, NaN where unobserved
    face_mask: torch.Tensor  # (B, S, S) bool

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class FrameState:
    """Per-frame parameters in the tracker's world frame: ``pose`` is FLAME's joints, axis-angle."""

    exp: torch.Tensor  # (B, E)
    pose: torch.Tensor  # (B, J, 3)
    transl: torch.Tensor  # (B, 3)

    def detach(self) -> FrameState:
        return FrameState(self.exp.detach().clone(), self.pose.detach().clone(), self.transl.detach().clone())

    def index(self, rows: slice | list[int]) -> FrameState:
        return FrameState(self.exp[rows], self.pose[rows], self.transl[rows])

    @staticmethod
    def cat(states: list[FrameState]) -> FrameState:
        return FrameState(*(torch.cat([getattr(s, key) for s in states]) for key in ("exp", "pose", "transl")))


@dataclass
class PhotometricResult:
    frames: FrameState
    image_error: np.ndarray  # (B,) mean absolute RGB error inside the mask, 0..1
    landmark_rms_px: np.ndarray  # (B,) in pixels of the crop
    iterations: int
    seconds: float


def state_from_tracked(frames: list[TrackedFrame], device: str | torch.device, dtype: torch.dtype) -> FrameState:
    """The tracker's per-frame results as a batch FrameState."""
    options = {"device": device, "dtype": dtype}
    return FrameState(
        torch.as_tensor(np.stack([f.exp for f in frames]), **options),
        torch.as_tensor(np.stack([f.pose for f in frames]), **options),
        torch.as_tensor(np.stack([f.transl for f in frames]), **options),
    )


class Appearance(torch.nn.Module):
    """The albedo model: a texture space, a free UV albedo map, or free per-vertex colours.

    ``albedo()`` returns a texture (Ht, Wt, 3) when ``uses_uv`` is True, else vertex colours (V, 3).
    """

    def __init__(self, head: HeadModel, config: PhotometricConfig, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        options = {"device": device, "dtype": dtype}
        self.uses_uv = head.uv_coords is not None and head.uv_faces is not None
        self.kind = "vertex"
        self.space_name = "per-vertex albedo estimated from the frames"
        self.coeffs = torch.nn.Parameter(torch.zeros(0, **options))
        if self.uses_uv:
            self.register_buffer("uv_coords", torch.as_tensor(head.uv_coords, **options))
            self.register_buffer("uv_faces", torch.as_tensor(head.uv_faces, dtype=torch.long, device=device))
        if head.texture is not None and self.uses_uv:
            mean, basis = _resampled_texture(head.texture.mean, head.texture.basis, config.texture_size)
            self.register_buffer("mean", torch.as_tensor(mean, **options))
            self.register_buffer("basis", torch.as_tensor(basis, **options))
            self.coeffs = torch.nn.Parameter(torch.zeros(basis.shape[-1], **options))
            self.kind, self.space_name = "texture_space", head.texture.name
            return
        if head.texture is not None:
            log.warning("%s needs a UV map, which this model lacks: estimating albedo from the frames", head.texture.name)
        elif not head.is_demo:
            log.warning(
                "no texture space (FLAME_albedo_from_BFM.npz or FLAME_texture.npz) beside the model: "
                "estimating albedo from the frames"
            )
        if self.uses_uv:
            side = config.albedo_map_size
            self.free = torch.nn.Parameter(torch.full((side, side, 3), 0.5, **options))
            self.kind, self.space_name = "uv_map", "UV albedo map estimated from the frames"
        else:
            self.free = torch.nn.Parameter(torch.full((head.n_vertices, 3), 0.5, **options))
            self.register_buffer("edges", _mesh_edges(head.faces, device))

    def albedo(self) -> torch.Tensor:
        if self.kind == "texture_space":
            return (self.mean + self.basis @ self.coeffs).clamp(0.0, 1.0)
        return self.free.clamp(0.0, 1.0)

    def parameters_to_fit(self) -> list[torch.nn.Parameter]:
        return [self.coeffs] if self.kind == "texture_space" else [self.free]

    def prior(self, weights: PhotometricWeights) -> torch.Tensor:
        if self.kind == "texture_space":
            return weights.tex * (self.coeffs**2).sum()
        if self.kind == "uv_map":
            rows = (self.free[1:] - self.free[:-1]).pow(2).mean()
            cols = (self.free[:, 1:] - self.free[:, :-1]).pow(2).mean()
            return weights.albedo_smoothness * (rows + cols)
        ends = self.free[self.edges]
        return weights.albedo_smoothness * (ends[:, 0] - ends[:, 1]).pow(2).mean()

    def texture_image(self) -> np.ndarray | None:
        """The albedo as an 8-bit RGB UV image (rows from the top, v = 1), or None for per-vertex albedo."""
        if not self.uses_uv:
            return None
        with torch.no_grad():
            return (self.albedo().cpu().float().numpy() * 255.0 + 0.5).astype(np.uint8)

    def state(self) -> np.ndarray:
        """What a message or file stores: texture-space coefficients, else the free albedo values (flattened)."""
        values = self.coeffs if self.kind == "texture_space" else self.free
        return values.detach().cpu().double().numpy().reshape(-1)

    def load_state(self, values: np.ndarray) -> None:
        target = self.coeffs if self.kind == "texture_space" else self.free
        with torch.no_grad():
            target.copy_(torch.as_tensor(values, dtype=target.dtype, device=target.device).reshape(target.shape))


def _resampled_texture(mean: np.ndarray, basis: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A texture space resampled to at most ``size`` pixels a side (area averaging keeps it linear)."""
    if mean.shape[0] <= size and mean.shape[1] <= size:
        return mean, basis
    height, width = mean.shape[:2]
    flat = np.concatenate([mean, basis.reshape(height, width, -1)], axis=2).astype(np.float32)
    channels = [cv2.resize(flat[..., c], (size, size), interpolation=cv2.INTER_AREA) for c in range(flat.shape[2])]
    resized = np.stack(channels, axis=-1)
    return resized[..., :3], resized[..., 3:].reshape(size, size, 3, -1)


def _mesh_edges(faces: np.ndarray, device: torch.device) -> torch.Tensor:
    pairs = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    return torch.as_tensor(np.unique(np.sort(pairs, axis=1), axis=0), dtype=torch.long, device=device)


def crop_box(points: np.ndarray, scale: float) -> tuple[int, int, int]:
    """(x0, y0, side) of a square around the finite points, ``scale`` times their bounding box."""
    finite = points[np.isfinite(points).all(axis=1)]
    low, high = finite.min(axis=0), finite.max(axis=0)
    side = max(int(math.ceil(scale * float((high - low).max()))), 8)
    centre = (low + high) / 2.0
    return int(round(centre[0] - side / 2.0)), int(round(centre[1] - side / 2.0)), side


def crop_image(image: np.ndarray, box: tuple[int, int, int], size: int) -> np.ndarray:
    """The square ``box`` of an RGB image (zero outside the image) resized to ``size`` pixels, float 0..1."""
    x0, y0, side = box
    height, width = image.shape[:2]
    crop = np.zeros((side, side, 3), dtype=image.dtype)
    left, top, right, bottom = max(x0, 0), max(y0, 0), min(x0 + side, width), min(y0 + side, height)
    if right > left and bottom > top:
        crop[top - y0 : bottom - y0, left - x0 : right - x0] = image[top:bottom, left:right]
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interpolation).astype(np.float32) / 255.0


def face_mask(points: np.ndarray, size: int, erosion_px: int) -> np.ndarray:
    """(size, size) bool: the convex hull of the finite points (crop pixels), eroded by ``erosion_px``."""
    finite = points[np.isfinite(points).all(axis=1)]
    mask = np.zeros((size, size), np.uint8)
    if len(finite) >= 3:
        hull = cv2.convexHull(np.round(finite * 4).astype(np.int32))  # 2 fractional bits for the fill
        cv2.fillConvexPoly(mask, hull, 1, lineType=cv2.LINE_8, shift=2)
    if erosion_px > 0:
        mask = cv2.erode(mask, np.ones((2 * erosion_px + 1, 2 * erosion_px + 1), np.uint8))
    return mask.astype(bool)


class PhotometricFitter:
    """Photometric fitting for one tracker: its head model, camera and landmark model."""

    def __init__(self, tracker: Tracker, config: PhotometricConfig | None = None) -> None:
        self.config = config or PhotometricConfig()
        self.tracker = tracker
        self.layer = tracker.layer
        self.device = tracker.shape.device
        self.dtype = tracker.shape.dtype
        self.appearance = Appearance(tracker.head, self.config, self.device, self.dtype)
        self.shape = tracker.shape.detach().clone()
        self.light = torch.zeros(9, 3, device=self.device, dtype=self.dtype)
        self.light[0] = UNIT_AMBIENT
        self._flip = torch.tensor(FLIP, device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------------------------------ preparation
    def prepare(
        self, images: list[np.ndarray], mp478: list[np.ndarray | None], lmk68: list[np.ndarray | None] | None = None
    ) -> FrameBatch:
        """Crop each RGB frame around its landmarks (full-image pixels, NaN unobserved) and build the masks."""
        size = self.config.size
        lmk68 = lmk68 or [None] * len(images)
        camera = self.tracker.camera
        crops, intrinsics, targets, masks = [], [], [], []
        for image, mp, lmk in zip(images, mp478, lmk68):
            pixels = self.tracker.targets.pixels(None if mp is None else mp[None], None if lmk is None else lmk[None])[0]
            observed = np.concatenate([p for p in (mp, lmk, pixels) if p is not None])
            if not np.isfinite(observed).all(axis=1).any():
                raise ValueError("every frame given to the photometric fit needs observed landmarks")
            x0, y0, side = crop_box(observed, self.config.crop_scale)
            scale = size / side
            crops.append(crop_image(image, (x0, y0, side), size))
            cx, cy = camera.center
            intrinsics.append([[camera.focal * scale, 0.0, (cx - x0) * scale], [0.0, camera.focal * scale, (cy - y0) * scale], [0.0, 0.0, 1.0]])
            targets.append((pixels - (x0, y0)) * scale)
            masks.append(face_mask((observed - (x0, y0)) * scale, size, round(self.config.mask_erosion * size)))
        options = {"device": self.device, "dtype": self.dtype}
        return FrameBatch(
            torch.as_tensor(np.stack(crops), **options),
            torch.as_tensor(np.array(intrinsics), **options),
            torch.as_tensor(np.stack(targets), **options),
            torch.as_tensor(np.stack(masks), device=self.device),
        )

    # ------------------------------------------------------------------------------------------- rendering
    def vertices_cam(self, shape: torch.Tensor, frames: FrameState) -> torch.Tensor:
        """(B, V, 3) posed mesh in OpenCV camera space."""
        batch = frames.exp.shape[0]
        return self.layer.vertices(shape.expand(batch, -1), frames.exp, frames.pose, frames.transl) * self._flip

    def render(self, frames: FrameState, batch: FrameBatch, shape: torch.Tensor | None = None, light: torch.Tensor | None = None):
        """The rendered crops (engine.render.RenderOutput) for these parameters."""
        shape = self.shape if shape is None else shape
        light = self.light if light is None else light
        vertices = self.vertices_cam(shape, frames)
        sh = light.expand(len(batch), 9, 3)
        albedo = self.appearance.albedo()
        faces = self.layer.faces
        if self.appearance.uses_uv:
            return render(vertices, faces, batch.K, batch.size, batch.size, sh, texture=albedo,
                          uv_coords=self.appearance.uv_coords, uv_faces=self.appearance.uv_faces)
        return render(vertices, faces, batch.K, batch.size, batch.size, sh, vertex_colors=albedo)

    # ------------------------------------------------------------------------------------------------ losses
    def _photometric(self, rendered, batch: FrameBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean robust RGB error over the masked pixels, and the per-frame mean absolute error."""
        mask = rendered.mask & batch.face_mask
        difference = (rendered.image - batch.images) * mask.unsqueeze(-1)
        eps = self.config.charbonnier_eps
        robust = (torch.sqrt(difference**2 + eps**2) - eps).sum(-1)
        counts = mask.flatten(1).sum(1).clamp_min(1)
        loss = robust.sum() / counts.sum()
        per_frame = difference.abs().sum(-1).flatten(1).sum(1) / (3 * counts)
        return loss, per_frame.detach()

    def _landmark_pixels(self, shape: torch.Tensor, frames: FrameState, batch: FrameBatch) -> torch.Tensor:
        model = self.tracker.full
        coeffs = torch.cat([shape.expand(frames.exp.shape[0], -1), frames.exp], dim=1)
        points = model.evaluate(coeffs, rodrigues(frames.pose), frames.transl, jacobians=False).points * self._flip
        projected = points @ batch.K.transpose(1, 2)
        return projected[..., :2] / projected[..., 2:].clamp_min(1e-6)

    def _landmarks(self, shape: torch.Tensor, frames: FrameState, batch: FrameBatch) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = self._landmark_pixels(shape, frames, batch)
        observed = torch.isfinite(batch.targets).all(-1) & (self.tracker.targets.weights > 0)
        error = torch.where(observed[..., None], pixels - torch.nan_to_num(batch.targets), torch.zeros_like(pixels))
        scale = self.config.landmark_noise * batch.size
        c = self.config.landmark_robust_scale
        robust = (c**2) * torch.log1p((error / scale).pow(2).sum(-1) / c**2)
        weights = self.tracker.targets.weights * observed
        loss = (robust * weights).sum() / weights.sum().clamp_min(1.0)
        rms = torch.sqrt((error.pow(2).sum(-1) * observed).sum(1) / observed.sum(1).clamp_min(1))
        return loss, rms.detach()

    def _frame_priors(self, frames: FrameState, initial: FrameState) -> torch.Tensor:
        weights = self.config.weights
        prior = weights.exp * frames.exp.pow(2).sum()
        joints = [NECK, JAW] + ([LEFT_EYE, RIGHT_EYE] if frames.pose.shape[1] > RIGHT_EYE else [])
        prior = prior + weights.joints * (frames.pose[:, joints] - initial.pose[:, joints]).pow(2).sum()
        return prior / frames.exp.shape[0]

    def _temporal(self, frames: FrameState, previous: FrameState | None) -> torch.Tensor:
        """Smoothness between consecutive frames, the first tied to ``previous`` (the frame before the window)."""
        if previous is not None:
            frames = FrameState.cat([previous, frames])
        if frames.exp.shape[0] < 2:
            return frames.exp.new_zeros(())
        weights = self.config.weights

        def steps(values: torch.Tensor) -> torch.Tensor:
            return (values[1:] - values[:-1]).pow(2).sum()

        return (weights.temporal_exp * steps(frames.exp) + weights.temporal_rotation * steps(frames.pose)
                + weights.temporal_translation * steps(frames.transl))

    def _light_prior(self, light: torch.Tensor) -> torch.Tensor:
        return self.config.weights.light * light[1:].pow(2).sum()

    # --------------------------------------------------------------------------------------------- fitting
    def fit_identity(self, batch: FrameBatch, initial: FrameState, iterations: int | None = None) -> PhotometricResult:
        """Fit shape, albedo and lighting shared by the frames of ``batch``, and each frame's parameters."""
        iterations = self.config.identity_iterations if iterations is None else iterations
        shape = self.shape.clone().requires_grad_(True)
        light = self.light.clone().requires_grad_(True)
        frames = initial.detach()
        for tensor in (frames.exp, frames.pose, frames.transl):
            tensor.requires_grad_(True)
        groups = [
            {"params": [shape, frames.exp], "lr": self.config.lr_coeffs},
            {"params": [frames.pose], "lr": self.config.lr_rotation},
            {"params": [frames.transl], "lr": self.config.lr_translation},
            {"params": [light], "lr": self.config.lr_light},
            {"params": self.appearance.parameters_to_fit(),
             "lr": self.config.lr_coeffs if self.appearance.kind == "texture_space" else self.config.lr_albedo},
        ]

        def objective() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            rendered = self.render(frames, batch, shape, light)
            photo, image_error = self._photometric(rendered, batch)
            landmarks, rms = self._landmarks(shape, frames, batch)
            loss = (photo + self.config.weights.landmarks * landmarks + self._frame_priors(frames, initial)
                    + self.config.weights.shape * shape.pow(2).sum() + self._light_prior(light)
                    + self.appearance.prior(self.config.weights))
            return loss, image_error, rms

        result = self._optimise(groups, objective, iterations, frames)
        self.shape = shape.detach()
        self.light = light.detach()
        return result

    def fit_frames(
        self, batch: FrameBatch, initial: FrameState, previous: FrameState | None = None, iterations: int | None = None
    ) -> PhotometricResult:
        """Fit each frame's expression and pose with the identity fixed, smoothly over consecutive frames."""
        iterations = self.config.frame_iterations if iterations is None else iterations
        frames = initial.detach()
        for tensor in (frames.exp, frames.pose, frames.transl):
            tensor.requires_grad_(True)
        groups = [
            {"params": [frames.exp], "lr": self.config.lr_coeffs},
            {"params": [frames.pose], "lr": self.config.lr_rotation},
            {"params": [frames.transl], "lr": self.config.lr_translation},
        ]
        previous = None if previous is None else previous.detach()

        def objective() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            rendered = self.render(frames, batch)
            photo, image_error = self._photometric(rendered, batch)
            landmarks, rms = self._landmarks(self.shape, frames, batch)
            loss = (photo + self.config.weights.landmarks * landmarks + self._frame_priors(frames, initial)
                    + self._temporal(frames, previous) / len(batch))
            return loss, image_error, rms

        self.appearance.requires_grad_(False)
        try:
            return self._optimise(groups, objective, iterations, frames)
        finally:
            self.appearance.requires_grad_(True)

    def _optimise(self, groups: list[dict], objective, iterations: int, frames: FrameState) -> PhotometricResult:
        started = time.perf_counter()
        optimiser = torch.optim.Adam(groups)
        image_error = rms = None
        for _ in range(iterations):
            optimiser.zero_grad(set_to_none=True)
            loss, image_error, rms = objective()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            _, image_error, rms = objective()
        return PhotometricResult(
            frames.detach(), image_error.cpu().double().numpy(), rms.cpu().double().numpy(), iterations,
            time.perf_counter() - started,
        )


def bench_photometric(
    head: HeadModel, device: str | torch.device = "cpu", size: int = 256, frames: int = 1, repeats: int = 10
) -> dict[str, float | int | str]:
    """Median milliseconds of one photometric iteration (render, losses, backward, Adam step) at ``size`` px.

    A synthetic head (the model's mean shape, frontal, 0.6 m away) is fitted to a rendering of itself
    with another expression, ``frames`` frames per batch.
    """
    from engine.tracker import TrackerConfig

    device = torch.device(device)
    tracker = Tracker(head, (size, size), TrackerConfig(fov_deg=30.0, device=str(device)))
    config = PhotometricConfig(size=size)
    fitter = PhotometricFitter(tracker, config)
    options = {"device": device, "dtype": tracker.config.dtype}
    truth = FrameState(
        0.5 * torch.ones(frames, tracker.layer.n_exp, **options) / (1 + torch.arange(tracker.layer.n_exp, **options)),
        torch.zeros(frames, tracker.layer.n_joints, 3, **options),
        torch.tensor([[0.0, 0.0, -0.6]], **options).expand(frames, 3).clone(),
    )
    K = torch.as_tensor(tracker.camera.intrinsics(), **options).expand(frames, 3, 3)
    with torch.no_grad():
        model_points = fitter._landmark_pixels(fitter.shape, truth, FrameBatch(torch.zeros(frames, size, size, 3, **options), K, torch.zeros(1), torch.zeros(1)))
        image = fitter.render(truth, FrameBatch(torch.zeros(frames, size, size, 3, **options), K, model_points, torch.ones(frames, size, size, dtype=torch.bool, device=device))).image
    batch = FrameBatch(image, K, model_points, torch.ones(frames, size, size, dtype=torch.bool, device=device))
    start = FrameState(torch.zeros_like(truth.exp), truth.pose.clone(), truth.transl.clone())

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(iterations: int) -> float:
        synchronize()
        began = time.perf_counter()
        fitter.fit_identity(batch, start, iterations=iterations)
        synchronize()
        return time.perf_counter() - began

    timed(2)  # warm-up: allocator, kernels
    # Each fit ends with one evaluation without gradient; the difference of two fits leaves the iterations.
    one = statistics.median(timed(1) for _ in range(3))
    many = statistics.median(timed(1 + repeats) for _ in range(3))
    return {
        "device": str(device),
        "size": size,
        "frames_per_batch": frames,
        "faces": int(tracker.layer.faces.shape[0]),
        "iteration_ms": (many - one) * 1e3 / repeats,
    }
