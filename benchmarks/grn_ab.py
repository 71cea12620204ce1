"""GRN as model code (sample_l2_norm + scale_samples, HEAD) vs the former backend op (``backend.grn``,
commit 3499aa4): run this file in a checkout of each and compare (BENCHMARKS.md, "GRN").

  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/grn_ab.py LABEL [REPEATS]

Prints one JSON line: GRN alone on atto's stage-1 MLP expansion (B 8, 160 channels, 56x56, fwd+bwd),
and the atto encoder fwd+bwd (B 8, 224), for dense and packed, at mask ratios 0.6 and 0.
"""
import json
import statistics
import sys
import time

import torch

from mimsparse.backends import get_backend
from mimsparse.benchmark import run_benchmark
from mimsparse.masking import random_patch_mask, upsample_mask

torch.set_num_threads(2)
label, repeats = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20
B, C, H, W = 8, 160, 56, 56
g = torch.Generator().manual_seed(0)
x = torch.randn(B, C, H, W, generator=g)
weight, bias = torch.randn(C, requires_grad=True), torch.randn(C, requires_grad=True)


def grn_fn(backend):
    if hasattr(backend, "grn"):  # the former op
        return lambda t: backend.grn(t, weight, bias)
    from mimsparse.models.convnextv2 import GRN

    module = GRN(C)
    module.weight, module.bias = torch.nn.Parameter(weight.detach()), torch.nn.Parameter(bias.detach())
    return lambda t: module(t, backend)


def median_ms(fn, n):
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


out = {"label": label}
for ratio in (0.6, 0.0):
    visible = upsample_mask(random_patch_mask(B, (H // 8, W // 8), ratio, generator=torch.Generator().manual_seed(0)), 8)
    for name in ("dense", "packed"):
        backend = get_backend(name)
        grn = grn_fn(backend)
        t = backend.from_dense(x, visible)
        out[f"grn {name} r={ratio}"] = median_ms(lambda: backend.to_dense(grn(t)).sum().backward(), repeats)
res = run_benchmark("convnextv2_atto", backends=("dense", "packed"), mask_ratios=(0.0, 0.6), batch=8, img=224,
                    device="cpu", repeats=max(3, repeats // 4), warmup=2, measures=("enc_fwd_bwd",),
                    log=lambda *a, **k: None)
for row in res["rows"]:
    out[f"encoder fwd+bwd {row['backend']} r={row['mask_ratio']}"] = row["enc_fwd_bwd"]["median_ms"]
print(json.dumps(out))
