"""Sparse ConvNeXt V2 encoder: visible patches in, features at visible sites out."""
from __future__ import annotations

import torch
import torch.nn as nn

from mimsparse.backends import Backend
from mimsparse.layers import LayerNorm, SparseConvNeXtBlock, SparseDownsample
from mimsparse.masking import upsample_mask
from mimsparse.models import get_spec
from mimsparse.sparse_encoder import SparseEncoder


class SparseConvNeXtV2(SparseEncoder):
    """ConvNeXt V2 whose convolutions are submanifold sparse convolutions over the visible sites.

    Parameter names follow timm's ``ConvNeXt`` (``stages.i.blocks.j.conv_dw`` ...), so conversion to
    timm is a rename of the stem/downsample modules and a reshape for the conv-MLP sizes.
    """

    def __init__(self, depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), in_chans: int = 3,
                 drop_path_rate: float = 0.0, use_grn: bool = True, stem_stride: int = 4,
                 backend: Backend | str = "dense"):
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError(f"depths {depths} and dims {dims} must have one entry per stage")
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.in_chans = in_chans
        self.stem_stride = stem_stride
        self.stem_conv = nn.Conv2d(in_chans, dims[0], stem_stride, stride=stem_stride)
        self.stem_norm = LayerNorm(dims[0], eps=1e-6)
        rates = [drop_path_rate * i / max(1, sum(depths) - 1) for i in range(sum(depths))]
        self.stages = nn.ModuleList()
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            stage = nn.Module()
            stage.downsample = SparseDownsample(dims[i - 1], dim) if i > 0 else None
            start = sum(depths[:i])
            stage.blocks = nn.ModuleList(
                SparseConvNeXtBlock(dim, rates[start + j], use_grn) for j in range(depth)
            )
            self.stages.append(stage)
        self.backend = backend
        self.apply(_init_weights)

    @classmethod
    def from_name(cls, name: str, **kwargs) -> "SparseConvNeXtV2":
        spec = get_spec(name)
        return cls(depths=spec.depths, dims=spec.dims, **kwargs)

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Channels of each stage's output, finest first."""
        return self.dims

    @property
    def stage_strides(self) -> tuple[int, ...]:
        """Stride of each stage's output w.r.t. the image, finest first: the stem, then x2 per downsample."""
        return tuple(self.stem_stride * 2 ** i for i in range(len(self.dims)))

    def forward_sparse(self, image_bchw: torch.Tensor, visible_bhw: torch.Tensor, return_stages: bool = False,
                       num_visible: int | None = None):
        """image: [B, C, H, W]; visible: bool [B, H/p, W/p] (True = kept), p = patch_size;
        num_visible: see SparseEncoder.forward_sparse.
        Returns the backend's native tensor of the last stage (or a list of all stages)."""
        self.check_mask(image_bchw, visible_bhw)
        b, backend = image_bchw.shape[0], self.backend
        scale = self.patch_size // self.stem_stride
        rows = None if num_visible is None else num_visible * scale * scale  # stem sites per sample
        x = backend.patch_embed(image_bchw, upsample_mask(visible_bhw, scale),
                                self.stem_conv.weight, self.stem_conv.bias, self.stem_stride, rows)
        x = backend.map_feats(x, self.stem_norm)
        outs = []
        for stage in self.stages:
            if stage.downsample is not None:
                x = stage.downsample(x, backend)
            for block in stage.blocks:
                x = block(x, backend, b)
            outs.append(x)
        return outs if return_stages else x


def _init_weights(module: nn.Module) -> None:
    # As timm / the official code: truncated normal 0.02 for conv and linear weights, zero biases.
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
