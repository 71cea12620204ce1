"""SparK's ResNet-50 train step on the packed backend, eager vs compiled (static mode: ``num_visible`` given,
``torch.compile(fullgraph=True, dynamic=False)``), interleaved in one process after the compile: the FCMAE
loss, backward and an AdamW step, as tools/benchmark.py's train_step. Median and min of N rounds.
BENCHMARKS.md, "Halo tiles for full convs".

  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/resnet50_compiled_step_ab.py [batch=4] [rounds=9] [mask_ratio=0.6]
"""
import copy
import time

import torch

from mimsparse.config import ModelConfig
from mimsparse.models.build import build_encoder
from mimsparse.models.fcmae import FCMAE
from resnet50_ab import interleaved, setup

batch, rounds, ratio, images, visible = setup(default_rounds=9)
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
times = interleaved(steps, rounds, warm_up=False)
med = {key: sorted(v)[rounds // 2] for key, v in times.items()}
print(f"batch {batch}, mask ratio {ratio}, {rounds} rounds, {torch.get_num_threads()} thread(s)")
for key, v in times.items():
    print(f"{key}: median {med[key] * 1e3:.0f} ms (min {min(v) * 1e3:.0f}, max {max(v) * 1e3:.0f})")
print(f"compiled / eager: {med['compiled'] / med['eager']:.2f} by medians, {min(times['compiled']) / min(times['eager']):.2f} by minima")
