"""Fused per-token log-prob, entropy and KL over a tensor-parallel vocabulary (no [T, V] logits).

Public ops (all return per-token fp32 tensors; reductions stay with the caller):

- ``logprob_entropy(hidden, weight, labels, ...)`` and ``logprob_entropy_from_logits(logits, labels, ...)``
- ``kl_divergence(h_s, w_s, h_t, w_t, kind=..., ...)`` and ``kl_divergence_from_logits(z_s, z_t, ...)``
- ``megatron_vocab_shard(weight)``, ``output_weight(model)``, ``output_layer_returns_hidden(model)``:
  Megatron glue for the hidden-state path (see ``megatron.py``).

``KernelConfig.impl`` picks Triton (CUDA) or the chunked PyTorch path (CPU, reference).
"""

from megatron_lcr.kernels.config import KernelConfig, resolve_impl
from megatron_lcr.kernels.kl import KL_KINDS, kl_divergence, kl_divergence_from_logits
from megatron_lcr.kernels.logprob import logprob_entropy, logprob_entropy_from_logits
from megatron_lcr.kernels.megatron import megatron_vocab_shard, output_layer_returns_hidden, output_weight
from megatron_lcr.kernels.vocab_parallel import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "KL_KINDS",
    "KernelConfig",
    "kl_divergence",
    "kl_divergence_from_logits",
    "logprob_entropy",
    "logprob_entropy_from_logits",
    "megatron_vocab_shard",
    "output_layer_returns_hidden",
    "output_weight",
    "resolve_impl",
]
