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
import torch.nn as nn
import torch.nn.functional as F

from mimsparse.errors import UnsupportedDtype
from mimsparse.sparse import SparseBatch

from .checks import dtype_name

Native = Any
FeatureFn = Callable[[torch.Tensor], torch.Tensor]
RowsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Backend(ABC):
    """Submanifold sparse ops over the active sites of a batch of 2D maps.

    Semantics every backend must reproduce (tests compare each backend with ``dense``):
    - ``conv``/``dwconv``: stride-1 k x k convolution, zero padding, evaluated at active sites only,
      reading only active sites (inactive ones count as zero). The active set is unchanged.
    - ``strided_conv``: F.conv2d's strided geometry (stride, zero padding) reading active input sites
      only, evaluated at the output sites the caller gives, or else at every output site whose
      window holds an active input (the libraries' generative strided conv).
    - ``map_feats``: a function applied to each active site's feature vector (LayerNorm, Linear, GELU).
    - ``sample_l2_norm``/``scale_samples``: per-sample reductions and broadcasts over each sample's
      own active sites (never over the whole batch); model code builds GRN and DropPath from them.
    - ``map_rows``: a function of all active sites' rows at once, with each row's sample index
      (anything whose statistics span sites; ``batch_norm`` uses it by default). GRN and DropPath
      use the two per-sample ops instead, which no backend has to gather rows for.
    - ``max_pool``: k x k windows centred on stride * (output site) (padding k // 2, torchvision's
      ResNet geometry), over active input sites only, evaluated at the output sites the caller gives.
    """

    name: str = "base"

    # ---- entering and leaving -------------------------------------------------------------------
    @abstractmethod
    def from_sparse(self, sb: SparseBatch) -> Native: ...

    @abstractmethod
    def to_sparse(self, t: Native) -> SparseBatch: ...

    def from_dense(self, x_bchw: torch.Tensor, active_bhw: torch.Tensor, stride: int = 1,
                   rows_per_sample: int | None = None, block: int = 1) -> Native:
        """The map's active sites. ``rows_per_sample``, ``block``: as for :meth:`patch_embed`."""
        return self.from_sparse(SparseBatch.from_dense(x_bchw, active_bhw, stride))

    def to_dense(self, t: Native) -> torch.Tensor:
        """[B, C, H, W] with zeros at inactive sites."""
        return self.to_sparse(t).to_dense()

    def patch_embed(self, image: torch.Tensor, active_bhw: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None, stride: int, rows_per_sample: int | None = None,
                    block: int = 1) -> Native:
        """Non-overlapping k x k / stride k conv of a dense image, kept at ``active_bhw`` (output grid).

        ``rows_per_sample``: when the caller knows every sample has exactly this many active sites, a
        backend may build its indices from it without host syncs (packed's static mode); others ignore it.
        ``block``: the caller's promise that ``active_bhw`` is made of whole block x block squares of the
        block grid (the mask's patches on the output grid); with ``rows_per_sample`` it lets packed size
        its depthwise tiles without a sync. Others ignore it.

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
    def strided_conv(self, t: Native, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, *,
                     padding: int, active_out_bhw: torch.Tensor | None = None) -> Native:
        """k x k conv (weight [C_out, C_in, k, k]) with stride ``stride`` and zero padding ``padding``
        (F.conv2d's geometry: output site (i, j) reads input (stride*i + dy - padding, stride*j + dx -
        padding)), reading only active input sites (inactive = 0). Output sites: ``active_out_bhw``
        (bool [B, Ho, Wo] on F.conv2d's output grid) when given (a ResNet's next-stage mask), else every
        output site whose window holds an active input site (ConvNeXt's k x k / stride k downsampling,
        where the libraries' own strided convs produce exactly these). The result's stride is ``t``'s
        stride * ``stride``."""

    @abstractmethod
    def max_pool(self, t: Native, kernel: int, stride: int, active_out_bhw: torch.Tensor) -> Native:
        """k x k max pool (k odd) with stride ``stride`` and padding k // 2 (F.conv2d's geometry),
        the max over the ACTIVE input sites of each window only, evaluated at the output sites
        ``active_out_bhw``; an output site whose window holds no active input gets 0."""

    # ---- per-site and per-sample ops ------------------------------------------------------------
    @abstractmethod
    def map_feats(self, t: Native, fn: FeatureFn) -> Native:
        """Apply ``fn`` to the channel (last) dimension of every active site's features."""

    @abstractmethod
    def map_rows(self, t: Native, fn: RowsFn) -> Native:
        """``fn(feats_nc, batch_n)`` on exactly the active sites: their feature rows [N, C] (in the
        backend's row order) and int64 [N] sample indices; it returns new rows [N, C'] for the same sites."""

    def batch_norm(self, t: Native, bn: nn.BatchNorm2d) -> Native:
        """``bn`` over the active sites of the whole batch: in training its mean and biased variance
        normalise them and update the running statistics exactly as ``bn`` itself does; in eval the
        running ones. By default ``bn`` itself on the gathered rows (an [N, C, 1, 1] map)."""
        return self.map_rows(t, lambda feats_nc, _: bn(feats_nc[:, :, None, None]).flatten(1))

    @abstractmethod
    def batch_size(self, t: Native) -> int:
        """Samples in the batch (a sample may have no active site at all)."""

    @abstractmethod
    def add(self, a: Native, b: Native) -> Native:
        """Sum of two tensors with the same active sites (residual connections)."""

    @abstractmethod
    def sample_l2_norm(self, t: Native) -> torch.Tensor:
        """float32 [B, C]: the L2 norm of each channel over each sample's active sites, computed in
        float32 whatever the features' dtype (bf16 sums over thousands of sites lose small channels).
        A sample without sites, or an all-zero channel, gets 0 with zero gradient (like
        ``torch.linalg.vector_norm``). GRN's statistic; an op because a backend reduces it where its
        rows already are (the dense map, ``[B, n, C]`` views of uniform packed rows)."""

    @abstractmethod
    def scale_samples(self, t: Native, scale: torch.Tensor, shift: torch.Tensor | None = None) -> Native:
        """``feats * scale[b] + shift`` at every active site of sample b: ``scale`` is [B] (DropPath)
        or [B, C] (GRN), ``shift`` [C] or None. Computed in the wider of the features' and ``scale``'s
        dtypes and returned in the features' dtype, so a float32 scale is not rounded to bf16."""

    # ---- capabilities -----------------------------------------------------------------------------
    def supported_dtypes(self, device: torch.device) -> tuple[torch.dtype, ...]:
        if device.type == "cuda":
            return (torch.float32, torch.float16, torch.bfloat16)
        return (torch.float32, torch.bfloat16)

    def check_dtype(self, dtype: torch.dtype, device: torch.device) -> None:
        supported = self.supported_dtypes(torch.device(device))
        if dtype not in supported:
            names = ", ".join(dtype_name(d) for d in supported)
            raise UnsupportedDtype(
                f"the {self.name} backend does not support {dtype_name(dtype)} on "
                f"{torch.device(device).type}; supported: {names} (compute in float32: train.amp=none in "
                f"pretraining, --amp none in tools/benchmark.py; or use another backend)"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
