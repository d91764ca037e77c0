"""Packing documents into rows: boundaries, targets, cu_seqlens, and attention that stays
inside each document."""

import math

import numpy as np
import pytest
import torch

import qkv
from qkv.data import IGNORE_INDEX, document_mask, pack_documents


def _docs(seed=0, n=7, low=1, high=20):
    rng = np.random.default_rng(seed)
    return [rng.integers(10, 100, rng.integers(low, high)).tolist() for _ in range(n)]


@pytest.mark.parametrize("eos_id", [None, 3])
def test_tokens_targets_and_boundaries(eos_id):
    docs, L = _docs(), 16
    packed = pack_documents(docs, L, eos_id=eos_id, pad_id=0)
    R = packed.input_ids.shape[0]
    stream = [t for d in docs for t in (d + ([eos_id] if eos_id is not None else []))]
    assert math.ceil(len(stream) / L) == R
    flat = packed.input_ids.flatten().tolist()
    assert flat[:len(stream)] == stream and set(flat[len(stream):]) <= {0}
    doc_of = packed.doc_ids.flatten().tolist()
    targets = packed.targets.flatten().tolist()
    for p, t in enumerate(targets):
        nxt_same = p + 1 < len(stream) and doc_of[p + 1] == doc_of[p] != -1
        assert t == (stream[p + 1] if nxt_same else IGNORE_INDEX)
    if eos_id is not None:  # the last real token predicts eos; eos predicts nothing
        ends = np.cumsum([len(d) + 1 for d in docs]) - 1
        assert all(flat[e] == eos_id and targets[e] == IGNORE_INDEX for e in ends)
        assert all(targets[e - 1] == eos_id for e in ends if len(docs) and e > 0)
    cu = packed.cu_seqlens
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == R * L
    assert (cu[1:] > cu[:-1]).all()
    assert set(range(0, R * L, L)) <= set(cu.tolist())  # every row starts a piece
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        assert len(set(doc_of[a:b])) == 1  # a piece is one document in one row
        assert packed.position_ids.flatten()[a:b].tolist() == list(range(b - a))
    assert packed.max_seqlen == int((cu[1:] - cu[:-1]).max())


def test_drop_last_and_errors():
    docs = [[1] * 10, [2] * 9]
    assert pack_documents(docs, 8, drop_last=True).input_ids.shape == (2, 8)
    assert pack_documents(docs, 8).input_ids.shape == (3, 8)
    with pytest.raises(ValueError, match="seq_len"):
        pack_documents(docs, 0)
    with pytest.raises(ValueError, match="no tokens"):
        pack_documents([[], []], 4)
    with pytest.raises(ValueError, match="fewer tokens"):
        pack_documents([[1, 2]], 4, drop_last=True)


def test_document_mask():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, -1]])
    m = document_mask(doc_ids)
    assert m.shape == (1, 1, 6, 6)
    expect = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(m[0, 0], expect)
    assert torch.equal(document_mask(doc_ids, causal=False)[0, 0],
                       expect | expect.T)


def test_attention_over_packed_rows_equals_attention_per_document():
    torch.manual_seed(0)
    docs, L, H, D = _docs(seed=1, n=9, high=30), 24, 2, 8
    packed = pack_documents(docs, L, eos_id=1)
    R = packed.input_ids.shape[0]
    q, k, v = (torch.randn(R, H, L, D, dtype=torch.float64) for _ in range(3))
    masked = qkv.attention(q, k, v, mask=packed.document_mask(), causal=True,
                           backend="reference")  # (R, H, L, D)
    # One piece at a time, each attended alone.
    separate = torch.zeros_like(masked)
    cu = packed.cu_seqlens.tolist()
    for a, b in zip(cu[:-1], cu[1:], strict=True):
        r, i, j = a // L, a % L, a % L + (b - a)
        separate[r, :, i:j] = qkv.attention(q[r:r + 1, :, i:j], k[r:r + 1, :, i:j],
                                            v[r:r + 1, :, i:j], causal=True,
                                            backend="reference")[0]
    torch.testing.assert_close(masked, separate)
    # The same with varlen over the flattened rows.
    flat = lambda t: t.transpose(1, 2).reshape(R * L, H, D)  # (R*L, H, D)
    varlen = qkv.attention_varlen(flat(q), flat(k), flat(v), packed.cu_seqlens,
                                  packed.cu_seqlens, causal=True)
    torch.testing.assert_close(varlen, flat(separate))


def test_ignore_index_is_the_models_one():
    import inspect

    import qkv.data.batching
    from qkv.nn.models import IGNORE_INDEX as MODEL_IGNORE_INDEX

    assert IGNORE_INDEX == MODEL_IGNORE_INDEX == -100
    assert "IGNORE_INDEX =" not in inspect.getsource(qkv.data.batching)  # defined once
