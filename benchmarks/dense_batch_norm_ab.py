"""Paired A/B of the masked-dense backend's BatchNorm (BENCHMARKS.md, "Masked-dense BatchNorm"): masked
sums (``MaskedDenseBackend.batch_norm`` now) vs ``bn`` on the rows ``map_rows`` gathers through
``nonzero`` (the code before, ``Backend.batch_norm``). A SparK ResNet-18 train step (fwd + bwd) on CPU,
both interleaved in one process so load hits both alike; the losses are checked equal first.

  PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dense_batch_norm_ab.py [REPEATS]
"""
import statistics
import sys
import time

import torch

from mimsparse.backends import Backend
from mimsparse.backends.dense import MaskedDenseBackend
from mimsparse.models.fcmae import FCMAE
from mimsparse.models.resnet import SparseResNet

torch.set_num_threads(1)


class GatheredRows(MaskedDenseBackend):
    batch_norm = Backend.batch_norm


def main(repeats: int = 7) -> None:
    torch.manual_seed(0)
    backends = {"masked sums": MaskedDenseBackend(), "gathered rows": GatheredRows()}
    model = FCMAE(SparseResNet.from_name("resnet18"), decoder="spark", decoder_dim=128, mask_ratio=0.6)
    x = torch.randn(8, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    visible = model.make_mask(x, torch.Generator().manual_seed(0))
    model.eval()  # the equality check must not move the running statistics
    losses = []
    for backend in backends.values():
        model.encoder.backend = backend
        with torch.no_grad():
            losses.append(model(x, visible)[0])
    assert torch.allclose(*losses, rtol=1e-5), losses
    model.train()
    times = {name: [] for name in backends}
    for rep in range(repeats + 1):  # the first round warms up
        for name, backend in backends.items():
            model.encoder.backend = backend
            start = time.perf_counter()
            model(x, visible)[0].backward()
            elapsed = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            if rep:
                times[name].append(elapsed)
    for name, t in times.items():
        print(f"{name}: {statistics.median(t):.3f} s median ({min(t):.3f}-{max(t):.3f})")
    ratios = [a / b for a, b in zip(times["masked sums"], times["gathered rows"])]
    print(f"masked sums / gathered rows, median of per-repeat ratios: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
