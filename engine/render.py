"""A differentiable triangle rasterizer and spherical-harmonics shading in pure PyTorch.

This replaces pytorch3d / nvdiffrast for photometric refinement. It works on any torch device and in any
floating dtype, and is batched over B images that share one triangle list.

The split follows nvdiffrast: *visibility* is decided without gradient (a z-buffer: each pixel keeps its
nearest triangle), and the *values* inside the visible triangle are recomputed differentiably from the
projected vertex positions. Gradients therefore reach vertex positions, per-vertex attributes, textures
and lighting at interior pixels; silhouette edges are discontinuous and give no gradient (no
anti-aliasing pass).

Conventions
-----------
- Vertices are in OpenCV camera space (x right, y down, z forward, metres), shape (B, V, 3).
- ``K`` is a pinhole intrinsics matrix (B, 3, 3) or (3, 3) whose last row is (0, 0, 1); a pixel is
  ``(K @ v)[:2] / z``. Pixel (row i, column j) covers [j, j+1) x [i, i+1), so its centre is
  (j + 0.5, i + 0.5). (If your intrinsics put pixel centres on integers, add 0.5 to cx and cy.)
- Triangles with any vertex at z <= ``near`` are culled whole (no clipping). Back faces are kept; the
  z-buffer hides them behind front faces of a closed mesh.
- Images are channels-last: (B, H, W, C). Background pixels are 0 and ``mask`` is False there.
- UV coordinates follow the OBJ convention: u, v in [0, 1], v = 0 at the *bottom* row of the texture.

API
---
``rasterize(vertices_cam, faces, K, height, width) -> Fragments``
    No gradient. ``face_ids`` (B, H, W) int64, -1 for background; ``bary`` (B, H, W, 3)
    perspective-correct; ``depth`` (B, H, W), inf for background; ``mask``; ``foreground`` (flat
    indices of covered pixels into B*H*W, handy for sparse losses).
``interpolate(attributes, faces, fragments, vertices_cam, K, attribute_faces=None) -> (B, H, W, C)``
    Perspective-correct interpolation with gradient w.r.t. ``attributes`` ((B, V, C) or (V, C)) and
    ``vertices_cam``. For per-face-corner attributes such as UVs, pass ``attributes=uv_coords`` (Vt, 2)
    and ``attribute_faces=uv_faces`` (F, 3).
``sample_texture(texture, uv, mask) -> (B, H, W, C)``
    Bilinear lookup (``grid_sample``) of a (B, Ht, Wt, C) or (Ht, Wt, C) texture; gradient to both.
``vertex_normals(vertices, faces) -> (B, V, 3)``
    Area-weighted unit normals, differentiable; outward for counter-clockwise faces (FLAME's winding).
``sh_shading(normals, sh_coeffs) -> (..., 3)``
    9-coefficient irradiance in the DECA / photometric_optimization convention (see ``SH_CONSTANTS``).
``render(vertices_cam, faces, K, height, width, sh_coeffs, vertex_colors=... | texture=...) -> RenderOutput``
    Albedo times SH shading, with mask, normals and fragments.
``benchmark_render(device, size, n_faces, repeats) -> dict``
    Median milliseconds of forward and forward+backward on a sphere of about ``n_faces`` triangles.

Lighting frame: ``render`` evaluates the SH lighting on normals in the fitting world frame of
``engine.camera`` (x right, y up, z toward the camera: OpenCV camera normals times ``FLIP``). For a head
facing the camera this is FLAME's model frame, the frame in which DECA and photometric_optimization
estimate their SH coefficients, so their coefficients carry over. The normals that ``render`` returns are
in OpenCV camera space.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.camera import FLIP, MIN_DEPTH
from engine.timing import synchronizer

#: Multiplies each SH basis function [1, x, y, z, xy, xz, yz, x^2 - y^2, 3z^2 - 1] (in this order). These
#: are the real SH normalisations times the Lambertian convolution factors (2pi/3 for band 1, pi/4 for
#: band 2) of Ramamoorthi & Hanrahan (2001), exactly as in DECA and photometric_optimization, so their
#: (B, 9, 3) lighting coefficients give the same irradiance here. Like theirs, the constant term leaves
#: out its factor pi: coefficient 0 carries it (a white ambient light of irradiance E has
#: coefficient 0 = E * sqrt(4 pi)).
SH_CONSTANTS: tuple[float, ...] = (
    1.0 / math.sqrt(4.0 * math.pi),
    (2.0 * math.pi / 3.0) * math.sqrt(3.0 / (4.0 * math.pi)),
    (2.0 * math.pi / 3.0) * math.sqrt(3.0 / (4.0 * math.pi)),
    (2.0 * math.pi / 3.0) * math.sqrt(3.0 / (4.0 * math.pi)),
    (math.pi / 4.0) * 3.0 * math.sqrt(5.0 / (12.0 * math.pi)),
    (math.pi / 4.0) * 3.0 * math.sqrt(5.0 / (12.0 * math.pi)),
    (math.pi / 4.0) * 3.0 * math.sqrt(5.0 / (12.0 * math.pi)),
    (math.pi / 4.0) * 1.5 * math.sqrt(5.0 / (12.0 * math.pi)),
    (math.pi / 4.0) * 0.5 * math.sqrt(5.0 / (4.0 * math.pi)),
)

#: Default near plane in metres: the camera's own minimum depth.
DEFAULT_NEAR = MIN_DEPTH

# Covered (pixel, triangle) pairs z-buffered at once; bounds the rasterizer's memory (~60 bytes per pair).
_PIXELS_PER_CHUNK = 1 << 21
# Horizontal slack in pixels when deciding whether a pixel centre lies inside a triangle; keeps shared
# edges watertight under float32 rounding.
_EDGE_TOLERANCE_PX = 1e-3
_BACKGROUND_KEY = torch.iinfo(torch.int64).max
_LOW_32_BITS = 0xFFFFFFFF


@dataclass(frozen=True)
class Fragments:
    """What the rasterizer saw at each pixel. None of it carries gradient."""

    face_ids: torch.Tensor  # (B, H, W) int64, index into faces, -1 for background
    bary: torch.Tensor  # (B, H, W, 3) perspective-correct barycentrics of the pixel centre, 0 on background
    depth: torch.Tensor  # (B, H, W) camera z of the visible surface, inf on background
    foreground: torch.Tensor  # (N,) int64 flat indices into B*H*W of the covered pixels, ascending

    @property
    def mask(self) -> torch.Tensor:
        """(B, H, W) bool, True where a triangle covers the pixel centre."""
        return self.face_ids >= 0

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B, H, W)."""
        batch, height, width = self.face_ids.shape
        return batch, height, width


@dataclass(frozen=True)
class RenderOutput:
    """The result of :func:`render`; images are channels-last and 0 on background."""

    image: torch.Tensor  # (B, H, W, 3) albedo * shading
    mask: torch.Tensor  # (B, H, W) bool
    normals: torch.Tensor  # (B, H, W, 3) unit normals in OpenCV camera space
    albedo: torch.Tensor  # (B, H, W, 3)
    shading: torch.Tensor  # (B, H, W, 3)
    fragments: Fragments


def _batched_intrinsics(K: torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
    K = K.to(device=like.device, dtype=like.dtype)
    if K.dim() == 2:
        K = K.unsqueeze(0)
    if K.shape[1:] != (3, 3) or K.shape[0] not in (1, batch):
        raise ValueError(f"K must be (3, 3) or ({batch}, 3, 3), got {tuple(K.shape)}")
    return K.expand(batch, 3, 3)


def _check_mesh(vertices_cam: torch.Tensor, faces: torch.Tensor) -> None:
    if vertices_cam.dim() != 3 or vertices_cam.shape[-1] != 3:
        raise ValueError(f"vertices_cam must be (B, V, 3), got {tuple(vertices_cam.shape)}")
    if faces.dim() != 2 or faces.shape[-1] != 3 or faces.dtype != torch.int64:
        raise ValueError(f"faces must be (F, 3) int64, got {tuple(faces.shape)} {faces.dtype}")


def _project(vertices_cam: torch.Tensor, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates (B, V, 2) and camera depth (B, V) of camera-space points."""
    homogeneous = vertices_cam @ K.transpose(1, 2)
    depth = homogeneous[..., 2]
    return homogeneous[..., :2] / depth.unsqueeze(-1), depth


def _cross2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _pixel_centres(flat_index: torch.Tensor, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    within_image = flat_index % (height * width)
    return torch.stack(((within_image % width).to(dtype), (within_image // width).to(dtype)), dim=1) + 0.5


def _face_setup(
    pixels_xy: torch.Tensor, depth: torch.Tensor, faces: torch.Tensor, height: int, width: int, near: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-triangle tables for scanning the pixel centres in each triangle's bounding box.

    Returns ``active`` (M,) indices into B*F of the triangles that may cover a pixel centre,
    ``float_table`` (M, 9) [ox, oy, a1x, a1y, a2x, a2y, 1/z0, gx, gy], ``first_pixel`` (M,) the flat index
    into B*H*W of the box's top-left pixel, and ``box_size`` (M, 2) its width and height in pixels.
    For the pixel (i, j) steps right and down from the box corner, with dx = i + ox, dy = j + oy (offsets
    from corner 0): lambda1 = a1x dx + a1y dy, lambda2 = a2x dx + a2y dy are its screen-space
    barycentrics and 1/z = 1/z0 + gx dx + gy dy (inverse depth is affine in screen space).
    """
    batch = pixels_xy.shape[0]
    corners = pixels_xy[:, faces]  # (B, F, 3, 2)
    corners_z = depth[:, faces]  # (B, F, 3)
    low = corners.amin(dim=2)
    high = corners.amax(dim=2)
    # Pixel centres c + 0.5 inside [low, high] (give or take the edge tolerance), clipped to the image.
    box_low = torch.ceil(low - 0.5 - _EDGE_TOLERANCE_PX).clamp(min=0)
    box_high = torch.minimum(torch.floor(high - 0.5 + _EDGE_TOLERANCE_PX), low.new_tensor((width - 1, height - 1)))
    box_size = (box_high - box_low + 1).clamp(min=0)
    q1 = corners[:, :, 1] - corners[:, :, 0]
    q2 = corners[:, :, 2] - corners[:, :, 0]
    area = _cross2(q1, q2)
    usable = (corners_z > near).all(dim=2) & (area != 0) & torch.isfinite(area) & (box_size > 0).all(dim=2)
    active = usable.reshape(-1).nonzero().squeeze(1)

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch * faces.shape[0], *t.shape[2:]).index_select(0, active)

    q1, q2, area, box_low, box_size, corner0 = (pick(t) for t in (q1, q2, area, box_low, box_size, corners[:, :, 0]))
    inv_z = 1.0 / pick(corners_z)
    a1 = torch.stack((q2[:, 1], -q2[:, 0]), dim=1) / area.unsqueeze(1)
    a2 = torch.stack((-q1[:, 1], q1[:, 0]), dim=1) / area.unsqueeze(1)
    gradient_inv_z = (-a1 - a2) * inv_z[:, :1] + a1 * inv_z[:, 1:2] + a2 * inv_z[:, 2:3]
    float_table = torch.cat((box_low + 0.5 - corner0, a1, a2, inv_z[:, :1], gradient_inv_z), dim=1)
    box_low = box_low.long()
    first_pixel = (active // faces.shape[0]) * (height * width) + box_low[:, 1] * width + box_low[:, 0]
    return active, float_table, first_pixel, box_size.long()


def _row_spans(
    float_table: torch.Tensor, first_pixel: torch.Tensor, box_size: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each triangle's box into pixel rows and find, per row, the run of pixel centres inside the triangle.

    Each barycentric constraint (lambda1 >= 0, lambda2 >= 0, lambda0 >= 0) is a half-line in x along a
    row, so the covered centres form one run that is found without testing pixels. A centre counts as
    inside when it is within ``_EDGE_TOLERANCE_PX`` (along x and y) of each edge's inner side, so that
    centres exactly on an edge shared by two triangles fall in both, never in neither, whatever the
    rounding; the z-buffer then picks one.

    Returns, per non-empty run: its triangle (index into the tables), first pixel (flat index into
    B*H*W), length, inverse depth at the first pixel and inverse depth step per pixel.
    """
    heights = box_size[:, 1]
    triangle = torch.repeat_interleave(torch.arange(heights.shape[0], device=heights.device), heights)
    row_in_box = torch.arange(triangle.shape[0], device=heights.device) - (
        torch.cumsum(heights, 0) - heights
    ).index_select(0, triangle)
    table = float_table.index_select(0, triangle)
    offset_x, offset_y, a1x, a1y, a2x, a2y, inv_z0, inv_z_dx, inv_z_dy = table.unbind(1)
    dy = row_in_box.to(table.dtype) + offset_y
    # Constraints slope * dx + intercept >= 0, each lambda relaxed by what it changes over the tolerance.
    slope = torch.stack((a1x, a2x, -(a1x + a2x)), dim=1)
    slope_y = torch.stack((a1y, a2y, -(a1y + a2y)), dim=1)
    intercept = (slope_y * dy.unsqueeze(1) + dy.new_tensor((0.0, 0.0, 1.0))
                 + _EDGE_TOLERANCE_PX * (slope.abs() + slope_y.abs()))
    bound = -intercept / slope
    lower = torch.where(slope > 0, bound, -math.inf).amax(dim=1)
    upper = torch.where(slope < 0, bound, math.inf).amin(dim=1)
    first_col = torch.ceil(lower - offset_x).clamp(min=0)
    last_col = torch.minimum(torch.floor(upper - offset_x),
                             (box_size[:, 0] - 1).index_select(0, triangle).to(table.dtype))
    blocked = ((slope == 0) & (intercept < 0)).any(dim=1)
    length = torch.where(blocked, 0.0, (last_col - first_col + 1).clamp(min=0)).long()

    runs = length.nonzero().squeeze(1)
    first_col = first_col.index_select(0, runs)
    start_pixel = (first_pixel.index_select(0, triangle) + row_in_box * width).index_select(0, runs) + first_col.long()
    start_inv_z = (inv_z0 + inv_z_dy * dy).index_select(0, runs) + inv_z_dx.index_select(0, runs) * (
        first_col + offset_x.index_select(0, runs)
    )
    return (triangle.index_select(0, runs), start_pixel, length.index_select(0, runs), start_inv_z,
            inv_z_dx.index_select(0, runs))


def _zbuffer_runs(
    face_id: torch.Tensor,
    start_pixel: torch.Tensor,
    length: torch.Tensor,
    start_inv_z: torch.Tensor,
    step_inv_z: torch.Tensor,
    zbuffer: torch.Tensor,
) -> None:
    """Write the pixels of runs into ``zbuffer`` (flat int64 keys), keeping the nearest at each pixel."""
    run = torch.repeat_interleave(torch.arange(length.shape[0], device=length.device), length)
    step = torch.arange(run.shape[0], device=length.device) - (torch.cumsum(length, 0) - length).index_select(0, run)
    inv_z = start_inv_z.index_select(0, run) + step_inv_z.index_select(0, run) * step
    # One int64 key orders by depth, then by face id: positive float32 bit patterns sort like the floats.
    # (A non-positive inverse depth, from rounding at a grazing edge, sorts as infinitely far.)
    depth = torch.where(inv_z > 0, 1.0 / inv_z, math.inf)
    depth_bits = depth.float().view(torch.int32).long()
    key = (depth_bits << 32) | face_id.index_select(0, run)
    zbuffer.scatter_reduce_(0, start_pixel.index_select(0, run) + step, key, reduce="amin")


@torch.no_grad()
def _visible_faces(
    vertices_cam: torch.Tensor, faces: torch.Tensor, K: torch.Tensor, height: int, width: int, near: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The z-buffer pass: face ids (B*H*W,) with -1 for background, and the covered pixels' flat indices."""
    batch = vertices_cam.shape[0]
    pixels_xy, depth = _project(vertices_cam.detach(), K)
    active, float_table, first_pixel, box_size = _face_setup(pixels_xy, depth, faces, height, width, near)
    triangle, start_pixel, length, start_inv_z, step_inv_z = _row_spans(float_table, first_pixel, box_size, width)
    face_id = active.index_select(0, triangle) % faces.shape[0]
    zbuffer = torch.full((batch * height * width,), _BACKGROUND_KEY, dtype=torch.int64, device=depth.device)
    if length.numel():
        # Bound memory: cut the runs into pieces of about _PIXELS_PER_CHUNK pixels.
        starts = torch.cumsum(length, 0) - length
        total = int(starts[-1] + length[-1])
        marks = torch.arange(1, -(-total // _PIXELS_PER_CHUNK), device=length.device) * _PIXELS_PER_CHUNK
        cuts = [0, *torch.searchsorted(starts, marks).tolist(), length.shape[0]]
        for begin, end in zip(cuts[:-1], cuts[1:]):
            _zbuffer_runs(face_id[begin:end], start_pixel[begin:end], length[begin:end], start_inv_z[begin:end],
                          step_inv_z[begin:end], zbuffer)
    foreground = (zbuffer != _BACKGROUND_KEY).nonzero().squeeze(1)
    face_ids = torch.full_like(zbuffer, -1)
    face_ids[foreground] = zbuffer[foreground] & _LOW_32_BITS
    return face_ids, foreground


def _fragments(
    face_ids: torch.Tensor,
    foreground: torch.Tensor,
    bary: torch.Tensor,
    depth: torch.Tensor,
    shape: tuple[int, int, int],
) -> Fragments:
    """Dense, gradient-free fragments from the z-buffer pass and the covered pixels' barycentrics and depth."""
    batch, height, width = shape
    pixels = batch * height * width
    return Fragments(
        face_ids=face_ids.view(batch, height, width),
        bary=bary.detach().new_zeros(pixels, 3).index_put_((foreground,), bary.detach()).view(*shape, 3),
        depth=depth.detach().new_full((pixels,), math.inf).index_put_((foreground,), depth.detach()).view(*shape),
        foreground=foreground,
    )


def _rasterize_with_geometry(
    vertices_cam: torch.Tensor, faces: torch.Tensor, K: torch.Tensor, height: int, width: int, near: float
) -> tuple[Fragments, torch.Tensor]:
    """Fragments, and the covered pixels' barycentrics (N, 3) with gradient w.r.t. vertices and K."""
    _check_mesh(vertices_cam, faces)
    K = _batched_intrinsics(K, vertices_cam.shape[0], vertices_cam)
    face_ids, foreground = _visible_faces(vertices_cam, faces, K, height, width, near)
    pixels_xy, depth = _project(vertices_cam, K)
    bary, surface_depth = _foreground_geometry(pixels_xy, depth, faces, face_ids, foreground, height, width)
    return _fragments(face_ids, foreground, bary, surface_depth, (vertices_cam.shape[0], height, width)), bary


def rasterize(
    vertices_cam: torch.Tensor,
    faces: torch.Tensor,
    K: torch.Tensor,
    height: int,
    width: int,
    near: float = DEFAULT_NEAR,
) -> Fragments:
    """Find the nearest triangle under each pixel centre (no gradient). See the module docstring."""
    with torch.no_grad():
        fragments, _ = _rasterize_with_geometry(vertices_cam, faces, K, height, width, near)
    return fragments


def _foreground_geometry(
    pixels_xy: torch.Tensor,
    depth: torch.Tensor,
    faces: torch.Tensor,
    face_ids: torch.Tensor,
    foreground: torch.Tensor,
    height: int,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Perspective-correct barycentrics (N, 3) and depth (N,) at the covered pixels ``foreground``.

    Differentiable w.r.t. the projections ``pixels_xy`` (B, V, 2) and ``depth`` (B, V). Screen-space
    edge functions are taken relative to the pixel centre (small differences keep float32 accurate),
    weighted by each corner's inverse depth and renormalised: the nvdiffrast formulation.
    """
    batch, n_vertices = depth.shape
    screen = torch.cat((pixels_xy, 1.0 / depth.unsqueeze(-1)), dim=-1).reshape(batch * n_vertices, 3)
    image = torch.div(foreground, height * width, rounding_mode="floor")
    corners = faces.index_select(0, face_ids.index_select(0, foreground)) + (image * n_vertices).unsqueeze(1)
    corner_screen = screen.index_select(0, corners.reshape(-1)).view(-1, 3, 3)
    pixel = _pixel_centres(foreground, height, width, screen.dtype)
    # unbind, not indexing: its backward is one stack rather than a zero-filled copy per index.
    corner_x, corner_y, corner_inv_z = corner_screen.unbind(2)
    x0, x1, x2 = (corner_x - pixel[:, :1]).unbind(1)
    y0, y1, y2 = (corner_y - pixel[:, 1:]).unbind(1)
    # Edge function of corner k: twice the signed area of (pixel, corner k+1, corner k+2).
    edge = torch.stack((x1 * y2 - y1 * x2, x2 * y0 - y2 * x0, x0 * y1 - y0 * x1), dim=1)
    weight = edge * corner_inv_z
    weight_sum = weight.sum(dim=1, keepdim=True)
    return weight / weight_sum, (edge.sum(dim=1, keepdim=True) / weight_sum).squeeze(1)


def _foreground_barycentrics(
    fragments: Fragments, vertices_cam: torch.Tensor, faces: torch.Tensor, K: torch.Tensor
) -> torch.Tensor:
    """Barycentrics (N, 3) at ``fragments.foreground``, recomputed with gradient w.r.t. vertices and K."""
    _check_mesh(vertices_cam, faces)
    batch, height, width = fragments.shape
    pixels_xy, depth = _project(vertices_cam, _batched_intrinsics(K, batch, vertices_cam))
    bary, _ = _foreground_geometry(pixels_xy, depth, faces, fragments.face_ids.reshape(-1), fragments.foreground,
                                   height, width)
    return bary


def _foreground_images(fragments: Fragments) -> list[slice]:
    """For each image of the batch, the slice of ``fragments.foreground`` that lies in it (it is sorted)."""
    batch, height, width = fragments.shape
    marks = torch.arange(batch + 1, device=fragments.foreground.device) * (height * width)
    bounds = torch.searchsorted(fragments.foreground, marks).tolist()
    return [slice(begin, end) for begin, end in zip(bounds[:-1], bounds[1:])]


def _interpolate_foreground(
    attributes: torch.Tensor, attribute_faces: torch.Tensor, fragments: Fragments, bary: torch.Tensor
) -> torch.Tensor:
    """Interpolated attributes (N, C) at the foreground pixels from their barycentrics (N, 3)."""
    batch, height, width = fragments.shape
    face = fragments.face_ids.reshape(-1).index_select(0, fragments.foreground)
    corners = attribute_faces.index_select(0, face)  # (N, 3)
    if attributes.dim() == 3:
        image = torch.div(fragments.foreground, height * width, rounding_mode="floor")
        corners = corners + (image * attributes.shape[1]).unsqueeze(1)
        attributes = attributes.reshape(-1, attributes.shape[-1])
    values = attributes.index_select(0, corners.reshape(-1)).view(-1, 3, attributes.shape[-1]).unbind(1)
    weights = bary.to(attributes.dtype).unsqueeze(-1).unbind(1)
    # Three fused multiply-adds beat a batched (1 x 3) @ (3 x C) product on CPU.
    return torch.addcmul(torch.addcmul(weights[0] * values[0], weights[1], values[1]), weights[2], values[2])


def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` that does not copy a lone part (the common batch of one)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _scatter_image(values: torch.Tensor, fragments: Fragments) -> torch.Tensor:
    """Dense (B, H, W, C) image from per-foreground-pixel values (N, C), zeros elsewhere; differentiable."""
    batch, height, width = fragments.shape
    dense = values.new_zeros(batch * height * width, values.shape[-1])
    return dense.index_put_((fragments.foreground,), values).view(batch, height, width, -1)


def interpolate(
    attributes: torch.Tensor,
    faces: torch.Tensor,
    fragments: Fragments,
    vertices_cam: torch.Tensor,
    K: torch.Tensor,
    attribute_faces: torch.Tensor | None = None,
) -> torch.Tensor:
    """Perspective-correct (B, H, W, C) interpolation of ``attributes``; 0 on background.

    ``attributes`` is (B, V, C) or (V, C), indexed by ``faces`` or, for per-corner attributes such as UVs,
    by ``attribute_faces`` (F, 3). The barycentrics are recomputed from ``vertices_cam`` projected by
    ``K`` for each pixel's triangle in ``fragments``, so gradients reach the attributes, the vertices
    (interior pixels only) and K.
    """
    bary = _foreground_barycentrics(fragments, vertices_cam, faces, K)
    values = _interpolate_foreground(attributes, faces if attribute_faces is None else attribute_faces,
                                     fragments, bary)
    return _scatter_image(values, fragments)


def _texture_grid(uv: torch.Tensor) -> torch.Tensor:
    """OBJ-convention UVs (v up) to ``grid_sample`` coordinates (-1..1, y down)."""
    return torch.stack((2.0 * uv[..., 0] - 1.0, 1.0 - 2.0 * uv[..., 1]), dim=-1)


def _lookup(texture: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear samples (B, ..., C) of channels-last textures (B, Ht, Wt, C) at grid points (B, Gh, Gw, 2)."""
    sampled = F.grid_sample(texture.permute(0, 3, 1, 2), grid.to(texture.dtype), mode="bilinear",
                            padding_mode="border", align_corners=False)
    return sampled.permute(0, 2, 3, 1)


def sample_texture(texture: torch.Tensor, uv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Bilinear texture lookup (B, H, W, C) at OBJ-convention ``uv`` (B, H, W, 2); 0 where ``mask`` is False.

    ``texture`` is (B, Ht, Wt, C) or (Ht, Wt, C), row 0 at the top (v = 1). Gradients reach both.
    """
    if texture.dim() == 3:
        texture = texture.unsqueeze(0).expand(uv.shape[0], -1, -1, -1)
    return _lookup(texture, _texture_grid(uv)) * mask.unsqueeze(-1)


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unit vertex normals (B, V, 3): the sum of adjacent face normals weighted by face area."""
    corner0, corner1, corner2 = vertices[:, faces].unbind(2)
    # The cross product's length is twice the face area: summing it weights by area.
    face_normals = torch.linalg.cross(corner1 - corner0, corner2 - corner0)
    per_corner = face_normals.unsqueeze(2).expand(-1, -1, 3, -1).reshape(vertices.shape[0], -1, 3)
    summed = torch.zeros_like(vertices).index_add(1, faces.reshape(-1), per_corner)
    return F.normalize(summed, dim=-1, eps=1e-12)


def _sh_basis(normals: torch.Tensor) -> torch.Tensor:
    """The 9 scaled SH basis values (..., 9) of unit normals (..., 3)."""
    x, y, z = normals.unbind(-1)
    basis = torch.stack((torch.ones_like(x), x, y, z, x * y, x * z, y * z, x * x - y * y, 3.0 * z * z - 1.0), dim=-1)
    return basis * normals.new_tensor(SH_CONSTANTS)


def sh_shading(normals: torch.Tensor, sh_coeffs: torch.Tensor) -> torch.Tensor:
    """Irradiance (B, ..., 3) from unit normals (B, ..., 3) under 9 SH coefficients per colour (B, 9, 3).

    Basis order and constants are DECA's (:data:`SH_CONSTANTS`); the normals' frame is the frame the
    coefficients were estimated in (for DECA's: x right, y up, z toward the viewer).
    """
    basis = _sh_basis(normals).reshape(normals.shape[0], -1, 9)
    shading = torch.bmm(basis, sh_coeffs.to(basis.dtype))
    return shading.reshape(*normals.shape[:-1], sh_coeffs.shape[-1])


def render(
    vertices_cam: torch.Tensor,
    faces: torch.Tensor,
    K: torch.Tensor,
    height: int,
    width: int,
    sh_coeffs: torch.Tensor,
    vertex_colors: torch.Tensor | None = None,
    texture: torch.Tensor | None = None,
    uv_coords: torch.Tensor | None = None,
    uv_faces: torch.Tensor | None = None,
    near: float = DEFAULT_NEAR,
) -> RenderOutput:
    """Render a mesh lit by SH light: image = albedo * sh_shading(viewer-frame normal).

    Give the albedo either as ``vertex_colors`` ((B, V, 3) or (V, 3)) or as ``texture`` ((B, Ht, Wt, 3) or
    (Ht, Wt, 3)) with ``uv_coords`` (Vt, 2) and ``uv_faces`` (F, 3). ``sh_coeffs`` is (B, 9, 3).
    Gradients reach vertices, albedo and lighting at interior pixels.
    """
    if (vertex_colors is None) == (texture is None):
        raise ValueError("give exactly one of vertex_colors and texture")
    if texture is not None and (uv_coords is None or uv_faces is None):
        raise ValueError("a texture needs uv_coords and uv_faces")
    if sh_coeffs.shape != (vertices_cam.shape[0], 9, 3):
        raise ValueError(f"sh_coeffs must be ({vertices_cam.shape[0]}, 9, 3), got {tuple(sh_coeffs.shape)}")
    fragments, bary = _rasterize_with_geometry(vertices_cam, faces, K, height, width, near)
    images = _foreground_images(fragments)

    # Everything below works on the N covered pixels only and is scattered into images at the end.
    vertex_values = vertex_normals(vertices_cam, faces)
    if vertex_colors is not None:
        # Normals and colours in one gather: one scatter instead of two in the backward pass.
        colors = vertex_colors.to(vertex_values.dtype).expand(vertex_values.shape[0], -1, -1)
        vertex_values = torch.cat((vertex_values, colors), dim=-1)
    pixel_values = _interpolate_foreground(vertex_values, faces, fragments, bary)
    normals = F.normalize(pixel_values[:, :3], dim=-1, eps=1e-12)
    viewer_basis = _sh_basis(normals * normals.new_tensor(FLIP))
    shading = _concat([viewer_basis[pixels] @ sh_coeffs[b].to(normals.dtype) for b, pixels in enumerate(images)])
    if vertex_colors is not None:
        albedo = pixel_values[:, 3:]
    else:
        grid = _texture_grid(_interpolate_foreground(uv_coords, uv_faces, fragments, bary))
        textures = texture.unsqueeze(0).expand(len(images), -1, -1, -1) if texture.dim() == 3 else texture
        albedo = _concat([_lookup(textures[b:b + 1], grid[pixels].view(1, 1, -1, 2)).view(-1, texture.shape[-1])
                          for b, pixels in enumerate(images)])
    return RenderOutput(
        image=_scatter_image(albedo * shading, fragments),
        mask=fragments.mask,
        normals=_scatter_image(normals, fragments),
        albedo=_scatter_image(albedo, fragments),
        shading=_scatter_image(shading, fragments),
        fragments=fragments,
    )


def uv_sphere(n_faces: int, radius: float, centre: tuple[float, float, float],
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """A closed latitude-longitude sphere of about ``n_faces`` triangles, counter-clockwise seen from outside.

    Returns vertices (V, 3) and faces (F, 3) int64; used by the benchmark and the tests.
    """
    slices = max(3, round(math.sqrt(n_faces)))
    stacks = max(2, round(n_faces / (2 * slices)) + 1)
    polar = torch.linspace(0.0, math.pi, stacks + 1, dtype=torch.float64)[1:-1]
    azimuth = torch.arange(slices, dtype=torch.float64) * (2.0 * math.pi / slices)
    ring = torch.stack(
        (polar.sin()[:, None] * azimuth.cos()[None], polar.cos()[:, None].expand(-1, slices),
         polar.sin()[:, None] * azimuth.sin()[None]), dim=-1
    ).reshape(-1, 3)
    poles = torch.tensor([[0.0, 1.0, 0.0], [0.0, -1.0, 0.0]], dtype=torch.float64)
    vertices = torch.cat((ring, poles)) * radius + torch.tensor(centre, dtype=torch.float64)
    north, south = ring.shape[0], ring.shape[0] + 1
    j = torch.arange(slices)
    j_next = (j + 1) % slices
    triangles = [torch.stack((torch.full_like(j, north), j_next, j), dim=1)]
    for i in range(stacks - 2):
        upper, lower = i * slices, (i + 1) * slices
        triangles.append(torch.stack((upper + j, upper + j_next, lower + j), dim=1))
        triangles.append(torch.stack((upper + j_next, lower + j_next, lower + j), dim=1))
    last = (stacks - 2) * slices
    triangles.append(torch.stack((torch.full_like(j, south), last + j, last + j_next), dim=1))
    return vertices.to(device=device, dtype=dtype), torch.cat(triangles).to(device)


def benchmark_render(
    device: torch.device | str = "cpu", size: int = 256, n_faces: int = 10_000, repeats: int = 20
) -> dict[str, float | int | str]:
    """Median milliseconds of :func:`render` (forward) and of forward + backward on a lit sphere.

    The sphere (about ``n_faces`` triangles, half of them facing away) fills half of a ``size`` x
    ``size`` image, like a face crop; the backward pass differentiates w.r.t. vertices, colours and light.
    """
    device = torch.device(device)
    radius, distance = 0.1, 0.5
    vertices, faces = uv_sphere(n_faces, radius, (0.0, 0.0, distance), device)
    focal = 0.4 * size * distance / radius
    K = torch.tensor([[focal, 0.0, size / 2], [0.0, focal, size / 2], [0.0, 0.0, 1.0]], device=device)
    generator = torch.Generator().manual_seed(0)
    colors = torch.rand(1, vertices.shape[0], 3, generator=generator).to(device)
    sh = torch.zeros(1, 9, 3)
    sh[:, 0] = 3.0
    sh[:, 3] = 0.5
    sh = sh.to(device)

    vertices = vertices[None].requires_grad_(True)
    colors.requires_grad_(True)
    sh.requires_grad_(True)

    synchronize = synchronizer(device)

    def forward() -> RenderOutput:
        return render(vertices, faces, K, size, size, sh, vertex_colors=colors)

    def timed(with_backward: bool) -> float:
        synchronize()
        start = time.perf_counter()
        if with_backward:
            forward().image.mean().backward()
        else:
            with torch.no_grad():
                forward()
        synchronize()
        return (time.perf_counter() - start) * 1000.0

    for _ in range(2):  # warm-up: allocator, kernels
        timed(False)
        timed(True)
    forward_ms = [timed(False) for _ in range(repeats)]
    backward_ms = [timed(True) for _ in range(repeats)]
    return {
        "device": str(device),
        "size": size,
        "faces": int(faces.shape[0]),
        "covered_pixels": int(forward().mask.sum()),
        "forward_ms": statistics.median(forward_ms),
        "forward_backward_ms": statistics.median(backward_ms),
    }
