"""The global model's KV cache while decoding (`bytelift.decoding`): the in-place layer against HF's. The
decoding session itself is tested through `generate` in test_generation.py."""

import pytest
import torch
from transformers.cache_utils import DynamicLayer

import bytelift.decoding as decoding
from bytelift.decoding import GrowingKVLayer


def test_growing_kv_layer_equals_dynamic_layer(monkeypatch):
    """Appends in place across several buffer growths and row selections: the same keys and values as HF's
    concatenating DynamicLayer, and the cache's sequence length follows."""
    monkeypatch.setattr(decoding, "KV_MIN_SPARE", 2)
    torch.manual_seed(0)
    ours, theirs = GrowingKVLayer(), DynamicLayer()
    B, growths, capacity = 5, 0, 0
    for S, select in [(3, None), (1, None), (1, None), (2, [0, 2, 3, 4]), (1, None), (4, [1, 3]), (1, None)]:
        if select is not None:
            index = torch.tensor(select)
            ours.batch_select_indices(index)
            theirs.batch_select_indices(index)
            B = len(select)
        k, v = torch.randn(B, 2, S, 8), torch.randn(B, 2, S, 6)
        k_ours, v_ours = ours.update(k, v)
        k_theirs, v_theirs = theirs.update(k, v)
        assert torch.equal(k_ours, k_theirs) and torch.equal(v_ours, v_theirs)
        assert ours.get_seq_length() == theirs.get_seq_length()
        assert ours.get_mask_sizes(1) == theirs.get_mask_sizes(1)
        growths += ours._key_buffer.shape[-2] != capacity
        capacity = ours._key_buffer.shape[-2]
    assert growths == 3  # capacities 5, 9, 15 with two spare slots
    for op, arg in (("reorder_cache", torch.tensor([1, 1, 0])), ("batch_repeat_interleave", 2)):
        getattr(ours, op)(arg)
        getattr(theirs, op)(arg)
        k = torch.randn(ours.keys.shape[0], 2, 1, 8)
        assert torch.equal(ours.update(k, k[..., :6])[0], theirs.update(k, k[..., :6])[0]), op


def test_growing_kv_layer_step_of_some_rows():
    """A forward of rows (1, 3) of 4 (`step_rows`): their new slot is written, the other rows' entries are
    zeros, and the layer returns those rows' keys and values: as HF's layer given the full batch."""
    torch.manual_seed(0)
    ours, theirs = GrowingKVLayer(), DynamicLayer()
    k, v = torch.randn(4, 2, 3, 8), torch.randn(4, 2, 3, 6)
    ours.update(k, v)
    theirs.update(k, v)
    rows = torch.tensor([1, 3])
    k1, v1 = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 6)
    full_k, full_v = torch.zeros(4, 2, 1, 8), torch.zeros(4, 2, 1, 6)
    full_k[rows], full_v[rows] = k1, v1
    ours._key_buffer.fill_(float("nan"))  # the spare slots: whatever memory held
    ours._key_buffer[..., :3, :] = k
    ours.step_rows = rows
    k_ours, v_ours = ours.update(k1, v1)
    ours.step_rows = None
    k_theirs, v_theirs = theirs.update(full_k, full_v)
    assert torch.equal(k_ours, k_theirs[rows]) and torch.equal(v_ours, v_theirs[rows])
    assert torch.equal(ours.keys, k_theirs) and torch.equal(ours.values, v_theirs)
    assert ours.get_seq_length() == 4
    with pytest.raises(TypeError, match="GrowingKVLayer"):
        with decoding.computing_rows(type("C", (), {"layers": [DynamicLayer()]})(), rows):
            pass
