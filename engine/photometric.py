"""Photometric refinement: correct the landmark fit's expression and pose, and estimate albedo and lighting,
from the pixels of frames.

Everything is anchored to the landmark tracker's result. The objective is

- a robust (Charbonnier) RGB difference between each frame crop and the rendered head (albedo times
  9-coefficient SH shading, :mod:`engine.render`) over a face mask: the convex hull of the observed
  landmarks, eroded; face pixels the head leaves uncovered compare with the black background;
- the tracker's landmark residuals (Cauchy-robust, normalised by the inter-ocular distance), weighted so that
  they keep the landmark fit;
- Gaussian priors on the corrections to the landmark fit (not on the parameters themselves), on shape,
  texture-space coefficients and lighting.

Lighting and albedo are fitted with Adam on the landmark fit's geometry; geometry (corrections, and the shape
when asked) with L-BFGS and a strong-Wolfe line search, which only takes steps that lower the objective.

Appearance is the model's texture space when the user has one (``HeadModel.texture`` over its UV map);
otherwise a coarse UV albedo map (or per-vertex albedo without a UV map) fitted under a smoothness prior,
which :meth:`PhotometricFitter.gather_albedo` can replace by a detailed map gathered from the frames'
pixels. Each frame is cropped around its landmarks and resized to ``size`` pixels; the crop's intrinsics
follow from the tracker's camera, so the fit happens in the tracker's world frame.

Two problems:
- :meth:`PhotometricFitter.fit_identity`: several keyframes jointly for one albedo, lighting and shape;
- :meth:`PhotometricFitter.fit_frames`: a window of consecutive frames with the identity fixed, corrected
  linearly over the window from the correction of the frame before it.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

import cv2
import numpy as np
import torch

from engine.camera import FLIP, Camera
from engine.config import Range
from engine.evaluation import OUTER_EYE_CORNERS
from engine.fitting import fitted_joints
from engine.flame import rodrigues
from engine.frames import FrameState
from engine.head_model import HeadModel
from engine.render import SH_CONSTANTS, rasterize, render, sh_shading, vertex_normals
from engine.timing import synchronizer
from engine.rig import HeadRig

log = logging.getLogger(__name__)

#: SH coefficient 0 that makes the shading exactly 1 (a white ambient light).
UNIT_AMBIENT = 1.0 / SH_CONSTANTS[0]


@dataclass
class PhotometricWeights:
    """Loss weights, relative to the mean robust RGB error (0..1 per channel) of the face-mask pixels.

    Per-frame parameters are fitted as corrections to the landmark fit they start from; the priors hold
    those corrections (not the parameters themselves) near zero, so the landmark fit's expression is kept.
    """

    landmarks: float = 0.02  # per (landmark error / landmark_noise IOD)^2, Cauchy-robust
    shape: float = 1e-4
    tex: float = 2e-5
    light: float = 1e-4  # on the non-ambient SH coefficients
    albedo_smoothness: float = 1.0  # free albedo map / vertex colours: squared neighbour differences
    correction_exp: float = 1e-3  # per coefficient^2 of expression correction
    correction_rotation: float = 1.0  # per radian^2 of joint-rotation correction
    correction_translation: float = 100.0  # per metre^2 of translation correction
    correction_change: float = 100.0  # a window's change of correction: times the correction weights above


@dataclass
class PhotometricConfig:
    size: Annotated[int, Range(32, 1024)] = 128
    """Side of the square crop around the face, in pixels, that is rendered and compared."""
    crop_scale: float = 1.5
    """Crop side as a multiple of the landmarks' bounding box."""
    identity_iterations: int = 40
    """Adam iterations for lighting and the coarse albedo on the keyframes."""
    shape_iterations: int = 8
    """L-BFGS iterations for the shape (and each keyframe's correction) once the appearance is known."""
    frame_iterations: int = 4
    """L-BFGS iterations per window of frames."""
    lr_light: float = 0.05
    lr_albedo: float = 0.02
    lr_coeffs: float = 0.05  # texture-space coefficients
    charbonnier_eps: float = 0.01
    landmark_noise: float = 0.01  # landmark error treated as noise, as a fraction of the inter-ocular distance
    landmark_robust_scale: float = 3.0
    mask_erosion: float = 0.03  # of the crop side
    texture_size: int = 256  # texture spaces larger than this are resampled down
    albedo_map_size: int = 64  # the coarse UV albedo map fitted with the lighting when no texture space exists
    detail_size: int | None = None
    """Side of the detailed albedo map gathered from the keyframes' pixels (free UV maps), and of the crops it is
    gathered from; None: 256 on the CPU, 512 on a GPU."""
    gather_depth_tolerance: float = 0.005  # metres behind the z-buffer's surface that still count as visible
    gather_view_power: float = 4.0  # samples weigh cos(view angle)^power: frontal views dominate
    gather_confidence: float = 0.3  # total sample weight at which a texel is half gathered, half coarse map
    weights: PhotometricWeights = field(default_factory=PhotometricWeights)


@dataclass
class FrameBatch:
    """Frames prepared for the fit: crops, their intrinsics, landmark targets and face masks."""

    images: torch.Tensor  # (B, S, S, 3) RGB in [0, 1]
    K: torch.Tensor  # (B, 3, 3) intrinsics of the crops
    targets: torch.Tensor  # (B, L, 2) landmark pixels in the crops, NaN where unobserved
    face_mask: torch.Tensor  # (B, S, S) bool
    iod: torch.Tensor | None = None  # (B,) inter-ocular distance (outer eye corners) in crop pixels

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class PhotometricResult:
    frames: FrameState
    image_error: np.ndarray  # (B,) mean absolute RGB error inside the face mask, 0..1
    landmark_rms_px: np.ndarray  # (B,) in pixels of the crop
    iterations: int
    seconds: float
    landmark_error: np.ndarray | None = None  # (B,) mean landmark distance over the inter-ocular distance
    initial_landmark_error: np.ndarray | None = None  # (B,) the same for the parameters the fit started from


def _cross_2d(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """z of the cross product of (N, 2) vectors (np.cross on 2-vectors is deprecated since NumPy 2.0)."""
    return u[:, 0] * v[:, 1] - u[:, 1] * v[:, 0]


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
        self.detail: torch.Tensor | None = None  # the detailed UV albedo gathered from pixels (uv_map only)
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
        if self.detail is not None:
            return self.detail
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

    def texel_map(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The texels of a ``size`` map that UV triangles cover: flat indices (N,), triangle (N,), barycentrics (N, 3)."""
        uv = self.uv_coords.cpu().double().numpy()
        uv_faces = self.uv_faces.cpu().numpy()
        corners = np.stack([uv[:, 0] * size, (1.0 - uv[:, 1]) * size], axis=1)[uv_faces]  # (F, 3, 2) texel units
        owner = np.zeros((size, size), np.int32)
        for face, triangle in enumerate(corners):
            cv2.fillConvexPoly(owner, np.round(triangle * 16).astype(np.int32), face + 1, lineType=cv2.LINE_8, shift=4)
        rows, columns = np.nonzero(owner)
        faces = owner[rows, columns] - 1
        centre = np.stack([columns + 0.5, rows + 0.5], axis=1)
        a, b, c = corners[faces, 0], corners[faces, 1], corners[faces, 2]
        area = _cross_2d(b - a, c - a)
        area = np.where(np.abs(area) < 1e-12, 1e-12, area)
        w1, w2 = _cross_2d(centre - a, c - a) / area, _cross_2d(b - a, centre - a) / area
        bary = np.clip(np.stack([1.0 - w1 - w2, w1, w2], axis=1), 0.0, 1.0)
        bary /= bary.sum(axis=1, keepdims=True)
        device = self.uv_coords.device
        return (torch.as_tensor(rows * size + columns, dtype=torch.long, device=device),
                torch.as_tensor(faces, dtype=torch.long, device=device),
                torch.as_tensor(bary, dtype=self.uv_coords.dtype, device=device))

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
    """Photometric fitting on a head rig: its head model, camera, landmark model and identity."""

    def __init__(self, rig: HeadRig, config: PhotometricConfig | None = None) -> None:
        self.config = config or PhotometricConfig()
        self.rig = rig
        self.layer = rig.layer
        self.device = rig.shape.device
        self.dtype = rig.shape.dtype
        self.appearance = Appearance(rig.head, self.config, self.device, self.dtype)
        self.shape = rig.shape.detach().clone()
        self.light = torch.zeros(9, 3, device=self.device, dtype=self.dtype)
        self.light[0] = UNIT_AMBIENT
        self._flip = torch.tensor(FLIP, device=self.device, dtype=self.dtype)
        corrected = torch.zeros(self.layer.n_joints, 1, device=self.device, dtype=self.dtype)
        corrected[fitted_joints(self.layer.n_joints, rig.fit)] = 1.0
        self._corrected_joints = corrected  # the joints the landmark fit estimates; the others stay as given

    @property
    def detail_size(self) -> int:
        """The detailed albedo map's side (``PhotometricConfig.detail_size``, resolved for the device)."""
        if self.config.detail_size is not None:
            return self.config.detail_size
        return 512 if self.device.type == "cuda" else 256

    # ------------------------------------------------------------------------------------------ preparation
    def prepare(
        self, images: list[np.ndarray], mp478: list[np.ndarray | None], lmk68: list[np.ndarray | None] | None = None,
        size: int | None = None,
    ) -> FrameBatch:
        """Crop each RGB frame around its landmarks (full-image pixels, NaN unobserved) and build the masks.

        ``size`` overrides the configured crop side (the detailed albedo is gathered from larger crops).
        """
        size = size or self.config.size
        lmk68 = lmk68 or [None] * len(images)
        camera = self.rig.camera
        crops, intrinsics, targets, masks, iods = [], [], [], [], []
        for image, mp, lmk in zip(images, mp478, lmk68):
            pixels = self.rig.targets.pixels(None if mp is None else mp[None], None if lmk is None else lmk[None])[0]
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
            iods.append(_inter_ocular(mp, lmk, observed) * scale)
        options = {"device": self.device, "dtype": self.dtype}
        return FrameBatch(
            torch.as_tensor(np.stack(crops), **options),
            torch.as_tensor(np.array(intrinsics), **options),
            torch.as_tensor(np.stack(targets), **options),
            torch.as_tensor(np.stack(masks), device=self.device),
            torch.as_tensor(np.array(iods), **options),
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

    def image_error(self, frames: FrameState, batch: FrameBatch) -> np.ndarray:
        """(B,) mean absolute RGB error inside the face mask of these parameters under the current appearance."""
        with torch.no_grad():
            return self._photometric(self.render(frames, batch), batch)[1].cpu().double().numpy()

    def error_map(self, frames: FrameState, batch: FrameBatch) -> np.ndarray:
        """(B, S, S) absolute RGB error of each pixel (mean of the channels) inside the face mask, 0 outside:
        the per-pixel terms :meth:`image_error` averages."""
        with torch.no_grad():
            difference = (self.render(frames, batch).image - batch.images).abs().mean(-1) * batch.face_mask
        return difference.cpu().double().numpy()

    # ------------------------------------------------------------------------------------------------ losses
    def _photometric(self, rendered, batch: FrameBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean robust RGB error over the face mask, and the per-frame mean absolute error.

        Face pixels the head does not cover compare with the renderer's black background: a fit cannot lower
        its error by uncovering hard pixels, while an open mouth (dark) stays cheap where the mesh has a hole
        there (the demo head closes its mouth with triangles between the inner lips).
        """
        mask = batch.face_mask
        difference = (rendered.image - batch.images) * mask.unsqueeze(-1)
        eps = self.config.charbonnier_eps
        robust = (torch.sqrt(difference**2 + eps**2) - eps).sum(-1)
        counts = mask.flatten(1).sum(1).clamp_min(1)
        loss = (robust.flatten(1).sum(1) / counts).mean()
        per_frame = difference.abs().sum(-1).flatten(1).sum(1) / (3 * counts)
        return loss, per_frame.detach()

    def _landmark_pixels(self, shape: torch.Tensor, frames: FrameState, batch: FrameBatch) -> torch.Tensor:
        model = self.rig.landmarks
        coeffs = torch.cat([shape.expand(frames.exp.shape[0], -1), frames.exp], dim=1)
        points = model.evaluate(coeffs, rodrigues(frames.pose), frames.transl, jacobians=False).points * self._flip
        projected = points @ batch.K.transpose(1, 2)
        return projected[..., :2] / projected[..., 2:].clamp_min(1e-6)

    def _iod(self, batch: FrameBatch) -> torch.Tensor:
        if batch.iod is not None:
            return batch.iod
        return torch.full((len(batch),), 0.4 * batch.size, device=self.device, dtype=self.dtype)

    def _landmarks(self, pixels: torch.Tensor, batch: FrameBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cauchy-robust landmark loss (mean over frames), per-frame RMS pixels and mean error over the IOD."""
        observed = torch.isfinite(batch.targets).all(-1)
        error = torch.where(observed[..., None], pixels - torch.nan_to_num(batch.targets), torch.zeros_like(pixels))
        iod = self._iod(batch)
        distance_sq = error.pow(2).sum(-1)
        c = self.config.landmark_robust_scale
        scale = (self.config.landmark_noise * iod)[:, None]
        robust = (c**2) * torch.log1p(distance_sq / scale**2 / c**2)
        weights = self.rig.targets.weights * observed
        loss = ((robust * weights).sum(1) / weights.sum(1).clamp_min(1e-9)).mean()
        count = observed.sum(1).clamp_min(1)
        rms = torch.sqrt((distance_sq * observed).sum(1) / count)
        over_iod = (torch.sqrt(distance_sq + 1e-12) * observed).sum(1) / count / iod
        return loss, rms.detach(), over_iod.detach()

    def _correction_prior(self, correction: FrameState, change: FrameState | None) -> torch.Tensor:
        """Corrections to the landmark fit stay small (per frame) and, in a sequence, change slowly."""
        weights = self.config.weights

        def cost(state: FrameState) -> torch.Tensor:
            return (weights.correction_exp * state.exp.pow(2).sum() + weights.correction_rotation * state.pose.pow(2).sum()
                    + weights.correction_translation * state.transl.pow(2).sum())

        prior = cost(correction) / correction.exp.shape[0]
        return prior if change is None else prior + weights.correction_change * cost(change)

    def _light_prior(self, light: torch.Tensor) -> torch.Tensor:
        return self.config.weights.light * light[1:].pow(2).sum()

    # --------------------------------------------------------------------------------------------- fitting
    def fit_identity(
        self, batch: FrameBatch, initial: FrameState, iterations: int | None = None, fit_shape: bool = True,
        on_step: Callable[[], None] | None = None,
    ) -> PhotometricResult:
        """Fit lighting, albedo and (``fit_shape``) shape shared by the frames of ``batch``, and each frame's
        correction.

        Lighting and albedo come first (Adam), on the landmark fit's geometry, so that the shape and pose
        never chase a wrong albedo; then the shape and each frame's correction (L-BFGS), anchored to the
        landmarks. ``iterations`` overrides the Adam iterations; ``on_step`` is called after each of them
        and after the geometry (progress bars).
        """
        started = time.perf_counter()
        iterations = self.config.identity_iterations if iterations is None else iterations
        initial = initial.detach()
        light = self.light.clone().requires_grad_(True)
        appearance_lr = self.config.lr_coeffs if self.appearance.kind == "texture_space" else self.config.lr_albedo
        optimiser = torch.optim.Adam([{"params": [light], "lr": self.config.lr_light},
                                      {"params": self.appearance.parameters_to_fit(), "lr": appearance_lr}])
        for _ in range(iterations):
            optimiser.zero_grad(set_to_none=True)
            photo, _ = self._photometric(self.render(initial, batch, self.shape, light), batch)
            loss = photo + self._light_prior(light) + self.appearance.prior(self.config.weights)
            loss.backward()
            optimiser.step()
            if on_step is not None:
                on_step()
        self.light = light.detach()
        self.appearance.requires_grad_(False)
        try:
            result = self._fit_geometry(batch, initial, self.config.shape_iterations, fit_shape)
        finally:
            self.appearance.requires_grad_(True)
        if on_step is not None:
            on_step()
        result.seconds = time.perf_counter() - started
        return result

    def fit_frames(
        self, batch: FrameBatch, initial: FrameState, previous_correction: FrameState | None = None,
        iterations: int | None = None,
    ) -> PhotometricResult:
        """Correct the expression and pose of a window of consecutive frames with the identity fixed.

        ``initial`` is the landmark fit. The correction changes linearly over the window, from
        ``previous_correction`` (that of the frame before the window: refined minus landmark fit; free when
        None) to a fitted correction at its last frame: the landmarks carry the fast motion, photometry
        corrects what drifts slowly, and the sequence of corrections is continuous from window to window,
        so refinement adds no jitter.
        """
        iterations = self.config.frame_iterations if iterations is None else iterations
        self.appearance.requires_grad_(False)
        try:
            return self._fit_geometry(batch, initial.detach(), iterations, fit_shape=False, sequence=True,
                                      start=previous_correction)
        finally:
            self.appearance.requires_grad_(True)

    def _fit_geometry(
        self, batch: FrameBatch, initial: FrameState, iterations: int, fit_shape: bool, sequence: bool = False,
        start: FrameState | None = None,
    ) -> PhotometricResult:
        """L-BFGS with a strong-Wolfe line search on corrections to ``initial`` (and the shape): a step is taken
        only where it lowers the whole objective, and parameters without a gradient do not move.

        Corrections are per frame, or for a ``sequence`` linear from ``start`` (free when None) to the last frame.
        """
        started = time.perf_counter()
        count = len(batch)
        options = {"device": self.device, "dtype": self.dtype}
        # Variables in units of about a pixel's effect, so that one step size suits them all.
        units = FrameState(torch.full((1, 1), 0.1, **options), 0.01 * self._corrected_joints, torch.full((1, 1), 0.001, **options))
        knots = 1 if sequence else count
        ends = FrameState(*(torch.zeros((knots, *v.shape[1:]), **options).requires_grad_(True)
                            for v in (initial.exp, initial.pose, initial.transl)))
        variables = [ends.exp, ends.pose, ends.transl]
        if sequence and start is None:
            start = FrameState(*(torch.zeros_like(v).requires_grad_(True) for v in variables))
            variables += [start.exp, start.pose, start.transl]
            start_units = units
        else:
            start_units = FrameState(*(torch.ones((), **options),) * 3)
            start = None if start is None else start.detach()
        shape_step = torch.zeros_like(self.shape, requires_grad=fit_shape)
        shape_unit = 0.1
        if fit_shape:
            variables.append(shape_step)
        # Frame k of a window of n lies k/n of the way from the frame before it (start) to its last frame.
        ramp = torch.arange(1, count + 1, **options) / count

        def corrections() -> tuple[FrameState, FrameState | None]:
            """Each frame's correction and, for a sequence, the change over the window."""
            end = FrameState(ends.exp * units.exp, ends.pose * units.pose, ends.transl * units.transl)
            if not sequence:
                return end, None
            begin = FrameState(start.exp * start_units.exp, start.pose * start_units.pose, start.transl * start_units.transl)
            change = end.minus(begin)

            def blend(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
                return a + b * ramp.reshape(-1, *([1] * (b.dim() - 1)))

            return FrameState(blend(begin.exp, change.exp), blend(begin.pose, change.pose), blend(begin.transl, change.transl)), change

        def objective() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
            correction, change = corrections()
            frames = initial.plus(correction)
            shape = self.shape + shape_unit * shape_step
            photo, image_error = self._photometric(self.render(frames, batch, shape), batch)
            landmarks, rms, over_iod = self._landmarks(self._landmark_pixels(shape, frames, batch), batch)
            loss = photo + self.config.weights.landmarks * landmarks + self._correction_prior(correction, change)
            if fit_shape:
                loss = loss + self.config.weights.shape * shape.pow(2).sum()
            return loss, image_error, rms, over_iod, frames

        with torch.no_grad():
            _, rms0, initial_error = self._landmarks(self._landmark_pixels(self.shape, initial, batch), batch)
        evaluations = 0
        if iterations > 0:
            optimiser = torch.optim.LBFGS(variables, lr=1.0, max_iter=iterations, max_eval=2 * iterations + 2,
                                          history_size=10, line_search_fn="strong_wolfe",
                                          tolerance_grad=1e-9, tolerance_change=1e-9)

            def closure() -> torch.Tensor:
                nonlocal evaluations
                evaluations += 1
                optimiser.zero_grad(set_to_none=True)
                loss = objective()[0]
                loss.backward()
                return loss

            optimiser.step(closure)
        with torch.no_grad():
            loss, image_error, rms, over_iod, frames = objective()
            if not torch.isfinite(loss):
                # A non-finite objective leaves the landmark fit as it was.
                for variable in variables:
                    variable.zero_()
                if start is not None:
                    start = FrameState(*(torch.zeros_like(v) for v in (start.exp, start.pose, start.transl)))
                loss, image_error, rms, over_iod, frames = objective()
        if fit_shape:
            self.shape = (self.shape + shape_unit * shape_step).detach()
        log.debug("photometric fit of %d frames: %d evaluations, landmark error %.4f -> %.4f IOD", count, evaluations,
                  float(initial_error.mean()), float(over_iod.mean()))
        return PhotometricResult(
            frames.detach(), image_error.cpu().double().numpy(), rms.cpu().double().numpy(), evaluations,
            time.perf_counter() - started, over_iod.cpu().double().numpy(), initial_error.cpu().double().numpy(),
        )

    # ------------------------------------------------------------------------------------- detailed albedo
    def gather_albedo(self, batch: FrameBatch, frames: FrameState) -> None:
        """Replace a free UV albedo map by a detailed one gathered from the frames' pixels.

        Each texel's point on the fitted mesh is projected into every frame; where it is visible (z-buffer),
        inside the face mask and facing the camera, the pixel divided by the SH shading is an albedo sample.
        Samples are averaged with weights that favour frontal views (sharp where seen); texels seen little or
        never blend into the coarse fitted map (smooth where unseen). Texture spaces are left as they are.
        """
        if self.appearance.kind != "uv_map":
            return
        size = self.detail_size
        with torch.no_grad():
            texels, faces_of, bary = self.appearance.texel_map(size)
            faces = self.layer.faces
            vertices = self.vertices_cam(self.shape, frames)
            normals = vertex_normals(vertices, faces)
            corners = faces[faces_of]  # (N, 3) vertex indices
            points = (vertices[:, corners] * bary[None, :, :, None]).sum(2)  # (B, N, 3)
            texel_normals = torch.nn.functional.normalize((normals[:, corners] * bary[None, :, :, None]).sum(2), dim=-1)
            projected = points @ batch.K.transpose(1, 2)
            pixels = projected[..., :2] / projected[..., 2:].clamp_min(1e-6)
            crop = batch.size
            column, row = pixels[..., 0].floor().long(), pixels[..., 1].floor().long()
            inside = (column >= 0) & (column < crop) & (row >= 0) & (row < crop) & (points[..., 2] > 0)
            column, row = column.clamp(0, crop - 1), row.clamp(0, crop - 1)
            frame_index = torch.arange(len(batch), device=self.device)[:, None]
            depth = rasterize(vertices, faces, batch.K, crop, crop).depth[frame_index, row, column]
            visible = inside & (points[..., 2] <= depth + self.config.gather_depth_tolerance)
            visible &= batch.face_mask[frame_index, row, column]
            facing = (texel_normals * -torch.nn.functional.normalize(points, dim=-1)).sum(-1).clamp_min(0.0)
            weight = visible * facing.pow(self.config.gather_view_power)
            grid = (2.0 * pixels / crop - 1.0).unsqueeze(1)  # (B, 1, N, 2), align_corners=False pixel centres
            colour = torch.nn.functional.grid_sample(batch.images.permute(0, 3, 1, 2), grid, align_corners=False)
            colour = colour[:, :, 0].transpose(1, 2)  # (B, N, 3)
            shading = sh_shading(texel_normals * self._flip, self.light.expand(len(batch), 9, 3))
            samples = (colour / shading.clamp_min(0.05)).clamp(0.0, 1.0)
            total = weight.sum(0)
            gathered = (weight[..., None] * samples).sum(0) / total.clamp_min(1e-9)[:, None]
            coarse = torch.nn.functional.interpolate(self.appearance.albedo().permute(2, 0, 1)[None], size=(size, size),
                                                     mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
            confidence = (total / (total + self.config.gather_confidence))[:, None]
            detail = coarse.reshape(-1, 3).clone()
            detail[texels] = confidence * gathered + (1.0 - confidence) * detail[texels]
            self.appearance.detail = detail.reshape(size, size, 3).clamp(0.0, 1.0)
            log.info("detailed albedo %dx%d from %d frames: %.0f%% of the texels seen", size, size, len(batch),
                     100.0 * float((total > 0).float().mean()))


def _inter_ocular(mp478: np.ndarray | None, lmk68: np.ndarray | None, observed: np.ndarray) -> float:
    """Distance between the outer eye corners (MediaPipe's, else iBUG's), else 40 % of the landmarks' extent."""
    for points, corners in ((mp478, OUTER_EYE_CORNERS), (lmk68, (36, 45))):
        if points is not None and np.isfinite(points[list(corners)]).all():
            return float(np.linalg.norm(points[corners[0]] - points[corners[1]]))
    finite = observed[np.isfinite(observed).all(axis=1)]
    return 0.4 * float(np.ptp(finite, axis=0).max())


def bench_photometric(
    head: HeadModel, device: str | torch.device = "cpu", size: int = 256, frames: int = 1, repeats: int = 10
) -> dict[str, float | int | str]:
    """Median milliseconds of one photometric iteration (render, losses, backward, Adam step) at ``size`` px.

    A synthetic head (the model's mean shape, frontal, 0.6 m away) is fitted to a rendering of itself
    with another expression, ``frames`` frames per batch.
    """
    device = torch.device(device)
    rig = HeadRig(head, Camera.from_fov(size, size, 30.0), n_shape=100, n_exp=50, device=device)
    config = PhotometricConfig(size=size)
    fitter = PhotometricFitter(rig, config)
    options = rig.options
    truth = FrameState(
        0.5 * torch.ones(frames, rig.layer.n_exp, **options) / (1 + torch.arange(rig.layer.n_exp, **options)),
        torch.zeros(frames, rig.layer.n_joints, 3, **options),
        torch.tensor([[0.0, 0.0, -0.6]], **options).expand(frames, 3).clone(),
    )
    K = torch.as_tensor(rig.camera.intrinsics(), **options).expand(frames, 3, 3)
    with torch.no_grad():
        model_points = fitter._landmark_pixels(fitter.shape, truth, FrameBatch(torch.zeros(frames, size, size, 3, **options), K, torch.zeros(1), torch.zeros(1)))
        image = fitter.render(truth, FrameBatch(torch.zeros(frames, size, size, 3, **options), K, model_points, torch.ones(frames, size, size, dtype=torch.bool, device=device))).image
    batch = FrameBatch(image, K, model_points, torch.ones(frames, size, size, dtype=torch.bool, device=device))
    start = FrameState(torch.zeros_like(truth.exp), truth.pose.clone(), truth.transl.clone())

    synchronize = synchronizer(device)

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
        "faces": int(rig.layer.faces.shape[0]),
        "iteration_ms": (many - one) * 1e3 / repeats,
    }
