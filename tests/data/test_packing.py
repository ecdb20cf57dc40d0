"""Packing: budget, exactly-once, equal micro-batch counts, balance across ranks, cu_seqlens/positions.

``hypothesis`` is not installed here, so the properties run over seeded random cases.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from megatron_lcr.data.packing import (
    balance_ratio,
    cu_seqlens,
    pack_sequences,
    packed_position_ids,
    rank_tokens,
)


def check_plan(plan: list[list[list[int]]], lengths: list[int], token_budget: int, num_ranks: int) -> None:
    assert len(plan) == num_ranks
    counts = {len(micro_batches) for micro_batches in plan}
    assert len(counts) == 1, f"micro-batch counts differ across ranks: {[len(mb) for mb in plan]}"
    flat = [i for micro_batches in plan for mb in micro_batches for i in mb]
    assert sorted(flat) == list(range(len(lengths))), "every index exactly once"
    for micro_batches in plan:
        for mb in micro_batches:
            assert sum(lengths[i] for i in mb) <= token_budget


def random_case(rng: random.Random) -> tuple[list[int], int, int]:
    token_budget = rng.choice([1, 7, 64, 1000, 4096])
    num_ranks = rng.choice([1, 2, 3, 8])
    n = rng.randint(num_ranks * 4, num_ranks * 40)
    shape = rng.choice(["uniform", "small", "near-budget", "lognormal"])
    if shape == "uniform":
        lengths = [rng.randint(1, token_budget) for _ in range(n)]
    elif shape == "small":
        lengths = [rng.randint(1, max(1, token_budget // 10)) for _ in range(n)]
    elif shape == "near-budget":
        lengths = [rng.randint(max(1, token_budget * 3 // 4), token_budget) for _ in range(n)]
    else:
        median = math.log(token_budget / 8)
        lengths = [min(token_budget, max(1, int(rng.lognormvariate(median, 1.0)))) for _ in range(n)]
    return lengths, token_budget, num_ranks


def test_random_plans_respect_budget_cover_once_and_equal_counts():
    rng = random.Random(0)
    cases = 0
    while cases < 300:
        lengths, token_budget, num_ranks = random_case(rng)
        try:
            plan = pack_sequences(lengths, token_budget=token_budget, num_ranks=num_ranks)
        except ValueError as err:
            # Only possible when some rank holds fewer sequences than the needed count.
            assert "micro-batches" in str(err)
            plan = pack_sequences(lengths, token_budget=token_budget, num_ranks=num_ranks, allow_empty=True)
            assert any(mb == [] for micro_batches in plan for mb in micro_batches)
        check_plan(plan, lengths, token_budget, num_ranks)
        assert plan == pack_sequences(lengths, token_budget=token_budget, num_ranks=num_ranks, allow_empty=True)
        cases += 1


def test_hand_checked_plan_with_equalising_split():
    lengths = [8, 6, 2, 6, 10, 2, 8]
    # Longest first (ties by index): 4(10) 0(8) 6(8) 1(6) 3(6) 2(2) 5(2). LPT onto the least-loaded
    # rank (lower rank on ties): r0 <- 4 (10), r1 <- 0 (8), r1 <- 6 (16), r0 <- 1 (16),
    # r0 <- 3 (tie at 16: 22), r1 <- 2 (18), r1 <- 5 (20).
    # FFD under 10: r0 = [[4], [1], [3]] (6+6 > 10); r1 = [[0, 2], [6, 5]]: one micro-batch short,
    # so r1 splits its largest (both hold 10 tokens: the first) into [0] and [2].
    plan = pack_sequences(lengths, token_budget=10, num_ranks=2)
    assert plan == [[[4], [1], [3]], [[0], [2], [6, 5]]]
    assert rank_tokens(plan, lengths) == [22, 20]


def test_no_split_when_counts_already_match():
    # LPT alternates 6, 6 then the 3s: each rank [6, 3] + [3] under budget 10.
    assert pack_sequences([6, 6, 3, 3, 3, 3], token_budget=10, num_ranks=2) == [[[0, 2], [4]], [[1, 3], [5]]]
    # r0 = [[10]]; r1 = [[4, 1, 1, 1, 1]] (8 tokens): one micro-batch each, left alone.
    assert pack_sequences([10, 1, 1, 1, 1, 4], token_budget=10, num_ranks=2) == [[[0]], [[5, 1, 2, 3, 4]]]


def test_over_budget_sequence_is_an_error_naming_index_length_and_budget():
    with pytest.raises(ValueError, match=r"sequence 2 has 101 tokens, more than token_budget \(100\)"):
        pack_sequences([5, 100, 101, 3], token_budget=100, num_ranks=2)
    with pytest.raises(ValueError, match="sequence 1 has length 0"):
        pack_sequences([5, 0], token_budget=100, num_ranks=1)
    with pytest.raises(ValueError, match=r"token_budget \(0\).*num_ranks \(2\)"):
        pack_sequences([5], token_budget=0, num_ranks=2)


def test_rank_short_of_sequences_errors_or_pads_with_empty_micro_batches():
    # Five full-budget sequences over 3 ranks: ranks 0 and 1 need two micro-batches, rank 2 has one
    # sequence. (LPT: 0->r0, 1->r1, 2->r2, 3->r0, 4->r1.)
    lengths = [10] * 5
    with pytest.raises(ValueError, match="rank 2 has 1 sequences but every rank needs 2 micro-batches"):
        pack_sequences(lengths, token_budget=10, num_ranks=3)
    plan = pack_sequences(lengths, token_budget=10, num_ranks=3, allow_empty=True)
    assert plan == [[[0], [3]], [[1], [4]], [[2], []]]
    assert pack_sequences([], token_budget=10, num_ranks=2) == [[], []]
    with pytest.raises(ValueError, match="rank 1 has 0 sequences"):
        pack_sequences([3], token_budget=10, num_ranks=2)


def test_balance_on_lognormal_lengths_beats_round_robin():
    """512 log-normal lengths (median 1K, sigma 1, clipped to the 16K budget) over 8 ranks.

    LPT's guarantee: when the max rank got its last sequence s it was the least loaded, so
    max - min <= len(s) <= the longest sequence. Measured: 1.0003 for this seed (worst of 50 seeds
    1.0010); 1.05 leaves over 50x margin on the excess over 1 for tie-breaking changes, and still
    fails an assignment that ignores lengths (round-robin on these lengths: 1.55).
    """
    rng = random.Random(1234)
    token_budget, num_ranks = 16384, 8
    lengths = [min(token_budget, max(1, int(rng.lognormvariate(math.log(1024), 1.0)))) for _ in range(512)]
    plan = pack_sequences(lengths, token_budget=token_budget, num_ranks=num_ranks)
    check_plan(plan, lengths, token_budget, num_ranks)
    lpt = balance_ratio(rank_tokens(plan, lengths))
    round_robin = [0] * num_ranks
    for i, length in enumerate(lengths):
        round_robin[i % num_ranks] += length
    naive = balance_ratio(round_robin)
    print(f"\nmax/min tokens over {num_ranks} ranks: LPT {lpt:.4f}, round-robin {naive:.4f}")
    assert lpt <= 1.05
    assert lpt <= 1 + max(lengths) / min(rank_tokens(plan, lengths))
    assert naive > 1.2 and (naive - 1) > 20 * (lpt - 1)


def test_balance_ratio_values():
    assert balance_ratio([10, 10]) == 1.0
    assert balance_ratio([12, 8, 10]) == 1.5
    assert balance_ratio([0, 0]) == 1.0
    assert balance_ratio([0, 3]) == math.inf
    with pytest.raises(ValueError):
        balance_ratio([])


def test_cu_seqlens_and_position_ids_hand_checked():
    cu = cu_seqlens([3, 1, 4])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 4, 8]
    pos = packed_position_ids([3, 1, 4])
    assert pos.dtype == torch.int64 and pos.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert cu_seqlens([]).tolist() == [0] and packed_position_ids([]).tolist() == []
    assert packed_position_ids([2, 0, 2]).tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match=">= 0"):
        cu_seqlens([2, -1])


def test_position_ids_agree_with_cu_seqlens_on_random_lengths():
    rng = random.Random(7)
    for _ in range(50):
        lengths = [rng.randint(1, 50) for _ in range(rng.randint(1, 20))]
        cu, pos = cu_seqlens(lengths), packed_position_ids(lengths)
        for k, length in enumerate(lengths):
            assert pos[cu[k] : cu[k + 1]].tolist() == list(range(length))
