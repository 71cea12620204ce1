"""Paired A/B of packed's k x k conv implementations on ResNet-50's conv shapes (fwd+bwd), same rows
and weights, interleaved in one process, median of 7: the dense map (``_SubmConv``: scatter, oneDNN
conv, gather; stride 1 only), the gather-GEMM (``gather_conv``) and halo tiles (``tile_conv``, the
mask's blocks at the output stage). BENCHMARKS.md, "ResNet-50 on the packed backend" and "halo tiles".

  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gather_conv_ab.py [mask_ratio=0.6] [batch=4] [device=cpu]
"""
import sys
import time

import torch

from mimsparse.backends.packed import PackedGeometry
from mimsparse.backends.packed.gather_conv import gather_conv
from mimsparse.backends.packed.subm_conv import _SubmConv
from mimsparse.backends.packed.tile_conv import conv_tile_index, tile_conv
from mimsparse.backends.packed.windows import windows
from mimsparse.masking import random_patch_mask, upsample_mask

ratio = float(sys.argv[1]) if len(sys.argv) > 1 else 0.6
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 4
device = torch.device(sys.argv[3] if len(sys.argv) > 3 else "cpu")
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
torch.manual_seed(0)
vis = random_patch_mask(batch, (7, 7), ratio, torch.Generator().manual_seed(0)).to(device)
SHAPES = (  # name, C_in, C_out, k, stride, padding, input map side
    ("stem 7x7/2 224->112", 3, 64, 7, 2, 3, 224),
    ("3x3/1 56 (stage 1)", 64, 64, 3, 1, 1, 56),
    ("3x3/2 56->28", 128, 128, 3, 2, 1, 56),
    ("3x3/1 28 (stage 2)", 128, 128, 3, 1, 1, 28),
    ("3x3/2 28->14", 256, 256, 3, 2, 1, 28),
    ("3x3/1 14 (stage 3)", 256, 256, 3, 1, 1, 14),
    ("3x3/2 14->7", 512, 512, 3, 2, 1, 14),
    ("3x3/1 7 (stage 4)", 512, 512, 3, 1, 1, 7),
    ("1x1/2 56->28 (shortcut)", 256, 512, 1, 2, 0, 56),
    ("1x1/2 28->14 (shortcut)", 512, 1024, 1, 2, 0, 28),
    ("1x1/2 14->7 (shortcut)", 1024, 2048, 1, 2, 0, 14),
)
for name, cin, cout, k, stride, pad, hin in SHAPES:
    hout = hin // stride
    g_in = PackedGeometry.from_mask(upsample_mask(vis, hin // 7), 224 // hin)
    g_out = g_in if stride == 1 else PackedGeometry.from_mask(upsample_mask(vis, hout // 7), 224 // hout)
    s = hout // 7  # the output blocks (the mask's patches at that stage)
    x = torch.randn(g_in.num_rows, cin, device=device, requires_grad=cin > 3)  # the stem's input: no gradient
    w = (torch.randn(cout, cin, k, k, device=device) * 0.05).requires_grad_()
    win, inv = windows(g_in, g_out, k, stride, pad)
    gy = torch.randn(g_out.num_rows, cout, device=device)
    fns = {"gather": lambda: gather_conv(x, w, None, win, inv).backward(gy)}
    if s > 1 and k > 1:
        index = conv_tile_index(g_in, g_out, s, k, stride, pad)
        fns["tiles"] = lambda: tile_conv(x, w, None, index, stride).backward(gy)
    if stride == 1:
        fns["dense map"] = lambda: _SubmConv.apply(x, w, None, g_in, 1).backward(gy)
    times = {key: [] for key in fns}
    for f in fns.values():
        f()
    for _ in range(7):
        for key, f in fns.items():
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            times[key].append(time.perf_counter() - t0)
    med = {key: sorted(v)[3] * 1e3 for key, v in times.items()}
    best = min(med, key=med.get)
    print(f"{name} (output blocks {s}x{s}, span {s * stride}): " + ", ".join(f"{key} {v:.1f} ms" for key, v in med.items())
          + f"; fastest {best}", flush=True)
