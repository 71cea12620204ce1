"""Paired A/B of packed's two k x k conv implementations on ResNet-50's stage shapes (3x3, fwd+bwd):
the dense map (``_SubmConv``: scatter, oneDNN conv, gather) vs the gather-GEMM (``gather_conv``), same
rows and weights, interleaved in one process, median of 7. BENCHMARKS.md, "ResNet-50 on the packed backend".

  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gather_conv_ab.py [mask_ratio=0.6] [batch=4]
"""
import sys
import time

import torch

from mimsparse.backends.packed import PackedGeometry
from mimsparse.backends.packed.gather_conv import gather_conv
from mimsparse.backends.packed.subm_conv import _SubmConv
from mimsparse.backends.packed.windows import windows
from mimsparse.masking import random_patch_mask, upsample_mask

ratio = float(sys.argv[1]) if len(sys.argv) > 1 else 0.6
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 4
torch.manual_seed(0)
vis = random_patch_mask(batch, (7, 7), ratio, torch.Generator().manual_seed(0))
for hw, c in ((56, 64), (28, 128), (14, 256), (7, 512)):
    g = PackedGeometry.from_mask(upsample_mask(vis, hw // 7), 224 // hw)
    x = torch.randn(g.num_rows, c, requires_grad=True)
    w = (torch.randn(c, c, 3, 3) * 0.05).requires_grad_()
    win, inv = windows(g, g, 3, 1, 1)
    gy = torch.randn(g.num_rows, c)
    fns = {"dense map": lambda: _SubmConv.apply(x, w, None, g, 1).backward(gy),
           "gather": lambda: gather_conv(x, w, None, win, inv).backward(gy)}
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(7):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: sorted(v)[3] * 1e3 for k, v in times.items()}
    print(f"{hw}x{hw}, {c} ch: " + ", ".join(f"{k} {v:.1f} ms" for k, v in med.items())
          + f", gather / dense {med['gather'] / med['dense map']:.2f}", flush=True)
