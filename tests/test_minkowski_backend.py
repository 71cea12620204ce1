"""What only the MinkowskiEngine backend has: its kernel layout, non-square kernels, tensor strides, thread
count, float64, dtype refusals and options (the checks shared with spconv are in test_library_backends.py)."""
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

pytest.importorskip("MinkowskiEngine", reason="MinkowskiEngine is not installed (bash scripts/build_minkowski.sh "
                                              ".venv/bin/python, or `make setup`)")

import MinkowskiEngine as ME  # noqa: E402

from mimsparse.backends import get_backend  # noqa: E402
from mimsparse.backends.minkowski import MinkowskiBackend  # noqa: E402
from mimsparse.backends.minkowski_layout import channelwise_kernel, dense_weight, me_kernel  # noqa: E402
from mimsparse.sparse import SparseBatch  # noqa: E402
from tests.conftest import run_tool, tiny_overrides  # noqa: E402
from tests.helpers import downsample, random_active, rel_err  # noqa: E402

pytestmark = pytest.mark.minkowski

TOL = 1e-4
dense = get_backend("dense")
mink = get_backend("minkowski")
kernel_map = MinkowskiBackend(dwconv="kernel_map")


def _masked(x, active):
    return x * active.unsqueeze(1)


def _grad_check(fn, x, active, weight, bias):
    """fn(x, weight, bias) -> dense output; returns (output, grads of x, weight, bias) for a fixed
    random output gradient."""
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = fn(*leaves)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)))
    return out.detach(), [t.grad for t in leaves]


# ---- weight layout: ME's kernel offset order ------------------------------------------------------
def test_kernel_layout_round_trip_and_offset_order():
    w = torch.randn(4, 3, 3, 5)  # non-square: kh = 3 (y), kw = 5 (x)
    kern = me_kernel(w)
    assert kern.shape == (15, 3, 4) and kern.is_contiguous()
    assert torch.equal(dense_weight(kern, 3, 5), w)
    # ME enumerates offsets with the first spatial axis (y) fastest: index = ix * kh + iy
    for iy in range(3):
        for ix in range(5):
            assert torch.equal(kern[ix * 3 + iy], w[:, :, iy, ix].t())
    dw = torch.randn(6, 1, 5, 3)  # depthwise, MinkowskiChannelwiseConvolution's [kh*kw, C]
    cw = channelwise_kernel(dw)
    assert cw.shape == (15, 6)
    for iy in range(5):
        for ix in range(3):
            assert torch.equal(cw[ix * 5 + iy], dw[:, 0, iy, ix])


@pytest.mark.parametrize("kh,kw", [(3, 5), (5, 1), (1, 3), (7, 3)])
def test_non_square_kernels_on_non_square_maps_equal_conv2d(kh, kw):
    # the dense backend pads every side by k // 2 (square kernels only): compare with F.conv2d itself
    x = torch.randn(2, 5, 9, 14)
    active = random_active(2, 9, 14, 0.45, seed=kh * 10 + kw)
    w, b = torch.randn(6, 5, kh, kw), torch.randn(6)
    dw = torch.randn(5, 1, kh, kw)
    for op, weight, groups in (("conv", w, 1), ("dwconv", dw, 5)):
        backends = (mink,) if op == "conv" else (mink, kernel_map)
        ref, ref_grads = _grad_check(
            lambda x_, w_, b_: _masked(F.conv2d(_masked(x_, active), w_, b_, padding=(kh // 2, kw // 2), groups=groups),
                                       active), x, active, weight, b[:weight.shape[0]])
        for backend in backends:
            out, grads = _grad_check(
                lambda x_, w_, b_: backend.to_dense(getattr(backend, op)(backend.from_dense(x_, active), w_, b_)),
                x, active, weight, b[:weight.shape[0]])
            assert rel_err(out, ref) < TOL, (op, backend)
            for grad, ref_grad in zip(grads, ref_grads):
                assert rel_err(grad, ref_grad) < TOL, (op, backend)


def test_convs_after_downsample_use_the_coarse_grid():
    # a stride-2 ME tensor (coordinates multiples of 2): its 3x3 neighbours are 2 input units apart
    x = torch.randn(2, 4, 12, 10)
    active = random_active(2, 12, 10, 0.35, seed=11)
    wd, wc, wdw = torch.randn(6, 4, 2, 2), torch.randn(5, 6, 3, 3), torch.randn(6, 1, 5, 5)
    for backend in (mink, kernel_map):
        t = downsample(backend, backend.from_dense(x, active), wd, None)
        r = downsample(dense, dense.from_dense(x, active), wd, None)
        assert rel_err(backend.to_dense(backend.dwconv(t, wdw, None)), dense.to_dense(dense.dwconv(r, wdw, None))) < TOL
        assert rel_err(backend.to_dense(backend.conv(t, wc, None)), dense.to_dense(dense.conv(r, wc, None))) < TOL
        t2 = downsample(backend, t, torch.randn(3, 6, 2, 2), None)
        assert t2.tensor_stride == 4 and t2.stride == 4 and t2.spatial_shape == (3, 2)


# ---- entering and leaving --------------------------------------------------------------------------
def test_round_trip_keeps_all_zero_rows_and_the_explicit_shape():
    x = torch.randn(2, 3, 7, 9)
    active = random_active(2, 7, 9, 0.5, seed=1)
    active[:, -1, :], active[:, :, -1] = False, False  # nothing on the last row/column: dense() must not crop
    active[0, 2, 3] = True
    x[0, :, 2, 3] = 0.0  # an all-zero visible site stays a site (ME's to_sparse would drop it)
    sb = SparseBatch.from_dense(x, active)
    t = mink.from_sparse(sb)
    assert t.feats.shape == (int(active.sum()), 3) and t.batch_size == 2 and t.spatial_shape == (7, 9)
    back = mink.to_sparse(t)
    assert torch.equal(back.coords, sb.coords) and torch.equal(back.feats, sb.feats)
    assert (back.batch_size, back.spatial_shape, back.stride) == (2, (7, 9), 1)
    assert torch.equal(mink.to_dense(t), _masked(x, active))


def test_torch_thread_count_is_left_alone():
    # ME's CoordinateManager calls omp_set_num_threads(OMP_NUM_THREADS or CPU count, read at import)
    # in the OpenMP runtime torch uses: a plain ME.SparseTensor resets torch's setting.
    me_threads = min(sys.modules["MinkowskiCoordinateManager"].CPU_COUNT, 20)
    before = torch.get_num_threads()
    coords = torch.tensor([[0, 0, 0], [0, 1, 1]], dtype=torch.int32)
    try:
        torch.set_num_threads(me_threads + 1)  # no computation runs at this setting
        ME.SparseTensor(torch.randn(2, 3), coordinates=coords)
        assert torch.get_num_threads() == me_threads  # the pitfall
        torch.set_num_threads(me_threads + 1)
        mink.from_sparse(SparseBatch(coords, torch.randn(2, 3), 1, (2, 2)))
        assert torch.get_num_threads() == me_threads + 1
    finally:
        torch.set_num_threads(before)


# ---- refusals ---------------------------------------------------------------------------------------
def test_half_precision_is_refused_clearly():
    x = torch.randn(1, 4, 5, 5)
    active = random_active(1, 5, 5, 0.5, seed=0)
    for dtype in (torch.bfloat16, torch.float16):
        for device in ("cpu", "cuda"):
            with pytest.raises(TypeError, match=rf"minkowski backend does not support {str(dtype)[6:]} on {device}; "
                                                r"supported: float32, float64 \(compute in float32: train.amp=none in pretraining"):
                mink.check_dtype(dtype, torch.device(device))
        with pytest.raises(TypeError, match=rf"minkowski backend does not support {str(dtype)[6:]} on cpu"):
            mink.from_dense(x.to(dtype), active)
    mink.check_dtype(torch.float32, torch.device("cpu"))
    t = mink.from_dense(x, active)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="bfloat16"):
        mink.dwconv(t, torch.randn(4, 1, 3, 3), None)
    with pytest.raises(TypeError, match="weight dtype float64 differs"):
        mink.conv(t, torch.randn(4, 4, 3, 3, dtype=torch.float64), None)


def test_float64_runs_and_matches_conv2d_to_rounding():
    # ME's kernels dispatch on float and double: in float64 the offset mapping is exact to rounding
    x = torch.randn(2, 4, 8, 10, dtype=torch.float64)
    active = random_active(2, 8, 10, 0.5, seed=4)
    w, wd = torch.randn(3, 4, 3, 5, dtype=torch.float64), torch.randn(6, 3, 2, 2, dtype=torch.float64)
    t = downsample(mink, mink.conv(mink.from_dense(x, active), w, None), wd, None)
    ref = F.conv2d(_masked(F.conv2d(_masked(x, active), w, padding=(1, 2)), active), wd, stride=2)
    assert t.feats.dtype == torch.float64
    assert rel_err(mink.to_dense(t), _masked(ref, F.max_pool2d(active[:, None].double(), 2)[:, 0] > 0)) < 1e-12


def test_registry_and_option_from_environment(monkeypatch):
    assert isinstance(mink, MinkowskiBackend) and mink.dwconv_impl == "dense"
    monkeypatch.setenv("MIMSPARSE_MINKOWSKI_DWCONV", "kernel_map")
    assert get_backend("minkowski").dwconv_impl == "kernel_map"


# ---- the command line, end to end -------------------------------------------------------------------
@pytest.mark.slow
def test_pretrain_on_minkowski_resume_on_dense_then_convert_to_timm(photo_dir, tmp_path):
    run = tmp_path / "run"
    proc = run_tool("pretrain.py", "--backend", "minkowski", "--data", str(photo_dir), "--no-progress",
                    *tiny_overrides(run, **{"train.max_steps": 2}))
    assert "backend minkowski" in proc.stdout
    ckpt2 = run / "checkpoint-0000002.pth"
    assert torch.load(ckpt2, weights_only=True)["backend"] == "minkowski"
    proc = run_tool("pretrain.py", "--backend", "dense", "--data", str(photo_dir), "--no-progress",
                    "--resume", str(ckpt2), *tiny_overrides(run, **{"train.max_steps": 3}))
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    ckpt3 = run / "checkpoint-0000003.pth"
    out = tmp_path / "dense.pth"
    proc = run_tool("convert_to_dense.py", str(ckpt3), "-o", str(out), "--num-classes", "7")
    assert float(proc.stdout.split("mask ratio 0: ")[1].split()[0]) < 1e-4
    model = timm.create_model("convnextv2_atto", num_classes=7)
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    trained = torch.load(ckpt3, weights_only=True)["model"]
    assert torch.equal(model.stages[1].blocks[0].conv_dw.weight, trained["encoder.stages.1.blocks.0.conv_dw.weight"])
    # three steps of training moved the weights away from the two-step checkpoint
    step2 = torch.load(ckpt2, weights_only=True)["model"]
    assert not torch.equal(step2["encoder.stages.1.blocks.0.conv_dw.weight"],
                           trained["encoder.stages.1.blocks.0.conv_dw.weight"])
