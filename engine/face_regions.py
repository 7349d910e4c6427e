"""Regions of the face where photometry can correct the landmark fit: mouth, eyes, cheeks.

Each region is drawn from MediaPipe's 478 observed points (pixels of an image or of a crop), so it follows the
face, not the model: the same pixels are scored for every fit of a frame. Used to break the photometric image
error down by region (``bench --accuracy --refine``) and to frame the ``render --style compare`` crops.

- ``mouth``: inside the outer lip contour (lips, and the mouth opening when it is open);
- ``eyes``: each eye opening grown to the lower brow and as far below the eye, i.e. the eyelids;
- ``cheeks``: between the lower eyelid, the nose wing, the mouth corner and the face outline.
"""

from __future__ import annotations

import cv2
import numpy as np

#: The outer lip contour, a closed loop (MediaPipe's FACE_LANDMARKS_LIPS outer ring).
OUTER_LIPS = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185)
#: Each eye opening (subject's right, then left) and the lower edge of its brow above it.
EYE_LOOPS = (
    (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246),
    (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466),
)
LOWER_BROWS = ((46, 53, 52, 65, 55), (276, 283, 282, 295, 285))
#: Each cheek's outline (subject's right, then left; mirror images point for point).
CHEEKS = ((117, 118, 101, 36, 206, 207, 187, 123, 50), (346, 347, 330, 266, 426, 427, 411, 352, 280))
#: How far below an eye its region reaches, as a multiple of the eye's height above its centre.
_BELOW_EYE = 1.0

REGION_NAMES = ("mouth", "eyes", "cheeks")


def region_polygons(mp478: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Each region's convex polygons ((N, 2) pixels) for one frame's MediaPipe points (478, 2); a region whose
    points are not all observed has no polygon."""
    polygons: dict[str, list[np.ndarray]] = {"mouth": [mp478[list(OUTER_LIPS)]], "eyes": [], "cheeks": [mp478[list(c)] for c in CHEEKS]}
    for loop, brow in zip(EYE_LOOPS, LOWER_BROWS):
        eye, above = mp478[list(loop)], mp478[list(brow)]
        centre = eye.mean(axis=0)
        # The brow row mirrored through the eye centre, scaled: the lower lid and the skin just below it.
        below = centre + _BELOW_EYE * (centre - above)
        polygons["eyes"].append(np.concatenate([eye, above, below]))
    return {name: [p for p in shapes if np.isfinite(p).all()] for name, shapes in polygons.items()}


def region_masks(mp478: np.ndarray, image_size: tuple[int, int]) -> dict[str, np.ndarray]:
    """(H, W) bool mask of each region (:data:`REGION_NAMES`) for MediaPipe points in pixels of an image of
    ``image_size`` (height, width); all False where the points are missing."""
    height, width = image_size
    masks = {}
    for name, polygons in region_polygons(mp478).items():
        mask = np.zeros((height, width), np.uint8)
        for polygon in polygons:
            hull = cv2.convexHull(np.round(polygon * 4).astype(np.int32))  # 2 fractional bits for the fill
            cv2.fillConvexPoly(mask, hull, 1, lineType=cv2.LINE_8, shift=2)
        masks[name] = mask.astype(bool)
    return masks


def region_box(mp478: np.ndarray, region: str, margin: float = 0.35) -> tuple[float, float, float, float] | None:
    """(x0, y0, x1, y1) around a region ('face': every observed point), grown by ``margin`` of its size on each
    side; None when its points are not observed."""
    if region == "face":
        points = mp478[np.isfinite(mp478).all(axis=1)]
    else:
        polygons = region_polygons(mp478)[region]
        points = np.concatenate(polygons) if polygons else np.empty((0, 2))
    if len(points) < 3:
        return None
    (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
    grow = margin * max(x1 - x0, y1 - y0)
    return float(x0 - grow), float(y0 - grow), float(x1 + grow), float(y1 + grow)
