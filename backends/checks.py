"""Input checks and dtype helpers every backend uses (one wording for one mistake)."""
from __future__ import annotations

import torch


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast would compute in on this device type, or None when it is off."""
    kind = device.type
    try:
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    except TypeError:  # torch < 2.4: no device_type argument
        if kind == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if kind == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        return None


def check_conv_weight(weight: torch.Tensor, channels: int, op: str, depthwise: bool = False) -> tuple[int, int]:
    """Validate a dense-layout conv weight against the features; returns (kh, kw)."""
    if weight.dim() != 4:
        raise ValueError(f"{op}: expected a conv weight [C_out, C_in, kh, kw], got {tuple(weight.shape)}")
    kh, kw = weight.shape[-2:]
    if depthwise and weight.shape[1] != 1:
        raise ValueError(f"{op}: depthwise weight must be [C, 1, kh, kw], got {tuple(weight.shape)}")
    c_in = weight.shape[0] if depthwise else weight.shape[1]
    if c_in != channels:
        raise ValueError(f"{op}: weight {tuple(weight.shape)} expects {c_in} input channels, features have {channels}")
    if op != "downsample" and (kh % 2 == 0 or kw % 2 == 0):
        raise ValueError(f"{op}: submanifold convs need odd kernel sizes, got {kh}x{kw}")
    return kh, kw


def add_bias(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return out if bias is None else out + bias.to(out.dtype)


def check_window_op(op: str, kernel: int, stride: int, batch_size: int, spatial_shape: tuple[int, int],
                    active_out_bhw: torch.Tensor) -> None:
    """A stride-``stride`` k x k window op (``strided_conv``, ``max_pool``) needs an odd k (padding
    k // 2 centres it) and an output mask on its output grid (batch, ceil(H/stride), ceil(W/stride))."""
    if kernel % 2 == 0 or stride < 1:
        raise ValueError(f"{op}: needs an odd kernel and a stride >= 1 (padding k // 2 centres the window), "
                         f"got kernel {kernel}, stride {stride}")
    h, w = spatial_shape
    expected = (batch_size, -(-h // stride), -(-w // stride))
    if tuple(active_out_bhw.shape) != expected:
        raise ValueError(f"{op}: output mask {tuple(active_out_bhw.shape)} does not match the output grid "
                         f"{expected} of stride {stride} on a {h}x{w} map: pass the mask of the next stage")


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| in float64, the reference being ``b`` (0 when both are zero)."""
    a, b = a.detach().double(), b.detach().double().to(a.device)
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    return diff / (scale if scale > 0 else 1.0)


def check_downsample_weight(weight: torch.Tensor, channels: int, spatial_shape: tuple[int, int]) -> int:
    """A k x k stride-k downsampling weight [C_out, C_in, k, k] that fits the map; returns k."""
    kh, kw = check_conv_weight(weight, channels, "downsample")
    if kh != kw:
        raise ValueError(f"downsample: expected a square kernel [C_out, C_in, k, k], got {tuple(weight.shape)}")
    h, w = spatial_shape
    if h < kh or w < kh:  # F.conv2d(stride=k), no padding: a partial last block is dropped
        raise ValueError(f"cannot downsample a {h}x{w} map with a {kh}x{kh} stride-{kh} conv")
    return kh
