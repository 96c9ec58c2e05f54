"""FeatureQueue contract (DESIGN.md): any size, wrap-around, only written rows, ids, state."""

import pytest
import torch

from moco_mm.model import FeatureQueue


def _rows(q):
    """The queue's content as a set of (id, feature tuple), order-free as the contract says."""
    return {(int(i), tuple(f.tolist())) for i, f in zip(q.ids, q.features.float())}


def _reference_last(all_feats, all_ids, size):
    return {(int(i), tuple(f.tolist())) for i, f in zip(all_ids[-size:], all_feats[-size:])}


@pytest.mark.parametrize("size,batch", [(10, 3), (7, 7), (5, 2), (1, 4), (13, 20)])
def test_wraparound_keeps_exactly_the_newest_rows(size, batch):
    q = FeatureQueue(size, 4)
    feats, ids = [], []
    for step in range(9):
        f = torch.randn(batch, 4)
        i = torch.arange(step * batch, (step + 1) * batch)
        q.enqueue(f, i)
        feats.append(f)
        ids.append(i)
        all_f, all_i = torch.cat(feats), torch.cat(ids)
        assert len(q) == min(size, len(all_i))
        assert q.features.shape == (len(q), 4) and q.ids.shape == (len(q),)
        assert _rows(q) == _reference_last(all_f, all_i, size)


def test_only_written_rows_are_visible():
    q = FeatureQueue(100, 8)
    assert len(q) == 0 and q.features.shape == (0, 8) and q.ids.shape == (0,)
    q.enqueue(torch.ones(3, 8), torch.tensor([4, 5, 6]))
    assert len(q) == 3
    assert torch.equal(q.features, torch.ones(3, 8))
    assert q.ids.tolist() == [4, 5, 6]


def test_more_rows_than_size_keeps_the_last():
    q = FeatureQueue(4, 2)
    f = torch.arange(20.0).view(10, 2)
    q.enqueue(f, torch.arange(10))
    assert len(q) == 4
    assert _rows(q) == _reference_last(f, torch.arange(10), 4)


def test_state_dict_round_trip_and_continues_identically():
    a = FeatureQueue(7, 3, "bfloat16")
    for s in range(3):
        a.enqueue(torch.randn(3, 3), torch.arange(3) + 3 * s)
    b = FeatureQueue(7, 3, "bfloat16")
    b.load_state_dict(a.state_dict())
    assert len(b) == len(a) and int(b.ptr) == int(a.ptr)
    nxt = torch.randn(4, 3)
    a.enqueue(nxt, torch.arange(100, 104))
    b.enqueue(nxt, torch.arange(100, 104))
    assert torch.equal(a.features, b.features) and torch.equal(a.ids, b.ids)
    assert a.features.dtype == torch.bfloat16


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="queue.size"):
        FeatureQueue(-1, 4)
    with pytest.raises(ValueError, match="queue.dtype"):
        FeatureQueue(4, 4, "float8")
    q = FeatureQueue(4, 4)
    with pytest.raises(ValueError, match=r"\[n, 4\]"):
        q.enqueue(torch.randn(2, 3), torch.arange(2))
