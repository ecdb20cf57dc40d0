"""float64 PyTorch references for the fused kernels: materialised logits, plain autograd.

Padding columns (global ids >= valid_vocab_end) are dropped before the softmax; masked rows are
multiplied by 0, so their gradients are exact zeros.
"""

from __future__ import annotations

import math

import torch


def ref_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float, valid_vocab_end: int) -> torch.Tensor:
    """``[T, valid_vocab_end]`` float64 logits / temperature (global vocabulary, padding dropped)."""
    return (hidden.double() @ weight.double().t())[:, :valid_vocab_end] / temperature


def ref_logprob_entropy(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, valid_vocab_end: int, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits [T, V]`` (any dtype, global columns) -> float64 ``(logp [T], entropy [T])``."""
    log_p = (logits.double()[:, :valid_vocab_end] / temperature).log_softmax(dim=-1)
    keep = labels != ignore_index
    logp = log_p.gather(1, labels.clamp(min=0)[:, None])[:, 0] * keep
    entropy = -(log_p.exp() * log_p).sum(dim=-1) * keep
    return logp, entropy


def ref_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str,
    beta: float,
    temperature: float,
    valid_vocab_end: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """float64 per-token KL: forward ``KL(q||p)``, reverse ``KL(p||q)``, GKD's generalised JSD."""
    log_p = (student_logits.double()[:, :valid_vocab_end] / temperature).log_softmax(dim=-1)
    log_q = (teacher_logits.double()[:, :valid_vocab_end] / temperature).log_softmax(dim=-1)
    if kind == "forward":
        kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    elif kind == "reverse":
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    else:
        log_m = torch.logsumexp(torch.stack([log_q + math.log(beta), log_p + math.log(1 - beta)]), dim=0)
        kl = beta * (log_q.exp() * (log_q - log_m)).sum(-1) + (1 - beta) * (log_p.exp() * (log_p - log_m)).sum(-1)
    return kl if mask is None else kl * mask


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, name: str = "") -> None:
    """``|a - e| <= atol * max(1, max|e|) + rtol * |e|`` elementwise: atol scales with the tensor's size."""
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}"
    )
