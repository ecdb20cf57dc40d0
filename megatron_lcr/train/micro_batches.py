"""Prompt + response sequences -> packed micro-batches under a token budget, and back.

A micro-batch is one row ``[1, L]`` holding several whole sequences end to end (``data.packing``
plans which, balanced over data-parallel ranks). Attention must not cross sequences: on CPU (and
with Megatron's local layer spec) the row gets a block-diagonal causal mask; with Transformer Engine
it gets THD ``PackedSeqParams`` (``cu_seqlens``), which FlashAttention-style kernels use instead of a
mask. Position ids restart at 0 for every sequence, so a packed sequence sees exactly what it would
alone.

Only response tokens carry loss. For each sequence the trainer needs per-token values (log-probs,
advantages, masks) laid out as padded rows ``[n, R]`` (n sequences, R = longest response), which is
what ``rl.losses`` consumes: ``response_index [n, R]`` holds, for response token j of sequence k,
the row position whose logits predict it (``start + len(prompt) + j - 1``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_lcr.data.packing import cu_seqlens, pack_sequences, packed_position_ids
from megatron_lcr.parallel.layout import ParallelConfig
from megatron_lcr.rl.sequences import TokenSequence


@dataclass
class PackedBatch:
    """One packed micro-batch (row of sequences) and the padded per-response-token layout."""

    input_ids: torch.Tensor
    """``[1, L]`` int64 token ids (padding id after the last sequence)."""
    position_ids: torch.Tensor
    """``[1, L]`` int64, restarting at 0 for each sequence."""
    labels: torch.Tensor
    """``[1, L]`` int64 next token of each position (0 where nothing is predicted)."""
    lengths: list[int]
    """Segment lengths in the row, padding segment included (sums to L)."""
    sequence_ids: list[int]
    """Indices of the sequences (into the caller's list), in row order."""
    response_index: torch.Tensor
    """``[n, R]`` int64 row positions predicting each response token (0 where masked)."""
    response_mask: torch.Tensor
    """``[n, R]`` float32, 1 for real response tokens."""
    role: torch.Tensor
    """``[n]`` int64 :class:`~megatron_lcr.rl.sequences.Role` of each sequence."""
    rollout: torch.Tensor
    """``[n]`` float32 rollout index of each sequence."""
    reward: torch.Tensor
    """``[n]`` float32."""
    advantage: torch.Tensor
    """``[n]`` float32."""
    in_loss: torch.Tensor
    """``[n]`` float32, 1.0 where the sequence counts in its role's loss."""
    old_logp: torch.Tensor | None = None
    """``[n, R]`` float32 sampling-policy log-probs (0 where masked); None if no sequence has them."""
    ref_logp: torch.Tensor | None = None
    """``[n, R]`` float32 reference log-probs, likewise."""
    teacher_logp: torch.Tensor | None = None
    """``[n, R]`` float32 teacher log-probs, likewise."""
    teacher_hidden: torch.Tensor | None = None
    """``[n, R, H_teacher]`` a Megatron teacher's final hidden states at the positions predicting each
    response token (last pipeline stage only; attached per update by ``distill.teacher``)."""
    teacher_topk_ids: torch.Tensor | None = None
    """``[n, R, k]`` int64 an engine teacher's k most likely token ids at each response position (0 where
    masked); None if no sequence has them."""
    teacher_topk_logp: torch.Tensor | None = None
    """``[n, R, k]`` float32 their teacher log-probs (0 where masked)."""

    def attention_inputs(self, device: torch.device, *, thd: bool):
        """``(attention_mask, packed_seq_params)`` for Megatron's GPTModel.forward.

        ``thd``: Transformer Engine attention with THD packing (no mask); else a boolean
        ``[1, 1, L, L]`` mask, True where attention is masked (causal within each segment).
        """
        if thd:
            from megatron.core.packed_seq_params import PackedSeqParams

            offsets = cu_seqlens(self.lengths).to(device)
            longest = max(self.lengths)
            return None, PackedSeqParams(qkv_format="thd", cu_seqlens_q=offsets, cu_seqlens_kv=offsets,
                                         max_seqlen_q=longest, max_seqlen_kv=longest)
        segment = torch.repeat_interleave(torch.arange(len(self.lengths)), torch.tensor(self.lengths)).to(device)
        total = segment.numel()
        causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
        allowed = causal & (segment[:, None] == segment[None, :])
        return ~allowed[None, None], None


# Transformer Engine's FP8 GEMMs need every matrix dimension, tokens included, divisible by 16.
FP8_TOKEN_MULTIPLE = 16


def _round_up(tokens: int, multiple: int) -> int:
    return -(-tokens // multiple) * multiple


@dataclass(frozen=True)
class PackLayout:
    """What a parallel layout requires of packed micro-batches."""

    segment_multiple: int = 1
    """Each sequence's segment is padded to this (``2 * cp``: the zigzag split's equal chunks)."""
    row_multiple: int = 1
    """Each row's length is a multiple of this (sequence parallelism scatters ``L / cp`` over TP; FP8
    GEMMs need each rank's share of the row to be a multiple of 16)."""
    count_multiple: int = 1
    """The number of micro-batches is a multiple of this (the interleaved pipeline schedule: PP)."""

    @classmethod
    def for_layout(cls, tp: int, cp: int, sequence_parallel: bool, *, pp: int = 1, vpp: int | None = None,
                   fp8: bool = False) -> "PackLayout":
        segment = 2 * cp if cp > 1 else 1
        shards = cp * tp if sequence_parallel else cp  # ranks a row's tokens are split over
        row = math.lcm(segment, shards)
        if fp8:  # Transformer Engine's FP8 GEMMs take token dimensions that are multiples of 16 only
            row = math.lcm(row, FP8_TOKEN_MULTIPLE * shards)
        return cls(segment, row, pp if vpp and vpp > 1 else 1)

    @classmethod
    def for_parallel(cls, parallel: ParallelConfig, *, fp8: bool = False) -> "PackLayout":
        return cls.for_layout(parallel.tensor_model_parallel_size, parallel.context_parallel_size,
                              parallel.sequence_parallel, pp=parallel.pipeline_model_parallel_size,
                              vpp=parallel.virtual_pipeline_model_parallel_size, fp8=fp8)


def pack_micro_batch(sequences: Sequence[TokenSequence], ids: Sequence[int], *, pad_id: int,
                     pad_to: int, layout: PackLayout = PackLayout()) -> PackedBatch:
    """Pack ``sequences[i] for i in ids`` into one row of ``pad_to`` tokens (or just enough, if 0).

    Each sequence's segment is padded at its end to ``layout.segment_multiple`` (under causal
    attention the real tokens never see the padding after them) and the row to
    ``layout.row_multiple``. An empty ``ids`` gives a row of padding with no response tokens (a DP
    rank with nothing to do still runs a micro-batch so that collectives match).
    """
    if pad_to % layout.row_multiple:
        raise ValueError(f"pad_to ({pad_to}) must be a multiple of {layout.row_multiple}")
    chosen = [sequences[i] for i in ids]
    segments = [_round_up(len(s), layout.segment_multiple) for s in chosen]
    used = sum(segments)
    total = max(pad_to, _round_up(used, layout.row_multiple), layout.row_multiple)
    lengths = segments + ([total - used] if total > used else [])
    tokens = [t for s, n in zip(chosen, segments) for t in (*s.prompt, *s.response, *[pad_id] * (n - len(s)))]
    tokens += [pad_id] * (total - used)
    input_ids = torch.tensor(tokens, dtype=torch.int64)
    labels = torch.zeros_like(input_ids)
    longest = max((len(s.response) for s in chosen), default=1) or 1
    index = torch.zeros(len(chosen), longest, dtype=torch.int64)
    mask = torch.zeros(len(chosen), longest)
    start = 0
    for k, seq in enumerate(chosen):
        first = start + len(seq.prompt) - 1  # the prompt's last token predicts response token 0
        n = len(seq.response)
        index[k, :n] = torch.arange(first, first + n)
        mask[k, :n] = 1.0
        labels[first:first + n] = torch.tensor(seq.response, dtype=torch.int64)
        start += segments[k]
    def per_sequence(values: list[float], dtype=torch.float32) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype)

    return PackedBatch(input_ids=input_ids[None], position_ids=packed_position_ids(lengths)[None],
                       labels=labels[None], lengths=lengths, sequence_ids=list(ids), response_index=index,
                       response_mask=mask, role=per_sequence([int(s.role) for s in chosen], torch.int64),
                       rollout=per_sequence([float(s.rollout) for s in chosen]),
                       reward=per_sequence([s.reward for s in chosen]),
                       advantage=per_sequence([s.advantage for s in chosen]),
                       in_loss=per_sequence([float(s.in_loss) for s in chosen]),
                       old_logp=_rows([s.old_logp for s in chosen], longest),
                       ref_logp=_rows([s.ref_logp for s in chosen], longest),
                       teacher_logp=_rows([s.teacher_logp for s in chosen], longest),
                       teacher_topk_ids=_topk_rows([s.teacher_topk_ids for s in chosen], longest, torch.int64),
                       teacher_topk_logp=_topk_rows([s.teacher_topk_logp for s in chosen], longest, torch.float32))


def _rows(lists: list[list[float] | None], width: int) -> torch.Tensor | None:
    """``[n, width]`` float32 rows (0 beyond each list and for None); None if every list is None."""
    if all(row is None for row in lists):
        return None
    out = torch.zeros(len(lists), width)
    for k, row in enumerate(lists):
        if row:
            out[k, :len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def _topk_rows(lists: list[list[list] | None], width: int, dtype: torch.dtype) -> torch.Tensor | None:
    """``[n, width, k]`` rows of per-token top-k lists (0 beyond each list and for None); None if all are None."""
    present = [rows for rows in lists if rows]
    if not present:
        return None
    out = torch.zeros(len(lists), width, len(present[0][0]), dtype=dtype)
    for k, rows in enumerate(lists):
        if rows:
            out[k, :len(rows)] = torch.tensor(rows, dtype=dtype)
    return out


def plan_micro_batches(sequences: Sequence[TokenSequence], *, token_budget: int, dp_size: int, dp_rank: int,
                       pad_id: int, fixed_length: bool, units: Sequence[Sequence[int]] | None = None,
                       layout: PackLayout = PackLayout()) -> list[PackedBatch]:
    """This DP rank's packed micro-batches; every rank gets the same number.

    ``fixed_length`` pads every row to ``token_budget`` (pipeline parallelism needs one activation
    shape for all micro-batches); otherwise a row is as long as its sequences. ``units`` (a
    partition of the sequence indices; default: each sequence alone) are kept in one micro-batch
    each, in the given order: the exact DePO KD compares a response's logits on the long context
    with its logits on the short one, so both sequences must be in the same forward pass.
    """
    units = [[i] for i in range(len(sequences))] if units is None else [list(u) for u in units]
    if sorted(i for u in units for i in u) != list(range(len(sequences))):
        raise ValueError(f"units must partition the {len(sequences)} sequence indices")
    lengths = [sum(_round_up(len(sequences[i]), layout.segment_multiple) for i in u) for u in units]
    for unit, length in zip(units, lengths):
        if len(unit) > 1 and length > token_budget:
            raise ValueError(f"sequences {unit} must share a micro-batch (the exact DePO KD's short and long "
                             f"sequences of one rollout) but have {length} tokens together, more than "
                             f"token_budget ({token_budget}): raise trainer.token_budget")
    plan = pack_sequences(lengths, token_budget=token_budget, num_ranks=dp_size, allow_empty=True,
                          count_multiple=layout.count_multiple)
    pad_to = token_budget if fixed_length else 0
    return [pack_micro_batch(sequences, [i for u in micro for i in units[u]], pad_id=pad_id, pad_to=pad_to,
                             layout=layout)
            for micro in plan[dp_rank]]
