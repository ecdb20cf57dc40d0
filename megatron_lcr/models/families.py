"""Hugging Face model families megatron_lcr supports, and what distinguishes them.

Llama 3.x, Qwen2/Qwen2.5 and Qwen3 dense decoders share one Megatron GPT layout (RMSNorm, RoPE,
SwiGLU MLP, grouped-query attention). They differ in a few switches: QKV bias (Qwen2), per-head
q/k RMSNorm (Qwen3), an explicit ``head_dim`` (Qwen3), tied embeddings (small Qwen and Llama 3.2
models) and RoPE scaling (Llama 3.1+). Llama/Qwen3 configs with ``attention_bias`` are rejected (it
also biases o_proj, which Megatron cannot express alone). This module reads those switches from a ``transformers`` config into :class:`HFArch`, the only description of the
model the rest of the package needs, and rejects anything it cannot represent exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_lcr.parallel.layout import ModelDims

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


class UnsupportedModelError(ValueError):
    """The Hugging Face config describes a model megatron_lcr cannot represent exactly."""


@dataclass(frozen=True, kw_only=True)
class RopeSpec:
    """Rotary embedding parameters (Hugging Face ``rope_parameters`` / ``rope_scaling``)."""

    theta: float
    """Base of the rotary frequencies."""
    kind: str = "default"
    """``default`` or ``llama3`` (Llama 3.1 wavelength-dependent scaling)."""
    factor: float = 1.0
    """llama3: how much the long wavelengths are stretched."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above original_max / low_freq_factor are fully scaled."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below original_max / high_freq_factor are left alone."""
    original_max_position_embeddings: int = 8192
    """llama3: context length (tokens) the base model was trained at."""


@dataclass(frozen=True, kw_only=True)
class HFArch:
    """Everything about a Hugging Face decoder that decides its Megatron layout."""

    architecture: str
    """Hugging Face class name, e.g. ``Qwen2ForCausalLM``."""
    num_layers: int
    """Transformer layers."""
    hidden_size: int
    """Model width (features)."""
    ffn_hidden_size: int
    """SwiGLU intermediate width (features, per gate/up half)."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int
    """Key/value heads (grouped-query attention)."""
    head_dim: int
    """Features per attention head."""
    vocab_size: int
    """Tokenizer vocabulary (rows of the HF embedding, before Megatron's padding)."""
    max_position_embeddings: int
    """Longest sequence (tokens) the model is configured for."""
    norm_eps: float
    """RMSNorm epsilon."""
    qkv_bias: bool
    """Whether q/k/v projections have a bias."""
    qk_norm: bool
    """Whether q and k go through a per-head RMSNorm (Qwen3)."""
    tie_word_embeddings: bool
    """Whether the output layer shares the input embedding's weight."""
    rope: RopeSpec
    """Rotary embedding parameters."""


def _rope_spec(hf) -> RopeSpec:
    # transformers >= 5 keeps everything in `rope_parameters`; 4.x uses rope_theta + rope_scaling.
    params = dict(getattr(hf, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(hf, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    if kind == "default":
        return RopeSpec(theta=theta)
    if kind == "llama3":
        return RopeSpec(
            theta=theta,
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise UnsupportedModelError(f"rope type '{kind}' is not supported (supported: default, llama3)")


def architecture_of(hf) -> str:
    """The supported architecture name of a ``transformers`` config, or UnsupportedModelError."""
    archs = list(getattr(hf, "architectures", None) or [])
    if not archs and getattr(hf, "model_type", None) in _MODEL_TYPES:
        archs = [_MODEL_TYPES[hf.model_type]]
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    found = ", ".join(archs) or f"model_type={getattr(hf, 'model_type', None)!r}"
    raise UnsupportedModelError(
        f"unsupported architecture {found} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
    )


def hf_arch(hf) -> HFArch:
    """Read a ``transformers`` Llama/Qwen2/Qwen3 config into an :class:`HFArch`."""
    arch = architecture_of(hf)
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act '{hf.hidden_act}' is not supported (only silu)")
    if getattr(hf, "use_sliding_window", False):
        raise UnsupportedModelError("sliding-window attention (use_sliding_window: true) is not supported")
    if getattr(hf, "mlp_bias", False):
        raise UnsupportedModelError("mlp_bias: true is not supported")
    if arch != "Qwen2ForCausalLM" and getattr(hf, "attention_bias", False):
        # Llama/Qwen3 attention_bias also biases o_proj; Megatron can add a bias to the output
        # projection only together with every other linear (add_bias_linear), so it cannot be exact.
        raise UnsupportedModelError(f"attention_bias: true is not supported for {arch} (o_proj bias)")
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    qkv_bias = arch == "Qwen2ForCausalLM"
    return HFArch(
        architecture=arch,
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab_size=hf.vocab_size,
        max_position_embeddings=hf.max_position_embeddings,
        norm_eps=hf.rms_norm_eps,
        qkv_bias=qkv_bias,
        qk_norm=arch == "Qwen3ForCausalLM",
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        rope=_rope_spec(hf),
    )


def rope_inv_freq(rope: RopeSpec, head_dim: int) -> torch.Tensor:
    """Inverse rotary frequencies ``[head_dim // 2]`` (fp32), with Llama 3.1 scaling when asked.

    Megatron's own llama3 scaling hard-codes low/high frequency factors and the original context
    length; computing the frequencies here lets any Llama 3.x config map exactly.
    """
    # Always on CPU: also called while a model is built under torch.device("meta").
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.kind == "default":
        return inv_freq
    low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
    high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    # Between the two wavelengths, interpolate linearly in 1/wavelength between scaled and unscaled.
    smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def model_dims(arch: HFArch) -> ModelDims:
    """The sizes parallel-layout validation checks (heads, groups, layers, FFN) of ``arch``."""
    return ModelDims(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        ffn_hidden_size=arch.ffn_hidden_size,
        vocab_size=arch.vocab_size,
    )
