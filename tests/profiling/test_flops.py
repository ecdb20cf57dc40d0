"""profiling/flops.py against a hand count, torch's own FLOP counter on a Hugging Face model, the
published formulas it follows (Narayanan et al. 2021, PaLM) and published Llama 3 figures."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_lcr.profiling.flops import (TransformerDims, attention_flops, forward_flops, forward_flops_per_token,
                                          matmul_params, param_count, sequences_flops, step_flops_metrics,
                                          training_flops)

# 2 layers, width 8, 4 query heads and 2 key/value heads of 2 features, SwiGLU width 12, vocabulary 10.
TINY = TransformerDims(layers=2, hidden=8, ffn_hidden=12, heads=4, kv_heads=2, head_dim=2, vocab=10)


def test_tiny_config_equals_a_hand_count_term_by_term():
    s = 3  # tokens in the sequence
    q_proj = 2 * 8 * (4 * 2)  # 2 FLOPs per multiply-add, hidden -> heads * head_dim = 128
    k_proj = 2 * 8 * (2 * 2)  # grouped-query attention: only kv_heads * head_dim outputs = 64
    v_proj = 2 * 8 * (2 * 2)  # 64
    o_proj = 2 * (4 * 2) * 8  # 128
    swiglu = 3 * (2 * 8 * 12)  # gate, up and down projections = 576
    per_layer_per_token = q_proj + k_proj + v_proj + o_proj + swiglu
    assert per_layer_per_token == 960
    lm_head = 2 * 8 * 10  # per token = 160
    causal_pairs = s * s / 2  # the convention: half the score matrix under a causal mask = 4.5
    scores = 2 * 4 * 2 * causal_pairs  # Q K^T: 2 * heads * head_dim per (query, key) pair = 72
    values = 2 * 4 * 2 * causal_pairs  # softmax(...) V, likewise = 72
    forward = 2 * (per_layer_per_token * s + scores + values) + lm_head * s
    assert forward == 5760 + 288 + 480 == 6528
    assert forward_flops(TINY, s) == forward
    assert training_flops(TINY, s) == 3 * forward == 19584  # backward: input and weight gradient of every matmul
    assert forward_flops(TINY, s, causal=False) == forward + 2 * (scores + values) == 6816
    assert forward_flops_per_token(TINY, s) == forward / s
    assert matmul_params(TINY) == 2 * per_layer_per_token // 2 + lm_head // 2 == 1040


def _tiny_llama(dims: TransformerDims):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=dims.vocab, hidden_size=dims.hidden, intermediate_size=dims.ffn_hidden,
                         num_hidden_layers=dims.layers, num_attention_heads=dims.heads,
                         num_key_value_heads=dims.kv_heads, head_dim=dims.head_dim, max_position_embeddings=64,
                         attn_implementation="eager", tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).double()


def test_torch_flop_counter_on_a_hf_llama_counts_the_same_forward_and_backward():
    """torch counts every matmul it runs (2mnk); HF's eager attention multiplies the whole s x s score
    matrix (the mask is added, not skipped), i.e. the non-causal count."""
    model = _tiny_llama(TINY)
    ids = torch.tensor([[1, 5, 2, 7, 3, 9, 4]])
    with FlopCounterMode(display=False) as forward_only:
        with torch.no_grad():
            model(ids)
    assert forward_only.get_total_flops() == forward_flops(TINY, 7, causal=False)
    with FlopCounterMode(display=False) as both:
        model(ids).logits.sum().backward()
    assert both.get_total_flops() == training_flops(TINY, 7, causal=False)


def test_gpt_config_matches_narayanan_et_al_2021():
    """Narayanan et al. 2021 (arXiv:2104.04473), Appendix "Floating-point operations": a GPT layer
    (h -> 3h QKV, h -> h projection, h -> 4h -> h MLP) costs ``72 B s l h^2 (1 + s/(6h) + V/(12 l h))``
    per iteration without activation recomputation (their 96 counts a second forward)."""
    b, s, l, h, heads, v = 4, 512, 6, 768, 12, 50304
    gpt = TransformerDims(layers=l, hidden=h, ffn_hidden=4 * h, heads=heads, kv_heads=heads, head_dim=h // heads,
                          vocab=v, gated_mlp=False)
    paper = 72 * b * s * l * h**2 * (1 + s / (6 * h) + v / (12 * l * h))
    assert b * training_flops(gpt, s, causal=False) == pytest.approx(paper, rel=1e-12)


def test_palm_per_token_definition():
    """PaLM (Chowdhery et al. 2022, Appendix B): ``6N + 12 L H Q T`` training FLOPs per token, N the
    matmul parameters, H heads of Q features, T the sequence length, the whole attention square."""
    llama8b = TransformerDims(layers=32, hidden=4096, ffn_hidden=14336, heads=32, kv_heads=8, head_dim=128,
                              vocab=128256)
    t = 8192
    palm = 6 * matmul_params(llama8b) + 12 * 32 * 32 * 128 * t
    assert training_flops(llama8b, t, causal=False) / t == pytest.approx(palm, rel=1e-12)
    # causal: the attention term is halved, the rest unchanged
    assert training_flops(llama8b, t) / t == pytest.approx(6 * matmul_params(llama8b) + 6 * 32 * 32 * 128 * t, rel=1e-12)


def test_llama_3_1_8b_and_405b_against_published_figures():
    # Llama 3 paper (Llama Team, "The Llama 3 Herd of Models", arXiv:2407.21783, Table 3): 8B = 32 layers,
    # model dimension 4,096, FFN 14,336, 32 attention heads, 8 key/value heads; 405B = 126 layers,
    # 16,384, 53,248, 128 heads, 8 key/value heads; the released models' vocabulary is 128,256.
    llama8b = TransformerDims(layers=32, hidden=4096, ffn_hidden=14336, heads=32, kv_heads=8, head_dim=128,
                              vocab=128256)
    llama405b = TransformerDims(layers=126, hidden=16384, ffn_hidden=53248, heads=128, kv_heads=8, head_dim=128,
                                vocab=128256)
    # Hugging Face Hub, meta-llama/Llama-3.1-8B, model.safetensors.index.json: "total_size": 16060522496
    # bytes of bfloat16 = 8,030,261,248 parameters (the model page's "8.03B params").
    assert param_count(llama8b) == 16060522496 // 2 == 8_030_261_248
    # 6N per token (Kaplan et al. 2020) with N the weights a token multiplies through: all of them but the
    # input embedding (a lookup) and the norms (elementwise).
    norms = 2 * 32 * 4096 + 4096
    assert training_flops(llama8b, 1) == pytest.approx(6 * (8_030_261_248 - 128256 * 4096 - norms), abs=1e6)
    # Same paper, Section 1: the 405B model was "pre-trained on 15.6T text tokens using a total of
    # 3.8 x 10^25 FLOPs": 6N per token over 15.6T tokens, given to two significant digits.
    total = 6 * matmul_params(llama405b) * 15.6e12
    assert round(total / 1e25, 1) == 3.8


def test_packed_sequences_count_their_own_attention():
    assert sequences_flops(TINY, [3, 5], training=False) == forward_flops(TINY, 3) + forward_flops(TINY, 5)
    assert sequences_flops(TINY, [3, 5], training=True) == 3 * sequences_flops(TINY, [3, 5], training=False)
    # one row of 8 tokens would have a bigger square: attention is per sequence, the dense part is not
    assert forward_flops(TINY, 8) - sequences_flops(TINY, [3, 5], training=False) == \
        attention_flops(TINY, 8) - attention_flops(TINY, 3) - attention_flops(TINY, 5) > 0
    metrics = step_flops_metrics(TINY, trained=[3, 5, 3], scored=[3], ranks=2)
    assert metrics == {"train/tokens": 11.0, "perf/update_flops": 2 * training_flops(TINY, 3) + training_flops(TINY, 5),
                       "perf/logprob_flops": forward_flops(TINY, 3), "perf/ranks": 2.0}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_of_each_family_equals_the_hf_models(family, tied):
    """Dims read from a Hugging Face config (GQA, Qwen2's QKV bias, Qwen3's q/k norms, tied heads) count
    the parameters the transformers model has."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    from megatron_lcr.models.families import hf_arch

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    config = cls(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=12, max_position_embeddings=64, tie_word_embeddings=tied)
    config.architectures = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]]
    model = AutoModelForCausalLM.from_config(config)
    dims = TransformerDims.from_arch(hf_arch(config))
    assert dims.head_dim == 12 != 32 // 4  # heads x head_dim need not be the width
    assert param_count(dims) == sum(p.numel() for p in model.parameters())


def test_bad_dims_are_rejected():
    with pytest.raises(ValueError, match=r"heads \(6\) must be a multiple of kv_heads \(4\)"):
        TransformerDims(layers=1, hidden=8, ffn_hidden=8, heads=6, kv_heads=4, head_dim=2, vocab=4)
    with pytest.raises(ValueError, match="every dimension must be >= 1"):
        TransformerDims(layers=0, hidden=8, ffn_hidden=8, heads=2, kv_heads=2, head_dim=4, vocab=4)
