"""Which spconv algorithm a conv runs with: Native on CPU (the only one there); on CUDA the requested one,
checked once per (device, dtype, kernel, stride, channels) against ``F.conv2d`` forward and backward,
falling back to Native (with a warning) and raising rather than returning wrong numbers."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from mimsparse.errors import ConfigError
from mimsparse.sparse import SparseBatch

from .checks import autocast_dtype, dtype_name, max_rel_error
from .spconv_rules import ConvAlgo, _make_tensor, spconv_conv

ALGOS = {
    "native": ConvAlgo.Native,
    "mask_implicit_gemm": ConvAlgo.MaskImplicitGemm,
    "mask_split_implicit_gemm": ConvAlgo.MaskSplitImplicitGemm,
}
# Largest relative error (max |a - b| / max |b|) the CUDA self-check accepts. Loose enough for
# TF32/fp16 rounding (seen: 3e-4 fp32, 2e-3 fp16), far below a wrong kernel (seen: ~1).
_CHECK_TOL = {torch.float32: 1e-2, torch.float16: 3e-2}


class AlgoChoice:
    """The spconv backend's algorithm option and its per-configuration verification (a base class of
    ``SpconvBackend``, kept apart: it is about trusting spconv's CUDA kernels, not about the ops)."""

    def _init_algo(self, algo: str | ConvAlgo) -> None:
        if isinstance(algo, str):
            if algo.lower() not in ALGOS:
                raise ConfigError(f"unknown spconv algorithm {algo!r}; choose one of {', '.join(ALGOS)}")
            algo = ALGOS[algo.lower()]
        if algo not in ALGOS.values():
            raise ConfigError(f"unsupported spconv algorithm {algo}; choose one of {', '.join(ALGOS)}")
        self.algo = algo
        # (device, dtype, k, stride, subm, c_in, c_out) -> the algorithm verified for it (CUDA only)
        self._verified_algo: dict[tuple, ConvAlgo] = {}

    def _algo_for(self, feats: torch.Tensor, weight: torch.Tensor, k: int, stride: int, subm: bool) -> ConvAlgo:
        device = feats.device
        if device.type != "cuda":
            return ConvAlgo.Native  # the only algorithm spconv runs on CPU
        dtype = autocast_dtype(device) or feats.dtype
        return self._resolve_algo(device, dtype, k, stride, subm, weight.shape[1], weight.shape[0])

    def _resolve_algo(self, device: torch.device, dtype: torch.dtype, k: int, stride: int, subm: bool,
                      c_in: int, c_out: int) -> ConvAlgo:
        """The first of (requested algorithm, Native) that passes ``_check_algo`` for this config."""
        key = (str(device), dtype, k, stride, subm, c_in, c_out)
        if key in self._verified_algo:
            return self._verified_algo[key]
        candidates = [self.algo] + ([ConvAlgo.Native] if self.algo != ConvAlgo.Native else [])
        failures = []
        for algo in candidates:
            try:
                with torch.enable_grad():  # the op may run under no_grad (eval); the check needs backward
                    err = self._check_algo(algo, device, dtype, k, stride, subm, c_in, c_out)
            except Exception as e:  # e.g. a JIT compile failure or "Not Implemented"
                failures.append(f"{algo.name}: {type(e).__name__}: {e}")
                continue
            if err <= _CHECK_TOL.get(dtype, 1e-2):
                if failures:
                    warnings.warn(f"spconv: {'; '.join(failures)}; using {algo.name} for {k}x{k} "
                                  f"stride {stride} convs on {device}", RuntimeWarning, stacklevel=3)
                self._verified_algo[key] = algo
                return algo
            failures.append(f"{algo.name}: relative error {err:.3g} against F.conv2d")
        raise RuntimeError(
            f"spconv gives wrong results or fails for a {k}x{k} stride-{stride} "
            f"{'submanifold ' if subm else ''}conv ({c_in}->{c_out} channels, {dtype_name(dtype)}) on {device}: "
            f"{'; '.join(failures)}. Use another backend (dense, packed) or another spconv build."
        )

    def _check_algo(self, algo: ConvAlgo, device: torch.device, dtype: torch.dtype, k: int, stride: int,
                    subm: bool, c_in: int, c_out: int) -> float:
        """Relative error of spconv's conv (this module's own code path, forward and backward)
        against float64 F.conv2d on the CPU, on a small random problem."""
        g = torch.Generator().manual_seed(0)
        b, h, w = 2, 3 * k + 2, 2 * k + 3
        active = torch.rand(b, h, w, generator=g) < 0.5
        active[0, 0, 0] = True
        x = torch.randn(b, c_in, h, w, generator=g, dtype=torch.float64) * active.unsqueeze(1)
        wt = torch.randn(c_out, c_in, k, k, generator=g, dtype=torch.float64) / (c_in * k * k) ** 0.5
        gout_dense = torch.randn(b, c_out, h // stride, w // stride, generator=g, dtype=torch.float64)

        # reference: masked dense conv, float64 on the CPU
        x_ref, w_ref = x.clone().requires_grad_(), wt.clone().requires_grad_()
        out_active = active if subm else F.max_pool2d(active[:, None].double(), stride)[:, 0] > 0
        pad = k // 2 if subm else 0
        ref = F.conv2d(x_ref, w_ref, stride=stride, padding=pad) * out_active.unsqueeze(1)
        (ref * gout_dense).sum().backward()

        sb = SparseBatch.from_dense(x.to(dtype), active)
        t = _make_tensor(sb.feats.to(device).contiguous().requires_grad_(), sb.coords.to(device).contiguous(),
                         sb.spatial_shape, b, 1)
        w_dev = wt.to(device=device, dtype=dtype).requires_grad_()
        out, idx = spconv_conv(t, w_dev, k, stride, subm, algo)
        ib, iy, ix = idx.long().cpu().unbind(1)
        gout = gout_dense.permute(0, 2, 3, 1)[ib, iy, ix]
        out.backward(gout.to(device=device, dtype=out.dtype))
        ref_rows = ref.detach().permute(0, 2, 3, 1)[ib, iy, ix]
        if not torch.equal(out_active, SparseBatch(idx.cpu(), out.detach().cpu(), b, out_active.shape[1:]).active_mask()):
            return float("inf")
        sb_b, sb_y, sb_x = sb.coords.long().unbind(1)
        errs = [
            max_rel_error(out.detach().cpu(), ref_rows),
            max_rel_error(t.feats.grad.cpu(), x_ref.grad.permute(0, 2, 3, 1)[sb_b, sb_y, sb_x]),
            max_rel_error(w_dev.grad.cpu(), w_ref.grad),
        ]
        return max(errs)
