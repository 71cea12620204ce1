"""Shared test utilities (imported by test modules; not a conftest so imports stay explicit)."""
from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| (0 when both are zero): the backends' own formula."""
    from mimsparse.backends.checks import max_rel_error

    return max_rel_error(a, b)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Random values in every parameter (GRN and biases init to zero, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.ndim == 1 and "norm" in _name(module, p) else 0.0))
    return module


def _name(module, param) -> str:
    for n, p in module.named_parameters():
        if p is param:
            return n
    return ""


def random_active(batch: int, h: int, w: int, p_active: float, seed: int = 0, empty_sample: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    active = torch.rand(batch, h, w, generator=g) < p_active
    if empty_sample is not None:
        active[empty_sample] = False
    return active


def check_conv_against_conv2d(backend, x, active, w, b, stride, padding, active_out=None, tol: float = 1e-4,
                              device: str = "cpu"):
    """Forward and the three gradients of ``backend``'s conv (stride 1) or strided conv at ``active_out``,
    run on ``device``, against CPU F.conv2d on the masked input, masked at the output sites; and the
    output's active sites. Returns the backend's output tensor."""
    import torch.nn.functional as F

    leaves = [v.to(device).requires_grad_() for v in (x.detach(), w.detach(), b.detach())]
    t = backend.from_dense(leaves[0], active.to(device))
    y = (backend.conv(t, leaves[1], leaves[2]) if active_out is None else
         backend.strided_conv(t, leaves[1], leaves[2], stride, padding=padding, active_out_bhw=active_out.to(device)))
    out = backend.to_dense(y)
    ref_leaves = [v.detach().clone().requires_grad_() for v in (x, w, b)]
    mask_out = active if active_out is None else active_out
    ref = F.conv2d(ref_leaves[0] * active[:, None], ref_leaves[1], ref_leaves[2], stride=stride,
                   padding=padding) * mask_out[:, None]
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    (out * g.to(device)).sum().backward()
    (ref * g).sum().backward()
    assert torch.equal(backend.to_sparse(y).active_mask().cpu(), mask_out)
    assert rel_err(out.detach().cpu(), ref.detach()) < tol
    for a, r in zip(leaves, ref_leaves):
        assert rel_err(a.grad.cpu(), r.grad) < tol
    return y


def fit_fixed_batch(model, images, visible, lr: float, steps: int) -> list[float]:
    """AdamW steps on one batch and mask; returns the losses (to check that the model can learn)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss, _, _ = model(images, visible)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# Backends that need a library that may be missing, and the pytest marker that selects their tests.
LIBRARY_BACKENDS = ("spconv", "minkowski")


def backend_param(name: str, *values, id: str | None = None):  # noqa: A002 (pytest.param's name)
    """``pytest.param(name, *values)`` carrying the marker of the library the backend needs
    (``spconv`` / ``minkowski``; none for the plain-torch backends)."""
    import pytest

    marks = [getattr(pytest.mark, name)] if name in LIBRARY_BACKENDS else []
    return pytest.param(name, *values, marks=marks, id=id)


def backend_or_skip(name: str):
    """``get_backend(name)``, or skip the test when its library is not installed."""
    import pytest

    from mimsparse.backends import BackendUnavailable, get_backend

    try:
        return get_backend(name)
    except BackendUnavailable as e:  # spconv / MinkowskiEngine not installed
        pytest.skip(str(e))


def downsample(backend, t, weight, bias):
    """ConvNeXt's k x k / stride k downsampling through the backend interface: a strided conv whose
    output sites follow from the input (every block holding an active site)."""
    return backend.strided_conv(t, weight, bias, weight.shape[-1], padding=0)
