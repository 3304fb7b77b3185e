"""Pinhole camera intrinsics recovered from per-pixel local point maps.

A pinhole camera sends a point `(x, y, z)` of its (OpenCV) frame to the pixel `(u, v) = (fx x / z + cx, fy y / z + cy)`.
Given the point map of a view (one 3D point per pixel, in the camera's frame) the pixel of each point is known, so
`fx, cx` and `fy, cy` are each the solution of a two-unknown linear least-squares problem over the valid pixels:

    minimise  sum_p w_p (fx a_p + cx - u_p)^2    with a_p = x_p / z_p       (and the same for fy, cy with y_p / z_p)

solved in closed form from the 2x2 normal equations. Pixel coordinates follow the COLMAP/OpenCV continuous convention:
the image spans `[0, W] x [0, H]` and the centre of pixel `(row i, column j)` is `(u, v) = (j + 0.5, i + 0.5)`, so a
resize by `s` scales `fx, cx` (or `fy, cy`) by exactly `s` (see [`rescale_intrinsics`]).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .tensor_checks import require_tensor

__all__ = ["estimate_intrinsics", "rescale_intrinsics"]

#: Pixels whose depth is at most this are not used (the ray direction `x / z` is undefined at z = 0).
MIN_DEPTH = 1e-6


def estimate_intrinsics(
    local_points: torch.Tensor,
    confidence: torch.Tensor | None = None,
    *,
    valid_mask: torch.Tensor | None = None,
    confidence_quantile: float = 0.5,
) -> torch.Tensor:
    """Least-squares pinhole intrinsics of each view from its local point map.

    Args:
        local_points (`torch.Tensor` of shape `(..., H, W, 3)`):
            Per-pixel points in each camera's frame (x right, y down, z forward), e.g.
            `G2VLMReconstructionOutput.local_points`.
        confidence (`torch.Tensor` of shape `(..., H, W)`, *optional*):
            Per-pixel confidence, higher is more reliable. When given, only the pixels of a view whose confidence is
            at least the view's `confidence_quantile` quantile take part.
        valid_mask (`torch.BoolTensor` of shape `(..., H, W)`, *optional*):
            Pixels allowed to take part (e.g. the pixels that hit a surface). Points must also be finite with z > 0.
        confidence_quantile (`float`, *optional*, defaults to 0.5):
            In `[0, 1)`: the fraction of a view's least confident valid pixels left out.

    Returns:
        `torch.Tensor` of shape `(..., 3, 3)`, float32 (float64 for float64 input): `[[fx, 0, cx], [0, fy, cy],
        [0, 0, 1]]` in pixels of the point map's `W x H` grid. A view with fewer than two usable pixels along an axis
        (or whose rays do not vary along it) gets NaN in that axis' focal length and principal point.

    Raises:
        TypeError: When an array is not a `torch.Tensor` (NumPy arrays: `torch.from_numpy(array)`).
        ValueError: On mismatched shapes or a quantile outside `[0, 1)`.
    """
    require_tensor("local_points", local_points)
    require_tensor("confidence", confidence, optional=True)
    require_tensor("valid_mask", valid_mask, optional=True)
    if local_points.ndim < 3 or local_points.shape[-1] != 3:
        raise ValueError(f"`local_points` must have shape (..., H, W, 3), got {tuple(local_points.shape)}")
    if not 0.0 <= confidence_quantile < 1.0:
        raise ValueError(f"`confidence_quantile` must be in [0, 1), got {confidence_quantile}")
    # float32 suffices (the fit uses centred sums) and halves the bytes; float64 input keeps float64
    dtype = torch.float64 if local_points.dtype == torch.float64 else torch.float32
    points = local_points.detach().to(dtype)
    height, width = points.shape[-3], points.shape[-2]
    x, y, z = points.unbind(-1)
    usable = torch.isfinite(points).all(-1) & (z > MIN_DEPTH)
    if valid_mask is not None:
        if valid_mask.shape != usable.shape:
            raise ValueError(f"`valid_mask` must have shape {tuple(usable.shape)}, got {tuple(valid_mask.shape)}")
        usable = usable & valid_mask.to(device=usable.device, dtype=torch.bool)
    if confidence is not None:
        if confidence.shape != usable.shape:
            raise ValueError(f"`confidence` must have shape {tuple(usable.shape)}, got {tuple(confidence.shape)}")
        scores = confidence.detach().to(device=points.device, dtype=dtype)
        usable = usable & torch.isfinite(scores)
        if confidence_quantile > 0.0:
            flat = torch.where(usable, scores, torch.nan).reshape(-1, height * width)
            threshold = _nanquantile_rows(flat, confidence_quantile).reshape(usable.shape[:-2])
            usable = usable & (scores >= threshold[..., None, None])  # a view without usable pixels: NaN, none kept

    weights = usable.to(dtype)
    safe_z = torch.where(usable, z, torch.ones_like(z))
    ray_x = torch.where(usable, x / safe_z, torch.zeros_like(x))
    ray_y = torch.where(usable, y / safe_z, torch.zeros_like(y))
    v, u = torch.meshgrid(
        torch.arange(height, dtype=dtype, device=points.device) + 0.5,
        torch.arange(width, dtype=dtype, device=points.device) + 0.5,
        indexing="ij",
    )
    focal_x, centre_x = _fit_line(ray_x, u.expand_as(ray_x), weights)
    focal_y, centre_y = _fit_line(ray_y, v.expand_as(ray_y), weights)

    intrinsics = torch.zeros(*points.shape[:-3], 3, 3, dtype=dtype, device=points.device)
    intrinsics[..., 0, 0], intrinsics[..., 0, 2] = focal_x, centre_x
    intrinsics[..., 1, 1], intrinsics[..., 1, 2] = focal_y, centre_y
    intrinsics[..., 2, 2] = 1.0
    return intrinsics


def _nanquantile_rows(rows: torch.Tensor, quantile: float) -> torch.Tensor:
    """`torch.nanquantile(row, quantile)` (linear interpolation) of every row at once, by one sort: NaN sorts last, so
    each row's finite values lead. (torch's quantile also refuses inputs of more than 2**24 elements.)"""
    ordered = rows.sort(dim=-1).values
    count = (~torch.isnan(rows)).sum(-1)
    position = quantile * (count - 1).clamp(min=0).to(rows.dtype)
    below = position.floor().long()
    above = torch.minimum(below + 1, (count - 1).clamp(min=0))
    low = ordered.gather(-1, below[:, None])[:, 0]
    high = ordered.gather(-1, above[:, None])[:, 0]
    value = low + (high - low) * (position - below.to(rows.dtype))
    return torch.where(count > 0, value, torch.full_like(value, torch.nan))


def _fit_line(inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least squares `targets ~ slope * inputs + offset` over the last two dims, in closed form. Centred
    sums keep it accurate when the inputs hardly vary; a degenerate fit gives NaN."""
    count = weights.sum((-2, -1))
    safe_count = count.clamp(min=1.0)
    mean_in = (weights * inputs).sum((-2, -1)) / safe_count
    mean_out = (weights * targets).sum((-2, -1)) / safe_count
    centred_in = inputs - mean_in[..., None, None]
    centred_out = targets - mean_out[..., None, None]
    variance = (weights * centred_in * centred_in).sum((-2, -1))
    covariance = (weights * centred_in * centred_out).sum((-2, -1))
    degenerate = (count < 2) | (variance <= 1e-12 * count.clamp(min=1.0))
    slope = covariance / torch.where(degenerate, torch.ones_like(variance), variance)
    offset = mean_out - slope * mean_in
    nan = torch.full_like(slope, torch.nan)
    return torch.where(degenerate, nan, slope), torch.where(degenerate, nan, offset)


def rescale_intrinsics(intrinsics: torch.Tensor, from_size: Sequence[int], to_size: Sequence[int]) -> torch.Tensor:
    """Intrinsics of the same camera after resizing its image from `from_size` to `to_size` (both `(height, width)`).

    With the continuous pixel convention of this module a resize by `(s_y, s_x)` multiplies `fx, cx` by `s_x` and
    `fy, cy` by `s_y`; this maps the intrinsics of the processed geometry views back to the original images (the
    geometry processor only resizes, it never crops).

    Args:
        intrinsics (`torch.Tensor` of shape `(..., 3, 3)`): Pinhole intrinsics in pixels of `from_size`.
        from_size (`(height, width)`): Size the intrinsics refer to, e.g. the processed views' `(H, W)`.
        to_size (`(height, width)`): Size of the target image, e.g. the original image's.

    Returns:
        `torch.Tensor` of shape `(..., 3, 3)`: The intrinsics in pixels of `to_size` (floating point: integer
        intrinsics come back in the default dtype).

    Raises:
        TypeError: When `intrinsics` is not a `torch.Tensor` (NumPy arrays: `torch.from_numpy(array)`).
        ValueError: When a size is not a positive `(height, width)` pair.
    """
    require_tensor("intrinsics", intrinsics)
    if len(from_size) != 2 or len(to_size) != 2 or min(*from_size, *to_size) <= 0:
        raise ValueError(f"sizes must be positive (height, width) pairs, got {from_size} and {to_size}")
    if not intrinsics.is_floating_point():  # integer intrinsics: the scale factors would be truncated to 0 or 1
        intrinsics = intrinsics.to(torch.get_default_dtype())
    scale = torch.ones(3, dtype=intrinsics.dtype, device=intrinsics.device)
    scale[0] = to_size[1] / from_size[1]
    scale[1] = to_size[0] / from_size[0]
    return intrinsics * scale[:, None]
