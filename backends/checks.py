"""Input checks, dtype helpers and output-grid geometry every backend uses (one wording for one mistake)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
    if op != "strided_conv" and (kh % 2 == 0 or kw % 2 == 0):
        raise ValueError(f"{op}: submanifold convs need odd kernel sizes, got {kh}x{kw}")
    return kh, kw


def add_bias(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return out if bias is None else out + bias.to(out.dtype)


def check_window_op(op: str, kernel: int, stride: int, batch_size: int, spatial_shape: tuple[int, int],
                    active_out_bhw: torch.Tensor) -> None:
    """``max_pool``'s k x k window needs an odd k (padding k // 2 centres it) and an output mask on its
    output grid (batch, ceil(H/stride), ceil(W/stride))."""
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


def check_strided_conv(weight: torch.Tensor, channels: int, stride: int, padding: int, batch_size: int,
                       spatial_shape: tuple[int, int], active_out_bhw: torch.Tensor | None) -> tuple[int, tuple[int, int]]:
    """A k x k strided conv (square weight [C_out, C_in, k, k], stride >= 1, 0 <= padding < k) that has an
    output on the map, and an output mask, when given, on its output grid; returns (k, output grid)."""
    kh, kw = check_conv_weight(weight, channels, "strided_conv")
    if kh != kw:
        raise ValueError(f"strided_conv: expected a square kernel [C_out, C_in, k, k], got {tuple(weight.shape)}")
    if stride < 1 or not 0 <= padding < kh:
        raise ValueError(f"strided_conv: needs stride >= 1 and 0 <= padding < k, got stride {stride}, padding "
                         f"{padding}, k {kh}")
    h, w = spatial_shape
    out_shape = ((h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kh) // stride + 1)  # F.conv2d's
    if min(out_shape) < 1:
        raise ValueError(f"strided_conv: a {h}x{w} map is smaller than the {kh}x{kh} window (padding {padding}): "
                         f"no output site")
    if active_out_bhw is not None and tuple(active_out_bhw.shape) != (batch_size, *out_shape):
        raise ValueError(f"strided_conv: output mask {tuple(active_out_bhw.shape)} does not match the output grid "
                         f"{(batch_size, *out_shape)} of a {kh}x{kh} stride-{stride} conv on a {h}x{w} map: "
                         f"pass the mask of the next stage")
    return kh, out_shape


def is_block_conv(k: int, stride: int, padding: int, active_out_bhw: torch.Tensor | None) -> bool:
    """Non-overlapping k x k blocks whose output sites follow from the input (ConvNeXt's downsampling):
    the case sparse libraries run natively and the packed backend as one gather + matmul."""
    return active_out_bhw is None and stride == k and padding == 0


def sites_reached(active_bhw: torch.Tensor, k: int, stride: int, padding: int) -> torch.Tensor:
    """bool [B, Ho, Wo]: the output sites of a k x k strided conv whose window holds an active input
    site, the output set of the libraries' (generative) strided sparse conv."""
    ones = torch.ones(1, 1, k, k, device=active_bhw.device)
    return F.conv2d(active_bhw.unsqueeze(1).float(), ones, stride=stride, padding=padding).squeeze(1) > 0
