import pytest
import torch

from mimsparse.sparse import SparseBatch
from tests.helpers import random_active


def test_round_trip_keeps_all_zero_visible_sites():
    x = torch.randn(3, 5, 6, 7)
    active = random_active(3, 6, 7, 0.5, seed=1)
    x[0, :, 2, 3] = 0.0
    active[0, 2, 3] = True  # visible but all-zero: must stay an active site
    sb = SparseBatch.from_dense(x, active, stride=4)
    assert sb.coords.dtype == torch.int32 and sb.coords.shape == (int(active.sum()), 3)
    assert sb.feats.shape == (int(active.sum()), 5)
    assert (sb.coords == torch.tensor([0, 2, 3], dtype=torch.int32)).all(1).any()
    assert torch.equal(sb.active_mask(), active)
    assert torch.equal(sb.to_dense(), x * active.unsqueeze(1))
    # independent reference for the row order: raster order per sample
    ref = [(b, y, xx) for b in range(3) for y in range(6) for xx in range(7) if active[b, y, xx]]
    assert sb.coords.tolist() == [list(r) for r in ref]


def test_empty_sample_and_shape_checks():
    x = torch.randn(2, 3, 4, 4)
    active = random_active(2, 4, 4, 0.5, empty_sample=1)
    sb = SparseBatch.from_dense(x, active)
    assert (sb.coords[:, 0] == 0).all()
    assert sb.to_dense().shape == (2, 3, 4, 4) and sb.to_dense()[1].abs().sum() == 0
    with pytest.raises(ValueError, match="does not match"):
        SparseBatch.from_dense(x, active[:, :3])


def test_validate_rejects_bad_coordinates():
    feats = torch.randn(2, 4)
    ok = SparseBatch(torch.tensor([[0, 1, 1], [1, 2, 3]], dtype=torch.int32), feats, 2, (4, 4))
    ok.validate()
    with pytest.raises(ValueError, match="outside the spatial shape"):
        SparseBatch(torch.tensor([[0, 1, 1], [1, 4, 0]], dtype=torch.int32), feats, 2, (4, 4)).validate()
    with pytest.raises(ValueError, match="duplicate"):
        SparseBatch(torch.tensor([[0, 1, 1], [0, 1, 1]], dtype=torch.int32), feats, 2, (4, 4)).validate()
    with pytest.raises(ValueError, match="int32"):
        SparseBatch(torch.tensor([[0, 1, 1]]), feats[:1], 1, (4, 4))
