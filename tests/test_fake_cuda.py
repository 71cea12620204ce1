"""The CUDA forward paths checked for device placement and dtypes without a GPU.

``FakeTensorMode`` makes ``device="cuda"`` tensors without data on a CPU-only machine and raises when
a CPU tensor meets a CUDA one; a dispatch mode under it records every op's output, so a tensor the
code creates on the wrong device or in the wrong dtype shows even where it meets nothing. Parameters
are faked onto "cuda" and the model is called through ``functional_call`` (``model.to("cuda")`` would
touch the driver). Forward only: the autograd engine needs a real CUDA context for backward.

What only a real GPU shows (kernels, numbers, speed, spconv, MinkowskiEngine) is the GPU check's
(README, "GPU check"); what these cover is listed there too.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mimsparse.backends import get_backend
from mimsparse.masking import PatchMasker, block_patch_mask
from mimsparse.models.fcmae import FCMAE
from mimsparse.models.loss import pixel_targets, reconstruction_loss
from mimsparse.models.registry import family_of

B, H, W = 2, 64, 96  # non-square: a 2 x 3 patch grid


class OpRecorder(TorchDispatchMode):
    """Every aten op that ran, with the device and dtype of each tensor it returned."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, torch.device, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += [(str(func), t.device, t.dtype) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out

    def off_device(self, device: str) -> list[str]:
        return sorted({op for op, dev, _ in self.ops if dev.type != device})

    def float_dtypes(self) -> set[torch.dtype]:
        return {dtype for _, _, dtype in self.ops if dtype.is_floating_point}


@contextlib.contextmanager
def autocast_on_fake(device_type: str, dtype: torch.dtype):
    """What ``torch.autocast(device_type, dtype)`` enters, without its check that CUDA is available
    (which turns it off here): the fake CUDA tensors carry autocast's dispatch key all the same."""
    prev_on, prev_dtype = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    torch.set_autocast_enabled(device_type, True)
    torch.set_autocast_dtype(device_type, dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled(device_type, prev_on)
        torch.set_autocast_dtype(device_type, prev_dtype)


def _model(encoder: str, backend, decoder: str) -> FCMAE:
    torch.manual_seed(0)
    cls = family_of(encoder).encoder
    # SimMIM's linear head needs the mask-token input; the others take the sparse one
    encoder_input = "mask_token" if decoder == "linear" else "sparse"
    return FCMAE(cls.from_name(encoder, backend=backend), decoder=decoder, decoder_dim=64, mask_ratio=0.5,
                 encoder_input=encoder_input)


def _fake_forward(model: FCMAE, device: str, static: bool, amp: torch.dtype | None = None):
    """One training-mode forward on fake tensors on ``device``. Dense inputs get a mask whose second
    sample is all masked; static mode needs every sample to keep the same count, so it gets a random
    mask. Returns (loss, pred, recorder)."""
    mode, rec = FakeTensorMode(), OpRecorder()
    with mode:
        state = {k: mode.from_tensor(v).to(device)
                 for k, v in [*model.named_parameters(), *model.named_buffers()]}
        images = torch.randn(B, 3, H, W, device=device)
        if static:
            visible = model.make_mask(images)
            num_visible = model.visible_count(visible.shape[1:])
        else:
            visible = torch.ones(B, H // 32, W // 32, dtype=torch.bool, device=device)
            visible[0, 0, 1] = False
            visible[1] = False
            num_visible = None
        with rec, (autocast_on_fake(device, amp) if amp else contextlib.nullcontext()):
            loss, pred, _ = functional_call(model, state, (images, visible), {"num_visible": num_visible})
    return loss, pred, rec


CASES = [  # (encoder, decoder, backend, static mode)
    *[(enc, dec, "dense", False) for enc in ("convnextv2_atto", "resnet18") for dec in ("fcmae", "linear", "spark")],
    ("resnet50", "spark", "dense", False),  # the bottleneck block
    # packed: static mode only (its general mode reads per-sample counts on the host, which a fake
    # tensor has not); the ResNet's stem, strided convs and max pool then take their sites from the geometry
    *[("convnextv2_atto", dec, "packed", True) for dec in ("fcmae", "linear", "spark")],
    ("resnet18", "spark", "packed", True), ("resnet50", "spark", "packed", True),
]


@pytest.mark.parametrize("encoder, decoder, backend, static", CASES)
def test_fcmae_forward_stays_on_cuda_in_fp32(encoder, decoder, backend, static):
    """Also: no host sync (a fake tensor has no values for nonzero, .item(), .tolist() or bool())."""
    model = _model(encoder, backend, decoder)
    loss, pred, rec = _fake_forward(model, "cuda", static)
    assert loss.shape == () and loss.device.type == "cuda" and loss.dtype == torch.float32
    assert pred.shape == (B, (H // 32) * (W // 32), 32 * 32 * 3) and pred.device.type == "cuda"
    assert rec.off_device("cuda") == []  # every tensor the forward created is on the input's device
    assert rec.float_dtypes() == {torch.float32}  # ... and in its dtype
    assert len(rec.ops) > 100  # the recorder saw the whole forward


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("encoder, decoder, backend, static", [
    ("convnextv2_atto", "fcmae", "dense", False), ("convnextv2_atto", "fcmae", "packed", True),
    ("resnet18", "spark", "dense", False)])
def test_fcmae_forward_under_cuda_autocast(encoder, decoder, backend, static, amp):
    """CUDA autocast (fp16 is GPU-only) entered by hand: convs and matmuls compute in ``amp``, the
    statistics (LayerNorm, GRN, BatchNorm) and the loss in float32, and nothing leaves the GPU."""
    model = _model(encoder, backend, decoder)
    loss, pred, rec = _fake_forward(model, "cuda", static, amp)
    assert loss.dtype == torch.float32 and loss.device.type == "cuda"
    assert rec.off_device("cuda") == []
    assert rec.float_dtypes() == {amp, torch.float32}  # no float64, no other half type
    convs = [dtype for op, _, dtype in rec.ops if op.startswith("aten.convolution")]
    assert convs and set(convs) == {amp}  # autocast really was on for the CUDA tensors


def _spy(backend, name: str) -> list:
    """Record what ``backend.<name>`` returns (on this instance only)."""
    calls, method = [], getattr(backend, name)

    def spy(*args, **kwargs):
        calls.append(method(*args, **kwargs))
        return calls[-1]

    setattr(backend, name, spy)
    return calls


def test_packed_static_depthwise_conv_takes_the_device_branch():
    """On a GPU static mode keeps cuDNN's depthwise conv over the whole map; on CPU the same geometry
    (stage 1: 16 x 24 sites, whole 8 x 8 patches) takes halo tiles where they are cheaper."""
    backend = get_backend("packed")
    model = _model("convnextv2_atto", backend, "fcmae")
    tiles = _spy(backend, "choose_tile_static")
    _, _, rec = _fake_forward(model, "cuda", static=True)
    assert len(tiles) == sum(model.encoder.depths) and set(tiles) == {None}
    dw = [op for op, _, _ in rec.ops if op.startswith("aten.convolution")]
    assert len(dw) >= len(tiles)  # each depthwise conv ran as one dense conv
    tiles.clear()
    _fake_forward(model, "cpu", static=True)
    assert tiles[:2] == [(8, 8), (8, 8)]  # stage 1 on CPU: the tiles


@pytest.mark.parametrize("strategy", ["random", "progressive", "importance"])
def test_mask_makers_give_masks_on_the_images_device(strategy):
    """The maskers draw on the host from a CPU generator (the same mask on any device, for a seed) and
    move the mask to the images' device; importance masking copies its scores to the host to sort."""
    mode = FakeTensorMode()
    with mode:
        images = torch.randn(B, 3, H, W, device="cuda")
        visible = PatchMasker(strategy=strategy, ratio=0.5)(images, 32, torch.Generator().manual_seed(0), 0.5)
    assert visible.device.type == "cuda" and visible.dtype == torch.bool and visible.shape == (B, 2, 3)


def test_block_mask_is_drawn_on_the_host_and_moved_once():
    """Block masking places its rectangles in Python from host draws (``.item()`` on CPU tensors, no
    device sync), which a fake tensor cannot give values for; its one device op is the final move,
    checked on the data-less meta device."""
    visible = block_patch_mask(B, (2, 3), 0.5, torch.Generator().manual_seed(0), "meta")
    assert visible.device.type == "meta" and visible.dtype == torch.bool and visible.shape == (B, 2, 3)


@pytest.mark.parametrize("loss, loss_on, norm_pix", [("mse", "masked", True), ("l1", "all", False)])
@pytest.mark.parametrize("pred_dtype", [torch.float32, torch.bfloat16])
def test_loss_on_cuda_is_float32_on_cuda(loss, loss_on, norm_pix, pred_dtype):
    mode, rec = FakeTensorMode(), OpRecorder()
    with mode:
        images = torch.randn(B, 3, H, W, device="cuda")
        pred = torch.randn(B, 6, 32 * 32 * 3, device="cuda", dtype=pred_dtype)
        visible = torch.zeros(B, 6, dtype=torch.bool, device="cuda")
        with rec:
            value = reconstruction_loss(pred, pixel_targets(images, 32, norm_pix), visible, loss, loss_on)
    assert value.shape == () and value.device.type == "cuda" and value.dtype == torch.float32
    assert rec.off_device("cuda") == []


@pytest.mark.parametrize("device, cudnn_weight_grad", [("cuda", True), ("cpu", False)])
def test_packed_static_depthwise_backward_takes_the_device_branch(device, cudnn_weight_grad):
    """Static mode's depthwise backward, called directly (the autograd engine cannot run it on fake
    CUDA tensors): on a GPU the weight gradient is cuDNN's convolution_backward, on CPU the per-plane
    conv; either way every gradient is on the features' device and in their dtype."""
    from mimsparse.backends.packed import _StaticDWConv

    b, h, w, c, n = 2, 8, 12, 5, 40
    mode, rec = FakeTensorMode(), OpRecorder()
    with mode:
        feats, weight = torch.randn(b * n, c, device=device), torch.randn(c, 1, 7, 7, device=device)
        flat = torch.cat([torch.arange(n, device=device), h * w + torch.arange(n, device=device)])
        ctx = SimpleNamespace(saved_tensors=(feats, weight, flat), needs_input_grad=(True, True, True, False, False),
                              dims=(b, h, w), pad=(3, 3), has_bias=True)
        with rec:
            grads = _StaticDWConv.backward(ctx, torch.randn(b * n, c, device=device))[:3]
    assert [tuple(g.shape) for g in grads] == [(b * n, c), (c, 1, 7, 7), (c,)]
    assert {g.device.type for g in grads} == {device} and {g.dtype for g in grads} == {torch.float32}
    assert rec.off_device(device) == [] and rec.float_dtypes() == {torch.float32}
    assert any(op.startswith("aten.convolution_backward") for op, _, _ in rec.ops) == cudnn_weight_grad
