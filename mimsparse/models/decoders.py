"""Decoders: encoder features -> pixel predictions per patch, [B, p*p*in_chans, h, w] on the patch grid.

- ``fcmae``: the FCMAE decoder (1x1 projection, mask token at masked patches, ConvNeXt V2 block(s),
  1x1 prediction), dense and light.
- ``linear``: SimMIM's head, a single 1x1 convolution. It has no spatial mixing, so it can only
  predict masked patches when the encoder has seen them (``encoder_input="mask_token"``).
- ``spark``: SparK's hierarchical decoder (Tian et al. 2023): every stage's sparse map is densified
  (mask token per scale) and a light UNet upsamples from the coarsest one to a full-resolution image.

A decoder's ``hierarchical`` class attribute says what it reads: False = the last stage's map
[B, C, h, w] (one site per patch); True = every stage's map, finest first.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d
from timm.models.convnext import ConvNeXtBlock

from mimsparse.errors import ConfigError
from mimsparse.models.loss import patchify
from mimsparse.masking import upsample_mask

DECODERS = ("fcmae", "linear", "spark")


def _init_convs(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class FCMAEDecoder(nn.Module):
    """1x1 projection -> mask token at masked patches -> ConvNeXt V2 block(s) -> 1x1 prediction of
    patch_size * patch_size * in_chans pixel values per patch."""

    hierarchical = False

    def __init__(self, in_dim: int, patch_size: int, in_chans: int = 3, dim: int = 512, depth: int = 1):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, dim, 1)
        self.mask_token = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.blocks = nn.Sequential(*[
            ConvNeXtBlock(dim, use_grn=True, ls_init_value=None, conv_mlp=False) for _ in range(depth)
        ])
        self.pred = nn.Conv2d(dim, patch_size * patch_size * in_chans, 1)
        nn.init.normal_(self.mask_token, std=0.02)
        _init_convs(self)

    def forward(self, feats_bchw: torch.Tensor, visible_bhw: torch.Tensor) -> torch.Tensor:
        """feats: [B, C, h, w] (zero at masked patches); visible: bool [B, h, w].
        Returns predictions [B, p*p*in_chans, h, w]."""
        x = self.proj(feats_bchw)
        masked = (~visible_bhw).unsqueeze(1).to(x.dtype)
        x = x * (1.0 - masked) + self.mask_token.to(x.dtype) * masked
        return self.pred(self.blocks(x))


class LinearDecoder(nn.Module):
    """SimMIM's prediction head: one 1x1 convolution from the encoder's features to
    patch_size * patch_size * in_chans pixel values per patch."""

    hierarchical = False

    def __init__(self, in_dim: int, patch_size: int, in_chans: int = 3):
        super().__init__()
        self.pred = nn.Conv2d(in_dim, patch_size * patch_size * in_chans, 1)
        _init_convs(self)

    def forward(self, feats_bchw: torch.Tensor, visible_bhw: torch.Tensor) -> torch.Tensor:
        """feats: [B, C, h, w]; the mask is not used. Returns predictions [B, p*p*in_chans, h, w]."""
        return self.pred(feats_bchw)


class Densify(nn.Module):
    """One scale of SparK's densifying: sparse encoder map -> dense decoder input at that scale.

    LayerNorm over the channels of each site (so the empty masked sites enter no statistic; they are
    overwritten next), the scale's learned mask token at the masked sites, then a projection to the
    decoder width of that scale. SparK uses this LayerNorm for ConvNeXt and a BatchNorm over the
    visible sites for ResNet; we use the LayerNorm for both, as it needs no batch statistics (see
    ``_norm``)."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int):
        super().__init__()
        self.norm = LayerNorm2d(in_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, in_dim, 1, 1))
        self.proj = nn.Conv2d(in_dim, out_dim, kernel_size, padding=kernel_size // 2)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, feats_bchw: torch.Tensor, visible_bhw: torch.Tensor) -> torch.Tensor:
        """feats: [B, C_in, h, w] (zero at masked sites); visible: bool [B, h, w] on the same grid.
        Returns [B, C_out, h, w]."""
        x = self.norm(feats_bchw)
        x = torch.where(visible_bhw.unsqueeze(1), x, self.mask_token.to(x.dtype))
        return self.proj(x)


class UpBlock(nn.Module):
    """x2 upsampling (transposed conv k4 s2 p1, as SparK: overlapping kernels, so neighbouring sites
    blend instead of each one painting its own 2x2 block), then ``depth`` times
    conv3x3-norm-ReLU-conv3x3-norm (SparK's UNet block), the last conv going to ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 1):
        super().__init__()
        self.upsample = nn.ConvTranspose2d(in_dim, in_dim, kernel_size=4, stride=2, padding=1)
        layers = []
        for j in range(depth):
            out = out_dim if j == depth - 1 else in_dim
            if j > 0:
                layers.append(nn.ReLU(inplace=True))
            layers += [nn.Conv2d(in_dim, in_dim, 3, padding=1, bias=False), _norm(in_dim), nn.ReLU(inplace=True),
                       nn.Conv2d(in_dim, out, 3, padding=1, bias=False), _norm(out)]
        self.convs = nn.Sequential(*layers)

    def forward(self, x_bchw: torch.Tensor) -> torch.Tensor:
        """[B, in_dim, h, w] -> [B, out_dim, 2h, 2w]."""
        return self.convs(self.upsample(x_bchw))


def _norm(dim: int) -> nn.Module:
    # SparK uses BatchNorm. One group over (C, H, W) per sample instead: no batch statistics, so the
    # decoder makes no sample's loss depend on the rest of its batch (N processes x batch b and gradient
    # accumulation stay equal to one big batch), eval equals train, and it works at any width (the
    # last levels have decoder_dim / 16 and / 32 channels). It fitted a fixed batch as fast as BatchNorm did.
    return nn.GroupNorm(1, dim, eps=1e-6)


class SparKDecoder(nn.Module):
    """SparK's decoder: densify every stage, then a light UNet from the coarsest stage to stride 1.

    Widths: ``dim`` at the coarsest stage (stride = patch_size), halved at every x2 upsampling, so
    dim / patch_size channels at full resolution (``dim`` must be at least ``patch_size``). The
    stage at stride s is densified to the width at s and added after the upsampling that reaches s;
    below the finest stage (stride 4 -> 1) the blocks upsample with nothing to add. A 1x1 conv then
    predicts ``in_chans`` values per pixel. ``depth`` is the number of conv pairs per upsampling
    block (SparK: 1).

    The densify projection is 1x1 at the coarsest stage and 3x3 at the others (as SparK): the
    coarsest map has the most channels (2048 for ResNet-50), where a 3x3 would cost 9x the weights
    for context the next block's 3x3 convs give anyway; the finer maps are narrow, and a 3x3 there
    lets visible sites next to a masked region inform its token-filled border.
    """

    hierarchical = True

    def __init__(self, stage_dims: tuple[int, ...], stage_strides: tuple[int, ...], patch_size: int,
                 in_chans: int = 3, dim: int = 512, depth: int = 1):
        super().__init__()
        if len(stage_dims) != len(stage_strides):
            raise ValueError(f"stage_dims {stage_dims} and stage_strides {stage_strides} need one entry per stage")
        if not _is_pow2(patch_size) or stage_strides[-1] != patch_size or not all(
                _is_pow2(s) and s < t for s, t in zip(stage_strides, stage_strides[1:])):
            raise ConfigError(f"the spark decoder needs increasing power-of-two stage strides ending at the patch "
                             f"size {patch_size}, got {stage_strides}")
        levels = round(math.log2(patch_size))
        if dim < patch_size:
            raise ConfigError(f"model.decoder_dim={dim} is too small for the spark decoder: the width halves at each "
                             f"of its {levels} upsamplings, so it must be at least {patch_size}")
        if depth < 1:
            raise ConfigError(f"model.decoder_depth={depth}: the spark decoder needs at least 1 conv pair per block")
        self.patch_size, self.stage_strides = patch_size, tuple(stage_strides)
        # decoder channels at stride patch_size / 2^k: dim / 2^k
        self.densify = nn.ModuleList(
            Densify(c, dim // (patch_size // s), 1 if s == patch_size else 3) for c, s in zip(stage_dims, stage_strides)
        )
        # up[k] goes from stride patch_size / 2^k to patch_size / 2^(k+1)
        self.up = nn.ModuleList(UpBlock(dim // 2**k, dim // 2**(k + 1), depth) for k in range(levels))
        self.pred = nn.Conv2d(dim // 2**levels, in_chans, 1)
        _init_convs(self)

    def forward_image(self, feats: list[torch.Tensor], visible_bhw: torch.Tensor) -> torch.Tensor:
        """feats: the encoder's stage maps, finest first, [B, C_i, H/s_i, W/s_i] (zero at masked sites);
        visible: bool [B, H/p, W/p]. Returns the predicted image [B, in_chans, H, W]."""
        if len(feats) != len(self.densify):
            raise ValueError(f"the spark decoder was built for {len(self.densify)} stages, got {len(feats)} maps")
        dense = {s: densify(f, upsample_mask(visible_bhw, self.patch_size // s))
                 for densify, f, s in zip(self.densify, feats, self.stage_strides)}
        x, stride = dense[self.patch_size], self.patch_size
        for block in self.up:
            x, stride = block(x), stride // 2
            if stride in dense:
                x = x + dense[stride]
        return self.pred(x)

    def forward(self, feats: list[torch.Tensor], visible_bhw: torch.Tensor) -> torch.Tensor:
        """As :meth:`forward_image`, cut into patches: [B, p*p*in_chans, H/p, W/p], values within a
        patch in :func:`mimsparse.models.loss.patchify` order (the layout of the other decoders)."""
        image = self.forward_image(feats, visible_bhw)
        return patchify(image, self.patch_size).transpose(1, 2).unflatten(2, visible_bhw.shape[1:])


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def build_decoder(kind: str, encoder: nn.Module, dim: int = 512, depth: int = 1) -> nn.Module:
    """The decoder ``kind`` sized for ``encoder`` (its num_features, patch_size, in_chans and, for
    spark, stage_dims and stage_strides)."""
    if kind == "fcmae":
        return FCMAEDecoder(encoder.num_features, encoder.patch_size, encoder.in_chans, dim, depth)
    if kind == "linear":
        return LinearDecoder(encoder.num_features, encoder.patch_size, encoder.in_chans)
    if kind == "spark":
        return SparKDecoder(encoder.stage_dims, encoder.stage_strides, encoder.patch_size, encoder.in_chans, dim, depth)
    raise ConfigError(f"model.decoder must be one of {', '.join(DECODERS)}, got {kind!r}")
