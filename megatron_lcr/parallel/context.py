"""Context parallelism's data side: the zigzag split of sequences over CP ranks, and its inverse.

Megatron-Core / Transformer Engine context parallelism (CP) shards each sequence's tokens over the
``cp`` ranks of a CP group. With causal attention a token's cost grows with its position, so a plain
split into ``cp`` contiguous blocks would leave the last rank with most of the work. Instead the
sequence is cut into ``2 * cp`` equal chunks and rank ``r`` holds chunks ``r`` and ``2*cp - 1 - r``
("zigzag", load-balanced): with S = 8, cp = 2 rank 0 holds positions [0, 1, 6, 7], rank 1 holds
[2, 3, 4, 5]. This is Megatron-Core 0.16.1's ``get_batch_on_this_cp_rank`` (padded BSHD batches,
sequence dim 1) and, for packed THD rows, Transformer Engine's ``thd_get_partitioned_indices``
(each packed sequence split on its own, each rank's part of sequence k stored contiguously, sequences
in order; every packed length a multiple of ``2 * cp``). The attention itself (ring exchange of K/V)
needs TE on a GPU; everything here is plain tensor indexing and runs anywhere.

Conventions:

- Every per-token tensor of a batch (tokens, labels, position ids, loss masks, advantages, old
  log-probs) is split with the same function, so they stay aligned. Labels must be shifted on the
  full sequence *before* the split (label of position t is token t+1), as Megatron does: chunk
  boundaries are not sequence boundaries.
- ``cp_size == 1`` is the identity, with no divisibility requirement (Megatron skips the split).
- Losses: either each rank computes its loss terms on its local tokens and the sum is reduced over
  the CP group, or (the RL trainer: its losses need whole responses, e.g. GSPO's sequence ratio)
  every CP rank gathers the per-token values with ``all_gather_cp_for_loss`` and computes the same
  loss on the whole row; its backward hands each rank the gradient of its own tokens only, and
  Megatron's gradient all-reduce over DP x CP sums the ranks' shares. ``gather_from_cp`` is for
  values used without gradients (metrics, old/reference log-probs) and refuses a tensor that would
  need one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def _check_rank(cp_size: int, cp_rank: int) -> None:
    if cp_size < 1:
        raise ValueError(f"cp_size must be >= 1, got {cp_size}")
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be in [0, cp_size={cp_size}), got {cp_rank}")


def _check_divisible(seq_len: int, cp_size: int, what: str = "sequence length") -> None:
    if cp_size > 1 and seq_len % (2 * cp_size) != 0:
        raise ValueError(
            f"{what} S={seq_len} is not a multiple of 2 * cp = {2 * cp_size} (cp={cp_size}): "
            f"pad it to {-(-seq_len // (2 * cp_size)) * 2 * cp_size} (see pad_for_cp)"
        )


def pad_for_cp(lengths: Sequence[int], cp_size: int) -> list[int]:
    """Each length rounded up to a multiple of ``2 * cp_size`` (unchanged for ``cp_size == 1``).

    The padded lengths give the ``cu_seqlens_padded`` of a packed row under CP; padding tokens are
    loss-masked by the caller.
    """
    _check_rank(cp_size, 0)
    if any(length < 0 for length in lengths):
        raise ValueError(f"lengths must be >= 0, got {list(lengths)}")
    if cp_size == 1:
        return list(lengths)
    multiple = 2 * cp_size
    return [-(-length // multiple) * multiple for length in lengths]


# --- one sequence dimension (padded [B, S, ...] batches) ---


def zigzag_indices(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global positions ``[S / cp]`` (int64, ascending) that CP rank ``cp_rank`` holds.

    ``zigzag_split(x, ...) == x.index_select(dim, zigzag_indices(...))``; use it as position ids.
    """
    _check_rank(cp_size, cp_rank)
    if cp_size == 1:
        return torch.arange(seq_len)
    _check_divisible(seq_len, cp_size)
    chunk = seq_len // (2 * cp_size)
    mirror = 2 * cp_size - 1 - cp_rank
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    return torch.cat([first, torch.arange(mirror * chunk, (mirror + 1) * chunk)])


def zigzag_split(x: torch.Tensor, cp_size: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """This CP rank's part of ``x``: ``[..., S, ...] -> [..., S / cp, ...]`` along ``dim``.

    Chunks ``cp_rank`` and ``2*cp - 1 - cp_rank`` of ``2*cp`` equal chunks, concatenated in that order.
    Differentiable (narrow + cat).
    """
    _check_rank(cp_size, cp_rank)
    if cp_size == 1:
        return x
    seq_len = x.size(dim)
    _check_divisible(seq_len, cp_size)
    chunk = seq_len // (2 * cp_size)
    mirror = 2 * cp_size - 1 - cp_rank
    return torch.cat([x.narrow(dim, cp_rank * chunk, chunk), x.narrow(dim, mirror * chunk, chunk)], dim=dim)


def zigzag_merge(parts: Sequence[torch.Tensor], cp_size: int, dim: int = 1) -> torch.Tensor:
    """The full sequence from every rank's part: ``cp x [..., S / cp, ...] -> [..., S, ...]``.

    ``parts[r]`` is rank r's ``zigzag_split``; the inverse of the split. Differentiable.
    """
    if len(parts) != cp_size:
        raise ValueError(f"expected one part per CP rank: {cp_size} ranks, got {len(parts)} parts")
    if cp_size == 1:
        return parts[0]
    local_len = parts[0].size(dim)
    for rank, part in enumerate(parts):
        if part.shape != parts[0].shape:
            raise ValueError(
                f"CP parts differ in shape: rank 0 {tuple(parts[0].shape)}, rank {rank} {tuple(part.shape)}"
            )
    if local_len % 2 != 0:
        raise ValueError(f"a CP part holds two equal chunks, but its length along dim {dim} is {local_len}")
    chunk = local_len // 2
    chunks: list[torch.Tensor | None] = [None] * (2 * cp_size)
    for rank, part in enumerate(parts):
        chunks[rank], chunks[2 * cp_size - 1 - rank] = part.split(chunk, dim=dim)
    return torch.cat(chunks, dim=dim)


# --- packed rows (THD: sequences concatenated along one token dimension, with cu_seqlens) ---


def _offsets(cu_seqlens: Sequence[int] | torch.Tensor, cp_size: int) -> list[int]:
    """``cu_seqlens`` as ints, checked: starts at 0, non-decreasing, lengths multiples of 2 * cp."""
    offsets = [int(v) for v in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)]
    if not offsets or offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {offsets[:4]}")
    for k in range(len(offsets) - 1):
        length = offsets[k + 1] - offsets[k]
        if length < 0:
            raise ValueError(
                f"cu_seqlens must be non-decreasing: cu_seqlens[{k}]={offsets[k]} > "
                f"cu_seqlens[{k + 1}]={offsets[k + 1]}"
            )
        _check_divisible(length, cp_size, what=f"packed sequence {k}'s length")
    return offsets


def zigzag_indices_packed(cu_seqlens: Sequence[int] | torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global token positions ``[T / cp]`` (int64) of a packed row that CP rank ``cp_rank`` holds.

    ``cu_seqlens``: ``[n + 1]`` padded offsets (every length a multiple of ``2 * cp``). For each
    sequence k, in order: its chunks ``cp_rank`` and ``2*cp - 1 - cp_rank`` of ``2*cp`` (TE's layout).
    """
    _check_rank(cp_size, cp_rank)
    offsets = _offsets(cu_seqlens, cp_size)
    if cp_size == 1:
        return torch.arange(offsets[-1])
    mirror = 2 * cp_size - 1 - cp_rank
    pieces = []
    for start, end in zip(offsets[:-1], offsets[1:]):
        chunk = (end - start) // (2 * cp_size)
        pieces.append(torch.arange(start + cp_rank * chunk, start + (cp_rank + 1) * chunk))
        pieces.append(torch.arange(start + mirror * chunk, start + (mirror + 1) * chunk))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)


def local_cu_seqlens(cu_seqlens: Sequence[int] | torch.Tensor, cp_size: int) -> torch.Tensor:
    """Offsets ``[n + 1]`` (int32) of each sequence's tokens within a rank's packed part: ``cu / cp``.

    For per-sequence reductions on local tokens (e.g. a sequence-level log-prob sum, then summed
    over the CP group).
    """
    offsets = _offsets(cu_seqlens, cp_size)
    return torch.tensor([offset // cp_size for offset in offsets], dtype=torch.int32)


def zigzag_split_packed(
    x: torch.Tensor, cu_seqlens: Sequence[int] | torch.Tensor, cp_size: int, cp_rank: int, dim: int = 1
) -> torch.Tensor:
    """This CP rank's part of a packed row: ``[..., T, ...] -> [..., T / cp, ...]`` along ``dim``.

    ``dim`` defaults to 1, Megatron's packed ``[1, T]`` layout; pass 0 for ``[T]`` or ``[T, H]``.
    Differentiable (index_select).
    """
    index = zigzag_indices_packed(cu_seqlens, cp_size, cp_rank)
    if x.size(dim) != index.numel() * cp_size:
        raise ValueError(f"x has {x.size(dim)} tokens along dim {dim} but cu_seqlens ends at {index.numel() * cp_size}")
    if cp_size == 1:
        return x
    return x.index_select(dim, index.to(x.device))


def zigzag_merge_packed(
    parts: Sequence[torch.Tensor], cu_seqlens: Sequence[int] | torch.Tensor, cp_size: int, dim: int = 1
) -> torch.Tensor:
    """The full packed row from every rank's part: ``cp x [..., T / cp, ...] -> [..., T, ...]``.

    Inverse of ``zigzag_split_packed``. Differentiable.
    """
    if len(parts) != cp_size:
        raise ValueError(f"expected one part per CP rank: {cp_size} ranks, got {len(parts)} parts")
    # position[i] = global position of element i of cat(parts); invert the permutation.
    position = torch.cat([zigzag_indices_packed(cu_seqlens, cp_size, rank) for rank in range(cp_size)])
    stacked = torch.cat(list(parts), dim=dim)
    if stacked.size(dim) != position.numel():
        raise ValueError(
            f"parts hold {stacked.size(dim)} tokens along dim {dim}, cu_seqlens ends at {position.numel()}"
        )
    if cp_size == 1:
        return stacked
    inverse = torch.empty_like(position)
    inverse[position] = torch.arange(position.numel())
    return stacked.index_select(dim, inverse.to(stacked.device))


# --- gathers over the CP process group ---


class _GatherForLoss(torch.autograd.Function):
    """all_gather whose backward keeps this rank's slice of the gradient (no reduction)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, ...]:
        ctx.rank = dist.get_rank(group)
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        return grads[ctx.rank], None


def all_gather_cp_for_loss(local: torch.Tensor, group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    """Every CP rank's ``local`` (CP-rank order) for a loss that every CP rank computes identically.

    Differentiable: the gradient reaching ``local`` is the loss's gradient for this rank's tokens
    only; summing the CP ranks' parameter gradients (Megatron's DP x CP all-reduce does) gives the
    gradient of the loss. Not for a loss that differs between CP ranks.
    """
    return list(_GatherForLoss.apply(local, group))


def _all_gather_parts(local: torch.Tensor, group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    """Every CP rank's ``local``, in CP-rank order (ranks must pass equal shapes)."""
    if local.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "gather_from_cp does not carry gradients: compute the loss on this rank's local tokens "
            "and reduce it over the CP group, or gather local.detach() for metrics"
        )
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return parts


def gather_from_cp(local: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """Full-sequence per-token values on every CP rank: ``[..., S / cp, ...] -> [..., S, ...]``.

    One all_gather over ``group`` (the CP group; None = the default group), then ``zigzag_merge``.
    E.g. per-token log-probs ``[B, S/cp] -> [B, S]``. Not differentiable: RuntimeError for a tensor
    that requires grad while grad mode is on.
    """
    cp_size = dist.get_world_size(group)
    if cp_size == 1:
        return local
    return zigzag_merge(_all_gather_parts(local, group), cp_size, dim=dim)


def gather_from_cp_packed(
    local: torch.Tensor, cu_seqlens: Sequence[int] | torch.Tensor, group: dist.ProcessGroup | None, dim: int = 1
) -> torch.Tensor:
    """``gather_from_cp`` for packed rows: ``[..., T / cp, ...] -> [..., T, ...]`` on every CP rank.

    ``cu_seqlens``: the padded offsets the row was split with (the same on every rank).
    """
    cp_size = dist.get_world_size(group)
    if cp_size == 1:
        return local
    return zigzag_merge_packed(_all_gather_parts(local, group), cu_seqlens, cp_size, dim=dim)
