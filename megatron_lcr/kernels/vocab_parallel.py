"""Online-softmax statistics over vocabulary pieces, and their merge across tensor-parallel ranks.

Both implementations reduce each piece of the vocabulary they visit (a tile, a program's split, a
tensor-parallel rank's shard) to a few floats per token, *partials*, and merge them here (the
streaming log-sum-exp of Milakov & Gimelshein, "Online normalizer calculation for softmax", 2018):

- log-prob / entropy partial ``(m, s, u, t)``: ``m = max_j z_j``, ``s = sum_j exp(z_j - m)``,
  ``u = sum_j exp(z_j - m) (z_j - m)``, ``t`` = the label's logit if the label is in the piece, else 0.
  ``u`` is kept relative to the max so that entropy ``log S - U / S`` has no cancellation when the
  logits are large (``logZ - E[z]`` in absolute terms loses all digits at |z| ~ 1e4 in fp32).
- KL partial ``(m_s, s_s, m_t, s_t, a)``: one log-sum-exp per side and ``a``, a sum scaled by the
  max of one side (see ``kl.py``).

A piece with no vocabulary column (a rank holding only padding) has ``m = -inf, s = 0``; every merge
below gives it zero weight instead of ``exp(-inf - -inf) = nan``. Across TP, the merged per-rank
statistics ``[T, k]`` are exchanged with one ``all_gather`` (k floats per token, never logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Head:
    """Where one distribution's logits come from: ``hidden @ weight.T`` or given ``logits``."""

    hidden: torch.Tensor | None = None
    """``[T, H]`` final hidden states (after the final norm), or None when ``logits`` is given."""
    weight: torch.Tensor | None = None
    """``[V_local, H]`` this rank's rows of the output-layer weight."""
    logits: torch.Tensor | None = None
    """``[T, V_local]`` this rank's logit columns, or None when ``hidden`` is given."""

    @property
    def from_logits(self) -> bool:
        return self.logits is not None

    @property
    def num_tokens(self) -> int:
        return (self.logits if self.from_logits else self.hidden).shape[0]

    @property
    def local_vocab(self) -> int:
        return (self.logits.shape[1]) if self.from_logits else self.weight.shape[0]


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of the vocabulary: global columns ``[start, start + local)``."""

    start: int
    """Global id of this rank's first vocabulary row."""
    local: int
    """Rows of the weight (columns of the logits) on this rank, padding included."""
    valid_end: int
    """Real vocabulary size (global ids >= it are padding and get probability 0)."""
    group: dist.ProcessGroup | None
    """The tensor-parallel group the vocabulary is split over; None: one rank holds all of it."""

    @property
    def num_valid(self) -> int:
        """Columns of this shard that are real tokens: ``[0, num_valid)`` (padding comes last)."""
        return max(0, min(self.local, self.valid_end - self.start))

    @property
    def world_size(self) -> int:
        return 1 if self.group is None else dist.get_world_size(self.group)


def make_shard(
    local: int, vocab_start: int, valid_vocab_end: int | None, tp_group: dist.ProcessGroup | None
) -> VocabShard:
    """Validate the shard arguments of the public ops; ``valid_vocab_end=None`` means no padding."""
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")
    if valid_vocab_end is None:
        if tp_group is not None and dist.get_world_size(tp_group) > 1:
            raise ValueError("valid_vocab_end (the real vocabulary size) is required with a tp_group of size > 1")
        valid_vocab_end = vocab_start + local
    if valid_vocab_end < 1:
        raise ValueError(f"valid_vocab_end must be >= 1, got {valid_vocab_end}")
    if tp_group is not None and dist.get_world_size(tp_group) == 1:
        tp_group = None
    return VocabShard(start=vocab_start, local=local, valid_end=valid_vocab_end, group=tp_group)


def local_labels(labels: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """Global label ids ``[T]`` -> this shard's column ``[T]`` int32, or -1 where the label lives elsewhere."""
    col = labels - shard.start
    inside = (col >= 0) & (col < shard.num_valid)
    return torch.where(inside, col, -1).to(torch.int32)


def check_labels(labels: torch.Tensor, shard: VocabShard, ignore_index: int) -> None:
    """Every label is ``ignore_index`` or a real token id in ``[0, valid_vocab_end)``."""
    if labels.dim() != 1 or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be a 1-D int64/int32 tensor, got {tuple(labels.shape)} {labels.dtype}")
    real = labels != ignore_index
    bad = real & ((labels < 0) | (labels >= shard.valid_end))
    if bool(bad.any()):
        raise ValueError(
            f"labels must be in [0, valid_vocab_end={shard.valid_end}) or ignore_index={ignore_index}; "
            f"found {labels[bad][:4].tolist()}"
        )


def _rebase(m: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``m, s [T, P]`` -> ``(M [T], weights exp(m - M) [T, P], m - M [T, P])``; empty pieces weigh 0."""
    big_m = m.amax(dim=1)
    safe = torch.where(torch.isfinite(big_m), big_m, torch.zeros_like(big_m))
    delta = m - safe[:, None]
    return big_m, torch.where(s > 0, delta.exp(), torch.zeros_like(s)), delta


def merge_logprob_partials(parts: torch.Tensor) -> torch.Tensor:
    """``[T, P, 4]`` partials ``(m, s, u, t)`` over P vocabulary pieces -> ``[T, 4]`` for their union."""
    m, s, u, t = parts.unbind(dim=2)
    big_m, w, delta = _rebase(m, s)
    # u_p is relative to m_p: sum e^{z-M} (z-M) = w_p (u_p + (m_p - M) s_p); 0 for empty pieces.
    shifted = torch.where(s > 0, u + delta * s, torch.zeros_like(u))
    return torch.stack([big_m, (w * s).sum(1), (w * shifted).sum(1), t.sum(1)], dim=1)


def merge_kl_partials(parts: torch.Tensor, scaled_by_teacher: bool) -> torch.Tensor:
    """``[T, P, 5]`` partials ``(m_s, s_s, m_t, s_t, a)`` -> ``[T, 5]``; ``a`` is scaled by one side's max."""
    m_s, s_s, m_t, s_t, a = parts.unbind(dim=2)
    big_s, w_s, _ = _rebase(m_s, s_s)
    big_t, w_t, _ = _rebase(m_t, s_t)
    w_a = w_t if scaled_by_teacher else w_s
    return torch.stack([big_s, (w_s * s_s).sum(1), big_t, (w_t * s_t).sum(1), (w_a * a).sum(1)], dim=1)


def gather_across_ranks(stats: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """``[T, k]`` on each TP rank -> ``[T, tp, k]`` (one all-gather); ``[T, 1, k]`` without TP."""
    if shard.group is None:
        return stats[:, None, :]
    world = shard.world_size
    # Ranks concatenated along dim 0: the output layout every backend accepts (gloo rejects [tp, T, k]).
    out = torch.empty((world * stats.shape[0], stats.shape[1]), dtype=stats.dtype, device=stats.device)
    dist.all_gather_into_tensor(out, stats.contiguous(), group=shard.group)
    return out.view(world, stats.shape[0], stats.shape[1]).permute(1, 0, 2)


def sum_across_ranks(values: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """All-reduce (sum) of per-token values over the TP group; identity without TP. In place."""
    if shard.group is not None:
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=shard.group)
    return values


def logprob_from_stats(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merged ``[T, 4]`` ``(M, S, U, t)`` -> ``(logp [T], entropy [T], logZ [T])``, fp32.

    ``logZ = M + log S``, ``logp = t - logZ``, ``entropy = log S - U / S`` (S >= 1: the max term is 1).
    """
    big_m, s, u, t = stats.unbind(dim=1)
    log_s = s.log()
    log_z = big_m + log_s
    return t - log_z, log_s - u / s, log_z
