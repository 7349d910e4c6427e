"""The differentiable renderer against analytic scenes: coverage, depth, barycentrics, occlusion, silhouettes,
finite-difference gradients, batching, textures and spherical-harmonics lighting."""

from __future__ import annotations

import math

import pytest
import torch

from engine.render import (
    SH_CONSTANTS,
    Fragments,
    benchmark_render,
    interpolate,
    rasterize,
    render,
    sample_texture,
    sh_shading,
    uv_sphere,
    vertex_normals,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seeded_random() -> None:
    torch.manual_seed(0)


def intrinsics(focal: float, cx: float, cy: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor([[focal, 0.0, cx], [0.0, focal, cy], [0.0, 0.0, 1.0]], dtype=dtype)


def unproject(pixels: list[tuple[float, float]], depth: float, K: torch.Tensor) -> torch.Tensor:
    """Camera-space points (N, 3) at ``depth`` that project to ``pixels``."""
    uv = torch.tensor(pixels, dtype=K.dtype)
    x = (uv[:, 0] - K[0, 2]) * depth / K[0, 0]
    y = (uv[:, 1] - K[1, 2]) * depth / K[1, 1]
    return torch.stack((x, y, torch.full_like(x, depth)), dim=1)


def pixel_centres(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    return xs, ys


# A quad split along a diagonal that passes through no pixel centre: 7(j + 0.5 - 40) = 10(i + 0.5 - 60)
# has no integer solution, so the coverage is exact without tie rules.
QUAD_PIXELS = [(40.0, 60.0), (140.0, 60.0), (140.0, 130.0), (40.0, 130.0)]
QUAD_FACES = torch.tensor([[0, 1, 2], [0, 2, 3]])


@pytest.mark.parametrize("device", DEVICES)
def test_quad_facing_the_camera_covers_exactly_its_pixels(device: str) -> None:
    K = intrinsics(200.0, 100.0, 80.0)
    vertices = unproject(QUAD_PIXELS, 2.0, K)[None].to(device)
    fragments = rasterize(vertices, QUAD_FACES.to(device), K.to(device), 160, 200)

    expected = torch.zeros(160, 200, dtype=torch.bool)
    expected[60:130, 40:140] = True
    assert fragments.mask[0].cpu().equal(expected)
    assert int(fragments.mask.sum()) == 100 * 70  # the quad's area in pixels
    assert torch.allclose(fragments.depth[0][expected].cpu(), torch.tensor(2.0))
    assert torch.isinf(fragments.depth[0][~expected]).all()
    assert (fragments.face_ids[0][~expected] == -1).all()
    assert (fragments.bary[0][~expected] == 0).all()
    # Pixels above the diagonal belong to face 0, below it to face 1.
    assert int(fragments.face_ids[0, 61, 138]) == 0 and int(fragments.face_ids[0, 128, 42]) == 1
    assert fragments.foreground.equal(fragments.mask.reshape(-1).nonzero().squeeze(1))


def test_barycentrics_and_depth_are_perspective_correct_on_a_tilted_triangle() -> None:
    K = intrinsics(300.0, 64.0, 48.0, torch.float64)
    corners = torch.tensor([[-0.4, -0.3, 1.5], [0.5, -0.2, 3.0], [0.0, 0.4, 2.2]], dtype=torch.float64)
    fragments = rasterize(corners[None], torch.tensor([[0, 1, 2]]), K, 96, 128)
    assert int(fragments.mask.sum()) > 500

    bary = fragments.bary[0][fragments.mask[0]]
    points = bary @ corners  # the 3D points the barycentrics name
    projected = points @ K.T
    xs, ys = pixel_centres(96, 128)
    centres = torch.stack((xs[fragments.mask[0]], ys[fragments.mask[0]]), dim=1).double()
    # Each pixel's barycentrics name the surface point seen through that pixel centre, at that depth.
    assert torch.allclose(projected[:, :2] / projected[:, 2:], centres, atol=1e-9)
    assert torch.allclose(points[:, 2], fragments.depth[0][fragments.mask[0]], atol=1e-12)
    assert torch.allclose(bary.sum(dim=1), torch.ones(len(bary), dtype=torch.float64))
    assert (bary > -1e-6).all()


def test_nearer_triangle_wins_whatever_the_order() -> None:
    K = intrinsics(100.0, 32.0, 32.0)
    near = unproject([(8.0, 8.0), (48.0, 8.0), (8.0, 48.0)], 1.0, K)  # x > 8, y > 8, x + y < 56
    far = unproject([(20.0, 20.0), (60.0, 20.0), (20.0, 60.0)], 2.0, K)  # x > 20, y > 20, x + y < 80
    xs, ys = pixel_centres(64, 64)
    in_near = (xs > 9) & (ys > 9) & (xs + ys < 55)
    in_far = (xs > 21) & (ys > 21) & (xs + ys < 79)
    only_far = in_far & (xs + ys > 57)
    for order in ((near, far), (far, near)):
        near_id = 0 if order[0] is near else 1
        fragments = rasterize(torch.cat(order)[None], torch.tensor([[0, 1, 2], [3, 4, 5]]), K, 64, 64)
        face_ids, depth = fragments.face_ids[0], fragments.depth[0]
        assert (face_ids[in_near] == near_id).all() and torch.allclose(depth[in_near], torch.tensor(1.0))
        assert (face_ids[only_far] == 1 - near_id).all() and torch.allclose(depth[only_far], torch.tensor(2.0))
        assert int((in_near & in_far).sum()) > 50  # the overlap is really there


@pytest.mark.parametrize("device", DEVICES)
def test_sphere_silhouette_matches_the_analytic_disc(device: str) -> None:
    radius, distance, focal, size = 0.1, 0.5, 400.0, 160
    vertices, faces = uv_sphere(4000, radius, (0.0, 0.0, distance), device)
    K = intrinsics(focal, size / 2, size / 2).to(device)
    fragments = rasterize(vertices[None], faces, K, size, size)

    disc_radius = focal * radius / math.sqrt(distance**2 - radius**2)  # image of the tangent cone
    xs, ys = pixel_centres(size, size)
    r = torch.hypot(xs - size / 2, ys - size / 2)
    mask = fragments.mask[0].cpu()
    # The tessellated sphere is inscribed in the true one: a thin band at the rim may be missing.
    assert mask[r < disc_radius - 1.0].all()  # watertight: no holes between triangles
    assert not mask[r > disc_radius + 0.5].any()
    assert abs(int(mask.sum()) / (math.pi * disc_radius**2) - 1.0) < 0.02
    centre_depth = float(fragments.depth[0, size // 2, size // 2])
    assert centre_depth == pytest.approx(distance - radius, abs=5e-4)  # within the facets' sag
    # Every visible pixel shows the front half: only faces whose outward normal faces the camera.
    surface = fragments.bary[0][mask.to(device)].unsqueeze(-1) * vertices[faces[fragments.face_ids[0][mask.to(device)]]]
    assert (surface.sum(dim=1)[:, 2] < distance).all()


def test_edges_through_pixel_centres_leave_no_cracks() -> None:
    # A grid mesh with every vertex on a pixel centre: horizontal, vertical and diagonal edges all run
    # through pixel centres, the worst case for rounding at shared edges.
    K = intrinsics(123.4, 31.7, 32.9)  # inexact in binary: projections land a rounding error off centre
    steps = torch.arange(11) * 4.0 + 10.5
    grid_pixels = [(float(x), float(y)) for y in steps for x in steps]
    vertices = unproject(grid_pixels, 1.3, K)[None]
    index = torch.arange(121).view(11, 11)
    top_left, top_right = index[:-1, :-1].reshape(-1), index[:-1, 1:].reshape(-1)
    bottom_left, bottom_right = index[1:, :-1].reshape(-1), index[1:, 1:].reshape(-1)
    faces = torch.cat((torch.stack((top_left, bottom_left, bottom_right), 1),
                       torch.stack((top_left, bottom_right, top_right), 1)))
    fragments = rasterize(vertices, faces, K, 64, 64)
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[10:51, 10:51] = True  # centres 10.5 .. 50.5, the mesh's border included
    assert fragments.mask[0].equal(expected)


def test_clipped_triangle_larger_than_the_image_covers_every_pixel() -> None:
    K = intrinsics(50.0, 20.0, 15.0)
    vertices = unproject([(-500.0, -500.0), (900.0, -400.0), (-300.0, 900.0)], 1.0, K)[None]
    fragments = rasterize(vertices, torch.tensor([[0, 1, 2]]), K, 30, 40)
    assert fragments.mask.all()


def test_triangles_reaching_behind_the_near_plane_are_culled() -> None:
    K = intrinsics(100.0, 32.0, 32.0)
    vertices = torch.tensor([[[-0.2, -0.2, 1.0], [0.2, -0.2, 1.0], [0.0, 0.2, -0.5]]])
    fragments = rasterize(vertices, torch.tensor([[0, 1, 2]]), K, 64, 64)
    assert not fragments.mask.any()


def tilted_scene(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A small two-triangle quad, tilted against the image plane, in a 20 x 24 image."""
    K = intrinsics(40.0, 12.0, 10.0, dtype)
    vertices = torch.tensor(
        [[-0.22, -0.18, 1.0], [0.2, -0.2, 1.3], [0.23, 0.16, 1.2], [-0.2, 0.2, 0.9]], dtype=dtype
    )[None]
    return vertices, QUAD_FACES, K


def interior_pixels(fragments: Fragments, margin: int = 1) -> torch.Tensor:
    """Pixels whose whole (2 margin + 1)^2 neighbourhood shows the same face: away from all edges."""
    ids = fragments.face_ids.double().unsqueeze(1)
    kernel = 2 * margin + 1
    same = (torch.nn.functional.max_pool2d(ids, kernel, 1, margin) == -torch.nn.functional.max_pool2d(
        -ids, kernel, 1, margin)).squeeze(1)
    return same & fragments.mask


def test_interpolation_gradients_match_finite_differences() -> None:
    vertices, faces, K = tilted_scene()
    fragments = rasterize(vertices, faces, K, 20, 24)
    attributes = torch.rand(4, 2, dtype=torch.float64, requires_grad=True)
    vertices = vertices.clone().requires_grad_(True)
    # Fixed visibility: the interpolated values are smooth in attributes and vertex positions everywhere.
    assert torch.autograd.gradcheck(lambda a, v: interpolate(a, faces, fragments, v, K), (attributes, vertices))


def test_render_gradients_match_finite_differences_at_interior_pixels() -> None:
    vertices, faces, K = tilted_scene()
    colors = torch.rand(4, 3, dtype=torch.float64)
    sh = torch.zeros(1, 9, 3, dtype=torch.float64)
    sh[0, 0], sh[0, 3], sh[0, 2], sh[0, 4] = 3.0, 0.8, -0.3, 0.2
    reference = rasterize(vertices, faces, K, 20, 24)
    interior = interior_pixels(reference)
    assert int(interior.sum()) > 50
    weights = torch.rand(1, 20, 24, 3, dtype=torch.float64) * interior.unsqueeze(-1)

    def loss(v: torch.Tensor, c: torch.Tensor, light: torch.Tensor) -> torch.Tensor:
        out = render(v, faces, K, 20, 24, light, vertex_colors=c)
        assert out.fragments.face_ids[interior].equal(reference.face_ids[interior])  # visibility unchanged
        return (out.image * weights).sum()

    inputs = (vertices.clone().requires_grad_(True), colors.clone().requires_grad_(True),
              sh.clone().requires_grad_(True))
    analytic = torch.autograd.grad(loss(*inputs), inputs)
    eps = 1e-6
    for which, (tensor, grad) in enumerate(zip(inputs, analytic)):
        numeric = torch.zeros_like(tensor)
        for index in range(tensor.numel()):
            step = torch.zeros(tensor.numel(), dtype=tensor.dtype)
            step[index] = eps
            step = step.view_as(tensor)
            shifted = [t.detach() for t in inputs]
            plus, minus = list(shifted), list(shifted)
            plus[which] = shifted[which] + step
            minus[which] = shifted[which] - step
            numeric.view(-1)[index] = (loss(*plus) - loss(*minus)) / (2 * eps)
        assert torch.allclose(grad, numeric, rtol=1e-5, atol=1e-7), f"input {which}"
    assert analytic[0].abs().sum() > 0  # the vertex gradient is really there


def test_texture_gradient_and_uv_orientation() -> None:
    K = intrinsics(100.0, 32.0, 32.0, torch.float64)
    vertices = unproject([(8.0, 8.0), (56.0, 8.0), (56.0, 56.0), (8.0, 56.0)], 1.0, K)[None]
    uv_coords = torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    texture = torch.zeros(8, 8, 3, dtype=torch.float64)
    texture[:4, :, 0] = 1.0  # top half red
    texture[4:, :, 2] = 1.0  # bottom half blue
    sh = torch.zeros(1, 9, 3, dtype=torch.float64)
    sh[0, 0] = 1.0 / SH_CONSTANTS[0]  # uniform light: shading 1
    out = render(vertices, QUAD_FACES, K, 64, 64, sh, texture=texture, uv_coords=uv_coords, uv_faces=QUAD_FACES)
    # v = 1 (top vertices) samples the texture's top row.
    assert torch.allclose(out.image[0, 12, 32], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(out.image[0, 52, 32], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    assert torch.allclose(out.shading[out.mask], torch.tensor(1.0, dtype=torch.float64))
    assert (out.image[~out.mask] == 0).all()

    small_texture = torch.rand(1, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    fragments = rasterize(vertices, QUAD_FACES, K, 12, 12)
    uv = interpolate(uv_coords, QUAD_FACES, fragments, vertices, K, attribute_faces=QUAD_FACES)
    assert torch.autograd.gradcheck(lambda t: sample_texture(t, uv, fragments.mask), (small_texture,))


def test_batched_rendering_equals_rendering_each_item() -> None:
    vertices, faces = uv_sphere(600, 0.1, (0.0, 0.0, 0.0))
    angle = 0.4
    rotation = torch.tensor([[math.cos(angle), 0.0, math.sin(angle)], [0.0, 1.0, 0.0],
                             [-math.sin(angle), 0.0, math.cos(angle)]])
    poses = torch.stack((vertices + torch.tensor([0.0, 0.0, 0.5]),
                         vertices @ rotation.T + torch.tensor([0.03, -0.02, 0.6])))
    Ks = torch.stack((intrinsics(150.0, 40.0, 32.0), intrinsics(170.0, 38.0, 30.0)))
    colors = torch.rand(2, vertices.shape[0], 3)
    sh = torch.randn(2, 9, 3) * 0.3
    sh[:, 0] += 3.0
    batched = render(poses, faces, Ks, 64, 80, sh, vertex_colors=colors)
    for item in range(2):
        single = render(poses[item:item + 1], faces, Ks[item], 64, 80, sh[item:item + 1],
                        vertex_colors=colors[item])
        assert batched.fragments.face_ids[item].equal(single.fragments.face_ids[0])
        assert torch.allclose(batched.fragments.bary[item], single.fragments.bary[0], atol=1e-6)
        assert torch.allclose(batched.image[item], single.image[0], atol=1e-5)
        assert torch.allclose(batched.normals[item], single.normals[0], atol=1e-6)
    assert not batched.fragments.face_ids[0].equal(batched.fragments.face_ids[1])


def test_vertex_normals_are_area_weighted_and_outward() -> None:
    # Vertex 0 is shared by a large face in the z = 0 plane and a small one in the x = 0 plane.
    vertices = torch.tensor([[[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0],
                              [0.0, 1.0, 0.0]]])
    faces = torch.tensor([[0, 1, 2], [0, 4, 3]])
    normal = vertex_normals(vertices, faces)[0, 0]
    expected = torch.nn.functional.normalize(torch.tensor([0.5, 0.0, 2.0]), dim=0)  # areas 2 and 0.5
    assert torch.allclose(normal, expected, atol=1e-6)

    sphere, sphere_faces = uv_sphere(800, 1.0, (0.0, 0.0, 0.0))
    normals = vertex_normals(sphere[None], sphere_faces)[0]
    assert ((normals * sphere).sum(dim=1) > 0.99).all()


def test_sh_shading_uses_deca_constants_and_approximates_a_lambertian_light() -> None:
    normals = torch.nn.functional.normalize(torch.randn(1, 200, 3, dtype=torch.float64), dim=-1)
    coeffs = torch.zeros(1, 9, 3, dtype=torch.float64)
    coeffs[0, 3, 0] = 1.0  # the z basis in red only
    shading = sh_shading(normals, coeffs)
    assert torch.allclose(shading[..., 0], SH_CONSTANTS[3] * normals[..., 2])
    assert (shading[..., 1:] == 0).all()

    # A distant light from direction l projected on real SH, Y_lm(l), gives the irradiance of a Lambertian
    # surface, max(0, n.l), up to the known error of the 9-term approximation. SH_CONSTANTS are the SH
    # normalisations times the convolution factors (pi, 2pi/3, pi/4), except that DECA leaves the pi out of
    # the constant term: its coefficient carries it.
    light = torch.nn.functional.normalize(torch.tensor([0.3, 0.5, 0.8], dtype=torch.float64), dim=0)
    convolution = torch.tensor([1.0] + [2 * math.pi / 3] * 3 + [math.pi / 4] * 5, dtype=torch.float64)
    x, y, z = light
    basis = torch.stack((torch.tensor(1.0, dtype=torch.float64), x, y, z, x * y, x * z, y * z, x * x - y * y,
                         3 * z * z - 1))
    light_coeffs = torch.tensor(SH_CONSTANTS, dtype=torch.float64) / convolution * basis
    light_coeffs[0] *= math.pi
    irradiance = sh_shading(normals, light_coeffs.view(1, 9, 1).expand(1, 9, 3))[..., 0]
    lambert = (normals @ light).clamp(min=0)
    assert (irradiance - lambert).abs().max() < 0.1
    at_light = sh_shading(light.view(1, 1, 3), light_coeffs.view(1, 9, 1))
    assert float(at_light) == pytest.approx(1.0625)  # n = l: 1/4 + 1/2 + 5/16 for bands 0, 1, 2


def test_render_lights_in_the_world_frame() -> None:
    # Counter-clockwise on screen: facing the camera, camera-space normal (0, 0, -1), world normal (0, 0, +1).
    K = intrinsics(100.0, 32.0, 32.0)
    vertices = unproject([(8.0, 8.0), (56.0, 8.0), (56.0, 56.0), (8.0, 56.0)], 1.0, K)[None]
    facing_faces = QUAD_FACES.flip(1)
    sh = torch.zeros(1, 9, 3)
    sh[0, 3] = 1.0
    out = render(vertices, facing_faces, K, 64, 64, sh, vertex_colors=torch.ones(4, 3))
    assert torch.allclose(out.normals[0, 32, 32], torch.tensor([0.0, 0.0, -1.0]), atol=1e-6)
    assert torch.allclose(out.image[0, 32, 32], torch.full((3,), SH_CONSTANTS[3]), atol=1e-6)


def test_benchmark_reports_medians() -> None:
    result = benchmark_render("cpu", size=64, n_faces=500, repeats=2)
    assert abs(result["faces"] - 500) < 50 and result["covered_pixels"] > 0
    assert result["forward_ms"] > 0 and result["forward_backward_ms"] > 0
