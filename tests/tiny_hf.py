"""Tiny random Hugging Face models (Llama, Qwen2, Qwen3) and a word-level tokenizer, built locally.

Hugging Face models cannot be downloaded here, so tests build them from ``transformers`` configs.
The configs are chosen to exercise every switch megatron_lcr maps: Llama 3.1 rope scaling, Qwen2's
QKV bias and tied embeddings, Qwen3's q/k norms and a ``head_dim`` that is not hidden/heads, grouped-
query attention (8 heads, 2 kv heads), and a vocabulary (1000) that Megatron must pad.
"""

from __future__ import annotations

import os
import pathlib

import torch

FAMILIES = ("llama", "qwen2", "qwen3")

VOCAB_SIZE = 1000
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")

# Parameters are perturbed after init: HF initialises RMSNorm weights to ones and biases to zeros,
# which would hide a norm or bias mapped to the wrong place. Matrices start at std 0.02 (HF's
# initializer_range), so their noise matches that scale; 1-D tensors (norms, biases) get more.
_MATRIX_NOISE = 0.02
_VECTOR_NOISE = 0.1


def tiny_config(family: str, *, num_layers: int = 4, tie: bool | None = None, head_dim: int | None = None):
    """The ``transformers`` config :func:`make_tiny_hf` builds ``family`` from (no weights). ``head_dim``
    (a divisor of the hidden size 64) trades heads for head size: vLLM's CPU attention takes only
    head sizes 32, 64, 80, ... (the default 8 heads of 8 give vLLM nothing to run)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if head_dim is not None:
        heads = 64 // head_dim
        common.update(num_attention_heads=heads, num_key_value_heads=max(1, heads // 2))
    if family == "llama":
        # Head_dim 8 has 4 rotary wavelengths (~6, 167, 4.4e3, 1.2e5 tokens); with an original
        # context of 64 the first is left alone and the others are divided by the factor, so a
        # default-rope model gives different logits. (The smoothed band in between is covered by
        # the Llama-3.1-8B-shaped config in tests/models/test_families.py.)
        rope_scaling = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        cfg = LlamaConfig(**common, rope_scaling=rope_scaling, rope_theta=500000.0, tie_word_embeddings=False)
    elif family == "qwen2":
        cfg = Qwen2Config(**common, tie_word_embeddings=True)
    elif family == "qwen3":
        cfg = Qwen3Config(**common, head_dim=16, tie_word_embeddings=False)
    else:
        raise ValueError(f"unknown family {family!r} (known: {', '.join(FAMILIES)})")
    if tie is not None:
        cfg.tie_word_embeddings = tie
    return cfg


def save_tiny_tokenizer(out_dir: str | os.PathLike) -> None:
    """A 1000-token word-level tokenizer (specials, then ``w4`` .. ``w999``) that AutoTokenizer loads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), VOCAB_SIZE)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(str(out_dir))


def make_tiny_hf(
    family: str, out_dir: str | os.PathLike, *, seed: int = 0, num_layers: int = 4, tie: bool | None = None,
    head_dim: int | None = None,
) -> pathlib.Path:
    """Build, perturb and save a tiny random ``family`` model (fp32 safetensors) plus tokenizer."""
    from transformers import AutoModelForCausalLM

    out = pathlib.Path(out_dir)
    cfg = tiny_config(family, num_layers=num_layers, tie=tie, head_dim=head_dim)
    # fork_rng: the caller's global RNG stream is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        with torch.no_grad():
            for param in model.parameters():  # tied weights appear once
                scale = _MATRIX_NOISE if param.dim() > 1 else _VECTOR_NOISE
                param.add_(torch.randn_like(param) * scale)
    model.save_pretrained(str(out), safe_serialization=True)
    save_tiny_tokenizer(out)
    return out


@torch.no_grad()
def hf_logits(model_dir: str | os.PathLike, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, S, vocab]`` (fp32) of ``input_ids [B, S]`` from the Hugging Face model itself."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="eager", local_files_only=True
    )
    model.eval()
    return model(input_ids=input_ids).logits.float()
