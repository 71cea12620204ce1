"""GRN as a backend op vs. as model code over map_rows (BENCHMARKS.md, "GRN"). Mask ratio from $R.

  R=0.6 PYTHONPATH=. .venv/bin/python benchmarks/grn_op_vs_rows.py
"""
import torch, time
from mimsparse.backends import get_backend
from mimsparse.backends.rows import RowBackend, per_sample_l2_norm
from tests.helpers import random_active
torch.set_num_threads(2)
torch.manual_seed(0)
B, C, H, W = 8, 160, 56, 56   # convnextv2_atto stage 1 MLP expansion (4 x 40), 224 px
from mimsparse.masking import random_patch_mask, upsample_mask
active = upsample_mask(random_patch_mask(B, (H // 8, W // 8), float(__import__("os").environ.get("R", "0.6")), generator=torch.Generator().manual_seed(0)), 8)  # exactly 40 % of every sample visible, as in training
x = torch.randn(B, C, H, W)
w, b = torch.randn(C, requires_grad=True), torch.randn(C, requires_grad=True)

def rows_grn(f, bn, bs, eps=1e-6):
    gx = per_sample_l2_norm(f, bn, bs)
    nx = gx / (gx.mean(dim=1, keepdim=True) + eps)
    return f + torch.addcmul(b, w, f * nx.index_select(0, bn))

def timeit(fn, n=30):
    ts = []
    for i in range(n + 3):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    ts = sorted(ts[3:]); return ts[len(ts) // 2] * 1e3

res = {}
for name in ("dense", "packed"):
    be = get_backend(name)
    t = be.from_dense(x, active)
    feats_in = t
    def op():
        y = be.grn(feats_in, w, b); be.to_dense(y).sum().backward()
    def via_rows():
        y = be.map_rows(feats_in, lambda f, bn: rows_grn(f, bn, B)); be.to_dense(y).sum().backward()
    res[name] = (timeit(op), timeit(via_rows))
    if name == "packed":
        def generic():
            y = RowBackend.grn(be, feats_in, w, b); be.to_dense(y).sum().backward()
        res["packed-generic-row-grn"] = (timeit(generic), None)
for k, v in res.items():
    print(k, "op %.1f ms" % v[0], "" if v[1] is None else "model code via map_rows %.1f ms" % v[1])
