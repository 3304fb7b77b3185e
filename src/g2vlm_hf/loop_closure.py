"""The parts of loop closure for chunked reconstruction: view descriptors from the geometry encoder, loop candidates,
the co-visibility check of a re-run pair chunk, and the pose-graph optimisation over the chunks' similarities.

`chunked.close_loops` puts them together (see its docstring for the whole method):

- **Descriptors** ([`record_view_descriptors`]): the patch tokens the model's own geometry encoder (DINOv2) computes
  for every view while the chunk is reconstructed, mean-pooled and L2-normalised: one vector per view, no second model
  and no second pass (a forward hook reads them).
- **Candidates** ([`find_loop_candidates`]): view pairs whose descriptors' cosine similarity is at least
  `similarity_threshold`, at least `min_separation` views apart in the sequence (temporal neighbours are not loops),
  kept by non-maximum suppression (one per `suppression` x `suppression` block of the pair matrix), best first.
- **Pose graph** ([`optimise_pose_graph`]): one Sim(3) per chunk (chunk frame -> first chunk's frame, the first held
  fixed), one edge per pair of consecutive chunks (their chained alignment) and one per verified loop, each measuring
  the similarity between the two chunks' frames. The residual of an edge is the log of its error similarity: log
  scale, rotation vector, and translation divided by the chunk's extent (so that the three are unitless and comparable),
  times the edge's weight. Solved by `scipy.optimize.least_squares` (trust-region reflective, with the sparse Jacobian
  structure of the graph), started from the chain.

scipy is an optional dependency: `pip install "g2vlm-hf[loop]"`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .modeling.tensor_checks import require_tensor
from .similarity import Similarity

__all__ = [
    "LoopCandidate",
    "LoopClosureConfig",
    "PoseGraphEdge",
    "co_visible_share",
    "find_loop_candidates",
    "optimise_pose_graph",
    "record_view_descriptors",
]


@dataclass(frozen=True)
class LoopClosureConfig:
    """Settings of loop closure in chunked reconstruction (`reconstruct_chunked(..., loop_closure=config)`).

    Attributes:
        similarity_threshold: Least cosine similarity of two views' descriptors for a loop candidate.
        min_separation: Least distance in the sequence (views) between the two views of a candidate; None: twice the
            chunk size or a tenth of the sequence, whichever is larger (a long video's views a second apart look
            alike, and such short loops would fill `max_loops`); never less than twice `window`.
        suppression: One candidate per block of this many views on each side; None: the chunk size.
        max_loops: At most this many candidates are verified (the most similar).
        window: Views taken around each of the two views of a candidate for its pair chunk; None: half the chunk size
            (so the pair chunk has the size of a chunk, and the same device memory).
        max_alignment_error: A loop is kept when the pair chunk aligns onto the chain's views of both places with a
            relative error (median residual / median spread) at most this.
        min_co_visible: ... and when at least this share of the second place's points, in the pair chunk, lie next to
            the first place's points (the two places see the same structure).
        loop_weight: Weight of a loop edge relative to a sequential edge in the pose graph.
    """

    similarity_threshold: float = 0.8
    min_separation: int | None = None
    suppression: int | None = None
    max_loops: int = 32
    window: int | None = None
    max_alignment_error: float = 0.05
    min_co_visible: float = 0.3
    loop_weight: float = 1.0

    def __post_init__(self) -> None:
        if not -1.0 <= self.similarity_threshold <= 1.0:
            raise ValueError(
                f"similarity_threshold is a cosine similarity in [-1, 1], got {self.similarity_threshold}."
            )
        for name in ("min_separation", "suppression", "window"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 view (or None for the default), got {value}.")
        if self.max_loops < 0 or self.loop_weight <= 0 or not 0.0 <= self.min_co_visible <= 1.0:
            raise ValueError(
                f"Need max_loops >= 0, loop_weight > 0 and min_co_visible in [0, 1], got {self.max_loops}, "
                f"{self.loop_weight} and {self.min_co_visible}."
            )


@dataclass(frozen=True)
class LoopCandidate:
    """Views `first < second` whose descriptors have cosine similarity `score`."""

    first: int
    second: int
    score: float


@dataclass(frozen=True)
class PoseGraphEdge:
    """A measured similarity between two chunks' frames: `measurement` maps chunk `moving`'s frame into chunk
    `reference`'s (ideally `S_reference^-1 o S_moving`, with `S_i` chunk `i`'s similarity into the first frame)."""

    reference: int
    moving: int
    measurement: Similarity
    weight: float = 1.0


def geometry_encoder_of(model: Any) -> nn.Module:
    """The geometry encoder (DINOv2) of a G²VLM model, whose patch tokens describe the views."""
    encoder = getattr(getattr(model, "model", None), "geometry_encoder", None)
    if not isinstance(encoder, nn.Module):
        raise ValueError(
            f"Loop closure reads the views' features off the model's geometry encoder (`model.model.geometry_encoder`), "
            f"which {type(model).__name__} lacks: pass a G2VLMForConditionalGeneration or G2VLMForReconstruction."
        )
    return encoder


@contextlib.contextmanager
def record_view_descriptors(model: Any) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward of the model's geometry encoder appends `(views, dim)` float32 CPU descriptors
    (its patch tokens mean-pooled per view, L2-normalised) to the yielded list."""
    recorded: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: Any, tokens: torch.Tensor) -> None:
        pooled = tokens.detach().float().mean(dim=1)
        recorded.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())

    handle = geometry_encoder_of(model).register_forward_hook(hook)
    try:
        yield recorded
    finally:
        handle.remove()


def find_loop_candidates(
    descriptors: torch.Tensor, min_separation: int, suppression: int, threshold: float, max_loops: int
) -> list[LoopCandidate]:
    """Loop candidates among `(N, dim)` L2-normalised view descriptors (see the module docstring), best first.

    The similarity matrix is computed in blocks of rows, so memory stays `O(N)` per block; for each view only its best
    partner at least `min_separation` (>= 1) later in the sequence is considered; a view whose descriptor is not
    finite has no partner."""
    require_tensor("descriptors", descriptors)
    if descriptors.ndim != 2:
        raise ValueError(f"`descriptors` must be (views, dim), one row per view, got {tuple(descriptors.shape)}.")
    if min_separation < 1:
        raise ValueError(f"min_separation must be at least 1 view (a view is not its own loop), got {min_separation}.")
    count = descriptors.shape[0]
    best: list[LoopCandidate] = []
    descriptors = descriptors.float()
    for start in range(0, count, 1024):
        rows = torch.arange(start, min(start + 1024, count))
        scores = descriptors[rows] @ descriptors.T
        scores[torch.arange(count)[None, :] < rows[:, None] + min_separation] = -float("inf")
        scores.nan_to_num_(nan=-float("inf"))  # one NaN descriptor would make the best score of every row NaN
        value, partner = scores.max(dim=1)
        for row, score, other in zip(rows.tolist(), value.tolist(), partner.tolist(), strict=True):
            if score >= threshold:
                best.append(LoopCandidate(row, other, score))
    best.sort(key=lambda candidate: -candidate.score)
    kept: list[LoopCandidate] = []
    for candidate in best:
        if len(kept) == max_loops:
            break
        if all(
            abs(candidate.first - other.first) >= suppression or abs(candidate.second - other.second) >= suppression
            for other in kept
        ):
            kept.append(candidate)
    return kept


def co_visible_share(first: torch.Tensor, second: torch.Tensor, sample: int = 2000, seed: int = 0) -> float:
    """Share of the `(M, 3)` points `second` whose nearest point of `first` is within 3 times the median
    nearest-neighbour spacing of `first` (non-finite points ignored, at most `sample` points of each; the spacing is
    to the nearest other point at another place, so that repeated points, such as pixels clamped to one point, do not
    shrink it to 0): how much of one place's structure the other place sees too, in one reconstruction."""
    generator = torch.Generator().manual_seed(seed)
    first, second = (
        points[points.isfinite().all(1)].double() for points in (first.reshape(-1, 3), second.reshape(-1, 3))
    )
    if first.shape[0] < 2 or second.shape[0] == 0:
        return 0.0
    first, second = (
        points[torch.randperm(points.shape[0], generator=generator)[:sample]] for points in (first, second)
    )
    apart = torch.cdist(first, first)
    spacing = apart.masked_fill(apart == 0, float("inf")).min(dim=1).values.median()
    if not bool(spacing.isfinite()):  # every point of `first` at one place: no spacing to measure
        return 0.0
    nearest = torch.cdist(second, first).min(dim=1).values
    return float((nearest <= 3 * spacing).double().mean())


def require_scipy() -> Any:
    """`scipy.optimize`, or an ImportError that says how to install it."""
    try:
        import scipy.optimize
        import scipy.sparse
        import scipy.spatial.transform
    except ImportError as error:
        raise ImportError('Loop closure needs scipy (its pose-graph solver): pip install "g2vlm-hf[loop]"') from error
    return scipy


def optimise_pose_graph(
    similarities: list[Similarity], edges: list[PoseGraphEdge], anchors: list[Similarity], max_evaluations: int = 200
) -> list[Similarity]:
    """The chunks' similarities (chunk frame -> first chunk's frame; the first held fixed) that best agree with the
    `edges`, started from `similarities`.

    `anchors[i]` maps a unitless frame centred on chunk `i` into chunk `i`'s frame (translation: the chunk's centre,
    scale: its spread). The graph is solved in those frames, so that the rotations the solver spreads along the chain
    turn each chunk about its own centre (not about the arbitrary origin of the frame the model predicted it in) and
    translation residuals are in units of the chunk's size. Each similarity is varied as `S_i o exp(d_i)`, `d_i` = (log
    scale, rotation vector, translation): seven unitless parameters per chunk, away from the singularities of an
    absolute parametrisation. The residual of an edge is its weight times `log(measurement^-1 o S_reference^-1 o
    S_moving)` in the same seven coordinates.

    Raises:
        ImportError: When scipy is not installed.
        ValueError: On an edge naming a chunk that does not exist, or a wrong number of anchors.
    """
    scipy = require_scipy()
    count = len(similarities)
    if count < 2 or not edges:
        return list(similarities)
    if any(not 0 <= index < count for edge in edges for index in (edge.reference, edge.moving)):
        raise ValueError(f"Pose-graph edges must join chunks 0..{count - 1}.")
    if len(anchors) != count:
        raise ValueError(f"Need one anchor per chunk ({count}), got {len(anchors)}.")
    rotation = scipy.spatial.transform.Rotation
    centred = [similarity.compose(anchor) for similarity, anchor in zip(similarities, anchors, strict=True)]
    base_scale = np.array([s.scale for s in centred])
    base_rotation = np.stack([s.rotation.numpy() for s in centred])
    base_translation = np.stack([s.translation.numpy() for s in centred])
    reference = np.array([edge.reference for edge in edges])
    moving = np.array([edge.moving for edge in edges])
    weight = np.array([edge.weight for edge in edges])[:, None]
    inverse = [
        anchors[edge.moving].inverse().compose(edge.measurement.inverse()).compose(anchors[edge.reference])
        for edge in edges
    ]
    inverse_scale = np.array([m.scale for m in inverse])
    inverse_rotation = np.stack([m.rotation.numpy() for m in inverse])
    inverse_translation = np.stack([m.translation.numpy() for m in inverse])

    def chunk_similarities(free: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        step = np.concatenate([np.zeros(7), free]).reshape(-1, 7)
        return (
            base_scale * np.exp(step[:, 0]),
            base_rotation @ rotation.from_rotvec(step[:, 1:4]).as_matrix(),
            base_scale[:, None] * np.einsum("nij,nj->ni", base_rotation, step[:, 4:]) + base_translation,
        )

    def residuals(free: np.ndarray) -> np.ndarray:
        scale, rot, trans = chunk_similarities(free)
        # relative = S_reference^-1 o S_moving, then error = measurement^-1 o relative (identity when they agree)
        reference_inverse = rot[reference].transpose(0, 2, 1)
        relative_scale = scale[moving] / scale[reference]
        relative_rotation = reference_inverse @ rot[moving]
        relative_translation = (
            np.einsum("nij,nj->ni", reference_inverse, trans[moving] - trans[reference]) / scale[reference][:, None]
        )
        parts = [
            np.log(inverse_scale * relative_scale)[:, None],
            rotation.from_matrix(inverse_rotation @ relative_rotation).as_rotvec(),
            inverse_scale[:, None] * np.einsum("nij,nj->ni", inverse_rotation, relative_translation)
            + inverse_translation,
        ]
        return (weight * np.concatenate(parts, axis=1)).ravel()

    sparsity = scipy.sparse.lil_matrix((7 * len(edges), 7 * (count - 1)), dtype=int)
    for row, pair in enumerate(zip(reference, moving, strict=True)):
        for chunk in pair:
            if chunk > 0:
                sparsity[7 * row : 7 * row + 7, 7 * (chunk - 1) : 7 * chunk] = 1
    solution = scipy.optimize.least_squares(
        residuals,
        np.zeros(7 * (count - 1)),
        jac_sparsity=sparsity,
        method="trf",
        tr_solver="lsmr",
        tr_options={"atol": 1e-12, "btol": 1e-12},
        max_nfev=max_evaluations,
    )
    scale, rot, trans = chunk_similarities(solution.x)
    return [similarities[0]] + [
        Similarity(float(scale[i]), torch.from_numpy(rot[i]), torch.from_numpy(trans[i])).compose(anchors[i].inverse())
        for i in range(1, count)
    ]
