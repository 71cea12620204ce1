"""The packed static mode's depthwise 7x7 conv, fwd+bwd, eager vs torch.compile (BENCHMARKS.md,
"torch.compile on CPU"): with the backward AOTAutograd derives (the pre-fix code, kept here), with
the written-out backward of ``_StaticDWConv`` (dense map), and static mode's own choice (halo tiles
where the patches make whole tiles, built inside the compiled graph as in the train step); the eager
halo-tile path for reference.

  PYTHONPATH=. .venv/bin/python benchmarks/static_dwconv_compile.py [B H C]   (default 8 56 40: atto stage 1, 224 px)
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from mimsparse.backends.packed import PackedBackend, PackedGeometry, PackedTensor, _StaticDWConv
from mimsparse.masking import random_patch_mask, upsample_mask

torch.set_num_threads(2)
B, H, C = (int(a) for a in sys.argv[1:4]) if len(sys.argv) > 3 else (8, 56, 40)
scale = H // 7  # 7x7 patches at every stage of a 224 px image
active = upsample_mask(random_patch_mask(B, (7, 7), 0.6, torch.Generator().manual_seed(0)), scale)
geom = PackedGeometry.from_mask_static(active, 4, int(active[0].sum()))  # block unknown: the dense map
tiles_geom = PackedGeometry.from_mask(active, 4)
torch.manual_seed(0)
feats = torch.randn(geom.num_rows, C, requires_grad=True)
weight, bias = torch.randn(C, 1, 7, 7, requires_grad=True), torch.randn(C, requires_grad=True)
grad = torch.randn(geom.num_rows, C)


def derived(f, w, b):  # rows -> zero channels-last map -> conv -> rows; backward left to autograd
    x = f.new_zeros(geom.num_sites, C).index_copy(0, geom.flat, f).view(B, H, H, C).permute(0, 3, 1, 2)
    return geom.gather(F.conv2d(x, w, b, padding=3, groups=C))


def written_out(f, w, b):
    return _StaticDWConv.apply(f, w, b, geom.flat, (B, H, H))


def static_choice(f, w, b, a):  # the geometry built inside the graph, whole patches promised
    g = PackedGeometry.from_mask_static(a, 4, geom.num_rows // B, block=scale)
    return PackedBackend().dwconv(PackedTensor(f, g), w, b).feats


static_compiled = torch.compile(static_choice, dynamic=False, fullgraph=True)
choice = PackedBackend().choose_tile_static(PackedGeometry.from_mask_static(active, 4, geom.num_rows // B, block=scale),
                                            7, 7) or "dense map"


def tiles(f, w, b):
    return PackedBackend().dwconv(PackedTensor(f, tiles_geom), w, b).feats


variants = {"derived backward, eager": derived, "derived backward, compiled": torch.compile(derived, dynamic=False),
            "written-out backward, eager": written_out,
            "written-out backward, compiled": torch.compile(written_out, dynamic=False),
            f"static mode's choice ({choice}), compiled": lambda f, w, b: static_compiled(f, w, b, active),
            "halo tiles (eager default path)": tiles}


def step(fn):
    fn(feats, weight, bias).backward(grad)
    out = (feats.grad, weight.grad, bias.grad)
    feats.grad = weight.grad = bias.grad = None
    return out


ref = step(derived)
times = {}
for name, fn in variants.items():
    for got, want in zip(step(fn), ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    step(fn)
    times[name] = []
for _ in range(11):  # interleaved, so load changes hit every variant alike
    for name, fn in variants.items():
        t0 = time.perf_counter()
        step(fn)
        times[name].append((time.perf_counter() - t0) * 1e3)
print(f"B={B} {H}x{H} C={C}, 40 % active, fwd+bwd ms (median / min of 11)")
for name, t in times.items():
    print(f"  {name}: {statistics.median(t):.1f} / {min(t):.1f}")
