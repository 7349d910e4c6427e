"""Pictures of a fit: the fitted head drawn over an image, its landmarks, and labels.

Shared by the offline ``render`` job and the live preview. The head is rasterised by our own renderer
(:mod:`engine.render`) inside the bounding box of its projection only, so the cost follows the face's size,
not the image's. Shading is SH lighting in the fitting world frame: a fixed soft light from the viewer for
plain fits, or the lighting a photometric refinement estimated together with its albedo (texture map or
per-vertex colours).

Images are RGB uint8 (H, W, 3); vertices are (V, 3) in OpenCV camera space; ``K`` is the (3, 3) intrinsics
of the image in the renderer's convention (pixel (i, j) covers [j, j+1) x [i, i+1)).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from engine.camera import MIN_DEPTH
from engine.head_model import HeadModel
from engine.landmarks import to_68
from engine.render import SH_CONSTANTS, render
from engine.targets import tracking_head

#: A pale blue-grey: reads as "model" over any skin tone, and stands apart from it in screenshots.
MESH_ALBEDO = (0.62, 0.70, 0.84)
#: Soft frontal light: ambient plus a linear term toward the viewer and slightly from above (world frame).
_AMBIENT = 0.72 / SH_CONSTANTS[0]
_FRONT_LIGHT = ((0, _AMBIENT), (2, 0.12), (3, 0.32))
BACKGROUND_RGB = (96, 96, 96)
OBSERVED_RGB = (60, 230, 60)
FITTED_RGB = (240, 60, 200)
INVALID_RGB = (235, 50, 50)
LABEL_RGB = (255, 255, 255)
#: Opacity of the plain shaded mesh over the frame; a textured (refined) head is drawn opaque.
MESH_ALPHA = 0.6


def front_light() -> np.ndarray:
    """(9, 3) SH coefficients of the default light (DECA's basis, see engine.render)."""
    light = np.zeros((9, 3))
    for row, value in _FRONT_LIGHT:
        light[row] = value
    return light


@dataclass(frozen=True)
class Appearance:
    """What a refined fit looks like: an albedo UV map (Ht, Wt, 3) in [0, 1] or per-vertex albedo (V, 3)."""

    texture: np.ndarray | None = None
    vertex_colors: np.ndarray | None = None


@dataclass(frozen=True)
class Painted:
    """A rendered head: its pixels and coverage inside ``box`` = (x0, y0, x1, y1) of the image."""

    rgb: np.ndarray  # (y1 - y0, x1 - x0, 3) uint8
    mask: np.ndarray  # (y1 - y0, x1 - x0) bool
    box: tuple[int, int, int, int]

    def full_mask(self, height: int, width: int) -> np.ndarray:
        """(H, W) bool coverage in the whole image."""
        mask = np.zeros((height, width), bool)
        x0, y0, x1, y1 = self.box
        mask[y0:y1, x0:x1] = self.mask
        return mask


class MeshPainter:
    """Renders one head model's mesh, shaded or textured, into the face's box of an image."""

    def __init__(self, head: HeadModel, appearance: Appearance | None = None) -> None:
        self.faces = torch.as_tensor(head.faces, dtype=torch.long)
        self.textured = appearance is not None
        self._texture = self._colors = self._uv_coords = self._uv_faces = None
        if appearance is not None and appearance.texture is not None:
            if head.uv_coords is None or head.uv_faces is None:
                raise ValueError(f"the {head.name} has no UV map for a texture")
            self._texture = torch.as_tensor(appearance.texture, dtype=torch.float32)
            self._uv_coords = torch.as_tensor(head.uv_coords, dtype=torch.float32)
            self._uv_faces = torch.as_tensor(head.uv_faces, dtype=torch.long)
        else:
            colors = MESH_ALBEDO if appearance is None or appearance.vertex_colors is None else appearance.vertex_colors
            self._colors = torch.as_tensor(np.broadcast_to(colors, (head.n_vertices, 3)).copy(), dtype=torch.float32)

    def paint(self, vertices_cam: np.ndarray, K: np.ndarray, image_size: tuple[int, int], light: np.ndarray | None = None) -> Painted | None:
        """The head rendered inside its projected bounding box; None when no part of it is in front of the camera
        and inside the image. ``image_size`` is (height, width); ``light`` (9, 3) defaults to :func:`front_light`."""
        height, width = image_size
        in_front = vertices_cam[:, 2] > MIN_DEPTH
        if not in_front.any():
            return None
        projected = vertices_cam[in_front] @ K.T
        pixels = projected[:, :2] / projected[:, 2:]
        x0, y0 = np.clip(np.floor(pixels.min(axis=0)).astype(int) - 1, 0, (width, height))
        x1, y1 = np.clip(np.ceil(pixels.max(axis=0)).astype(int) + 1, 0, (width, height))
        if x1 <= x0 or y1 <= y0:
            return None
        box_K = K.astype(np.float64).copy()
        box_K[0, 2] -= x0
        box_K[1, 2] -= y0
        sh = torch.as_tensor(front_light() if light is None else light, dtype=torch.float32).reshape(1, 9, 3)
        with torch.no_grad():
            result = render(
                torch.as_tensor(vertices_cam, dtype=torch.float32)[None], self.faces, torch.as_tensor(box_K, dtype=torch.float32),
                int(y1 - y0), int(x1 - x0), sh, vertex_colors=self._colors, texture=self._texture,
                uv_coords=self._uv_coords, uv_faces=self._uv_faces,
            )  # fmt: skip
        rgb = (result.image[0].clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).numpy()
        return Painted(rgb, result.mask[0].numpy(), (int(x0), int(y0), int(x1), int(y1)))


def composite(canvas: np.ndarray, painted: Painted | None, alpha: float) -> np.ndarray:
    """Blend the painted head into ``canvas`` (modified in place and returned) with opacity ``alpha``."""
    if painted is None:
        return canvas
    x0, y0, x1, y1 = painted.box
    region = canvas[y0:y1, x0:x1]
    covered = painted.mask
    mixed = alpha * painted.rgb[covered].astype(np.float32) + (1.0 - alpha) * region[covered].astype(np.float32)
    region[covered] = (mixed + 0.5).astype(np.uint8)
    return canvas


def grey_canvas(height: int, width: int) -> np.ndarray:
    return np.full((height, width, 3), BACKGROUND_RGB, np.uint8)


@dataclass(frozen=True)
class LandmarkPairs:
    """The landmarks the tracker fits, as points on the mesh and where they are among MediaPipe's 478."""

    corners: np.ndarray  # (L, 3) vertex indices of each landmark's triangle
    bary: np.ndarray  # (L, 3)
    mediapipe_indices: np.ndarray | None  # (L,) into the 478 points, or None: the 51 static iBUG points

    @staticmethod
    def for_head(head: HeadModel) -> LandmarkPairs | None:
        fitted = tracking_head(head)
        if fitted.mediapipe is not None:
            embedding = fitted.mediapipe
            return LandmarkPairs(head.faces[embedding.face_idx], embedding.bary, embedding.landmark_indices)
        if head.static68 is not None:
            return LandmarkPairs(head.faces[head.static68.face_idx], head.static68.bary, None)
        return None

    def fitted(self, vertices_cam: np.ndarray, K: np.ndarray) -> np.ndarray:
        """(L, 2) pixels of the model's landmarks on the posed mesh."""
        points = (vertices_cam[self.corners] * self.bary[..., None]).sum(axis=1)
        projected = points @ K.T
        return projected[:, :2] / np.maximum(projected[:, 2:], MIN_DEPTH)

    def observed(self, mp478: np.ndarray) -> np.ndarray:
        """(L, 2) observed pixels matching :meth:`fitted`, NaN where unobserved."""
        if self.mediapipe_indices is not None:
            return mp478[self.mediapipe_indices]
        return to_68(mp478)[17:]


def draw_points(canvas: np.ndarray, points: np.ndarray | None, color: tuple[int, int, int], radius: int = 1) -> None:
    if points is None:
        return
    for x, y in points[np.isfinite(points).all(axis=1)]:
        cv2.circle(canvas, (int(round(x)), int(round(y))), radius, color, -1, cv2.LINE_AA)


def draw_label(canvas: np.ndarray, text: str, line: int, color: tuple[int, int, int] = LABEL_RGB, bottom: bool = False) -> None:
    """Text on a dark box (readable on any frame), on ``line`` counted from the top or from the bottom."""
    scale = max(0.4, canvas.shape[0] / 720.0)
    thickness = max(1, int(round(scale * 1.5)))
    (width, height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    step = height + baseline + 6
    top = canvas.shape[0] - (line + 1) * step if bottom else line * step
    cv2.rectangle(canvas, (0, top), (width + 8, top + step - 1), (0, 0, 0), -1)
    cv2.putText(canvas, text, (4, top + 3 + height), cv2.FONT_HERSHEY_SIMPLEX, scale, color, thickness, cv2.LINE_AA)


def mark_invalid(canvas: np.ndarray, text: str = "no fit") -> None:
    """A red frame border and a label: this frame's image is shown without any mesh."""
    border = max(2, min(canvas.shape[:2]) // 100)
    canvas[:border] = canvas[-border:] = INVALID_RGB
    canvas[:, :border] = canvas[:, -border:] = INVALID_RGB
    draw_label(canvas, text, 1, INVALID_RGB)


# ------------------------------------------------------------------------------- photometric error pictures
#: Error (mean absolute RGB, 0..1) drawn at full brightness in an error map, and difference of two errors
#: drawn at full colour in a difference map.
ERROR_SCALE = 0.2
DIFFERENCE_SCALE = 0.03
#: Difference map colours: where the second fit's error is lower (blue) or higher (orange) than the first's.
LOWER_RGB = (40, 150, 255)
HIGHER_RGB = (255, 140, 0)


def photometric_face_mask(mp478: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the face mask the photometric fit scores, drawn at the image's own resolution (the convex
    hull of the observed points, eroded by the same fraction of the face's crop)."""
    from engine.photometric import PhotometricConfig, crop_box, face_mask

    height, width = image_size
    if not np.isfinite(mp478).all(axis=1).any():
        return np.zeros((height, width), bool)
    config = PhotometricConfig()
    side = crop_box(mp478, config.crop_scale)[2]
    return face_mask(mp478, max(height, width), round(config.mask_erosion * side))[:height, :width]


def photometric_error(image: np.ndarray, painted: Painted | None, mask: np.ndarray) -> np.ndarray:
    """(H, W) absolute RGB error (mean of the channels, 0..1) of a rendered head against the image inside
    ``mask``, 0 outside: face pixels the head leaves uncovered compare with black, as in the fit."""
    rendered = composite(np.zeros_like(image), painted, 1.0)
    error = np.abs(rendered.astype(np.float32) - image.astype(np.float32)).mean(axis=2) / 255.0
    return np.where(mask, error, 0.0)


def error_picture(error: np.ndarray, mask: np.ndarray, image: np.ndarray) -> np.ndarray:
    """An error map as RGB: inferno colours inside ``mask`` (black 0, white :data:`ERROR_SCALE` and above), the
    image dimmed to grey outside it."""
    level = np.clip(error / ERROR_SCALE * 255.0, 0, 255).astype(np.uint8)
    colored = cv2.cvtColor(cv2.applyColorMap(level, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)
    return np.where(mask[..., None], colored, _dimmed(image))


def difference_picture(first: np.ndarray, second: np.ndarray, mask: np.ndarray, image: np.ndarray) -> np.ndarray:
    """``first - second`` error as RGB inside ``mask``: blue where the second is lower, orange where it is
    higher, black where equal, full colour at :data:`DIFFERENCE_SCALE`; the dimmed image outside."""
    difference = first - second
    strength = np.clip(np.abs(difference) / DIFFERENCE_SCALE, 0.0, 1.0)[..., None]
    hue = np.where((difference > 0)[..., None], np.array(LOWER_RGB, np.float32), np.array(HIGHER_RGB, np.float32))
    colored = (strength * hue + 0.5).astype(np.uint8)
    return np.where(mask[..., None], colored, _dimmed(image))


def _dimmed(image: np.ndarray) -> np.ndarray:
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return np.repeat((grey // 3)[..., None], 3, axis=2)


def zoomed(image: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    """The part of ``image`` inside ``box`` = (x0, y0, x1, y1) (grey beyond the image's edges) scaled to
    ``size`` = (width, height), nearest pixels so that error maps stay exact."""
    x0, y0, x1, y1 = box
    width, height = size
    scale = np.array([[width / (x1 - x0), 0.0, -x0 * width / (x1 - x0)], [0.0, height / (y1 - y0), -y0 * height / (y1 - y0)]])
    return cv2.warpAffine(image, scale, (width, height), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=BACKGROUND_RGB)  # fmt: skip
