"""The head rig: one head model, its landmarks and one camera, with one identity at a time.

What tracking, the photometric fitter, the refiners, evaluation and the benchmarks share, in one object:

- the model: ``head`` (as loaded), ``layer`` (FLAME's dense mesh and joints) and ``landmarks`` (the landmark
  model with the identity free, for calibration);
- ``targets``: observed MediaPipe / 68-point landmarks -> the landmark model's pixel targets and weights;
- the identity in use, a :class:`RigIdentity` (shape, camera with its focal length in pixels, and the
  landmark model specialised to that shape), built whole off the tracking thread when needed
  (:meth:`HeadRig.identity_for`) and swapped in between frames (:meth:`HeadRig.use`);
- the conversions of ``engine.frames`` that need the model: the root joint, the identity and K.

The :class:`~engine.tracker.Tracker` keeps only the tracking state machine around a rig.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from engine.camera import Camera, project
from engine.fitting import FitConfig
from engine.flame import FlameLayer
from engine.frames import (
    FrameParams,
    TrackedFrame,
    frame_from_reference,
    params_from_frames,
    params_from_reference_stack,
    reference_arrays,
)
from engine.head_model import HeadModel
from engine.jit import compiled
from engine.landmark_model import LandmarkModel
from engine.targets import TargetBuilder, groups_for, tracking_head


@dataclass(frozen=True)
class RigIdentity:
    """An identity and camera with the landmark model specialised to them."""

    shape: torch.Tensor  # (S,)
    camera: Camera
    landmarks: LandmarkModel  # the rig's landmark model with this shape fixed
    focal: torch.Tensor  # camera.focal as a scalar tensor on the rig's device
    #: The root joint at rest (3,) and its expression basis (3, E), float64 NumPy: every output frame needs
    #: the root joint, and a 3 x E product costs less in NumPy than PyTorch's per-call overhead.
    root_rest: np.ndarray
    root_basis: np.ndarray


class HeadRig:
    """One head model fitted to one camera's landmarks, with the identity in use."""

    def __init__(
        self, head: HeadModel, camera: Camera, n_shape: int, n_exp: int, fit: FitConfig | None = None,
        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    ) -> None:
        self.head = head
        self.fit = fit or FitConfig()
        self.options = {"dtype": dtype, "device": torch.device(device)}
        fitted = tracking_head(head)
        self.layer = FlameLayer(fitted, n_shape, n_exp, device, dtype)
        self.landmarks = LandmarkModel(self.layer, groups_for(head))
        self.targets = TargetBuilder(self.landmarks, fitted, self.fit)
        self.identity = self.identity_for(torch.zeros(self.layer.n_shape, **self.options), camera)

    @property
    def shape(self) -> torch.Tensor:
        return self.identity.shape

    @property
    def camera(self) -> Camera:
        return self.identity.camera

    @property
    def focal(self) -> torch.Tensor:
        return self.identity.focal

    @property
    def fixed_landmarks(self) -> LandmarkModel:
        """The landmark model with the current identity fixed (the per-frame fits')."""
        return self.identity.landmarks

    def identity_for(self, shape: torch.Tensor, camera: Camera | None = None) -> RigIdentity:
        """An identity (shape (S,), any dtype or device) with ``camera`` (default: the current one), built
        without touching the rig: safe on another thread, then :meth:`use` it between frames."""
        shape = shape.detach().to(**self.options).reshape(self.layer.n_shape).clone()
        camera = camera or self.camera
        landmarks = self.landmarks.with_fixed_shape(shape)
        root_rest, root_basis = (tensor[0].numpy(force=True).astype(np.float64) for tensor in (landmarks.joint_rest, landmarks.joint_coeff_basis))
        return RigIdentity(shape, camera, landmarks, torch.tensor(camera.focal, **self.options), root_rest, root_basis)

    def use(self, identity: RigIdentity) -> None:
        self.identity = identity

    def root_joint(self, exp: np.ndarray) -> np.ndarray:
        """The root joint of the shaped, expressed template (the pivot of the head rotation), metres.

        ``exp`` (E,) float64 may leave out the eyelid weights: they move no joint."""
        return _root_joint(self.identity.root_rest, self.identity.root_basis, exp)

    def root_joints(self, exp: np.ndarray) -> np.ndarray:
        """:meth:`root_joint` of T frames' expressions (T, E): (T, 3) metres."""
        return self.identity.root_rest + exp @ self.identity.root_basis[:, : exp.shape[1]].T

    def landmark_pixels(self, params: FrameParams) -> torch.Tensor:
        """(B, L, 2) the landmark model's points for a batch of frames, in pixels, with the current identity."""
        points = self.identity.landmarks.points(params.exp, params.rotations, params.transl)
        return project(points, self.focal, self.camera.center)

    # ------------------------------------------------------------------------ engine.frames, with this model
    def reference_arrays(self, frame: TrackedFrame) -> dict[str, np.ndarray]:
        """One frame in the reference format (``engine.frames.reference_arrays``) with this identity and camera."""
        return reference_arrays(frame, self.shape.cpu().double().numpy(), self.camera.intrinsics(), self.head.checksum)

    def frame_from_reference(self, arrays: Mapping[str, np.ndarray]) -> TrackedFrame:
        """The inverse of :meth:`reference_arrays` (``engine.frames.frame_from_reference``); frames tracked
        without eyelid blendshapes open the lids of a model that has them."""
        frame = frame_from_reference(arrays, self.layer.n_joints, self.root_joint)
        if self.layer.n_eyelids and frame.eyelids is None:
            frame.eyelids = np.zeros(self.layer.n_eyelids)
        return frame

    def params_from_reference(self, arrays: Mapping[str, np.ndarray]) -> FrameParams:
        """One frame of reference arrays as the solvers' parameters (batch of one) in the rig's dtype."""
        return params_from_frames([self.frame_from_reference(arrays)], self.options["dtype"], self.options["device"])

    def params_from_reference_stack(self, stacked: Mapping[str, np.ndarray]) -> FrameParams:
        """Stacked reference arrays (a track's frames) as the solvers' batch, all frames converted at once: the
        same as :meth:`params_from_frames` of every frame's :meth:`frame_from_reference`
        (``engine.frames.params_from_reference_stack``)."""
        return params_from_reference_stack(
            stacked, self.layer.n_joints, self.root_joints, self.layer.n_eyelids, self.options["dtype"], self.options["device"]
        )

    def params_from_frames(self, frames: list[TrackedFrame]) -> FrameParams:
        """Frames as the solvers' batch in the rig's dtype and device (``engine.frames.params_from_frames``)."""
        return params_from_frames(frames, self.options["dtype"], self.options["device"])


@compiled
def _root_joint(rest: np.ndarray, basis: np.ndarray, exp: np.ndarray) -> np.ndarray:
    """rest (3,) + basis (3, >= E) @ exp (E,), compiled (numba): every tracked frame asks for its root joint,
    and NumPy's slice and product cost far more than the arithmetic with the caches cold."""
    joint = np.empty(3)
    for x in range(3):
        total = 0.0
        for column in range(exp.shape[0]):
            total += basis[x, column] * exp[column]
        joint[x] = rest[x] + total
    return joint
