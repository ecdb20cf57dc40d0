"""HF architecture -> Megatron TransformerConfig: every field that decides the maths, by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_lcr.config import ConfigError, from_dict
from megatron_lcr.models.builder import ModelConfig, resolved_vocab_size, transformer_config
from megatron_lcr.models.families import hf_arch
from megatron_lcr.parallel.layout import ParallelConfig
from tests.tiny_hf import tiny_config


def test_qwen3_transformer_config_fields():
    arch = hf_arch(tiny_config("qwen3"))
    cfg = transformer_config(arch, ModelConfig(params_dtype="bfloat16"), ParallelConfig(tensor_model_parallel_size=2))
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (4, 64, 128)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels) == (8, 2, 16)  # head_dim 16 != 64/8
    assert cfg.normalization == "RMSNorm" and cfg.layernorm_epsilon == arch.norm_eps
    assert cfg.gated_linear_unit and cfg.activation_func is F.silu
    assert cfg.qk_layernorm and not cfg.add_qkv_bias and not cfg.add_bias_linear
    assert cfg.params_dtype == torch.bfloat16 and cfg.bf16 and not cfg.fp16
    assert cfg.tensor_model_parallel_size == 2
    assert cfg.attention_dropout == 0.0 and cfg.hidden_dropout == 0.0
    assert cfg.fp8 is None


def test_qwen2_has_qkv_bias_and_llama_does_not():
    local = ModelConfig(params_dtype="float32")
    assert transformer_config(hf_arch(tiny_config("qwen2")), local, ParallelConfig()).add_qkv_bias
    assert not transformer_config(hf_arch(tiny_config("llama")), local, ParallelConfig()).add_qkv_bias


def test_vocab_padding_follows_tp_unless_fixed_by_a_checkpoint():
    arch = hf_arch(tiny_config("llama"))  # vocab 1000
    assert resolved_vocab_size(arch, ModelConfig(), ParallelConfig()) == 1024
    assert resolved_vocab_size(arch, ModelConfig(), ParallelConfig(tensor_model_parallel_size=4)) == 1024
    assert resolved_vocab_size(arch, ModelConfig(), ParallelConfig(tensor_model_parallel_size=8)) == 1024
    assert resolved_vocab_size(arch, ModelConfig(), ParallelConfig(tensor_model_parallel_size=3)) == 1152
    assert resolved_vocab_size(arch, ModelConfig(padded_vocab_size=1024), ParallelConfig(tensor_model_parallel_size=2)) == 1024
    with pytest.raises(ValueError, match="1026 must be >= vocab_size 1000 and divisible by tensor_model_parallel_size 4"):
        resolved_vocab_size(arch, ModelConfig(padded_vocab_size=1026), ParallelConfig(tensor_model_parallel_size=4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusals")
def test_gpu_only_features_fail_clearly_on_cpu():
    arch = hf_arch(tiny_config("llama"))
    with pytest.raises(RuntimeError, match="context_parallel_size 2 needs Transformer Engine"):
        transformer_config(arch, ModelConfig(), ParallelConfig(context_parallel_size=2))
    with pytest.raises(RuntimeError, match="fp8='hybrid' needs Transformer Engine and a CUDA GPU"):
        transformer_config(arch, ModelConfig(fp8="hybrid"), ParallelConfig())
    with pytest.raises(RuntimeError, match="'transformer_engine' needs Transformer Engine"):
        transformer_config(arch, ModelConfig(transformer_impl="transformer_engine"), ParallelConfig())


def test_model_config_rejects_impossible_combinations():
    with pytest.raises(ConfigError, match="model: fp8='e4m3' needs transformer_impl"):
        from_dict(ModelConfig, {"fp8": "e4m3", "transformer_impl": "local"}, prefix="model")
    with pytest.raises(ConfigError, match="attention_dropout must be in"):
        from_dict(ModelConfig, {"attention_dropout": 1.5})
