"""Paired A/B of the static dense-map depthwise conv's weight gradient under torch.compile (BENCHMARKS.md,
"torch.compile on CPU"): oneDNN's depthwise ``convolution_backward`` (the code before, kept here as
``Old``) vs ``_planes_weight_grad`` (one conv over (channel, sample) planes, what ``_StaticDWConv`` does on
CPU now). Same inputs, interleaved, gradients checked equal first.

  PYTHONPATH=. .venv/bin/python benchmarks/static_dwconv_weight_grad_ab.py
"""
import statistics
import time

import torch
import torch.nn.functional as F

from mimsparse.backends.packed import PackedGeometry, _StaticDWConv, _scatter_static, _gather_static
from mimsparse.masking import random_patch_mask, upsample_mask

torch.set_num_threads(2)


class Old(_StaticDWConv):
    """The backward before: the weight gradient from convolution_backward on channels-last maps."""

    @staticmethod
    def backward(ctx, grad_out):
        feats, weight, flat = ctx.saved_tensors
        c, w = feats.shape[1], weight.to(feats.dtype)
        g = _scatter_static(grad_out, flat, ctx.dims)
        gf = _gather_static(F.conv2d(g, w.flip(-2, -1), None, padding=ctx.pad, groups=c), flat)
        gw = torch.ops.aten.convolution_backward(g, _scatter_static(feats, flat, ctx.dims), w, None, [1, 1],
                                                 list(ctx.pad), [1, 1], False, [0, 0], c, [False, True, False])[1]
        return gf, gw, grad_out.sum(0), None, None


# (batch, map side, channels): tiny stages 2-4 and atto stages 2-3 at 224 px, 40 % of the patches visible
for B, H, C in ((8, 28, 192), (8, 14, 384), (8, 28, 80), (8, 14, 160), (8, 7, 768)):
    scale = H // 7
    active = upsample_mask(random_patch_mask(B, (7, 7), 0.6, torch.Generator().manual_seed(0)), scale)
    geom = PackedGeometry.from_mask_static(active, 4, int(active[0].sum()))
    f = torch.randn(geom.num_rows, C, requires_grad=True)
    wt, bs = torch.randn(C, 1, 7, 7, requires_grad=True), torch.randn(C, requires_grad=True)
    gr = torch.randn(geom.num_rows, C)
    fns = {"old": torch.compile(lambda f, w, b: Old.apply(f, w, b, geom.flat, (B, H, H)), dynamic=False),
           "planes": torch.compile(lambda f, w, b: _StaticDWConv.apply(f, w, b, geom.flat, (B, H, H)), dynamic=False)}

    def step(fn):
        fn(f, wt, bs).backward(gr)
        out = (f.grad, wt.grad, bs.grad)
        f.grad = wt.grad = bs.grad = None
        return out

    r0 = step(fns["old"])
    for got, want in zip(step(fns["planes"]), r0):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    t = {k: [] for k in fns}
    for _ in range(15):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            step(fn)
            t[k].append((time.perf_counter() - t0) * 1e3)
    print(f"B={B} {H}x{H} C={C}: fwd+bwd ms, median/min of 15:",
          ", ".join(f"{k} {statistics.median(v):.2f}/{min(v):.2f}" for k, v in t.items()), flush=True)
