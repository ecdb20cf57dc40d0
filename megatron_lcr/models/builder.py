"""Hugging Face config -> Megatron-Core ``TransformerConfig``, layer spec and ``GPTModel``.

The Transformer Engine spec (fused norms, FP8) is used when TE and CUDA are present, the local
Megatron spec otherwise (CPU, or ``transformer_impl: local``). Both compute the same function;
only parameter names of the fused norms differ, which ``weight_map`` accounts for.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from megatron_lcr.models.families import HFArch, rope_inv_freq
from megatron_lcr.parallel.layout import ParallelConfig, padded_vocab_size

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(kw_only=True)
class ModelConfig:
    """How the policy (or teacher) network is built on top of its Hugging Face architecture."""

    hf_path: str = ""
    """Hugging Face model directory (config.json, weights, tokenizer); empty when loading a Megatron checkpoint."""
    random_init: bool = False
    """Initialise randomly (seeded) instead of loading weights; only for from-scratch demos and tests."""
    params_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Dtype of parameters and activations (the optimizer keeps fp32 master weights)."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer implementation: 'auto' = TE when TE and CUDA are present and params_dtype is 16-bit, else
    Megatron's local one (TE has no attention backend for float32 packed THD sequences)."""
    fp8: Literal["e4m3", "hybrid"] | None = None
    """FP8 format for TE linear layers (hybrid: e4m3 forward, e5m2 gradients); None disables FP8."""
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    """FP8 scaling recipe (mxfp8 needs Blackwell)."""
    fp8_margin: int = 0
    """Delayed scaling: power-of-two margin subtracted from the computed scale exponent."""
    fp8_amax_history_len: int = 1024
    """Delayed scaling: amax history window (steps)."""
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    """Delayed scaling: how the scale is computed from the amax history."""
    recompute_granularity: Literal["full", "selective"] | None = None
    """Activation recomputation (full layers or selective attention); None keeps activations."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities (probability); 0 for RL, where log-probs must be exact."""
    hidden_dropout: float = 0.0
    """Dropout on residual branches (probability)."""
    padded_vocab_size: int | None = None
    """Rows of the (vocab-parallel) embedding; None pads the tokenizer vocab to a multiple of 128*TP."""

    def __post_init__(self) -> None:
        if self.fp8 is not None and self.transformer_impl == "local":
            raise ValueError(f"fp8={self.fp8!r} needs transformer_impl 'transformer_engine' or 'auto', not 'local'")
        if self.params_dtype == "float32" and (self.transformer_impl == "transformer_engine" or self.fp8):
            # TE turns Flash and Fused attention off for non-16-bit inputs and Unfused attention takes
            # no THD (packed) layout: every packed forward would fail inside TE.
            what = f"fp8={self.fp8!r}" if self.fp8 else f"transformer_impl={self.transformer_impl!r}"
            raise ValueError(f"params_dtype 'float32' with {what}: Transformer Engine has no attention backend for "
                             "float32 packed sequences; use params_dtype 'bfloat16' or transformer_impl 'local'")
        for name in ("attention_dropout", "hidden_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


def te_available() -> bool:
    """Transformer Engine is importable and a GPU is present (TE does not run on CPU)."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def use_transformer_engine(cfg: ModelConfig) -> bool:
    """Resolve ``transformer_impl`` to a yes/no, failing clearly if TE was asked for but is absent."""
    if cfg.transformer_impl == "local":
        return False
    if cfg.transformer_impl == "transformer_engine" and not te_available():
        raise RuntimeError("transformer_impl 'transformer_engine' needs Transformer Engine and a CUDA GPU")
    if cfg.fp8 is not None and not te_available():
        raise RuntimeError(f"fp8={cfg.fp8!r} needs Transformer Engine and a CUDA GPU")
    return te_available() and cfg.params_dtype != "float32"  # see ModelConfig.transformer_impl


def resolved_vocab_size(arch: HFArch, cfg: ModelConfig, parallel: ParallelConfig) -> int:
    """Embedding rows: the configured padded size (checked against TP) or the default padding."""
    tp = parallel.tensor_model_parallel_size
    if cfg.padded_vocab_size is None:
        return padded_vocab_size(arch.vocab_size, tp)
    if cfg.padded_vocab_size < arch.vocab_size or cfg.padded_vocab_size % tp:
        raise ValueError(
            f"padded_vocab_size {cfg.padded_vocab_size} must be >= vocab_size {arch.vocab_size} "
            f"and divisible by tensor_model_parallel_size {tp}"
        )
    return cfg.padded_vocab_size


def transformer_config(arch: HFArch, cfg: ModelConfig, parallel: ParallelConfig):
    """Build Megatron's ``TransformerConfig`` for ``arch`` under ``parallel``."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    te = use_transformer_engine(cfg)
    if parallel.context_parallel_size > 1 and not te:
        # Megatron's context-parallel attention (ring exchange of K/V) exists only in TE.
        raise RuntimeError(
            f"context_parallel_size {parallel.context_parallel_size} needs Transformer Engine attention on a GPU"
        )
    dtype = DTYPES[cfg.params_dtype]
    fp8 = {}
    if cfg.fp8 is not None:
        fp8 = dict(
            fp8=cfg.fp8,
            fp8_recipe=cfg.fp8_recipe,
            fp8_margin=cfg.fp8_margin,
            fp8_amax_history_len=cfg.fp8_amax_history_len,
            fp8_amax_compute_algo=cfg.fp8_amax_compute_algo,
        )
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        attention_dropout=cfg.attention_dropout,
        hidden_dropout=cfg.hidden_dropout,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        recompute_granularity=cfg.recompute_granularity,
        recompute_method="uniform" if cfg.recompute_granularity == "full" else None,
        recompute_num_layers=1 if cfg.recompute_granularity == "full" else None,
        # Fused CUDA kernels (bias-act, softmax, RoPE, grad-accumulation) only where they exist.
        bias_activation_fusion=te,
        masked_softmax_fusion=te,
        apply_rope_fusion=te,
        gradient_accumulation_fusion=False,
        persist_layer_norm=te,
        use_cpu_initialization=not torch.cuda.is_available(),
        **fp8,
    )


def layer_spec(arch: HFArch, cfg: ModelConfig):
    """Megatron layer spec: Transformer Engine modules when available, else local modules."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_transformer_engine(cfg):
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    return gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")


def build_gpt_model(
    arch: HFArch,
    cfg: ModelConfig,
    parallel: ParallelConfig,
    *,
    pre_process: bool,
    post_process: bool,
    vp_stage: int | None = None,
    pg_collection=None,
):
    """Build this rank's ``GPTModel`` chunk; Megatron's parallel_state must be initialised.

    ``pg_collection`` (Megatron's ``ProcessGroupCollection``): process groups of the model's own instead
    of parallel_state's (a teacher with its own tensor-parallel layout, ``distill.layout_teacher``)."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    config = transformer_config(arch, cfg, parallel)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(arch, cfg),
        vocab_size=resolved_vocab_size(arch, cfg, parallel),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope.theta,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )
    # Megatron's llama3 scaling fixes three of its four parameters; set the exact frequencies.
    device = model.rotary_pos_emb.inv_freq.device
    inv_freq = rope_inv_freq(arch.rope, arch.head_dim)
    model.rotary_pos_emb.inv_freq = inv_freq if device.type == "meta" else inv_freq.to(device)
    return model
