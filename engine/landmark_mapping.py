"""Derive the MediaPipe 478 -> iBUG 68 table from images with hand-placed 68-point landmarks.

Each of the 68 points becomes a triangle of MediaPipe's canonical face mesh plus barycentric coordinates.
For every point we try all 898 triangles, solve the barycentrics in closed form (least squares, constrained
to the triangle) over all views jointly, and keep the triangle with the smallest error. Errors are in units
of the inter-ocular distance (outer eye corners, iBUG 37 and 46) of each view. Two measures keep two
images from being overfitted:

* each image is also seen mirrored (MediaPipe run on the flipped image, labels mirrored), and
* mirror-pair points (e.g. the two mouth corners) share one solution on mirrored triangles, so the table is
  left/right symmetric and each pair is fitted on twice the data.

The brow points, on which the two annotations disagree most, and the nostrils are also drawn to MediaPipe's
own landmarks for them (``prior_weight``). The leave-one-image-out error (fit on one image, evaluate on the other) is the
honest accuracy figure.

Regenerate the committed file and print the error table::

    python -m engine.landmark_mapping [--data DIR] [--task FILE] [--out FILE] [--draw DIR]
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.canonical_face import CanonicalFace, load_canonical_face
from engine.landmarks import MAPPING_FILE, MAPPING_FORMAT_VERSION, FaceLandmarker, LandmarkerConfig

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "landmarks68"
DEFAULT_TASK = REPO_ROOT.parent / "shared" / "models" / "face_landmarker.task"
DEFAULT_OUT = Path(__file__).resolve().parent / "data" / MAPPING_FILE

LABELLED_IMAGES = ("einstein.jpg", "takeo.ppm")

#: 0-based iBUG index -> index of the same point on the other side of the face.
IBUG_MIRROR = np.array(
    list(range(16, -1, -1))  # jaw
    + list(range(26, 16, -1))  # brows
    + [27, 28, 29, 30, 35, 34, 33, 32, 31]  # nose bridge, nostrils
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]  # eyes
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]  # outer lips
    + [64, 63, 62, 61, 60, 67, 66, 65]  # inner lips
)

#: 0-based iBUG index ranges of the reported groups.
GROUPS: dict[str, range] = {
    "jaw": range(0, 17),
    "brows": range(17, 27),
    "nose": range(27, 36),
    "eyes": range(36, 48),
    "mouth": range(48, 68),
}
RIGHT_EYE_OUTER, LEFT_EYE_OUTER = 36, 45  # iBUG 37 and 46, 1-based

#: 0-based iBUG points drawn to their named MediaPipe landmarks, chosen by the leave-one-image-out error
#: (engine/data/README.md): with weight 1 the brows (18-27, 1-based; the two images' brow labels disagree most)
#: and the nostrils (32-36) improve on both held-out images. The nose bridge (28-30) and the mouth improve on
#: one image and get worse on the other, and the nose tip (31) gets worse on both (the iBUG tip sits lower than
#: MediaPipe's), so they keep the hand labels alone.
DEFAULT_PRIOR_WEIGHT = 1.0
NOSTRILS = range(31, 36)
PRIOR_POINTS: tuple[int, ...] = (*GROUPS["brows"], *NOSTRILS)

#: The MediaPipe landmark conventionally named as each inner iBUG point (18-68, 1-based; the jaw has none):
#: the fit is drawn towards it with ``prior_weight``, which keeps two images from moving a point far from
#: where MediaPipe's own mesh puts that feature.
MEDIAPIPE_NAMED_INNER = np.array(
    [70, 63, 105, 66, 107, 336, 296, 334, 293, 300]  # brows 18-27
    + [6, 197, 195, 4, 98, 97, 2, 326, 327]  # nose 28-36
    + [33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380]  # eyes 37-48
    + [61, 40, 37, 0, 267, 270, 291, 321, 314, 17, 84, 91]  # outer lips 49-60
    + [78, 81, 13, 311, 308, 402, 14, 178]  # inner lips 61-68
)

#: The face detector (BlazeFace short range) misses faces smaller than about a quarter of the frame, as in
#: the full Einstein photo, so MediaPipe sees crops around the labelled face. Its answer on Einstein moves by
#: several % of the inter-ocular distance from one crop to the next, so each view is the per-landmark median
#: over these crops: (size in face extents, zoom, centre shift in face extents).
CROP_JITTER: tuple[tuple[float, float, tuple[float, float]], ...] = tuple(
    (extents, zoom, shift)
    for extents in (2.0, 2.5, 3.0)
    for zoom in (1.0, 2.0)
    for shift in ((0.0, 0.0), (0.1, 0.0), (-0.1, 0.0), (0.0, 0.1), (0.0, -0.1))
)


@dataclass(frozen=True)
class LabelledImage:
    """An RGB image and its hand-placed 68 points in the landmarker's pixel convention (image = [0, W])."""

    name: str
    image_rgb: np.ndarray
    points68: np.ndarray  # (68, 2) float64


@dataclass(frozen=True)
class View:
    """MediaPipe's mesh landmarks and the hand-placed points for one (possibly mirrored) image."""

    name: str
    mesh_points: np.ndarray  # (468, 2)
    hand68: np.ndarray  # (68, 2)

    @property
    def iod(self) -> float:
        return float(np.linalg.norm(self.hand68[RIGHT_EYE_OUTER] - self.hand68[LEFT_EYE_OUTER]))


@dataclass(frozen=True)
class Fit:
    face_idx: np.ndarray  # (68,)
    bary: np.ndarray  # (68, 3)
    triangles: np.ndarray  # (68, 3)

    def apply(self, mesh_points: np.ndarray) -> np.ndarray:
        return np.einsum("kcd,kc->kd", mesh_points[self.triangles], self.bary)


def read_pts(path: Path) -> np.ndarray:
    """An iBUG .pts file -> (68, 2) 0-based pixel-centre coordinates."""
    lines = path.read_text().splitlines()
    start = lines.index("{") + 1
    points = np.array([[float(v) for v in line.split()] for line in lines[start : start + 68]])
    if points.shape != (68, 2):
        raise ValueError(f"{path}: expected 68 points, got {points.shape}")
    return points - 1.0


def load_labelled_images(data_dir: Path) -> list[LabelledImage]:
    """The hand-labelled images, whole, with their points shifted to the landmarker's pixel convention."""
    import cv2

    images = []
    for file_name in LABELLED_IMAGES:
        bgr = cv2.imread(str(data_dir / file_name), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(data_dir / file_name)
        # .pts are pixel centres (first pixel = 0 after -1); the landmarker's pixels span [i, i + 1].
        points = read_pts((data_dir / file_name).with_suffix(".pts")) + 0.5
        images.append(LabelledImage(Path(file_name).stem, np.ascontiguousarray(bgr[:, :, ::-1]), points))
    return images


def crop_around(image: LabelledImage, extents: float = 2.0, zoom: float = 1.0,
                shift: tuple[float, float] = (0.0, 0.0)) -> LabelledImage:
    """A square crop centred on the labelled face (plus shift), ``extents`` face sizes wide, resized by zoom.

    Parts of the square outside the image repeat the border pixels.
    """
    import cv2

    size = np.ptp(image.points68, axis=0).max()
    centre = (image.points68.min(axis=0) + image.points68.max(axis=0)) / 2 + np.asarray(shift) * size
    x0, y0 = np.floor(centre - extents * size / 2).astype(int)
    side = int(np.ceil(extents * size))
    height, width = image.image_rgb.shape[:2]
    pad = max(0, -x0, -y0, x0 + side - width, y0 + side - height)
    padded = cv2.copyMakeBorder(image.image_rgb, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    pixels = padded[y0 + pad : y0 + pad + side, x0 + pad : x0 + pad + side]
    if zoom != 1.0:
        pixels = cv2.resize(pixels, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_CUBIC)
    return LabelledImage(image.name, np.ascontiguousarray(pixels), (image.points68 - [x0, y0]) * zoom)


def mirror_image(image: LabelledImage) -> LabelledImage:
    """The image flipped left-right, with the labels flipped and renumbered (left eye <-> right eye)."""
    width = image.image_rgb.shape[1]
    points = image.points68[IBUG_MIRROR] * [-1, 1] + [width, 0]
    return LabelledImage(image.name + " (mirrored)", np.ascontiguousarray(image.image_rgb[:, ::-1]), points)


def observe(images: list[LabelledImage], task_path: Path) -> list[View]:
    """Each image and its mirror image as a View: MediaPipe's median answer over the CROP_JITTER crops."""
    views = []
    with FaceLandmarker(LandmarkerConfig(task_path=task_path, running_mode="image")) as landmarker:
        for image in images:
            for oriented in (image, mirror_image(image)):
                runs = []
                for extents, zoom, shift in CROP_JITTER:
                    crop = crop_around(oriented, extents, zoom, shift)
                    observation = landmarker.detect(crop.image_rgb)
                    if observation is not None:
                        # Back to the uncropped image: the crop's offset is where the labels moved.
                        offset = oriented.points68[0] - crop.points68[0] / zoom
                        runs.append(observation.points[:468] / zoom + offset)
                if len(runs) < len(CROP_JITTER) // 2:
                    found = f"{len(runs)} of {len(CROP_JITTER)}"
                    raise RuntimeError(f"MediaPipe found {oriented.name} in only {found} crops")
                views.append(View(oriented.name, np.median(runs, axis=0), oriented.points68))
    return views


def mesh_mirror(face: CanonicalFace) -> tuple[np.ndarray, np.ndarray]:
    """(vertex mirror (468,), triangle mirror (898,)): the x -> -x counterpart of each vertex and triangle."""
    mirrored = face.vertices * [-1, 1, 1]
    distances = np.linalg.norm(face.vertices[None, :, :] - mirrored[:, None, :], axis=2)
    vertex_mirror = distances.argmin(axis=1)
    if distances.min(axis=1).max() > 1e-4:
        raise ValueError("the canonical face is not mirror-symmetric")
    triangle_of = {frozenset(t): i for i, t in enumerate(face.triangles.tolist())}
    triangle_mirror = np.array([triangle_of[frozenset(vertex_mirror[t].tolist())] for t in face.triangles])
    return vertex_mirror, triangle_mirror


def _best_in_triangles(corners: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares barycentrics constrained to each triangle.

    corners: (T, R, 3) the R stacked residual rows' values at each triangle's three vertices; target (R,).
    Returns (sum of squared residuals (T,), barycentrics (T, 3)).
    """
    a, b, c = corners[..., 0], corners[..., 1], corners[..., 2]
    # Unconstrained: target ~ c + s (a - c) + t (b - c), solved by the 2x2 normal equations.
    u, v, w = a - c, b - c, target - c
    uu, uv, vv = (u * u).sum(1), (u * v).sum(1), (v * v).sum(1)
    uw, vw = (u * w).sum(1), (v * w).sum(1)
    det = uu * vv - uv * uv
    safe = np.abs(det) > 1e-12
    det = np.where(safe, det, 1.0)
    s, t = (vv * uw - uv * vw) / det, (uu * vw - uv * uw) / det
    bary = np.stack([s, t, 1 - s - t], axis=1)
    inside = safe & np.all(bary >= 0, axis=1)
    cost = np.where(inside, ((w - s[:, None] * u - t[:, None] * v) ** 2).sum(1), np.inf)
    # Otherwise the optimum of this convex problem lies on an edge: clamped 1-D least squares per edge.
    for j, k in ((0, 1), (1, 2), (2, 0)):
        edge, offset = corners[..., j] - corners[..., k], target - corners[..., k]
        length2 = np.maximum((edge * edge).sum(1), 1e-12)
        along = np.clip((edge * offset).sum(1) / length2, 0.0, 1.0)
        edge_cost = ((offset - along[:, None] * edge) ** 2).sum(1)
        better = ~inside & (edge_cost < cost)
        cost = np.where(better, edge_cost, cost)
        edge_bary = np.zeros_like(bary)
        edge_bary[:, j], edge_bary[:, k] = along, 1 - along
        bary = np.where(better[:, None], edge_bary, bary)
    return cost, bary


def fit(views: list[View], triangles: np.ndarray, vertex_mirror: np.ndarray, triangle_mirror: np.ndarray,
        outside: float = 0.0, prior_weight: float = 0.0, prior_points: tuple[int, ...] = PRIOR_POINTS) -> Fit:
    """Choose each point's triangle and barycentrics minimising the IOD-normalised error over all views.

    ``outside`` lets barycentrics go down to -outside (the triangle grown about its centroid).
    ``prior_weight`` adds, for each point of ``prior_points``, its squared distance to MediaPipe's conventionally
    named landmark (MEDIAPIPE_NAMED_INNER) in every view, times the weight, to the error minimised.
    """
    scale = np.array([1.0 / view.iod for view in views])[:, None, None]
    mesh = np.stack([view.mesh_points for view in views]) * scale  # (N, 468, 2)
    hand = np.stack([view.hand68 for view in views]) * scale  # (N, 68, 2)
    # Solving in the grown triangle's barycentrics lets one inside-the-triangle solver serve both settings.
    grow = np.eye(3) * (1 + 3 * outside) - outside

    def stacked_rows(vertex_triples: np.ndarray) -> np.ndarray:
        """(T, 3) vertex triples -> (T, N * 2, 3): each view's x and y at the grown triangle's corners."""
        corners = np.einsum("ntcd,ce->tnde", mesh[:, vertex_triples, :], grow)
        return corners.reshape(len(vertex_triples), -1, 3)

    n_jaw = 68 - len(MEDIAPIPE_NAMED_INNER)
    drawn = set(prior_points)

    def rows_for(point: int, corners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The hand-placed rows of ``point``, plus the weighted rows drawing it to its named landmark."""
        target = hand[:, point, :].reshape(-1)
        if prior_weight <= 0 or point not in drawn:
            return corners, target
        root = np.sqrt(prior_weight)
        named = mesh[:, MEDIAPIPE_NAMED_INNER[point - n_jaw], :].reshape(-1)
        return np.concatenate([corners, root * corners], axis=1), np.concatenate([target, root * named])

    face_idx = np.zeros(68, dtype=np.int64)
    bary = np.zeros((68, 3))
    for point, partner in enumerate(IBUG_MIRROR):
        if partner < point:
            continue  # fitted together with its partner
        corners, target = rows_for(point, stacked_rows(triangles))
        if partner != point:
            # The partner sits on the mirrored triangle with vertices in mirrored order: same barycentrics.
            partner_corners, partner_target = rows_for(partner, stacked_rows(vertex_mirror[triangles]))
            corners = np.concatenate([corners, partner_corners], axis=1)
            target = np.concatenate([target, partner_target])
        cost, grown_bary = _best_in_triangles(corners, target)
        best = int(np.argmin(cost))
        face_idx[point], bary[point] = best, grow @ grown_bary[best]
        if partner != point:
            mirrored = triangle_mirror[best]
            # Reorder the barycentrics to the vertex order the mirrored triangle has in the mesh.
            order = [list(vertex_mirror[triangles[best]]).index(v) for v in triangles[mirrored]]
            face_idx[partner], bary[partner] = mirrored, bary[point][order]
    return Fit(face_idx, bary, triangles[face_idx])


def errors_by_group(fitted: Fit, view: View) -> dict[str, float]:
    """Mean point error per group (and "all") in % of the view's inter-ocular distance."""
    error = np.linalg.norm(fitted.apply(view.mesh_points) - view.hand68, axis=1) / view.iod * 100
    table = {group: float(error[list(indices)].mean()) for group, indices in GROUPS.items()}
    table["all"] = float(error.mean())
    return table


def error_table(views: list[View], face: CanonicalFace, outside: float, prior_weight: float) -> tuple[Fit, str]:
    """Fit on all views, plus leave-one-image-out; return the full fit and a markdown table."""
    vertex_mirror, triangle_mirror = mesh_mirror(face)
    full = fit(views, face.triangles, vertex_mirror, triangle_mirror, outside, prior_weight)
    header = "| fitted on | evaluated on | " + " | ".join(GROUPS) + " | all |"
    lines = [header, "|" + "---|" * (len(GROUPS) + 3)]

    def row(label: str, fitted: Fit, view: View) -> None:
        errors = errors_by_group(fitted, view)
        lines.append(f"| {label} | {view.name} | " + " | ".join(f"{errors[g]:.1f}" for g in [*GROUPS, "all"]) + " |")

    for view in views:
        row("all views", full, view)
    for held_out in LABELLED_IMAGES:
        held_out_name = Path(held_out).stem
        training = [view for view in views if not view.name.startswith(held_out_name)]
        loo = fit(training, face.triangles, vertex_mirror, triangle_mirror, outside, prior_weight)
        for view in views:
            if view.name.startswith(held_out_name):
                row("the other image only", loo, view)
    return full, "\n".join(lines)


def draw(images: list[LabelledImage], views: list[View], fitted: Fit, out_dir: Path, zoom: float = 6.0) -> None:
    """PNGs of each unmirrored face: MediaPipe (blue), hand-placed 68 (green), mapped 68 (red)."""
    import cv2

    out_dir.mkdir(parents=True, exist_ok=True)
    for image, view in zip(images, views[::2]):
        crop = crop_around(image, extents=1.4, zoom=zoom)
        offset = crop.points68[0] - image.points68[0] * zoom
        canvas = np.ascontiguousarray(crop.image_rgb[:, :, ::-1])
        for points, colour, radius in (
            (view.mesh_points, (255, 128, 0), 2),
            (view.hand68, (0, 200, 0), 5),
            (fitted.apply(view.mesh_points), (0, 0, 255), 3),
        ):
            for x, y in points * zoom + offset:
                cv2.circle(canvas, (int(round(x)), int(round(y))), radius, colour, -1, cv2.LINE_AA)
        cv2.imwrite(str(out_dir / f"{image.name}_mapping.png"), canvas)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="folder with the labelled images")
    parser.add_argument("--task", type=Path, default=DEFAULT_TASK, help="face_landmarker.task")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="npz file to write")
    parser.add_argument("--outside", type=float, default=0.0, help="allowed barycentric undershoot (0 = inside)")
    parser.add_argument("--prior-weight", type=float, default=DEFAULT_PRIOR_WEIGHT,
                        help="weight of each brow and nostril point's conventionally named MediaPipe landmark against a "
                             "hand-placed view (0 = hand labels alone)")
    parser.add_argument("--draw", type=Path, help="write overlay PNGs to this folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    face = load_canonical_face(args.task)
    images = load_labelled_images(args.data)
    views = observe(images, args.task)
    fitted, table = error_table(views, face, args.outside, args.prior_weight)
    np.savez(
        args.out,
        version=np.int64(MAPPING_FORMAT_VERSION),
        face_idx=fitted.face_idx,
        bary=fitted.bary,
        triangles=fitted.triangles,
    )
    log.info("wrote %s\nmean error in %% of inter-ocular distance (outer eye corners):\n%s", args.out, table)
    if args.draw:
        draw(images, views, fitted, args.draw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
