"""train/micro_batches.py: packed rows (layout, labels, response positions, the block-diagonal causal
mask, the typed per-sequence fields) against hand-written tensors, and the micro-batch plan."""

from __future__ import annotations

import pytest
import torch

from megatron_lcr.rl.sequences import Role, TokenSequence
from megatron_lcr.train.micro_batches import PackLayout, pack_micro_batch, plan_micro_batches


def test_packed_row_layout_and_mask():
    seqs = [TokenSequence([5, 6, 7], [8, 9], Role.POLICY, rollout=4, advantage=0.5, old_logp=[-1.0, -2.0]),
            TokenSequence([1, 2], [3], Role.LONG_CONTEXT, rollout=4, in_loss=False)]
    batch = pack_micro_batch(seqs, [0, 1], pad_id=0, pad_to=10)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1]]
    assert batch.lengths == [5, 3, 2]
    # Position 2 (token 7) predicts 8, position 3 predicts 9, position 6 (token 2) predicts 3.
    assert batch.labels.tolist() == [[0, 0, 8, 9, 0, 0, 3, 0, 0, 0]]
    assert batch.response_index.tolist() == [[2, 3], [6, 0]]
    assert batch.response_mask.tolist() == [[1.0, 1.0], [1.0, 0.0]]
    assert batch.old_logp.tolist() == [[-1.0, -2.0], [0.0, 0.0]] and batch.ref_logp is None
    assert batch.role.tolist() == [0, 1] and batch.rollout.tolist() == [4.0, 4.0]
    assert batch.advantage.tolist() == [0.5, 0.0] and batch.in_loss.tolist() == [1.0, 0.0]
    mask, packed = batch.attention_inputs(torch.device("cpu"), thd=False)
    assert packed is None
    allowed = ~mask[0, 0]
    expected = torch.zeros(10, 10, dtype=torch.bool)
    for start, length in ((0, 5), (5, 3), (8, 2)):
        expected[start:start + length, start:start + length] = torch.ones(length, length, dtype=torch.bool).tril()
    assert torch.equal(allowed, expected)


def test_segments_padded_for_context_parallelism():
    seqs = [TokenSequence([5, 6, 7], [8, 9]), TokenSequence([1, 2], [3])]
    cp2 = PackLayout.for_layout(tp=1, cp=2, sequence_parallel=False)
    batch = pack_micro_batch(seqs, [0, 1], pad_id=0, pad_to=0, layout=cp2)
    assert batch.lengths == [8, 4]  # 5 -> 8 and 3 -> 4 tokens: each splits into 2 * cp = 4 chunks
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 0, 0, 0, 1, 2, 3, 0]]
    assert batch.labels.tolist() == [[0, 0, 8, 9, 0, 0, 0, 0, 0, 3, 0, 0]]
    assert batch.response_index.tolist() == [[2, 3], [9, 0]]
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_micro_batch(seqs, [0, 1], pad_id=0, pad_to=10, layout=cp2)
    # Sequence parallelism with TP=2 and CP=2: rows are a multiple of lcm(2 * cp, cp * tp) = 4 ...
    assert PackLayout.for_layout(tp=2, cp=2, sequence_parallel=True) == PackLayout(4, 4)
    # ... and with TP=4, CP=1 a multiple of 4 while segments are not padded: 5 + 3 -> 8, 5 -> 8.
    sp4 = PackLayout.for_layout(tp=4, cp=1, sequence_parallel=True)
    assert pack_micro_batch(seqs, [0, 1], pad_id=0, pad_to=0, layout=sp4).lengths == [5, 3]
    assert pack_micro_batch(seqs, [0], pad_id=0, pad_to=0, layout=sp4).lengths == [5, 3]


def test_units_share_a_micro_batch():
    seqs = [TokenSequence([1] * 30, [2]), TokenSequence([1] * 5, [2]), TokenSequence([1] * 30, [2]),
            TokenSequence([1] * 5, [2])]
    alone = plan_micro_batches(seqs, token_budget=70, dp_size=1, dp_rank=0, pad_id=0, fixed_length=False)
    assert sorted(b.sequence_ids for b in alone) == [[0, 2, 1], [3]]  # first-fit-decreasing splits 1 from 3
    batches = plan_micro_batches(seqs, token_budget=70, dp_size=1, dp_rank=0, pad_id=0, fixed_length=False,
                                 units=[[0, 2], [1, 3]])
    assert sorted(b.sequence_ids for b in batches) == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match=r"have 62 tokens together, more than token_budget \(40\)"):
        plan_micro_batches(seqs, token_budget=40, dp_size=1, dp_rank=0, pad_id=0, fixed_length=False,
                           units=[[0, 2], [1, 3]])
    with pytest.raises(ValueError, match="partition"):
        plan_micro_batches(seqs, token_budget=80, dp_size=1, dp_rank=0, pad_id=0, fixed_length=False, units=[[0, 1]])


def test_interleaved_pipeline_gets_a_multiple_of_pp_micro_batches():
    layout = PackLayout.for_layout(tp=1, cp=1, sequence_parallel=False, pp=4, vpp=2)
    assert layout == PackLayout(1, 1, 4) and PackLayout.for_layout(1, 1, False, pp=4).count_multiple == 1
    seqs = [TokenSequence([1] * 20, [2]) for _ in range(5)]
    batches = plan_micro_batches(seqs, token_budget=45, dp_size=1, dp_rank=0, pad_id=0, fixed_length=True,
                                 layout=layout)
    assert len(batches) == 4  # 5 sequences of 21 tokens fit in 3 rows of 45; the schedule needs 4
    assert sorted(i for b in batches for i in b.sequence_ids) == [0, 1, 2, 3, 4]
    assert all(b.input_ids.shape == (1, 45) for b in batches)


def test_empty_micro_batch_is_padding_only():
    batch = pack_micro_batch([], [], pad_id=0, pad_to=4)
    assert batch.input_ids.tolist() == [[0, 0, 0, 0]] and batch.lengths == [4]
    assert batch.response_mask.sum() == 0
