"""torch.compile of the packed train steps in static mode (``num_visible`` given): ConvNeXt V2's FCMAE
step and SparK's ResNet step (configs/spark_resnet50.yaml's objective).

One compile per model (CPU inductor is slow): the step is compiled with ``fullgraph=True,
dynamic=False`` -- any graph break or host sync that needs a data-dependent size fails the compile --
and three batches with different masks must run without a recompile and give the eager loss and
gradients (eager = the same model, uncompiled, on the masked-dense reference backend)."""
from __future__ import annotations

import copy

import pytest
import torch

from mimsparse.models.build import build_fcmae, build_masker
from mimsparse.models.fcmae import FCMAE
from mimsparse.models.resnet import SparseResNet
from mimsparse.config import ConfigError, ModelConfig, PretrainConfig, load_config
from mimsparse.train.build import Pretrainer
from mimsparse.masking import random_patch_mask
from tests.conftest import tiny_overrides
from tests.helpers import randomize_

# The same model, batch and image size as the pretraining test below (tiny_overrides, batch 2): its
# compile then finds this graph in inductor's cache instead of compiling again (minutes on CPU).
IMG, BATCH, RATIO, DECODER_DIM = 64, 2, 0.6, 64
TOL = 1e-4  # fp32; inductor fuses and reorders reductions


def grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def batches(model, count=3):
    grid = (IMG // model.patch_size,) * 2
    for seed in range(count):
        g = torch.Generator().manual_seed(100 + seed)
        yield torch.randn(BATCH, 3, IMG, IMG, generator=g), random_patch_mask(BATCH, grid, RATIO, g)


def run_compiled(ref):
    """Compiles a packed copy of ``ref`` (fullgraph, static) and runs it and eager ``ref`` on three batches;
    returns per batch (loss, grads) of both, and the number of graphs dynamo compiled."""
    packed = copy.deepcopy(ref)
    packed.encoder.backend = "packed"
    step = torch.compile(packed, fullgraph=True, dynamic=False)
    n = packed.visible_count((IMG // packed.patch_size,) * 2)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    results = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for images, visible in batches(packed):
            assert int(visible[0].sum()) == n
            packed.zero_grad(set_to_none=True)
            ref.zero_grad(set_to_none=True)
            loss_c = step(images, visible, num_visible=n)[0]
            loss_c.backward()
            loss_e = ref(images, visible)[0]
            loss_e.backward()
            results.append(((loss_c.detach(), grads(packed)), (loss_e.detach(), grads(ref))))
    return results, torch._dynamo.utils.counters["stats"]["unique_graphs"]


def check_matches_eager(results, tol, min_params):
    assert len(results) == 3
    for (loss_c, g_c), (loss_e, g_e) in results:
        assert torch.isfinite(loss_c)
        assert abs(loss_c.item() - loss_e.item()) <= tol * abs(loss_e.item())
        assert g_c.keys() == g_e.keys() and len(g_e) > min_params
        for name in g_e:
            scale = g_e[name].abs().max().clamp_min(1e-12)
            err = ((g_c[name] - g_e[name]).abs().max() / scale).item()
            assert err <= tol, f"{name}: gradient relative error {err:.2e}"


def check_one_graph(results, graphs):
    """Different masks with the same count reuse the one compiled graph (error_on_recompile would
    have raised otherwise); the losses differ, so the masks really changed."""
    assert graphs == 1
    assert len({r[0][0].item() for r in results}) == 3


@pytest.fixture(scope="module")
def compiled_run():
    torch.manual_seed(0)
    return run_compiled(randomize_(build_fcmae(PretrainConfig(model=ModelConfig(decoder_dim=DECODER_DIM)), "dense"),
                                   std=0.1))


def test_compiled_packed_step_matches_eager_dense(compiled_run):
    check_matches_eager(compiled_run[0], TOL, 100)


def test_three_masks_one_graph(compiled_run):
    check_one_graph(*compiled_run)


@pytest.fixture(scope="module")
def compiled_spark_run():
    """SparK's step: the sparse ResNet (its stem, strided convs, max pool and BatchNorms over the visible
    rows) under the spark decoder, with configs/spark_resnet50.yaml's objective; the encoder is a
    one-block-per-stage ResNet (the graph of a resnet50 takes too long to compile for a test)."""
    cfg = load_config("configs/spark_resnet50.yaml", [f"model.decoder_dim={DECODER_DIM}", f"data.img_size={IMG}"])
    torch.manual_seed(0)
    m = cfg.model
    model = FCMAE(SparseResNet("basic", (1, 1, 1, 1)), decoder_dim=m.decoder_dim, decoder_depth=m.decoder_depth,
                  norm_pix_loss=m.norm_pix_loss, masker=build_masker(cfg.mask), decoder=m.decoder)
    return run_compiled(randomize_(model, std=0.1))


def test_compiled_spark_step_matches_eager_dense(compiled_spark_run):
    """BatchNorm over the few visible rows of a 64x64 batch is ill-conditioned in float32 (see
    test_resnet.py): the compiled step's reordered sums reach ~1e-4 of the eager dense gradients."""
    check_matches_eager(compiled_spark_run[0], 1e-3, 40)


def test_compiled_spark_step_three_masks_one_graph(compiled_spark_run):
    check_one_graph(*compiled_spark_run)


def _pretrain(tmp_path, photo_dir, **extra):
    values = {"data.path": str(photo_dir), "train.batch_size": BATCH, "train.max_steps": 2,
              "model.decoder_dim": DECODER_DIM, "mask.ratio": RATIO, **extra}
    trainer = Pretrainer(load_config(None, tiny_overrides(tmp_path, **values)), "packed", show_progress=False)
    return trainer, [r["loss"] for r in trainer.run()["history"]]


def test_train_compile_default_matches_eager(photo_dir, tmp_path):
    """train.compile=default: the 2-step packed pretraining gives the eager losses (the second one
    after an AdamW step, so the compiled gradients were right too); checkpoints hold the plain model."""
    _, eager = _pretrain(tmp_path / "eager", photo_dir)
    trainer, compiled = _pretrain(tmp_path / "compiled", photo_dir, **{"train.compile": "default"})
    assert len(compiled) == 2 and compiled == pytest.approx(eager, rel=1e-4)
    assert isinstance(trainer.train_model, torch._dynamo.eval_frame.OptimizedModule)
    assert not any(k.startswith("_orig_mod") for k in trainer.checkpoint_state()["model"])


def test_train_compile_refuses_unknown_modes(photo_dir, tmp_path):
    with pytest.raises(ConfigError, match="train.compile must be one of off, default, reduce-overhead, "
                                          "max-autotune, got 'fast'"):
        _pretrain(tmp_path, photo_dir, **{"train.compile": "fast"})


def test_compiled_masked_dense_max_pool_backward_equals_eager():
    """The masked-dense max pool compiled (inductor) forward and backward, with windows that hold no
    active site at the map's border (a -inf fill there once sent the compiled gradient to a padding
    position: an out-of-bounds index)."""
    from mimsparse.backends import get_backend

    dense = get_backend("dense")
    active = torch.zeros(2, 8, 8, dtype=torch.bool)
    active[0, 4:, 4:] = True                    # sample 0: the top-left windows see no active site
    active[1, :2, 6:] = True
    active_out = torch.ones(2, 4, 4, dtype=torch.bool)
    x = torch.randn(2, 3, 8, 8)
    gy = torch.randn(2, 3, 4, 4)

    def pooled(x):
        return dense.to_dense(dense.max_pool(dense.from_dense(x, active), 3, 2, active_out))

    grads = []
    for fn in (pooled, torch.compile(pooled, fullgraph=True, dynamic=False)):
        leaf = x.clone().requires_grad_()
        out = fn(leaf)
        (out * gy).sum().backward()
        grads.append((out.detach(), leaf.grad))
    (out_e, g_e), (out_c, g_c) = grads
    assert torch.equal(out_c, out_e) and torch.allclose(g_c, g_e)
    assert (out_e[0, :, 0, 0] == 0).all() and (g_e * ~active.unsqueeze(1)).abs().sum() == 0  # inactive: no gradient
