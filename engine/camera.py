"""Pinhole camera in OpenCV's convention, and the frame shared by the model and the camera.

The fitting world is FLAME's frame with the camera at its origin looking down -z (as OpenGL views are): a
head facing the camera has zero rotation. OpenCV camera coordinates are that frame with y and z negated, so
``x_cv = FLIP * x_world``. A camera keeps its focal length in pixels (what the solvers use); the vertical
field of view is how it is given and reported, as in the reference tracker: ``f = height / (2 tan(fov / 2))``
(:func:`focal_from_fov`, the one conversion), principal point at the image centre.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from engine.errors import UserError

#: OpenCV camera axes from the world's: x stays, y and z flip.
FLIP = (1.0, -1.0, -1.0)
#: Points closer than this (metres, along the view axis) are treated as behind the camera.
MIN_DEPTH = 1e-3
#: Vertical fields of view (degrees) a camera may be given: from a long telephoto to a wide fisheye.
FOV_RANGE_DEG = (5.0, 150.0)


def check_fov(fov_deg: float, what: str = "the field of view") -> float:
    """``fov_deg`` when it is a finite number in :data:`FOV_RANGE_DEG`, else UserError naming ``what``."""
    low, high = FOV_RANGE_DEG
    if not (isinstance(fov_deg, int | float) and math.isfinite(fov_deg) and low <= fov_deg <= high):
        raise UserError(f"{what} must be between {low:g} and {high:g} degrees (vertical), not {fov_deg!r}")
    return float(fov_deg)


def focal_from_fov(fov_deg: float, height: int) -> float:
    return height / (2.0 * math.tan(math.radians(fov_deg) / 2.0))


def fov_from_focal(focal: float, height: int) -> float:
    return math.degrees(2.0 * math.atan(height / (2.0 * focal)))


@dataclass(frozen=True)
class Camera:
    """Image size and focal length, in pixels of the input image."""

    width: int
    height: int
    focal: float

    @staticmethod
    def from_fov(width: int, height: int, fov_deg: float) -> Camera:
        """A camera with a vertical field of view in degrees (checked against :data:`FOV_RANGE_DEG`)."""
        return Camera(width, height, focal_from_fov(check_fov(fov_deg), height))

    @property
    def fov_deg(self) -> float:
        """The vertical field of view in degrees."""
        return fov_from_focal(self.focal, self.height)

    @property
    def center(self) -> tuple[float, float]:
        return self.width / 2.0, self.height / 2.0

    def intrinsics(self) -> np.ndarray:
        """K (3, 3) in pixels of the input image."""
        cx, cy = self.center
        return np.array([[self.focal, 0.0, cx], [0.0, self.focal, cy], [0.0, 0.0, 1.0]])

    def with_focal(self, focal: float) -> Camera:
        return Camera(self.width, self.height, float(focal))


def project(points: torch.Tensor, focal: torch.Tensor, center: tuple[float, float]) -> torch.Tensor:
    """World points (B, L, 3) to pixels (B, L, 2); ``focal`` (B,) or scalar tensor."""
    depth = (-points[..., 2]).clamp_min(MIN_DEPTH)
    focal = focal.reshape(-1, 1) if focal.dim() else focal
    u = focal * points[..., 0] / depth + center[0]
    v = focal * -points[..., 1] / depth + center[1]
    return torch.stack([u, v], dim=-1)


def project_with_jacobian(
    points: torch.Tensor, focal: torch.Tensor, center: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels (B, L, 2), d pixels / d points (B, L, 2, 3), and d pixels / d log(focal) (B, L, 2)."""
    depth = (-points[..., 2]).clamp_min(MIN_DEPTH)
    focal = focal.reshape(-1, 1) if focal.dim() else focal
    x_over_z = points[..., 0] / depth
    y_over_z = -points[..., 1] / depth
    pixels = torch.stack([focal * x_over_z + center[0], focal * y_over_z + center[1]], dim=-1)
    scale = focal / depth
    zero = torch.zeros_like(scale)
    # u = f x / (-z), v = f (-y) / (-z): derivatives with respect to the world point (x, y, z).
    d_points = torch.stack(
        [
            torch.stack([scale, zero, scale * x_over_z], dim=-1),
            torch.stack([zero, -scale, scale * y_over_z], dim=-1),
        ],
        dim=-2,
    )
    d_log_focal = torch.stack([focal * x_over_z, focal * y_over_z], dim=-1)
    return pixels, d_points, d_log_focal
