"""The backend interface: the few sparse operations a ConvNet encoder needs.

Model code holds the parameters (in timm's dense layout, e.g. conv weights [out, in, kh, kw]) and
passes them to these operations; a backend owns no parameters. That is what keeps checkpoints
independent of the backend: every backend reshapes the dense-layout weights to its library's layout
on the fly.

A backend works on its own *native* tensor type (a masked dense map, an ``ME.SparseTensor``, a
``spconv.SparseConvTensor``, packed rows); ``SparseBatch`` is the common currency to enter and leave.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
import torch.nn.functional as F

from mimsparse.sparse import SparseBatch

Native = Any
FeatureFn = Callable[[torch.Tensor], torch.Tensor]


class Backend(ABC):
    """Submanifold sparse ops over the active sites of a batch of 2D maps.

    Semantics every backend must reproduce (tests compare each backend with ``dense``):
    - ``conv``/``dwconv``: stride-1 k x k convolution, zero padding, evaluated at active sites only,
      reading only active sites (inactive ones count as zero). The active set is unchanged.
    - ``downsample``: k x k convolution with stride k; an output site is active when any of its
      k x k input block is.
    - ``map_feats``: a function applied to each active site's feature vector (LayerNorm, Linear, GELU).
    - ``grn``: Global Response Normalisation with statistics per sample over that sample's active
      sites (not over the whole batch).
    """

    name: str = "base"

    # ---- entering and leaving -------------------------------------------------------------------
    @abstractmethod
    def from_sparse(self, sb: SparseBatch) -> Native: ...

    @abstractmethod
    def to_sparse(self, t: Native) -> SparseBatch: ...

    def from_dense(self, x_bchw: torch.Tensor, active_bhw: torch.Tensor, stride: int = 1) -> Native:
        return self.from_sparse(SparseBatch.from_dense(x_bchw, active_bhw, stride))

    def to_dense(self, t: Native) -> torch.Tensor:
        """[B, C, H, W] with zeros at inactive sites."""
        return self.to_sparse(t).to_dense()

    def patch_embed(self, image: torch.Tensor, active_bhw: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None, stride: int) -> Native:
        """Non-overlapping k x k / stride k conv of a dense image, kept at ``active_bhw`` (output grid).

        Patches do not overlap and the mask is aligned with them, so no pixel of a masked patch
        reaches an active site: a dense conv of the image is exact and cheap (few input channels).
        """
        out = F.conv2d(image, weight, bias, stride=weight.shape[-1])
        return self.from_dense(out, active_bhw, stride)

    # ---- convolutions (weights in torch's dense layout) -----------------------------------------
    @abstractmethod
    def conv(self, t: Native, weight: torch.Tensor, bias: torch.Tensor | None) -> Native:
        """Submanifold k x k conv, full channels; weight [C_out, C_in, k, k]."""

    @abstractmethod
    def dwconv(self, t: Native, weight: torch.Tensor, bias: torch.Tensor | None) -> Native:
        """Submanifold depthwise k x k conv; weight [C, 1, k, k]."""

    @abstractmethod
    def downsample(self, t: Native, weight: torch.Tensor, bias: torch.Tensor | None) -> Native:
        """k x k conv with stride k; weight [C_out, C_in, k, k]."""

    # ---- per-site and per-sample ops ------------------------------------------------------------
    @abstractmethod
    def map_feats(self, t: Native, fn: FeatureFn) -> Native:
        """Apply ``fn`` to the channel (last) dimension of every active site's features."""

    @abstractmethod
    def grn(self, t: Native, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> Native: ...

    @abstractmethod
    def add(self, a: Native, b: Native) -> Native:
        """Sum of two tensors with the same active sites (residual connections)."""

    @abstractmethod
    def scale_samples(self, t: Native, scale_b: torch.Tensor) -> Native:
        """Multiply every site of sample b by ``scale_b[b]`` (stochastic depth)."""

    # ---- capabilities -----------------------------------------------------------------------------
    def supported_dtypes(self, device: torch.device) -> tuple[torch.dtype, ...]:
        if device.type == "cuda":
            return (torch.float32, torch.float16, torch.bfloat16)
        return (torch.float32, torch.bfloat16)

    def check_dtype(self, dtype: torch.dtype, device: torch.device) -> None:
        supported = self.supported_dtypes(torch.device(device))
        if dtype not in supported:
            names = ", ".join(dtype_name(d) for d in supported)
            raise TypeError(
                f"the {self.name} backend does not support {dtype_name(dtype)} on "
                f"{torch.device(device).type}; supported: {names} (use --amp none or another backend)"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RowBackend(Backend):
    """Shared per-site/per-sample ops for backends whose native tensor stores feature rows [N, C]
    plus a batch index per row (packed, spconv, MinkowskiEngine)."""

    @abstractmethod
    def feats(self, t: Native) -> torch.Tensor: ...

    @abstractmethod
    def batch_index(self, t: Native) -> torch.Tensor:
        """int64 [N]: the sample each row belongs to."""

    @abstractmethod
    def batch_size(self, t: Native) -> int: ...

    @abstractmethod
    def with_feats(self, t: Native, feats: torch.Tensor) -> Native:
        """Same sites, new feature rows."""

    def map_feats(self, t, fn):
        return self.with_feats(t, fn(self.feats(t)))

    def grn(self, t, weight, bias, eps=1e-6):
        f = self.feats(t)
        gx = per_sample_l2_norm(f, self.batch_index(t), self.batch_size(t))
        nx = gx / (gx.mean(dim=1, keepdim=True) + eps)
        # index_select: much faster backward on CPU than advanced indexing nx[batch]
        out = f + torch.addcmul(bias, weight, f * nx.index_select(0, self.batch_index(t)))
        return self.with_feats(t, out)

    def add(self, a, b):
        return self.with_feats(a, self.feats(a) + self.feats(b))

    def scale_samples(self, t, scale_b):
        f = self.feats(t)
        return self.with_feats(t, f * scale_b.to(f.dtype).index_select(0, self.batch_index(t)).unsqueeze(1))


def per_sample_l2_norm(feats_nc: torch.Tensor, batch_n: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[B, C]: L2 norm over each sample's rows. A sample without rows gets 0, with zero gradient
    (a plain sqrt would give 0 * inf = NaN in backward, unlike torch.linalg.vector_norm)."""
    sumsq = feats_nc.new_zeros(batch_size, feats_nc.shape[1], dtype=torch.float32)
    sumsq = sumsq.index_add(0, batch_n, feats_nc.float().square())
    positive = sumsq > 0
    norm = torch.where(positive, sumsq, torch.ones_like(sumsq)).sqrt() * positive
    return norm.to(feats_nc.dtype)


# ---- helpers shared by the library backends -----------------------------------------------------
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
