"""SparK's ResNet-50 train step on the packed backend, eager vs compiled (static mode: ``num_visible`` given,
``torch.compile(fullgraph=True, dynamic=False)``), interleaved in one process after the compile: the FCMAE
loss, backward and an AdamW step, as tools/benchmark.py's train_step. Median and min of N rounds.
BENCHMARKS.md, "Halo tiles for full convs".

  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/resnet50_compiled_step_ab.py [batch=4] [rounds=9] [mask_ratio=0.6]
"""
import copy
import sys
import time

import torch

from mimsparse.config import ModelConfig
from mimsparse.masking import random_patch_mask
from mimsparse.models.build import build_encoder
from mimsparse.models.fcmae import FCMAE

batch = int(sys.argv[1]) if len(sys.argv) > 1 else 4
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 9
ratio = float(sys.argv[3]) if len(sys.argv) > 3 else 0.6
torch.manual_seed(0)
images = torch.randn(batch, 3, 224, 224)
visible = random_patch_mask(batch, (7, 7), ratio, torch.Generator().manual_seed(0))
eager = FCMAE(build_encoder(ModelConfig(name="resnet50"), "packed"), mask_ratio=ratio)
compiled = copy.deepcopy(eager)
n = compiled.visible_count((7, 7))
compiled_loss = torch.compile(lambda: compiled(images, visible, num_visible=n)[0], fullgraph=True, dynamic=False)
steps = {}
for name, model, loss_fn in (("eager", eager, lambda: eager(images, visible)[0]), ("compiled", compiled, compiled_loss)):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(model=model, loss_fn=loss_fn, opt=opt):
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    steps[name] = step
t0 = time.perf_counter()
for f in steps.values():
    f()
print(f"first calls (compile included): {time.perf_counter() - t0:.0f} s", flush=True)
times = {key: [] for key in steps}
for _ in range(rounds):
    for key, f in steps.items():
        t0 = time.perf_counter()
        f()
        times[key].append(time.perf_counter() - t0)
med = {key: sorted(v)[rounds // 2] for key, v in times.items()}
print(f"batch {batch}, mask ratio {ratio}, {rounds} rounds, {torch.get_num_threads()} thread(s)")
for key, v in times.items():
    print(f"{key}: median {med[key] * 1e3:.0f} ms (min {min(v) * 1e3:.0f}, max {max(v) * 1e3:.0f})")
print(f"compiled / eager: {med['compiled'] / med['eager']:.2f} by medians, {min(times['compiled']) / min(times['eager']):.2f} by minima")
