"""Intrinsics fitted to local point maps (`g2vlm_hf.modeling.intrinsics`), checked on rendered scenes whose camera
matrix is known exactly, and as a field of the model's reconstruction output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import geometry_block, tiny_model

from g2vlm_hf.modeling.intrinsics import estimate_intrinsics, rescale_intrinsics
from g2vlm_hf.training import render_room
from g2vlm_hf.training.synthetic import yaw_pose


def rendered_local_points(height: int, width: int, focal: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Local point maps `(views, H, W, 3)` of two rendered views (world points moved into each camera's frame) and
    their valid masks."""
    poses = np.stack([yaw_pose(0.0, 0.0, 0.0), yaw_pose(0.6, -0.5, 25.0)])
    scene = render_room(poses, height, width, focal=focal)
    rotation, translation = poses[:, None, None, :3, :3], poses[:, None, None, :3, 3]
    local = np.einsum("nhwji,nhwj->nhwi", rotation, scene.world_points.astype(np.float64) - translation)
    return torch.from_numpy(local), torch.from_numpy(scene.valid_mask)


def pinhole(focal: float, height: int, width: int) -> torch.Tensor:
    return torch.tensor([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]], dtype=torch.float64)


@pytest.mark.parametrize(("height", "width", "focal"), [(24, 32, 28.8), (42, 56, 20.0), (30, 30, 55.5)])
def test_exact_geometry_gives_the_renderers_intrinsics(height, width, focal):
    local, valid = rendered_local_points(height, width, focal)
    assert valid.all()  # the closed room: every ray hits a wall
    intrinsics = estimate_intrinsics(local)
    assert intrinsics.shape == (2, 3, 3) and intrinsics.dtype == torch.float64
    for view in intrinsics:
        torch.testing.assert_close(view, pinhole(focal, height, width), atol=1e-6, rtol=1e-9)


def test_low_confidence_and_invalid_pixels_are_left_out():
    height, width, focal = 24, 32, 28.8
    local, valid = rendered_local_points(height, width, focal)
    rng = np.random.default_rng(0)
    corrupted = torch.from_numpy(rng.random((2, height, width)) < 0.3)
    noisy = local.clone()
    noisy[corrupted] = noisy[corrupted] * torch.tensor([1.7, 0.4, 1.0], dtype=torch.float64)  # wrong rays
    confidence = torch.where(corrupted, 0.1, 5.0).to(torch.float64) + torch.rand(2, height, width, dtype=torch.float64)
    # Without the confidence the wrong rays pull the fit away; with it (or with the mask) the fit is exact again.
    assert (estimate_intrinsics(noisy) - pinhole(focal, height, width)).abs().max() > 1.0
    for view in estimate_intrinsics(noisy, confidence, confidence_quantile=0.5):
        torch.testing.assert_close(view, pinhole(focal, height, width), atol=1e-6, rtol=1e-9)
    for view in estimate_intrinsics(noisy, valid_mask=~corrupted & valid):
        torch.testing.assert_close(view, pinhole(focal, height, width), atol=1e-6, rtol=1e-9)
    # points behind the camera or NaN never take part
    noisy[corrupted] = torch.nan
    for view in estimate_intrinsics(noisy):
        torch.testing.assert_close(view, pinhole(focal, height, width), atol=1e-6, rtol=1e-9)


def test_view_without_usable_pixels_gives_nan_not_an_error():
    local, _ = rendered_local_points(12, 16, 14.0)
    local[1, ..., 2] = -1.0  # every point of view 1 behind its camera
    intrinsics = estimate_intrinsics(local.float())
    assert intrinsics.dtype == torch.float32
    assert torch.isfinite(intrinsics[0]).all()
    assert torch.isnan(intrinsics[1, [0, 0, 1, 1], [0, 2, 1, 2]]).all()
    with pytest.raises(ValueError, match="confidence_quantile"):
        estimate_intrinsics(local, torch.ones(local.shape[:-1]), confidence_quantile=1.0)
    with pytest.raises(ValueError, match="local_points"):
        estimate_intrinsics(local[..., :2])


def test_one_view_unbatched_and_every_pixel_kept_at_quantile_zero():
    height, width, focal = 24, 32, 28.8
    local, _ = rendered_local_points(height, width, focal)
    one_view = estimate_intrinsics(local[1])  # (H, W, 3): no batch dimension
    assert one_view.shape == (3, 3)
    torch.testing.assert_close(one_view, estimate_intrinsics(local)[1])
    noisy = local.clone()
    noisy[:, ::3] *= torch.tensor([1.7, 0.4, 1.0], dtype=torch.float64)  # wrong rays on every third row
    confidence = torch.rand(2, height, width, dtype=torch.float64)
    kept_all = estimate_intrinsics(noisy, confidence, confidence_quantile=0.0)
    torch.testing.assert_close(kept_all, estimate_intrinsics(noisy))
    assert (kept_all - pinhole(focal, height, width)).abs().max() > 1.0


def test_unusable_points_stay_out_whatever_their_confidence():
    height, width, focal = 24, 32, 28.8
    local, _ = rendered_local_points(height, width, focal)
    bad = torch.from_numpy(np.random.default_rng(1).random((2, height, width)) < 0.3)
    broken = local.clone()
    broken[bad & (torch.arange(width) % 2 == 0)] = torch.nan
    broken[..., 2][bad & (torch.arange(width) % 2 == 1)] *= -1.0  # behind the camera
    confidence = torch.full((2, height, width), 3.0, dtype=torch.float64)  # finite everywhere, bad points included
    for view in estimate_intrinsics(broken, confidence, confidence_quantile=0.0):
        torch.testing.assert_close(view, pinhole(focal, height, width), atol=1e-6, rtol=1e-9)


def test_an_axis_whose_rays_do_not_vary_gives_nan_there():
    # Only one column of view 1 is usable: its rays vary along y but along x only by the rounding of the renderer's
    # float32 points (about 1e-8), so fx and cx are not determined (NaN, as documented) while fy and cy are fitted.
    height, width, focal = 24, 32, 28.8
    local, _ = rendered_local_points(height, width, focal)
    column = torch.zeros(height, width, dtype=torch.bool)
    column[:, 7] = True
    rays_x = local[1, :, 7, 0] / local[1, :, 7, 2]
    assert 0 < rays_x.var() < 1e-12  # not exactly constant: the guard, not a division by zero, gives the NaN
    intrinsics = estimate_intrinsics(local[1], valid_mask=column)
    assert torch.isnan(intrinsics[0, [0, 2]]).all()
    torch.testing.assert_close(intrinsics[1, [1, 2]], pinhole(focal, height, width)[1, [1, 2]], atol=1e-6, rtol=1e-9)
    two = torch.zeros(height, width, dtype=torch.bool)
    two[3, 5] = two[17, 20] = True  # two pixels apart on both axes determine both lines
    torch.testing.assert_close(
        estimate_intrinsics(local[1], valid_mask=two), pinhole(focal, height, width), atol=1e-5, rtol=1e-9
    )


def test_rescale_maps_to_the_renderers_intrinsics_at_another_size():
    # The same camera rendered at 24x32 and at 48x96 (focal scaled with the width, aspect changed by a resize).
    small = estimate_intrinsics(rendered_local_points(24, 32, 28.8)[0])[0]
    mapped = rescale_intrinsics(small, (24, 32), (48, 96))
    expected = torch.tensor([[28.8 * 3, 0.0, 48.0], [0.0, 28.8 * 2, 24.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(mapped, expected, atol=1e-6, rtol=1e-9)
    torch.testing.assert_close(rescale_intrinsics(mapped, (48, 96), (24, 32)), small)
    for sizes in [((24, 0), (48, 96)), ((24, 32), (-48, 96)), ((24,), (48, 96)), ((24, 32), (48, 96, 3))]:
        with pytest.raises(ValueError, match="positive \\(height, width\\) pairs"):
            rescale_intrinsics(small, *sizes)


def test_rescale_takes_integer_intrinsics():
    """Hand-typed intrinsics are often integers: their scale factors were truncated to 0."""
    typed = torch.tensor([[500, 0, 320], [0, 500, 240], [0, 0, 1]])
    expected = torch.tensor([[250.0, 0.0, 160.0], [0.0, 250.0, 120.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(rescale_intrinsics(typed, (480, 640), (240, 320)), expected)


def test_numpy_arrays_are_refused_with_the_conversion_to_use():
    """A user with NumPy point maps (e.g. `output.local_points.numpy()`) or COLMAP's K gets a TypeError naming the
    argument and `torch.from_numpy`, not an AttributeError from inside the fit; the tensor call works."""
    local, valid = rendered_local_points(24, 32, 28.8)
    calls = {
        "local_points": lambda: estimate_intrinsics(local.numpy()),
        "confidence": lambda: estimate_intrinsics(local, valid.double().numpy()),
        "valid_mask": lambda: estimate_intrinsics(local, valid_mask=valid.numpy()),
        "intrinsics": lambda: rescale_intrinsics(pinhole(28.8, 24, 32).numpy(), (24, 32), (48, 64)),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=rf"`{name}` must be a torch.Tensor, got ndarray .*torch.from_numpy"):
            call()
    with pytest.raises(TypeError, match=r"`intrinsics` must be a torch.Tensor, got list\.$"):
        rescale_intrinsics([[1.0, 0.0, 0.5]] * 3, (1, 1), (2, 2))
    torch.testing.assert_close(estimate_intrinsics(local, valid_mask=valid)[0], pinhole(28.8, 24, 32))


def test_reconstruction_output_carries_intrinsics():
    model = tiny_model()
    views, grid_h, grid_w = 2, 2, 3
    ids = torch.tensor([[1, 5, *geometry_block(views, grid_h, grid_w)]])
    pixels = torch.randn(1, views, 3, grid_h * 14, grid_w * 14, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        output = model.reconstruct(input_ids=ids, geometry_pixel_values=pixels)
    batch, views, _, width, _ = output.local_points.shape
    assert output.intrinsics.shape == (batch, views, 3, 3) and output.intrinsics.dtype == torch.float32
    torch.testing.assert_close(output.intrinsics, estimate_intrinsics(output.local_points, output.confidence))
    assert torch.isfinite(output.intrinsics).all()
    # the fit is a least-squares one: on the kept pixels, K applied to the rays has zero mean residual
    rays = output.local_points[..., :2] / output.local_points[..., 2:]
    u = output.intrinsics[..., 0, 0, None, None] * rays[..., 0] + output.intrinsics[..., 0, 2, None, None]
    columns = torch.arange(width) + 0.5
    confident = output.confidence >= torch.quantile(output.confidence.flatten(-2), 0.5, dim=-1)[..., None, None]
    residual = torch.where(confident, u - columns, 0.0).sum((-2, -1))
    torch.testing.assert_close(residual, torch.zeros_like(residual), atol=1e-2, rtol=0)


def test_the_confidence_threshold_is_torchs_nanquantile_of_each_view():
    from g2vlm_hf.modeling.intrinsics import _nanquantile_rows

    scores = torch.rand(4, 997, generator=torch.Generator().manual_seed(0))
    scores[1, ::3] = torch.nan
    scores[2, :-1] = torch.nan  # one finite value
    scores[3] = torch.nan  # none
    for quantile in (0.0, 0.25, 0.5, 0.9):
        expected = torch.stack([torch.nanquantile(row, quantile) for row in scores])
        torch.testing.assert_close(_nanquantile_rows(scores, quantile), expected, equal_nan=True)


@pytest.mark.parametrize("side", [4, 128])
def test_whether_rays_vary_is_judged_per_pixel_not_by_the_pixel_count(side):
    """The fit is undetermined when a view's rays spread by under about 1e-6 (rounding of float32 points), whatever
    the resolution: rays spread by 3e-7 give NaN at 4x4 and at 128x128 pixels, and a (very long) lens whose rays spread
    by 2e-5 is still fitted exactly at both. The spread (standard deviation) of `side` pixel centres is
    sqrt((side^2 - 1) / 12) pixels, so the focal length is that over the rays' spread."""
    grid_spread = ((side**2 - 1) / 12) ** 0.5
    centre = side / 2
    v, u = torch.meshgrid(*[torch.arange(side, dtype=torch.float64) + 0.5] * 2, indexing="ij")
    depth = 2.0 + 0.1 * torch.rand(side, side, generator=torch.Generator().manual_seed(side), dtype=torch.float64)
    for ray_spread, fitted in ((3e-7, False), (2e-5, True)):
        focal = grid_spread / ray_spread
        points = torch.stack([(u - centre) / focal * depth, (v - centre) / focal * depth, depth], dim=-1)
        intrinsics = estimate_intrinsics(points)
        if fitted:
            torch.testing.assert_close(intrinsics, pinhole(focal, side, side), rtol=1e-6, atol=1e-6 * focal)
        else:
            assert torch.isnan(intrinsics[[0, 0, 1, 1], [0, 2, 1, 2]]).all()
