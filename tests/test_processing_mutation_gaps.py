"""Behaviour of the geometry image processor and of the intrinsics fit that the other tests left unchecked (found by
mutation testing). Expected values are worked out by hand or with NumPy, not read back from the code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from g2vlm_hf.modeling.intrinsics import MIN_DEPTH, _nanquantile_rows, estimate_intrinsics, rescale_intrinsics
from g2vlm_hf.processing.image_processing_geometry import G2VLMGeometryImageProcessor

# ---------------------------------------------------------------------------------------------------------------------
# intrinsics


def unprojected(fx: float, fy: float, cx: float, cy: float, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """`(H, W, 3)` float64 point map of a random-depth scene seen by the pinhole camera `fx, fy, cx, cy` (pixel centres
    at `j + 0.5, i + 0.5`)."""
    rng = np.random.default_rng(seed)
    depth = rng.uniform(1.0, 5.0, (height, width))
    v, u = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    points = np.stack([(u - cx) / fx * depth, (v - cy) / fy * depth, depth], axis=-1)
    return torch.from_numpy(points)


def matrix(fx: float, fy: float, cx: float, cy: float) -> torch.Tensor:
    return torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=torch.float64)


CAMERA = (9.5, 7.25, 4.3, 2.6)  # fx != fy, principal point off the image centre (8 x 6 grid)


def test_tied_confidences_at_the_threshold_are_kept():
    """Pixels whose confidence equals the view's quantile take part ("at least the quantile"): a view whose
    confidence is the same everywhere (or whose upper half is tied) is fitted, not turned into NaN."""
    points = unprojected(*CAMERA, 6, 8)
    uniform = torch.full((6, 8), 2.0, dtype=torch.float64)
    torch.testing.assert_close(estimate_intrinsics(points, uniform), matrix(*CAMERA), atol=1e-9, rtol=1e-9)
    # three quarters of the pixels tied at 2 (so the median is 2), the other quarter at 1 with wrong rays
    confidence = torch.full((6, 8), 2.0, dtype=torch.float64)
    confidence[:, ::4] = 1.0
    noisy = points.clone()
    noisy[:, ::4, 0] *= 3.0
    torch.testing.assert_close(estimate_intrinsics(noisy, confidence), matrix(*CAMERA), atol=1e-9, rtol=1e-9)


def test_points_at_exactly_the_minimum_depth_are_left_out():
    """`MIN_DEPTH` is documented as "depth at most this is not used": a point at exactly that depth (whose ray is
    huge) does not take part."""
    points = unprojected(*CAMERA, 6, 8)
    points[2, 3] = torch.tensor([1e-3, 1e-3, MIN_DEPTH], dtype=torch.float64)  # ray (1000, 1000)
    torch.testing.assert_close(estimate_intrinsics(points), matrix(*CAMERA), atol=1e-9, rtol=1e-9)
    points[2, 3, 2] = 2 * MIN_DEPTH  # just past the limit: the point is used and spoils the fit
    assert (estimate_intrinsics(points) - matrix(*CAMERA)).abs().max() > 1.0


def test_rays_that_vary_by_rounding_only_give_nan():
    """A column whose rays differ only at the 1e-7 level (variance 1e-14 per pixel, far below the 1e-12 guard) has an
    undetermined focal length: NaN along x, while y is still fitted."""
    height, width = 24, 8
    fy, cy = 20.0, 12.0
    depth = torch.linspace(1.0, 3.0, height, dtype=torch.float64)
    rays_x = 0.25 + 1e-7 * torch.tensor([(-1.0) ** i for i in range(height)], dtype=torch.float64)
    v = torch.arange(height, dtype=torch.float64) + 0.5
    column = torch.stack([rays_x * depth, (v - cy) / fy * depth, depth], dim=-1)
    points = torch.ones(height, width, 3, dtype=torch.float64)
    points[:, 5] = column
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[:, 5] = True
    intrinsics = estimate_intrinsics(points, valid_mask=mask)
    assert torch.isnan(intrinsics[0, [0, 2]]).all()
    torch.testing.assert_close(intrinsics[1, [1, 2]], torch.tensor([fy, cy], dtype=torch.float64))


def test_the_threshold_interpolates_up_to_the_largest_confidence():
    """The confidence quantile interpolates linearly between neighbouring values, up to the largest one (as
    `torch.nanquantile`): of 0, 1, 2, 3 the 0.9 quantile is 2.7, of two values 1 and 2 the median is 1.5."""
    rows = torch.tensor([[0.0, 3.0, 1.0, 2.0], [2.0, float("nan"), 1.0, float("nan")]], dtype=torch.float64)
    torch.testing.assert_close(_nanquantile_rows(rows, 0.9), torch.tensor([2.7, 1.9], dtype=torch.float64))
    torch.testing.assert_close(_nanquantile_rows(rows, 0.5), torch.tensor([1.5, 1.5], dtype=torch.float64))


def test_rescale_takes_a_side_of_one_pixel():
    """Sizes only need to be positive: a one-pixel-high strip maps like any other size."""
    intrinsics = matrix(3.0, 0.5, 2.0, 0.5)
    expected = matrix(6.0, 1.5, 4.0, 1.5)
    torch.testing.assert_close(rescale_intrinsics(intrinsics, (1, 4), (3, 8)), expected)
    torch.testing.assert_close(rescale_intrinsics(expected, (3, 8), (1, 4)), intrinsics)


# ---------------------------------------------------------------------------------------------------------------------
# geometry image processor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def blank(height: int, width: int, value: int = 0) -> np.ndarray:
    return np.full((height, width, 3), value, np.uint8)


def pixels(processor: G2VLMGeometryImageProcessor, views, **kwargs) -> torch.Tensor:
    return processor(views, **kwargs)["geometry_pixel_values"]


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        (480, 640, (392, 518)),  # 480 * 518 / 640 = 388.5 = 27.75 patches -> 28 (nearest, not floor)
        (640, 480, (686, 518)),  # 640 * 518 / 480 = 690.7 = 49.33 patches -> 49
        (280, 1036, (140, 518)),  # exactly 10 patches
    ],
)
def test_a_photo_becomes_518_wide_and_the_nearest_patch_multiple_high(height, width, expected):
    """The documented resize: width 518, height from the aspect ratio rounded to the nearest multiple of 14."""
    assert pixels(G2VLMGeometryImageProcessor(), [blank(height, width)]).shape == (1, 1, 3, *expected)


def test_a_height_of_one_patch_or_less_becomes_one_patch():
    """A 56x14 view at width 56 keeps one patch row (14 * 56 / 56 / 14 = 1), and a strip whose height rounds to zero
    patches still gets one (once the aspect limit is raised to let it through)."""
    assert pixels(G2VLMGeometryImageProcessor(target_width=56), [blank(14, 56)]).shape[-2:] == (14, 56)
    wide = G2VLMGeometryImageProcessor(max_aspect_ratio=100)
    assert pixels(wide, [blank(14, 1400)]).shape[-2:] == (14, 518)  # 14 * 518 / 1400 / 14 = 0.37 patches


def test_imagenet_normalisation_of_a_flat_colour():
    """Default normalisation: value / 255, minus the ImageNet mean, over the ImageNet std, per channel."""
    image = np.empty((480, 640, 3), np.uint8)
    image[...] = (255, 0, 128)
    out = pixels(G2VLMGeometryImageProcessor(), [image])[0, 0]
    expected = [(1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], -IMAGENET_MEAN[1] / IMAGENET_STD[1]]
    expected.append((128 / 255 - IMAGENET_MEAN[2]) / IMAGENET_STD[2])
    for channel, value in enumerate(expected):
        torch.testing.assert_close(out[channel], torch.full_like(out[channel], value), atol=1e-5, rtol=0)
    processor = G2VLMGeometryImageProcessor()
    assert processor.image_mean == list(IMAGENET_MEAN) and processor.image_std == list(IMAGENET_STD)


def test_max_views_is_inclusive():
    """`max_views` views are accepted; one more is refused."""
    processor = G2VLMGeometryImageProcessor(max_views=3)
    assert pixels(processor, [blank(14, 14)] * 3).shape[:2] == (1, 3)
    with pytest.raises(ValueError, match="4 views exceed max_views=3"):
        processor([blank(14, 14)] * 4)
    with pytest.raises(ValueError, match="257 views exceed max_views=256"):  # the default, before reading any
        G2VLMGeometryImageProcessor()(["never-read.png"] * 257)


def test_too_many_views_message_estimates_tokens_and_memory():
    """1000 views at width 518: 37 * 37 * 3 // 4 = 1026 tokens a 4:3 view, 1,026,000 in all, times 28 layers x K,V x
    2 heads x 128 dims x 2 bytes = 28672 bytes a token: 29.4 GB (checked before any image is read)."""
    with pytest.raises(ValueError, match=r"about 1026 geometry tokens.*about 1,026,000 tokens.*about 29 GB"):
        G2VLMGeometryImageProcessor()(["never-read.png"] * 1000)


def test_the_token_limit_is_inclusive_and_defaults_to_4096():
    """A 640x480 photo gives 37 x 28 = 1036 tokens: accepted with `max_tokens_per_view=1036`, refused with 1035; by
    default 64 x 64 = 4096 tokens pass and 17 x 241 = 4097 do not."""
    photo = blank(480, 640)
    assert pixels(G2VLMGeometryImageProcessor(max_tokens_per_view=1036), [photo]).shape[-2:] == (392, 518)
    with pytest.raises(ValueError, match="1,036 tokens"):
        G2VLMGeometryImageProcessor(max_tokens_per_view=1035)([photo])
    assert pixels(G2VLMGeometryImageProcessor(target_width=896), [blank(896, 896)]).shape[-2:] == (896, 896)
    tall = G2VLMGeometryImageProcessor(target_width=238, max_aspect_ratio=20)
    with pytest.raises(ValueError, match="4,097 tokens"):
        tall([blank(241 * 14, 238)])


def test_the_aspect_limit_is_inclusive_and_defaults_to_four():
    """A 4:1 view passes the default limit, a 4.5:1 one does not; `max_aspect_ratio=1` (its smallest value) is
    accepted and lets only square views through."""
    assert pixels(G2VLMGeometryImageProcessor(), [blank(140, 560)]).shape[-2:] == (126, 518)  # 9.25 patches -> 9
    with pytest.raises(ValueError, match=r"aspect 4\.5:1"):
        G2VLMGeometryImageProcessor()([blank(100, 450)])
    square_only = G2VLMGeometryImageProcessor(max_aspect_ratio=1)
    assert pixels(square_only, [blank(40, 40)]).shape[-2:] == (518, 518)
    with pytest.raises(ValueError, match="aspect"):
        square_only([blank(40, 42)])
    G2VLMGeometryImageProcessor(max_aspect_ratio=1.5)  # any number of at least 1


def test_without_resize_sides_go_down_to_patch_multiples_bilinearly():
    """`do_resize=False`: a 45x30 view becomes 42x28, resampled as PIL's antialiased bilinear resize does."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (45, 30, 3), dtype=np.uint8)
    out = pixels(G2VLMGeometryImageProcessor(do_resize=False, do_normalize=False), [image])
    assert out.shape == (1, 1, 3, 42, 28)
    for channel in range(3):
        plane = Image.fromarray(image[..., channel].astype(np.float32) / 255.0)  # mode "F"
        expected = torch.from_numpy(np.array(plane.resize((28, 42), Image.Resampling.BILINEAR)))
        torch.testing.assert_close(out[0, 0, channel], expected, atol=1e-5, rtol=0)
    assert pixels(G2VLMGeometryImageProcessor(do_resize=False), [blank(20, 20)]).shape[-2:] == (14, 14)


def test_size_mismatch_messages_name_both_sizes():
    """The errors for views of different sizes say which view is which size."""
    views = [blank(30, 40), blank(40, 30)]
    with pytest.raises(ValueError, match="View 1 is 30x40 but the first view is 40x30"):
        G2VLMGeometryImageProcessor()(views)
    with pytest.raises(ValueError, match=r"got \(30, 40\) and \(40, 30\)"):
        G2VLMGeometryImageProcessor(do_resize=False)(views)


def test_resize_views_to_first_gives_every_view_the_first_views_size():
    """With `resize_views_to_first`, a 320x240 view after a 640x480 one is resized to the first view's 518x392 and
    keeps its (flat) colour."""
    processor = G2VLMGeometryImageProcessor(resize_views_to_first=True, do_normalize=False)
    out = pixels(processor, [blank(480, 640, 10), blank(240, 320, 200)])
    assert out.shape == (1, 2, 3, 392, 518)
    torch.testing.assert_close(out[0, 1], torch.full_like(out[0, 1], 200 / 255), atol=1e-6, rtol=0)


def test_unnormalize_gives_back_the_image():
    """`unnormalize` inverts the scaling and ImageNet normalisation exactly for a view that needs no resize, and gives
    `(..., H, W, 3)` uint8."""
    image = np.random.default_rng(1).integers(0, 256, (28, 42, 3), dtype=np.uint8)
    processor = G2VLMGeometryImageProcessor(target_width=42)
    restored = processor.unnormalize(pixels(processor, [image]))[0, 0]
    assert restored.dtype == torch.uint8 and torch.equal(restored, torch.from_numpy(image))
    # values outside the image range (e.g. edited or predicted pixels) saturate at 0 and 255 instead of wrapping
    outside = torch.stack([torch.full((3, 2, 2), 10.0), torch.full((3, 2, 2), -10.0)])
    assert processor.unnormalize(outside).tolist() == [[[[255] * 3] * 2] * 2, [[[0] * 3] * 2] * 2]


def test_a_side_of_one_patch_is_enough():
    """Views of at least 14 pixels a side are taken; a 13-pixel side is refused, naming the view and its size."""
    assert pixels(G2VLMGeometryImageProcessor(), [blank(14, 14)]).shape[-2:] == (518, 518)
    with pytest.raises(ValueError, match="View 1 is 40x13 pixels, smaller than one 14x14 patch"):
        G2VLMGeometryImageProcessor(resize_views_to_first=True)([blank(14, 14), blank(13, 40)])


def test_depth_post_processing_without_target_sizes_keeps_the_depth():
    """`post_process_depth_estimation` without `target_sizes` returns each view's depth as it is, one dict a view."""
    depth = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(0))
    results = G2VLMGeometryImageProcessor().post_process_depth_estimation({"predicted_depth": depth})
    assert len(results) == 2
    for view, result in zip(depth, results, strict=True):
        assert torch.equal(result["predicted_depth"], view)
