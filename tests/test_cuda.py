"""CUDA checks (marker ``cuda``; skipped without a GPU). ``scripts/gpu_check.sh`` runs them with
``pytest -m cuda`` on a GPU machine. Reference: the same model in float32 on the CPU with the
masked-dense backend; TF32 is switched off so float32 on the GPU is float32."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from mimsparse.backends import BackendUnavailable, get_backend
from mimsparse.models.build import build_fcmae
from mimsparse.config import ModelConfig, PretrainConfig
from mimsparse.masking import random_patch_mask, upsample_mask
from tests.conftest import ROOT, tiny_overrides
from tests.helpers import check_conv_against_conv2d, randomize_

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")]

IMG, BATCH = 64, 4
FP32_TOL = 1e-3         # fp32 GPU vs CPU: summation order only
AMP_TOL = {torch.bfloat16: (5e-3, 3e-2), torch.float16: (2e-3, 1e-2)}  # (loss, gradient norm), relative


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _backend(name: str):
    if name == "packed-tiles":  # static halo tiles forced (auto keeps the dense map on a GPU)
        from mimsparse.backends.packed import PackedBackend
        return PackedBackend(dw_tiles=(8, 8))
    try:
        return get_backend(name)
    except BackendUnavailable as e:
        pytest.skip(str(e))


def _grads(model) -> dict:
    return {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}


def _norm_rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    num = sum(((a[k] - b[k]) ** 2).sum() for k in b)
    return float((num / sum((b[k] ** 2).sum() for k in b)).sqrt())


def _step(model, images, visible, device, amp=None, num_visible=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        loss = model(images.to(device), visible.to(device), num_visible=num_visible)[0]
    loss.backward()
    return loss.item(), _grads(model)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    ref = randomize_(build_fcmae(PretrainConfig(model=ModelConfig(decoder_dim=64)), "dense"), std=0.1)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, IMG, IMG, generator=g)
    visible = random_patch_mask(BATCH, (IMG // 32, IMG // 32), 0.6, g)
    return ref, images, visible, _step(ref, images, visible, torch.device("cpu"))


@pytest.mark.parametrize("backend,static", [("dense", False), ("packed", False), ("packed", True),
                                            ("packed-tiles", True), ("spconv", False)])
def test_backend_on_cuda_matches_cpu_dense(reference, backend, static):
    ref, images, visible, (loss_ref, grads_ref) = reference
    model = copy.deepcopy(ref).cuda()
    model.encoder.backend = _backend(backend)
    n = model.visible_count(visible.shape[1:]) if static else None
    loss, grads = _step(model, images, visible, torch.device("cuda"), num_visible=n)
    assert abs(loss - loss_ref) <= FP32_TOL * abs(loss_ref)
    assert _norm_rel(grads, grads_ref) <= FP32_TOL


def test_spconv_algorithm_self_check():
    """The requested implicit-GEMM algorithm is verified against F.conv2d per conv config and replaced
    by Native when it fails or is wrong (seen on an H100 for 7x7 kernels); either way the conv the
    backend runs is right."""
    from mimsparse.backends.spconv import SpconvBackend

    try:
        backend = SpconvBackend(algo="mask_implicit_gemm")
    except ImportError as e:
        pytest.skip(str(e))
    dev = torch.device("cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        algo = backend._resolve_algo(dev, torch.float32, 7, 1, True, 96, 96)
    assert algo.name in ("MaskImplicitGemm", "Native")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 96, 16, 16, generator=g).to(dev)
    active = (torch.rand(2, 16, 16, generator=g) < 0.5).to(dev)
    w = (torch.randn(96, 96, 7, 7, generator=g) * 0.02).to(dev)
    out = backend.to_dense(backend.conv(backend.from_dense(x, active), w, None))
    ref = F.conv2d(x * active[:, None], w, padding=3) * active[:, None]
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-3


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["dense", "packed"])
def test_amp_on_cuda_close_to_fp32(reference, backend, amp):
    ref, images, visible, (loss_ref, grads_ref) = reference
    model = copy.deepcopy(ref).cuda()
    model.encoder.backend = backend
    loss, grads = _step(model, images, visible, torch.device("cuda"), amp=amp)
    loss_tol, grad_tol = AMP_TOL[amp]
    assert abs(loss - loss_ref) <= loss_tol * abs(loss_ref)
    assert _norm_rel(grads, grads_ref) <= grad_tol


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_packed_step_on_cuda(reference, mode):
    """fullgraph, static shapes: three masks, one graph, the CPU reference's loss and gradients
    (reduce-overhead replays the step as a CUDA graph)."""
    ref, _, _, _ = reference
    model = copy.deepcopy(ref).cuda()
    model.encoder.backend = "packed"
    step = torch.compile(model, fullgraph=True, dynamic=False, mode=None if mode == "default" else mode)
    n = model.visible_count((IMG // 32, IMG // 32))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):
            g = torch.Generator().manual_seed(10 + seed)
            images = torch.randn(BATCH, 3, IMG, IMG, generator=g)
            visible = random_patch_mask(BATCH, (IMG // 32, IMG // 32), 0.6, g)
            loss_ref, grads_ref = _step(ref, images, visible, torch.device("cpu"))
            torch.compiler.cudagraph_mark_step_begin()
            loss, grads = _step(step, images, visible, torch.device("cuda"), num_visible=n)
            assert abs(loss - loss_ref) <= FP32_TOL * abs(loss_ref)
            assert _norm_rel(grads, grads_ref) <= FP32_TOL


def test_one_gpu_nccl_ddp_step(reference, tmp_path):
    """DDP over nccl with one process (world size 1, so averaging is the identity): a bf16 packed step
    through DDP gives the gradients of the same step without DDP."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    ref, images, visible, _ = reference
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        plain = copy.deepcopy(ref).cuda()
        plain.encoder.backend = "packed"
        ddp_model = copy.deepcopy(plain)
        ddp = DistributedDataParallel(ddp_model, device_ids=[0])
        dev = torch.device("cuda")
        loss_p, grads_p = _step(plain, images, visible, dev, amp=torch.bfloat16)
        ddp_model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_d = ddp(images.cuda(), visible.cuda())[0]
        loss_d.backward()
        assert loss_d.item() == pytest.approx(loss_p, rel=1e-6)
        assert _norm_rel(_grads(ddp_model), grads_p) <= 1e-6
        total = torch.ones(1, device=dev)
        dist.all_reduce(total)
        assert total.item() == 1.0
    finally:
        dist.destroy_process_group()


def test_pretraining_cli_on_cuda_compiled_bf16(photo_dir, tmp_path):
    """tools/pretrain.py on cuda:0, packed, train.amp=bf16, train.compile=default, 2 steps."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(ROOT / "tools" / "pretrain.py"), "--backend", "packed", "--device", "cuda",
           "--no-progress", *tiny_overrides(out, **{"data.path": str(photo_dir), "train.max_steps": 2,
                                                    "train.amp": "bf16", "train.compile": "default"})]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, f"pretrain failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["loss"] is not None for r in log)


@pytest.mark.parametrize("impl", ["tiles", "gather", "dense"])
@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (3, 2, 1), (7, 2, 3)])
def test_packed_conv_implementations_on_cuda_match_cpu_conv2d(impl, k, stride, padding):
    """ResNet's k x k and strided convs through each of packed's implementations on CUDA (auto picks
    the dense map / gather there; tiles are forced), forward and gradients against CPU F.conv2d."""
    from mimsparse.backends.packed import PackedBackend

    vis = random_patch_mask(2, (3, 3), 0.5, torch.Generator().manual_seed(k))
    h = 12 * stride
    active, active_out = upsample_mask(vis, 4 * stride), upsample_mask(vis, 4)
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 8, h, h, generator=g), torch.randn(6, 8, k, k, generator=g), torch.randn(6, generator=g)
    check_conv_against_conv2d(PackedBackend(conv_impl=impl), x, active, w, b, stride, padding,
                              None if stride == 1 else active_out, FP32_TOL, "cuda")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_finetuning_cli_on_cuda_with_autocast_close_to_fp32(tmp_path, amp):
    """tools/finetune.py on cuda:0 with --amp (fp16: the loss scaler), 2 accumulated micro-batches per
    step, under a one-process nccl torchrun: the epoch's losses within 0.02 of the fp32 run's."""
    run = ["--checkpoint", "random", "--model", "convnextv2_atto", "--data", "lfw-subset", "--label-fraction", "0.4",
           "--eval-limit", "20", "--img-size", "32", "--batch-size", "8", "--accum-iter", "2", "--epochs", "1",
           "--drop-path", "0", "--no-progress", "--device", "cuda"]
    losses = {}
    for precision in ("none", amp):
        out = tmp_path / precision
        cmd = [sys.executable, str(ROOT / "tools" / "launch.py"), "--standalone", "--nproc-per-node", "1",
               str(ROOT / "tools" / "finetune.py"), *run, "--amp", precision, "--output-dir", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert proc.returncode == 0, f"finetune failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        record = json.loads((out / "log.jsonl").read_text().splitlines()[0])
        losses[precision] = (record["train_loss"], record["test_loss"])
    assert losses[amp] == pytest.approx(losses["none"], abs=0.02) and losses[amp] != losses["none"]
