"""GRN as model code (``GRN`` over ``sample_l2_norm`` + ``scale_samples``) vs the backend op it replaced
(``backend.grn`` of commit 3499aa4: the dense map op, the packed fused autograd function, the row
backends' shared formula), paired in one process so that load on the machine hits both alike
(BENCHMARKS.md, "GRN").

  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/grn_ab.py [REPEATS]

GRN fwd+bwd on atto's stage-1 MLP expansion (B 8, 160 channels, 56x56) at mask ratios 0.6 and 0, on every
installed backend, each repeat timing old and new back to back; prints the medians and the median of the per-repeat ratios.
"""
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mimsparse.backends import backend_names, get_backend
from mimsparse.errors import BackendUnavailable
from mimsparse.masking import random_patch_mask, upsample_mask
from mimsparse.models.convnextv2 import GRN

OLD_COMMIT = "3499aa4"


def load_old_backends(tmp: Path):
    """The backends package as of OLD_COMMIT, imported under another name."""
    root = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "-C", str(root), "archive", OLD_COMMIT, "backends"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    spec = importlib.util.spec_from_file_location("old_backends", tmp / "backends" / "__init__.py",
                                                  submodule_search_locations=[str(tmp / "backends")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_backends"] = module
    spec.loader.exec_module(module)
    return module


def old_backend(old, name: str):
    """An instance of the former backend class (its registry names the current modules)."""
    module_path, class_name, _ = old._BACKENDS[name]
    return getattr(importlib.import_module("old_backends." + module_path.rsplit(".", 1)[1]), class_name)()


def _available(name: str) -> bool:
    try:
        get_backend(name)
    except BackendUnavailable:
        return False
    return True


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(repeats: int) -> None:
    torch.set_num_threads(2)
    B, C, H, W = 8, 160, 56, 56
    x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(0))
    grn = GRN(C)
    with torch.no_grad():
        grn.weight.normal_(), grn.bias.normal_()
    with tempfile.TemporaryDirectory() as tmp:
        old = load_old_backends(Path(tmp))
        names = [n for n in backend_names() if _available(n)]
        print(f"GRN fwd+bwd, B {B}, {C} channels, {H}x{W}, {repeats} paired repeats, "
              f"{torch.get_num_threads()} threads; ms as median (min-max)")
        for ratio in (0.6, 0.0):
            vis = random_patch_mask(B, (H // 8, W // 8), ratio, generator=torch.Generator().manual_seed(0))
            active = upsample_mask(vis, 8)
            for name in names:
                new_be, old_be = get_backend(name), old_backend(old, name)
                t_new, t_old = new_be.from_dense(x, active), old_be.from_dense(x, active)

                def run_new():
                    new_be.to_dense(grn(t_new, new_be)).sum().backward()

                def run_old():
                    old_be.to_dense(old_be.grn(t_old, grn.weight, grn.bias)).sum().backward()

                # same numbers first: the comparison is of two implementations of one function
                out_new = new_be.to_dense(grn(t_new, new_be))
                out_old = old_be.to_dense(old_be.grn(t_old, grn.weight, grn.bias))
                assert torch.allclose(out_new, out_old, rtol=1e-5, atol=1e-5), (out_new - out_old).abs().max()
                for fn in (run_new, run_old) * 2:  # warm-up
                    fn()
                new, old_t = [], []
                for _ in range(repeats):
                    new.append(timed(run_new) * 1e3)
                    old_t.append(timed(run_old) * 1e3)
                ratios = [n / o for n, o in zip(new, old_t)]
                print(f"r={ratio} {name:9s}  model code {statistics.median(new):6.1f} ({min(new):.1f}-{max(new):.1f})"
                      f"  former op {statistics.median(old_t):6.1f} ({min(old_t):.1f}-{max(old_t):.1f})"
                      f"  model/op per repeat: median {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
