"""Chunked PyTorch implementation of the fused log-prob / entropy / KL ops (CPU path and reference).

The logits ``z = hidden @ weight.T / temperature`` are visited in tiles of ``token_chunk_size`` x
``vocab_chunk_size`` (vocabulary outermost), never as a whole ``[T, V]`` tensor; each tile is an
fp32 matmul (bf16/fp16 operands are upcast per tile, so products and sums are fp32 as in the Triton
kernels). Forward reduces each tile to per-token partials (``vocab_parallel.py``); backward
recomputes each tile from the saved inputs and O(T) statistics, turns it into the logit gradient
``dz`` and folds that into ``d_hidden += dz @ W_tile`` (fp32 accumulator) and
``d_weight[tile] += dz.T @ hidden_chunk`` (accumulated in fp32 over token chunks, cast to the
weight's dtype once). Only the real vocabulary columns ``[0, num_valid)`` are visited: padding rows
of the weight get a zero gradient. Peak extra memory: a few ``[token_chunk, vocab_chunk]`` fp32
tiles plus the gradients themselves.

Every function here sees all-valid rows (masked rows are removed by the callers) and returns
per-token fp32 values; the formulas of each gradient are derived in ``logprob.py`` and ``kl.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from megatron_lcr.kernels.config import KernelConfig
from megatron_lcr.kernels.vocab_parallel import Head

HeadGrads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]
"""``(d_hidden [T, H] fp32, d_weight [V_local, H], d_logits [T, V_local])``; None where not asked."""


def _column_tiles(n_valid: int, config: KernelConfig) -> Iterator[tuple[int, int, int]]:
    """``(index, c0, c1)`` over the real vocabulary columns ``[0, n_valid)``."""
    for index, c0 in enumerate(range(0, n_valid, config.vocab_chunk_size)):
        yield index, c0, min(c0 + config.vocab_chunk_size, n_valid)


def _row_chunks(num_tokens: int, config: KernelConfig) -> Iterator[tuple[int, int]]:
    for r0 in range(0, num_tokens, config.token_chunk_size):
        yield r0, min(r0 + config.token_chunk_size, num_tokens)


def num_column_tiles(n_valid: int, config: KernelConfig) -> int:
    return -(-n_valid // config.vocab_chunk_size)


def logit_tile(head: Head, r0: int, r1: int, c0: int, c1: int, inv_temp: float) -> torch.Tensor:
    """``z[r0:r1, c0:c1]`` as a new fp32 tensor (safe to modify in place)."""
    if head.from_logits:
        return head.logits[r0:r1, c0:c1].float() * inv_temp
    # Operands upcast per tile: fp32 products and sums for bf16/fp16 inputs too (no-op for fp32).
    # The temperature scales the [r, H] rows, a pass over a much smaller tensor than [r, c].
    x = head.hidden[r0:r1].float()
    if inv_temp != 1.0:
        x = x * inv_temp
    return torch.mm(x, head.weight[c0:c1].float().t())


class GradSink:
    """Folds logit-gradient tiles ``dz`` of one head into the gradients of its inputs."""

    def __init__(self, head: Head, need_hidden: bool, need_weight: bool) -> None:
        self.head = head
        self.d_hidden = self.d_weight = self.d_logits = None
        self._tile_acc: torch.Tensor | None = None
        if head.from_logits:
            if need_hidden:  # for logits, "hidden" means the logits themselves
                self.d_logits = torch.zeros_like(head.logits, memory_format=torch.contiguous_format)
            return
        self.fp32 = head.weight.dtype == torch.float32  # else d_weight is accumulated per tile in fp32
        if need_hidden:
            self.d_hidden = torch.zeros(head.hidden.shape, dtype=torch.float32, device=head.hidden.device)
        if need_weight:
            self.d_weight = torch.zeros(head.weight.shape, dtype=head.weight.dtype, device=head.weight.device)

    def begin_columns(self, c0: int, c1: int) -> None:
        if self.d_weight is not None and not self.fp32:  # fp32 accumulator for this tile's rows
            self._tile_acc = torch.zeros(
                (c1 - c0, self.head.weight.shape[1]), dtype=torch.float32, device=self.d_weight.device
            )

    def add(self, r0: int, r1: int, c0: int, c1: int, dz: torch.Tensor) -> None:
        """``dz [r1-r0, c1-c0]`` fp32: the gradient of the (temperature-scaled) logit tile."""
        head = self.head
        if head.from_logits:
            if self.d_logits is not None:
                self.d_logits[r0:r1, c0:c1] = dz
            return
        w, x = head.weight[c0:c1].float(), head.hidden[r0:r1].float()
        if self.d_hidden is not None:
            self.d_hidden[r0:r1].addmm_(dz, w)
        if self.d_weight is not None:
            (self.d_weight[c0:c1] if self._tile_acc is None else self._tile_acc).addmm_(dz.t(), x)

    def end_columns(self, c0: int, c1: int) -> None:
        if self._tile_acc is not None:
            self.d_weight[c0:c1].copy_(self._tile_acc)
            self._tile_acc = None

    def result(self) -> HeadGrads:
        return self.d_hidden, self.d_weight, self.d_logits


def _label_logit(z: torch.Tensor, labels: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
    """``[r]``: ``z[i, label_i - c0]`` where the label's column is in ``[c0, c1)``, else 0."""
    inside = (labels >= c0) & (labels < c1)
    cols = (labels.long() - c0).clamp(0, c1 - c0 - 1)
    return torch.where(inside, z.gather(1, cols[:, None])[:, 0], torch.zeros((), dtype=z.dtype, device=z.device))


def logprob_partials(
    head: Head, labels: torch.Tensor, *, inv_temp: float, n_valid: int, config: KernelConfig
) -> torch.Tensor:
    """Per-tile partials ``[T, P, 4]`` ``(m, s, u, t)`` over this shard's real columns.

    ``labels [T]`` int32: the label's column in this shard, or -1 when it lives on another rank.
    """
    num_tokens = head.num_tokens
    device = (head.logits if head.from_logits else head.hidden).device
    parts = torch.zeros((num_tokens, max(1, num_column_tiles(n_valid, config)), 4), dtype=torch.float32, device=device)
    parts[:, :, 0] = float("-inf")  # no column visited (n_valid == 0): the merge gives this piece weight 0
    for index, c0, c1 in _column_tiles(n_valid, config):
        for r0, r1 in _row_chunks(num_tokens, config):
            z = logit_tile(head, r0, r1, c0, c1, inv_temp)
            t = _label_logit(z, labels[r0:r1], c0, c1)
            m = z.amax(dim=1)
            z.sub_(m[:, None])
            e = z.exp()
            s = e.sum(dim=1)
            u = e.mul_(z).sum(dim=1)
            parts[r0:r1, index] = torch.stack([m, s, u, t], dim=1)
    return parts


def logprob_backward(
    head: Head,
    labels: torch.Tensor,
    log_z: torch.Tensor,
    entropy: torch.Tensor,
    g_logp: torch.Tensor | None,
    g_entropy: torch.Tensor | None,
    *,
    inv_temp: float,
    n_valid: int,
    need_hidden: bool,
    need_weight: bool,
    config: KernelConfig,
) -> HeadGrads:
    """Gradients of ``sum(g_logp * logp + g_entropy * entropy)``; all per-token inputs ``[T]`` fp32.

    ``dz_k = g_logp (1[k = y] - p_k) - g_entropy p_k (log p_k + H)``, times ``1 / temperature``.
    """
    sink = GradSink(head, need_hidden, need_weight)
    for _, c0, c1 in _column_tiles(n_valid, config):
        sink.begin_columns(c0, c1)
        for r0, r1 in _row_chunks(head.num_tokens, config):
            z = logit_tile(head, r0, r1, c0, c1, inv_temp)
            dz = torch.sub(z, log_z[r0:r1, None]).exp_()  # p
            # -(g_h (log p + H) + g_l) / temperature, with log p + H = z + (H - logZ): per-row
            # factors folded first, so each step is one pass over the tile.
            if g_entropy is not None:
                z.add_((entropy - log_z)[r0:r1, None]).mul_((-inv_temp * g_entropy[r0:r1])[:, None])
                if g_logp is not None:
                    z.add_((-inv_temp * g_logp[r0:r1])[:, None])
                dz.mul_(z)
            elif g_logp is not None:
                dz.mul_((-inv_temp * g_logp[r0:r1])[:, None])
            if g_logp is not None:
                lbl = labels[r0:r1]
                rows = torch.nonzero((lbl >= c0) & (lbl < c1))[:, 0]
                dz.index_put_((rows, lbl[rows].long() - c0), g_logp[r0:r1][rows] * inv_temp, accumulate=True)
            sink.add(r0, r1, c0, c1, dz)
        sink.end_columns(c0, c1)
    return sink.result()


def log_mix_ratio(d: torch.Tensor, beta: float) -> torch.Tensor:
    """``log(m / p)`` for the mixture ``m = (1 - beta) p + beta q``, from ``d = log q - log p``.

    ``log(1 + beta (e^d - 1))`` for d <= 0 and ``d + log(beta + (1 - beta) e^-d)`` for d > 0, written
    with log1p/expm1: exact 0 at d = 0 (so JSD of identical distributions is exactly 0), no overflow.
    """
    low = torch.log1p(beta * torch.expm1(d.clamp(max=0.0)))
    high = d + torch.log1p((1.0 - beta) * torch.expm1(-d.clamp(min=0.0)))
    return torch.where(d <= 0, low, high)


def kl_partials(
    student: Head, teacher: Head, *, kind: str, inv_temp: float, n_valid: int, config: KernelConfig
) -> torch.Tensor:
    """Per-tile partials ``[T, P, 5]`` ``(m_s, s_s, m_t, s_t, a)``.

    ``a = sum_j e^{z_t,j - m_t} (z_t,j - z_s,j)`` for "forward" (scaled by the teacher's max),
    ``sum_j e^{z_s,j - m_s} (z_s,j - z_t,j)`` for "reverse", 0 for "jsd" (which needs a second pass).
    """
    num_tokens = student.num_tokens
    device = (student.logits if student.from_logits else student.hidden).device
    parts = torch.zeros((num_tokens, max(1, num_column_tiles(n_valid, config)), 5), dtype=torch.float32, device=device)
    parts[:, :, 0] = parts[:, :, 2] = float("-inf")
    for index, c0, c1 in _column_tiles(n_valid, config):
        for r0, r1 in _row_chunks(num_tokens, config):
            z_s = logit_tile(student, r0, r1, c0, c1, inv_temp)
            z_t = logit_tile(teacher, r0, r1, c0, c1, inv_temp)
            diff = (z_t - z_s) if kind == "forward" else (z_s - z_t) if kind == "reverse" else None
            m_s, m_t = z_s.amax(dim=1), z_t.amax(dim=1)
            e_s = z_s.sub_(m_s[:, None]).exp_()
            e_t = z_t.sub_(m_t[:, None]).exp_()
            a = torch.zeros_like(m_s) if diff is None else diff.mul_(e_t if kind == "forward" else e_s).sum(dim=1)
            parts[r0:r1, index] = torch.stack([m_s, e_s.sum(dim=1), m_t, e_t.sum(dim=1), a], dim=1)
    return parts


def jsd_sums(
    student: Head,
    teacher: Head,
    log_z_s: torch.Tensor,
    log_z_t: torch.Tensor,
    *,
    beta: float,
    inv_temp: float,
    n_valid: int,
    config: KernelConfig,
) -> torch.Tensor:
    """This shard's ``[T, 2]`` ``(sum_j p_j log(p_j/m_j), sum_j q_j log(q_j/m_j))``, given global ``logZ``s."""
    num_tokens = student.num_tokens
    device = log_z_s.device
    sums = torch.zeros((num_tokens, 2), dtype=torch.float32, device=device)
    for _, c0, c1 in _column_tiles(n_valid, config):
        for r0, r1 in _row_chunks(num_tokens, config):
            log_p = logit_tile(student, r0, r1, c0, c1, inv_temp).sub_(log_z_s[r0:r1, None])
            log_q = logit_tile(teacher, r0, r1, c0, c1, inv_temp).sub_(log_z_t[r0:r1, None])
            d = log_q - log_p
            mix = log_mix_ratio(d, beta)  # log(m/p); log(q/m) = d - mix
            sums[r0:r1, 0] -= (log_p.exp_() * mix).sum(dim=1)
            sums[r0:r1, 1] += (log_q.exp_() * d.sub_(mix)).sum(dim=1)
    return sums


def kl_logit_grads(
    z_s: torch.Tensor,
    z_t: torch.Tensor,
    log_z_s: torch.Tensor,
    log_z_t: torch.Tensor,
    stats: torch.Tensor,
    g: torch.Tensor,
    *,
    kind: str,
    beta: float,
    inv_temp: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dz_s, dz_t)`` of one tile ``[r, c]`` (consumes ``z_s``, ``z_t``); per-token inputs ``[r]``.

    ``stats [r, 2]``: ``(KL, 0)`` for forward/reverse, ``(KL(p||m), KL(q||m))`` for jsd. With
    ``p`` the student, ``q`` the teacher, ``m = (1-beta) p + beta q``:
    forward ``KL(q||p)``: ``dz_s = p - q``, ``dz_t = q (log q - log p - KL)``;
    reverse ``KL(p||q)``: ``dz_s = p (log p - log q - KL)``, ``dz_t = q - p``;
    jsd: ``dz_s = (1-beta) p (log(p/m) - KL(p||m))``, ``dz_t = beta q (log(q/m) - KL(q||m))``.
    """
    log_p = z_s.sub_(log_z_s[:, None])
    log_q = z_t.sub_(log_z_t[:, None])
    p, q = log_p.exp(), log_q.exp()
    scale = (g * inv_temp)[:, None]
    if kind == "forward":
        dz_t = q * log_q.sub_(log_p).sub_(stats[:, :1])
        return p.sub_(q).mul_(scale), dz_t.mul_(scale)
    if kind == "reverse":
        dz_s = p * log_p.sub_(log_q).sub_(stats[:, :1])
        return dz_s.mul_(scale), q.sub_(p).mul_(scale)
    d = log_q.sub_(log_p)
    mix = log_mix_ratio(d, beta)
    dz_s = p.mul_(mix.neg().sub_(stats[:, :1])).mul_(scale * (1.0 - beta))
    dz_t = q.mul_(d.sub_(mix).sub_(stats[:, 1:])).mul_(scale * beta)
    return dz_s, dz_t


def kl_backward(
    student: Head,
    teacher: Head,
    log_z_s: torch.Tensor,
    log_z_t: torch.Tensor,
    stats: torch.Tensor,
    g: torch.Tensor,
    *,
    kind: str,
    beta: float,
    inv_temp: float,
    n_valid: int,
    needs: tuple[bool, bool, bool, bool],
    config: KernelConfig,
) -> tuple[HeadGrads, HeadGrads]:
    """Gradients of ``sum(g * kl)`` for ``(student, teacher)``; ``needs`` = (d h_s, d W_s, d h_t, d W_t)."""
    sinks = GradSink(student, needs[0], needs[1]), GradSink(teacher, needs[2], needs[3])
    for _, c0, c1 in _column_tiles(n_valid, config):
        for sink in sinks:
            sink.begin_columns(c0, c1)
        for r0, r1 in _row_chunks(student.num_tokens, config):
            dz_s, dz_t = kl_logit_grads(
                logit_tile(student, r0, r1, c0, c1, inv_temp),
                logit_tile(teacher, r0, r1, c0, c1, inv_temp),
                log_z_s[r0:r1], log_z_t[r0:r1], stats[r0:r1], g[r0:r1],
                kind=kind, beta=beta, inv_temp=inv_temp,
            )  # fmt: skip
            sinks[0].add(r0, r1, c0, c1, dz_s)
            sinks[1].add(r0, r1, c0, c1, dz_t)
        for sink in sinks:
            sink.end_columns(c0, c1)
    return sinks[0].result(), sinks[1].result()
