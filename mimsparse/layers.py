"""Sparse ConvNeXt V2 building blocks. Parameters use timm's names and layouts; every operation goes
through the backend, so the same module runs on any backend."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimsparse.backends import Backend


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters) whose statistics are computed in float32 for bf16/fp16 input
    (autocast on CPU would keep bf16 here); the output has the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float32, torch.float64):
            return super().forward(x)
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class GRN(nn.Module):
    """Global Response Normalisation parameters (timm layout: weight/bias [C], zero-initialised).

    Statistics are per sample over that sample's visible sites. The official sparse FCMAE code
    (MinkowskiGRN) normalises over the whole batch instead, mixing samples — a known bug
    (facebookresearch/ConvNeXt-V2 issue #86) that makes pretraining differ from the dense model
    the weights are later used in. tests/test_backends.py checks both facts.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x, backend: Backend):
        return backend.grn(x, self.weight, self.bias, self.eps)


class GrnMlp(nn.Module):
    """fc1 -> GELU -> GRN -> fc2, per site (timm's GlobalResponseNormMlp)."""

    def __init__(self, dim: int, hidden: int, use_grn: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.grn = GRN(hidden) if use_grn else None
        self.fc2 = nn.Linear(hidden, dim)


class DropPath(nn.Module):
    """Stochastic depth: drops a whole sample's residual branch."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x, backend: Backend, batch_size: int, device: torch.device):
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        scale = torch.empty(batch_size, device=device).bernoulli_(keep) / keep
        return backend.scale_samples(x, scale)


class SparseConvNeXtBlock(nn.Module):
    """dwconv7 -> LN -> Linear 4x -> GELU -> GRN -> Linear -> DropPath, plus the residual."""

    def __init__(self, dim: int, drop_path: float = 0.0, use_grn: bool = True, kernel_size: int = 7):
        super().__init__()
        # nn.Conv2d only holds the depthwise weight [C, 1, k, k] and bias; the backend runs it.
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = LayerNorm(dim, eps=1e-6)
        self.mlp = GrnMlp(dim, 4 * dim, use_grn)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, backend: Backend, batch_size: int):
        shortcut = x
        x = backend.dwconv(x, self.conv_dw.weight, self.conv_dw.bias)
        x = backend.map_feats(x, lambda f: F.gelu(self.mlp.fc1(self.norm(f))))
        if self.mlp.grn is not None:
            x = self.mlp.grn(x, backend)
        x = backend.map_feats(x, self.mlp.fc2)
        x = self.drop_path(x, backend, batch_size, self.conv_dw.weight.device)
        return backend.add(shortcut, x)


class SparseDownsample(nn.Module):
    """LN -> k2s2 conv between stages (timm: stages.i.downsample.{0,1})."""

    def __init__(self, in_dim: int, out_dim: int, stride: int = 2):
        super().__init__()
        self.norm = LayerNorm(in_dim, eps=1e-6)
        self.conv = nn.Conv2d(in_dim, out_dim, stride, stride=stride)

    def forward(self, x, backend: Backend):
        x = backend.map_feats(x, self.norm)
        return backend.downsample(x, self.conv.weight, self.conv.bias)
