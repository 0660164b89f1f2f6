import numpy as np
import pytest
import torch

from glm5.data.loader import IGNORE_INDEX, BatchLoader, ConversationRows, PackedRows


def _tokens(n=5000, vocab=100, seed=0):
    return np.random.default_rng(seed).integers(1, vocab, size=n).astype(np.uint16)


def test_packed_rows_are_shifted_windows():
    t = _tokens()
    rows = PackedRows(t, 32)
    assert len(rows) == (len(t) - 1) // 32
    ids, labels, pos, doc = rows.build(3)
    assert np.array_equal(ids, t[96:128]) and np.array_equal(labels, t[97:129])
    assert np.array_equal(pos, np.arange(32)) and doc is None


def test_epoch_order_deterministic_and_complete():
    rows = PackedRows(_tokens(), 16)
    a = BatchLoader(rows, 4, seed=1)
    b = BatchLoader(rows, 4, seed=1)
    c = BatchLoader(rows, 4, seed=2)
    first = [next(a).input_ids for _ in range(3)]
    assert all(torch.equal(x, next(b).input_ids) for x in first)
    assert not torch.equal(first[0], next(c).input_ids)
    # One epoch visits every window at most once; the next epoch is a different permutation.
    e0 = rows.epoch_rows(0, 1, True)
    assert sorted(e0) == list(range(len(rows)))
    assert e0 != rows.epoch_rows(1, 1, True)


def test_resume_mid_epoch_and_across_epochs():
    rows = PackedRows(_tokens(2000), 16)
    ref = BatchLoader(rows, 8, seed=3)
    steps = ref.steps_per_epoch()
    seq = [next(ref).input_ids for _ in range(steps + 5)]  # crosses an epoch boundary
    for k in (1, steps - 1, steps, steps + 2):
        a = BatchLoader(rows, 8, seed=3)
        for _ in range(k):
            next(a)
        b = BatchLoader(rows, 8, seed=3)
        b.load_state_dict(a.state_dict())
        for j in range(k, k + 3):
            assert torch.equal(next(b).input_ids, seq[j])


def test_ranks_partition_the_global_batch():
    rows = PackedRows(_tokens(), 16)
    single = BatchLoader(rows, 4, seed=0)
    r0 = BatchLoader(rows, 2, seed=0, rank=0, world_size=2)
    r1 = BatchLoader(rows, 2, seed=0, rank=1, world_size=2)
    for _ in range(5):
        assert torch.equal(next(single).input_ids, torch.cat([next(r0).input_ids, next(r1).input_ids]))
    # A checkpoint from 2 ranks resumes on 1 process at the same global position.
    s = BatchLoader(rows, 4, seed=0)
    s.load_state_dict(r0.state_dict())
    assert torch.equal(next(s).input_ids, next(single).input_ids)


def test_document_mask_and_positions():
    eos = 0
    t = np.array([5, 6, eos, 7, 8, 9, eos, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1], dtype=np.uint16)
    rows = PackedRows(t, 16, eos_id=eos, doc_mask=True)
    b = BatchLoader(rows, 1, shuffle=False).collate([0])
    assert b.position_ids[0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    m = b.attention_mask[0, 0]
    assert m.shape == (16, 16)
    assert m[4, 3] and not m[4, 2] and not m[3, 2] and m[2, 0] and not m[1, 2]  # causal, within documents
    assert m.diagonal().all()


def _convs():
    # three conversations: lengths 5, 7, 4; loss mask on the "assistant" tail of each
    ids = np.arange(1, 17, dtype=np.uint16)
    mask = np.array([0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1], dtype=np.uint8)
    offsets = np.array([0, 5, 12, 16])
    return ids, mask, offsets


def test_conversation_rows_pack_whole_conversations():
    ids, mask, offsets = _convs()
    rows = ConversationRows(ids, mask, offsets, seq_len=12, pad_id=0)
    specs = rows.epoch_rows(0, 0, False)
    assert specs == [[0, 1], [2]]  # 5 + 7 fit in 12; the third does not fit after them
    x, labels, pos, doc = rows.build([0, 1])
    assert x.tolist() == list(range(1, 13))
    # labels[t] = ids[t+1] only where the next token is the assistant's, never across conversations
    assert labels.tolist() == [-100, 3, 4, 5, -100, -100, -100, 9, 10, 11, 12, -100]
    assert pos.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]
    x, labels, pos, doc = rows.build([2])
    assert x.tolist() == [13, 14, 15, 16] + [0] * 8
    assert labels.tolist() == [14, 15, 16] + [IGNORE_INDEX] * 9
    b = BatchLoader(rows, 1, shuffle=False).collate([[2]])
    m = b.attention_mask[0, 0]
    assert not m[5, 3] and m[3, 0]  # padding never sees the conversation


def test_conversation_rows_truncate_long():
    ids = np.arange(1, 41, dtype=np.uint16)
    mask = np.ones(40, dtype=np.uint8)
    rows = ConversationRows(ids, mask, np.array([0, 40]), seq_len=16, pad_id=0)
    x, labels, _, _ = rows.build([0])
    assert x.tolist() == list(range(1, 17)) and labels[-1] == IGNORE_INDEX


def test_too_little_data_is_an_error():
    with pytest.raises(ValueError):
        PackedRows(_tokens(10), 16)
    with pytest.raises(ValueError, match="global batch"):
        BatchLoader(PackedRows(_tokens(100), 16), 8)
