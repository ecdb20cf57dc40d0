"""Packing variable-length sequences into micro-batches under a token budget, balanced across DP ranks.

Three steps, all deterministic (ties broken by sequence index, then rank index):

1. Ranks: longest-processing-time-first (LPT, Graham 1969): sequences in decreasing length go to
   the rank with the fewest tokens so far. Makespan <= (4/3 - 1/(3R)) x optimal; with many more
   sequences than ranks the max/min token ratio is close to 1 (``benchmarks/bench_packing.py``).
   Balance is on token counts, not attention FLOPs (which grow with length squared).
2. Micro-batches within a rank: first-fit-decreasing (FFD) bin packing under ``token_budget``.
3. Equal counts: every DP rank must run the same number of micro-batches (Megatron's pipeline
   schedule and the gradient all-reduce assume it), so a rank with fewer micro-batches than the
   most repeatedly splits its largest splittable micro-batch (>= 2 sequences) into two halves of
   near-equal tokens. A rank holding fewer sequences than the needed count cannot get there: that
   is an error, unless ``allow_empty=True``, which pads it with empty micro-batches (``[]``); the
   caller must then run a dummy, fully loss-masked sequence for each so the collectives still match.

Packed micro-batches are fed to attention as one sequence with ``cu_seqlens`` (FlashAttention /
Transformer Engine THD layout) and position ids that restart at 0 for each sequence.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch


def pack_sequences(
    lengths: Sequence[int], *, token_budget: int, num_ranks: int, allow_empty: bool = False, count_multiple: int = 1
) -> list[list[list[int]]]:
    """Plan ``plan[rank][micro_batch] = [sequence indices]`` for sequences of ``lengths`` tokens.

    Every index appears exactly once; every micro-batch has at most ``token_budget`` tokens; every
    rank has the same number of micro-batches, a multiple of ``count_multiple`` (Megatron's
    interleaved pipeline schedule needs a multiple of PP). Raises ValueError for a sequence longer
    than the budget, and (unless ``allow_empty``) when a rank has fewer sequences than micro-batches
    needed.
    """
    if token_budget < 1 or num_ranks < 1:
        raise ValueError(f"token_budget ({token_budget}) and num_ranks ({num_ranks}) must be >= 1")
    for index, length in enumerate(lengths):
        if length < 1:
            raise ValueError(f"sequence {index} has length {length}; lengths must be >= 1")
        if length > token_budget:
            raise ValueError(f"sequence {index} has {length} tokens, more than token_budget ({token_budget})")
    # Longest first; equal lengths in index order.
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    per_rank = _assign_ranks(order, lengths, num_ranks)
    plan = [_first_fit_decreasing(indices, lengths, token_budget) for indices in per_rank]
    target = -(-max(len(micro_batches) for micro_batches in plan) // count_multiple) * count_multiple
    for rank, micro_batches in enumerate(plan):
        _split_to_count(micro_batches, lengths, target, rank=rank, allow_empty=allow_empty)
    return plan


def _assign_ranks(order: list[int], lengths: Sequence[int], num_ranks: int) -> list[list[int]]:
    """LPT: each sequence (in ``order``, longest first) to the least-loaded rank (lowest id on ties)."""
    loads = [(0, rank) for rank in range(num_ranks)]  # a heap of (tokens, rank)
    per_rank: list[list[int]] = [[] for _ in range(num_ranks)]
    for index in order:
        tokens, rank = heapq.heappop(loads)
        per_rank[rank].append(index)
        heapq.heappush(loads, (tokens + lengths[index], rank))
    return per_rank


def _first_fit_decreasing(indices: list[int], lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """FFD: ``indices`` are longest first; each goes into the first micro-batch with room."""
    micro_batches: list[list[int]] = []
    room: list[int] = []
    for index in indices:
        slot = next((j for j, free in enumerate(room) if free >= lengths[index]), None)
        if slot is None:
            micro_batches.append([])
            room.append(token_budget)
            slot = len(room) - 1
        micro_batches[slot].append(index)
        room[slot] -= lengths[index]
    return micro_batches


def _split_to_count(
    micro_batches: list[list[int]], lengths: Sequence[int], target: int, *, rank: int, allow_empty: bool
) -> None:
    """Split the largest splittable micro-batch in place until there are ``target``."""
    while len(micro_batches) < target:
        splittable = [j for j, mb in enumerate(micro_batches) if len(mb) >= 2]
        if not splittable:
            if not allow_empty:
                num_sequences = sum(len(mb) for mb in micro_batches)
                raise ValueError(
                    f"rank {rank} has {num_sequences} sequences but every rank needs {target} micro-batches "
                    "(another rank's sequences do not fit in fewer); give more sequences per step, a larger "
                    "token_budget, or allow_empty=True to pad with empty micro-batches"
                )
            micro_batches.extend([] for _ in range(target - len(micro_batches)))
            return
        # Largest by tokens; the earlier micro-batch on ties.
        j = max(splittable, key=lambda k: (sum(lengths[i] for i in micro_batches[k]), -k))
        first, second = _halve(micro_batches[j], lengths)
        micro_batches[j] = first
        micro_batches.insert(j + 1, second)


def _halve(indices: list[int], lengths: Sequence[int]) -> tuple[list[int], list[int]]:
    """Two non-empty halves with near-equal tokens (longest first onto the lighter half)."""
    halves: tuple[list[int], list[int]] = ([], [])
    tokens = [0, 0]
    for index in sorted(indices, key=lambda i: (-lengths[i], i)):
        side = 0 if tokens[0] <= tokens[1] else 1
        halves[side].append(index)
        tokens[side] += lengths[index]
    return halves


def rank_tokens(plan: list[list[list[int]]], lengths: Sequence[int]) -> list[int]:
    """Total tokens per rank of a :func:`pack_sequences` plan."""
    return [sum(lengths[i] for mb in micro_batches for i in mb) for micro_batches in plan]


def balance_ratio(per_rank_tokens: Sequence[int]) -> float:
    """max / min of per-rank token totals (1.0 is perfect; ``inf`` when a rank has none and another has some)."""
    if not per_rank_tokens:
        raise ValueError("balance_ratio needs at least one rank")
    high, low = max(per_rank_tokens), min(per_rank_tokens)
    if low == 0:
        return 1.0 if high == 0 else float("inf")
    return high / low


def cu_seqlens(lengths: Sequence[int]) -> torch.Tensor:
    """Cumulative offsets ``[n + 1]`` int32 starting at 0: sequence ``k`` is tokens ``cu[k]:cu[k+1]``."""
    if any(length < 0 for length in lengths):
        raise ValueError(f"lengths must be >= 0, got {list(lengths)}")
    if sum(lengths) > torch.iinfo(torch.int32).max:
        raise ValueError(f"{sum(lengths)} packed tokens overflow int32 cu_seqlens")
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    offsets[1:] = torch.tensor(list(lengths), dtype=torch.int64).cumsum(0).to(torch.int32)
    return offsets


def packed_position_ids(lengths: Sequence[int]) -> torch.Tensor:
    """Position ids ``[sum(lengths)]`` int64 of a packed row, restarting at 0 for each sequence."""
    offsets = cu_seqlens(lengths).long()
    counts = torch.tensor(list(lengths), dtype=torch.int64)
    starts = torch.repeat_interleave(offsets[:-1], counts)
    return torch.arange(int(offsets[-1])) - starts
