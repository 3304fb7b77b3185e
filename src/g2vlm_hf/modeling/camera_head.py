"""The camera head: a camera-to-world pose per view from its camera-decoder tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class G2VLMResidualMLPBlock(nn.Module):
    """Three ReLU linear layers with a skip connection."""

    def __init__(self, dim: int):
        super().__init__()
        self.res_conv1 = nn.Linear(dim, dim)
        self.res_conv2 = nn.Linear(dim, dim)
        self.res_conv3 = nn.Linear(dim, dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.res_conv1(hidden_states))
        out = F.relu(self.res_conv2(out))
        return hidden_states + F.relu(self.res_conv3(out))


def rotation_from_9d(matrix: torch.Tensor) -> torch.Tensor:
    """Nearest rotation to each of `(batch, 9)` (rows L2-normalised first) by SVD, reflections fixed: `(batch, 3, 3)`
    with det +1."""
    rows = F.normalize(matrix.view(-1, 3, 3), p=2, dim=-1)
    u, _, vh = torch.linalg.svd(rows.transpose(-1, -2))
    v = vh.transpose(-1, -2)
    det = torch.det(v @ u.transpose(-1, -2))
    v = torch.cat((v[..., :-1], v[..., -1:] * det.view(-1, 1, 1)), dim=-1)
    return v @ u.transpose(-1, -2)


class G2VLMCameraHead(nn.Module):
    """Camera-to-world pose of each view from its camera-decoder tokens: residual MLPs, average over patches, MLP,
    then a translation and a 9-vector orthogonalised to a rotation."""

    def __init__(self, dim: int):
        super().__init__()
        self.res_conv = nn.ModuleList(G2VLMResidualMLPBlock(dim) for _ in range(2))
        self.pose_mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())
        self.fc_t = nn.Linear(dim, 3)
        self.fc_rot = nn.Linear(dim, 9)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens `(batch, patches, dim)` -> poses `(batch, 4, 4)`."""
        for block in self.res_conv:
            tokens = block(tokens)
        features = self.pose_mlp(tokens.mean(dim=1))
        pose = torch.zeros(tokens.shape[0], 4, 4, device=tokens.device, dtype=torch.float32)
        pose[:, :3, :3] = rotation_from_9d(self.fc_rot(features).float())
        pose[:, :3, 3] = self.fc_t(features).float()
        pose[:, 3, 3] = 1.0
        return pose


__all__ = ["G2VLMCameraHead", "rotation_from_9d"]
