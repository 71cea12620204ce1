"""What only the spconv backend has: its rule-table cache, dtype refusals, algorithm choice and options
(the checks shared with MinkowskiEngine are in test_library_backends.py)."""
import pytest
import torch

pytest.importorskip("spconv.pytorch", reason="spconv is not installed (pip install spconv-cu120, or `make setup`)")

from mimsparse.backends import get_backend  # noqa: E402
from mimsparse.backends import spconv_rules  # noqa: E402  (where spconv.pytorch.ops is called)
from mimsparse.backends.spconv import ConvAlgo, SpconvBackend  # noqa: E402
from mimsparse.models.convnextv2 import SparseConvNeXtV2  # noqa: E402
from tests.helpers import random_active  # noqa: E402

pytestmark = pytest.mark.spconv

sparse = get_backend("spconv")
rulebook = SpconvBackend(dwconv="rulebook")


def test_rule_tables_are_built_once_per_stage(monkeypatch):
    calls = []
    original = spconv_rules.spops.get_indice_pairs

    def counting(indices, batch_size, shape, algo, ksize, stride, padding, dilation, out_padding, subm, *a, **kw):
        calls.append((tuple(shape), ksize[0], subm))
        return original(indices, batch_size, shape, algo, ksize, stride, padding, dilation, out_padding, subm, *a, **kw)

    monkeypatch.setattr(spconv_rules.spops, "get_indice_pairs", counting)
    enc = SparseConvNeXtV2.from_name("convnextv2_atto", backend=rulebook)
    visible = torch.ones(2, 2, 2, dtype=torch.bool)
    with torch.no_grad():
        enc(torch.randn(2, 3, 64, 64), visible)
    # one 7x7 submanifold table per stage (shared by its 2-6 blocks) + one table per downsample
    assert sorted(calls) == sorted([((16, 16), 7, True), ((16, 16), 2, False), ((8, 8), 7, True),
                                    ((8, 8), 2, False), ((4, 4), 7, True), ((4, 4), 2, False),
                                    ((2, 2), 7, True)])


def test_unsupported_dtypes_are_refused_clearly():
    x = torch.randn(1, 4, 5, 5)
    active = random_active(1, 5, 5, 0.5, seed=0)
    for dtype in (torch.bfloat16, torch.float16):
        with pytest.raises(TypeError, match=rf"spconv backend does not support {str(dtype)[6:]} on cpu; supported: float32"):
            sparse.from_dense(x.to(dtype), active)
    with pytest.raises(TypeError, match="does not support bfloat16 on cuda; supported: float32, float16"):
        sparse.check_dtype(torch.bfloat16, torch.device("cuda"))
    sparse.check_dtype(torch.float16, torch.device("cuda"))
    t = sparse.from_dense(x, active)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="bfloat16"):
        sparse.dwconv(t, torch.randn(4, 1, 3, 3), None)


def test_unknown_algorithm_is_refused():
    with pytest.raises(ValueError, match="unknown spconv algorithm"):
        SpconvBackend(algo="fast")


def test_self_check_passes_on_cpu_native():
    # the verification run on CUDA, exercised here on the CPU with the Native algorithm
    for k, stride, subm in ((3, 1, True), (7, 1, True), (2, 2, False)):
        err = sparse._check_algo(ConvAlgo.Native, torch.device("cpu"), torch.float32, k, stride, subm, 5, 6)
        assert err < 1e-5


def test_cuda_algorithm_selection_falls_back_and_caches(monkeypatch):
    backend = SpconvBackend(algo="mask_implicit_gemm")
    checked = []

    def fake_check(algo, device, dtype, k, stride, subm, c_in, c_out):
        checked.append(algo)
        if algo == ConvAlgo.MaskImplicitGemm:
            return 1.0 if k == 2 else float("nan")
        return 1e-6

    monkeypatch.setattr(backend, "_check_algo", fake_check)
    cuda = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match="MaskImplicitGemm: relative error 1 .*using Native"):
        assert backend._resolve_algo(cuda, torch.float16, 2, 2, False, 8, 16) == ConvAlgo.Native
    assert checked == [ConvAlgo.MaskImplicitGemm, ConvAlgo.Native]
    assert backend._resolve_algo(cuda, torch.float16, 2, 2, False, 8, 16) == ConvAlgo.Native
    assert len(checked) == 2  # verified once per (device, config)

    def crashing(algo, *args):
        raise RuntimeError("catastrophic error")

    monkeypatch.setattr(backend, "_check_algo", crashing)
    with pytest.raises(RuntimeError, match="spconv gives wrong results or fails .*MaskImplicitGemm: RuntimeError: "
                                           "catastrophic error; Native: RuntimeError"):
        backend._resolve_algo(cuda, torch.float32, 7, 1, True, 96, 96)
    # a passing preferred algorithm is used as is, and the CPU never runs the check
    monkeypatch.setattr(backend, "_check_algo", lambda *a: 0.0)
    assert backend._resolve_algo(cuda, torch.float32, 3, 1, True, 4, 4) == ConvAlgo.MaskImplicitGemm
    assert backend._algo_for(torch.randn(2, 4), torch.randn(4, 4, 3, 3), 3, 1, True) == ConvAlgo.Native


def test_registry_and_options_from_environment(monkeypatch):
    assert isinstance(get_backend("spconv"), SpconvBackend)
    monkeypatch.setenv("MIMSPARSE_SPCONV_DWCONV", "rulebook")
    monkeypatch.setenv("MIMSPARSE_SPCONV_ALGO", "mask_split_implicit_gemm")
    b = get_backend("spconv")
    assert b.dwconv_impl == "rulebook" and b.algo == ConvAlgo.MaskSplitImplicitGemm
