"""torch.compile of the packed FCMAE train step (static mode: ``num_visible`` given).

One compile per module (CPU inductor is slow): the step is compiled with ``fullgraph=True,
dynamic=False`` -- any graph break or host sync that needs a data-dependent size fails the compile --
and three batches with different masks must run without a recompile and give the eager loss and
gradients (eager = the same model, uncompiled, on the masked-dense reference backend)."""
from __future__ import annotations

import copy

import pytest
import torch

from mimsparse.models.build import build_fcmae
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


@pytest.fixture(scope="module")
def compiled_run():
    """Runs the compiled step on three batches once; returns per batch (loss, grads) of the compiled
    packed model and of the eager dense model, and the number of graphs dynamo compiled."""
    torch.manual_seed(0)
    ref = randomize_(build_fcmae(PretrainConfig(model=ModelConfig(decoder_dim=DECODER_DIM)), "dense"), std=0.1)
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


def test_compiled_packed_step_matches_eager_dense(compiled_run):
    results, _ = compiled_run
    assert len(results) == 3
    for (loss_c, g_c), (loss_e, g_e) in results:
        assert torch.isfinite(loss_c)
        assert abs(loss_c.item() - loss_e.item()) <= TOL * abs(loss_e.item())
        assert g_c.keys() == g_e.keys() and len(g_e) > 100
        for name in g_e:
            scale = g_e[name].abs().max().clamp_min(1e-12)
            err = ((g_c[name] - g_e[name]).abs().max() / scale).item()
            assert err <= TOL, f"{name}: gradient relative error {err:.2e}"


def test_three_masks_one_graph(compiled_run):
    """Different masks with the same count reuse the one compiled graph (error_on_recompile would
    have raised otherwise); the losses differ, so the masks really changed."""
    results, graphs = compiled_run
    assert graphs == 1
    losses = [r[0][0].item() for r in results]
    assert len(set(losses)) == 3


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
