"""Model FLOPs of a dense decoder (GQA attention, SwiGLU MLP, LM head) per sequence and per token.

The convention is the one MFU is defined with (Chowdhery et al. 2022, "PaLM", Appendix B; Narayanan et
al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", Appendix
"Floating-point operations"): count the matrix multiplications of the model, 2 FLOPs per
multiply-add, and nothing else (norms, softmax, activations, RoPE and residual adds are a few FLOPs
per feature, not per feature squared). The backward pass costs twice the forward (a gradient for the
input and one for the weight of every matmul), so a training pass is 3x the forward. Activation
recomputation is *not* counted: model FLOPs, not hardware FLOPs (Narayanan et al.'s 96 instead of
72 is the recomputing variant).

Per layer and token, with ``h`` the hidden size, ``n_q`` query heads, ``n_kv`` key/value heads of
``d`` features, ``F`` the MLP width:

- Q and O projections ``2 * (h * n_q*d) * 2``; grouped-query K and V projections ``2 * (h * n_kv*d) * 2``;
- SwiGLU MLP: three matmuls (gate, up, down) ``3 * 2 * h * F`` (a plain MLP: two);
- attention scores ``Q K^T`` and the weighted sum of values, each ``2 * n_q * d`` per (query, key)
  pair: a sequence of ``s`` tokens has ``s^2`` pairs, or ``s^2 / 2`` with a causal mask. We count the
  causal half by default, since FlashAttention-style kernels skip the blocks above the diagonal;
  PaLM (``6N + 12 * L * H * Q * T``) and Narayanan et al. count the whole square: ``causal=False``.

plus the LM head ``2 * h * V`` per token. The input embedding is a lookup: no FLOPs. Biases
(Qwen2's QKV bias) and Qwen3's q/k RMSNorm add parameters but no matmul FLOPs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class TransformerDims:
    """The sizes of a dense decoder that decide its FLOPs."""

    layers: int
    """Transformer layers."""
    hidden: int
    """Model width (features)."""
    ffn_hidden: int
    """MLP intermediate width (features; per gate/up half for SwiGLU)."""
    heads: int
    """Query heads."""
    kv_heads: int
    """Key/value heads (grouped-query attention; = heads for multi-head attention)."""
    head_dim: int
    """Features per attention head."""
    vocab: int
    """Vocabulary (rows of the LM head)."""
    gated_mlp: bool = True
    """SwiGLU (gate, up, down: three matmuls); False: a plain two-matmul MLP (GPT)."""
    tied_embeddings: bool = False
    """The LM head shares the input embedding's weight (changes the parameter count, not the FLOPs)."""
    qkv_bias: bool = False
    """Biases on the q/k/v projections (Qwen2; parameters only)."""
    qk_norm: bool = False
    """Per-head RMSNorm on q and k (Qwen3; parameters only)."""

    def __post_init__(self) -> None:
        if min(self.layers, self.hidden, self.ffn_hidden, self.heads, self.kv_heads, self.head_dim, self.vocab) < 1:
            raise ValueError(f"every dimension must be >= 1, got {self}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    @classmethod
    def from_arch(cls, arch) -> TransformerDims:
        """From a :class:`~megatron_lcr.models.families.HFArch` (Llama, Qwen2, Qwen3: all SwiGLU + GQA)."""
        return cls(layers=arch.num_layers, hidden=arch.hidden_size, ffn_hidden=arch.ffn_hidden_size,
                   heads=arch.num_attention_heads, kv_heads=arch.num_query_groups, head_dim=arch.head_dim,
                   vocab=arch.vocab_size, tied_embeddings=arch.tie_word_embeddings, qkv_bias=arch.qkv_bias,
                   qk_norm=arch.qk_norm)


def layer_matmul_params(dims: TransformerDims) -> int:
    """Weights of one layer's matmuls: Q, K, V, O projections and the MLP."""
    q_out, kv_out = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    attention = dims.hidden * q_out + 2 * dims.hidden * kv_out + q_out * dims.hidden
    mlp = (3 if dims.gated_mlp else 2) * dims.hidden * dims.ffn_hidden
    return attention + mlp


def matmul_params(dims: TransformerDims) -> int:
    """Weights every token multiplies through: all layers' matmuls and the LM head (not the embedding)."""
    return dims.layers * layer_matmul_params(dims) + dims.hidden * dims.vocab


def param_count(dims: TransformerDims) -> int:
    """Every parameter (matmuls, embedding unless tied, RMSNorm weights, q/k/v biases, q/k norms)."""
    per_layer_extra = 2 * dims.hidden  # the two RMSNorms of a layer
    if dims.qkv_bias:
        per_layer_extra += (dims.heads + 2 * dims.kv_heads) * dims.head_dim
    if dims.qk_norm:
        per_layer_extra += 2 * dims.head_dim
    embedding = 0 if dims.tied_embeddings else dims.vocab * dims.hidden
    return matmul_params(dims) + embedding + dims.layers * per_layer_extra + dims.hidden  # + final norm


def attention_flops(dims: TransformerDims, seq_len: int, *, causal: bool = True) -> float:
    """Forward FLOPs of the score and value matmuls of one sequence, all layers."""
    pairs = seq_len * seq_len / 2 if causal else seq_len * seq_len
    return dims.layers * 2 * (2 * dims.heads * dims.head_dim) * pairs


def forward_flops(dims: TransformerDims, seq_len: int, *, causal: bool = True) -> float:
    """Forward FLOPs of one sequence of ``seq_len`` tokens."""
    return 2.0 * matmul_params(dims) * seq_len + attention_flops(dims, seq_len, causal=causal)


def training_flops(dims: TransformerDims, seq_len: int, *, causal: bool = True) -> float:
    """Forward + backward FLOPs of one sequence (3x the forward)."""
    return 3.0 * forward_flops(dims, seq_len, causal=causal)


def forward_flops_per_token(dims: TransformerDims, seq_len: int, *, causal: bool = True) -> float:
    """Forward FLOPs per token of a ``seq_len``-token sequence (the attention share grows with it)."""
    return forward_flops(dims, seq_len, causal=causal) / seq_len


def sequences_flops(dims: TransformerDims, lengths: Iterable[int], *, training: bool) -> float:
    """FLOPs of a forward (``training``: forward + backward) pass over sequences of these lengths.

    Attention is per sequence: packing several into one row changes the hardware's work under a dense
    mask, not the model's FLOPs."""
    one = training_flops if training else forward_flops
    return float(sum(one(dims, n) for n in lengths))


def step_flops_metrics(dims: TransformerDims, *, trained: Iterable[int], scored: Iterable[int] = (),
                       ranks: int = 1) -> dict[str, float]:
    """A step's model-FLOPs metrics: ``train/tokens`` and ``perf/update_flops`` (forward + backward over
    the ``trained`` sequence lengths, one entry per sequence per pass), ``perf/logprob_flops``
    (forward-only scoring of the ``scored`` lengths, one entry per sequence per model) and
    ``perf/ranks`` (the processes sharing that work: MFU's denominator counts their GPUs)."""
    trained, scored = list(trained), list(scored)
    return {"train/tokens": float(sum(trained)),
            "perf/update_flops": sequences_flops(dims, trained, training=True),
            "perf/logprob_flops": sequences_flops(dims, scored, training=False),
            "perf/ranks": float(ranks)}
