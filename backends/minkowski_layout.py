"""MinkowskiEngine's kernel layouts <-> torch's dense conv weights, written once.

Used at run time by the minkowski backend and at conversion time for official ConvNeXt-V2
checkpoints (whose sparse encoder stores ME kernels); needs no MinkowskiEngine itself.
ME enumerates kernel offsets with the first spatial axis (y) fastest: offset index = ix * kh + iy.
"""
from __future__ import annotations

import math

import torch


def me_kernel(weight: torch.Tensor) -> torch.Tensor:
    """Dense [C_out, C_in, kh, kw] -> ME [kh*kw, C_in, C_out] for ``kernel_size=[kh, kw]`` on (y, x)
    coordinates. Differentiable."""
    c_out, c_in, kh, kw = weight.shape
    return weight.permute(3, 2, 1, 0).reshape(kw * kh, c_in, c_out).contiguous()


def dense_weight(kernel: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Inverse of ``me_kernel``: ME [kh*kw, C_in, C_out] -> dense [C_out, C_in, kh, kw]."""
    return kernel.reshape(kw, kh, kernel.shape[1], kernel.shape[2]).permute(3, 2, 1, 0)


def channelwise_kernel(weight: torch.Tensor) -> torch.Tensor:
    """Depthwise [C, 1, kh, kw] -> ``MinkowskiChannelwiseConvolution``'s [kh*kw, C]."""
    c, _, kh, kw = weight.shape
    return weight[:, 0].permute(2, 1, 0).reshape(kw * kh, c)


def dense_dw_weight(kernel: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Inverse of ``channelwise_kernel``: [kh*kw, C] -> depthwise [C, 1, kh, kw]."""
    return kernel.reshape(kw, kh, kernel.shape[1]).permute(2, 1, 0)[:, None]


def square_side(kernel: torch.Tensor) -> int:
    """k of a k x k kernel stored as [k*k, ...] (a file does not say kh and kw apart; 2D square only)."""
    k = math.isqrt(kernel.shape[0])
    if k * k != kernel.shape[0]:
        raise ValueError(f"kernel volume {kernel.shape[0]} is not a square k*k (2D kernels only)")
    return k
