"""Decoders: features on the last stage's grid (one site per patch) -> pixel predictions per patch.

- ``fcmae``: the FCMAE decoder (1x1 projection, mask token at masked patches, ConvNeXt V2 block(s),
  1x1 prediction), dense and light.
- ``linear``: SimMIM's head, a single 1x1 convolution. It has no spatial mixing, so it can only
  predict masked patches when the encoder has seen them (``encoder_input="mask_token"``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.convnext import ConvNeXtBlock

DECODERS = ("fcmae", "linear")


def _init_convs(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)


class FCMAEDecoder(nn.Module):
    """1x1 projection -> mask token at masked patches -> ConvNeXt V2 block(s) -> 1x1 prediction of
    patch_size * patch_size * in_chans pixel values per patch."""

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

    def __init__(self, in_dim: int, patch_size: int, in_chans: int = 3):
        super().__init__()
        self.pred = nn.Conv2d(in_dim, patch_size * patch_size * in_chans, 1)
        _init_convs(self)

    def forward(self, feats_bchw: torch.Tensor, visible_bhw: torch.Tensor) -> torch.Tensor:
        """feats: [B, C, h, w]; the mask is not used. Returns predictions [B, p*p*in_chans, h, w]."""
        return self.pred(feats_bchw)


def build_decoder(kind: str, in_dim: int, patch_size: int, in_chans: int = 3, dim: int = 512,
                  depth: int = 1) -> nn.Module:
    if kind == "fcmae":
        return FCMAEDecoder(in_dim, patch_size, in_chans, dim, depth)
    if kind == "linear":
        return LinearDecoder(in_dim, patch_size, in_chans)
    raise ValueError(f"model.decoder must be one of {', '.join(DECODERS)}, got {kind!r}")
