"""ResNet-50 encoder fwd+bwd, interleaved in one process (drift and noise hit every row alike): timm's
dense resnet50 on the whole image, packed with only the gather-GEMM for k x k convs, packed as shipped
(halo tiles where the blocks allow, conv_plan), spconv. Median and min of N rounds; x ideal = median /
(timm's median x the visible fraction). BENCHMARKS.md, "halo tiles for full convs".

  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/resnet50_encoder_ab.py [batch=4] [rounds=7] [mask_ratio=0.6]
"""
import timm
import torch

from mimsparse.backends.packed import PackedBackend
from mimsparse.config import ModelConfig
from mimsparse.models.build import build_encoder
from mimsparse.models.fcmae import FCMAE
from resnet50_ab import interleaved, setup

batch, rounds, ratio, img, vis = setup(default_rounds=7)
dense = timm.create_model("resnet50", num_classes=0)
models = {name: FCMAE(build_encoder(ModelConfig(name="resnet50"), name), mask_ratio=ratio) for name in ("packed", "spconv")}


def dense_run():
    dense.forward_features(img).square().mean().backward()
    dense.zero_grad(set_to_none=True)


def sparse_run(name, backend=None):
    model = models[name]

    def run():
        if backend is not None:
            model.encoder.backend = backend
        model.encoder(img, vis).float().square().mean().backward()
        model.zero_grad(set_to_none=True)
    return run


fns = {"timm dense (r 0)": dense_run, "packed, gather only": sparse_run("packed", PackedBackend(conv_impl="gather")),
       "packed (tiles + gather)": sparse_run("packed", PackedBackend()), "spconv": sparse_run("spconv")}
times = interleaved(fns, rounds)
visible = vis.float().mean().item()
ref = sorted(times["timm dense (r 0)"])[rounds // 2]
print(f"batch {batch}, mask ratio {ratio} (visible fraction {visible:.3f}), {rounds} rounds, "
      f"{torch.get_num_threads()} thread(s)")
for key, v in times.items():
    v = sorted(v)
    med = v[rounds // 2]
    print(f"{key}: median {med * 1e3:.0f} ms (min {v[0] * 1e3:.0f}, max {v[-1] * 1e3:.0f}), x ideal {med / (ref * visible):.2f}")
