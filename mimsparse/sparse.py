"""The sparse coordinate tensor: the point-cloud representation of the visible patches.

Every backend consumes and produces this type (each may wrap it in its own native tensor).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SparseBatch:
    """Active sites of a batch of 2D feature maps.

    coords:        int32 [N, 3], rows (batch, y, x), sorted by batch then raster order.
    feats:         [N, C], one feature row per active site.
    batch_size:    B (a sample may have no active site at all).
    spatial_shape: (H, W) of the dense map at this stride.
    stride:        pixels of the input image per site (4 for the stem output, 32 for the last stage).
    """

    coords: torch.Tensor
    feats: torch.Tensor
    batch_size: int
    spatial_shape: tuple[int, int]
    stride: int = 1

    def __post_init__(self):
        if self.coords.dtype != torch.int32 or self.coords.dim() != 2 or self.coords.shape[1] != 3:
            raise ValueError(f"coords must be int32 [N, 3] (batch, y, x), got {self.coords.dtype} {tuple(self.coords.shape)}")
        if self.feats.dim() != 2 or self.feats.shape[0] != self.coords.shape[0]:
            raise ValueError(
                f"feats must be [N, C] with N = {self.coords.shape[0]} rows like coords, got {tuple(self.feats.shape)}"
            )
        self.spatial_shape = (int(self.spatial_shape[0]), int(self.spatial_shape[1]))
        # nonzero() returns column-major coordinates; spconv and ME read such buffers wrongly.
        self.coords = self.coords.contiguous()

    @property
    def num_channels(self) -> int:
        return self.feats.shape[1]

    @classmethod
    def from_dense(cls, x_bchw: torch.Tensor, active_bhw: torch.Tensor, stride: int = 1) -> "SparseBatch":
        """Keep the sites where ``active_bhw`` is True, whatever their values (an all-zero visible
        patch stays active: sparsity is never inferred from zeros)."""
        if active_bhw.shape != (x_bchw.shape[0], *x_bchw.shape[2:]):
            raise ValueError(f"active mask {tuple(active_bhw.shape)} does not match the map {tuple(x_bchw.shape)}")
        coords = active_bhw.nonzero().to(torch.int32)
        b, y, x = coords.long().unbind(1)
        feats = x_bchw.permute(0, 2, 3, 1)[b, y, x]
        return cls(coords, feats, x_bchw.shape[0], tuple(x_bchw.shape[2:]), stride)

    def to_dense(self) -> torch.Tensor:
        """Scatter back to [B, C, H, W], zeros at inactive sites; the shape is explicit, never inferred."""
        h, w = self.spatial_shape
        out = self.feats.new_zeros(self.batch_size, h, w, self.num_channels)
        b, y, x = self.coords.long().unbind(1)
        out = out.index_put((b, y, x), self.feats)
        return out.permute(0, 3, 1, 2)

    def active_mask(self) -> torch.Tensor:
        """bool [B, H, W], True at active sites."""
        mask = torch.zeros(self.batch_size, *self.spatial_shape, dtype=torch.bool, device=self.coords.device)
        b, y, x = self.coords.long().unbind(1)
        mask[b, y, x] = True
        return mask

    def replace(self, feats: torch.Tensor) -> "SparseBatch":
        return SparseBatch(self.coords, feats, self.batch_size, self.spatial_shape, self.stride)

    def validate(self) -> None:
        """Checks that libraries which trust their input (spconv) would need: bounds and uniqueness."""
        if self.coords.numel() == 0:
            return
        b, y, x = self.coords.long().unbind(1)
        h, w = self.spatial_shape
        if b.min() < 0 or b.max() >= self.batch_size:
            raise ValueError(f"batch index out of range [0, {self.batch_size})")
        if y.min() < 0 or y.max() >= h or x.min() < 0 or x.max() >= w:
            raise ValueError(f"coordinates outside the spatial shape {self.spatial_shape}")
        flat = (b * h + y) * w + x
        if flat.unique().numel() != flat.numel():
            raise ValueError("duplicate coordinates: each active site must appear once")
