"""megatron_lcr.models.families: HF config -> HFArch, rope frequencies vs transformers, rejections.

Expected HFArch fields are written out by hand from the tiny configs in tests/tiny_hf.py; rope
frequencies are compared with the functions transformers itself initialises its models with.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from megatron_lcr.models.families import RopeSpec, UnsupportedModelError, hf_arch, rope_inv_freq
from megatron_lcr.models.hf_checkpoint import load_hf_config
from tests.tiny_hf import FAMILIES, make_tiny_hf, tiny_config

LLAMA3_TINY = RopeSpec(
    theta=500000.0,
    kind="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)
SHARED = dict(
    num_layers=4,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=8,
    num_query_groups=2,
    vocab_size=1000,
    max_position_embeddings=256,
    norm_eps=1e-6,
)
EXPECTED = {
    "llama": dict(
        architecture="LlamaForCausalLM", head_dim=8, qkv_bias=False, qk_norm=False,
        tie_word_embeddings=False, rope=LLAMA3_TINY,
    ),
    # Qwen2 always has q/k/v biases (its config has no switch for them).
    "qwen2": dict(
        architecture="Qwen2ForCausalLM", head_dim=8, qkv_bias=True, qk_norm=False,
        tie_word_embeddings=True, rope=RopeSpec(theta=10000.0),
    ),
    # head_dim 16 != hidden 64 / 8 heads: must come from the config, not be derived.
    "qwen3": dict(
        architecture="Qwen3ForCausalLM", head_dim=16, qkv_bias=False, qk_norm=True,
        tie_word_embeddings=False, rope=RopeSpec(theta=10000.0),
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def saved_configs(tmp_path_factory):
    """Configs read back from disk (config.json written by save_pretrained), as users load them."""
    root = tmp_path_factory.mktemp("families")
    return {f: load_hf_config(make_tiny_hf(f, root / f, num_layers=4)) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_arch_of_saved_tiny_models(saved_configs, family):
    arch = hf_arch(saved_configs[family])
    expected = {**SHARED, **EXPECTED[family]}
    assert {name: getattr(arch, name) for name in expected} == expected


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tie", [True, False])
def test_tie_override_is_read(family, tie):
    assert hf_arch(tiny_config(family, tie=tie)).tie_word_embeddings is tie


def test_config_without_architectures_falls_back_to_model_type():
    # A config built in code (not loaded from disk) has architectures=None.
    cfg = tiny_config("qwen3")
    assert cfg.architectures is None
    assert hf_arch(cfg).architecture == "Qwen3ForCausalLM"


def test_transformers4_style_rope_attributes():
    # transformers 4.x configs carry rope_theta + rope_scaling and no rope_parameters.
    fields = tiny_config("llama").to_dict()
    fields.pop("rope_parameters", None)
    fields["rope_theta"] = 500000.0
    fields["rope_scaling"] = {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }  # fmt: skip
    assert hf_arch(SimpleNamespace(**fields)).rope == LLAMA3_TINY


# ---- rope frequencies against transformers ----------------------------------------------------


def _llama31_8b_config() -> LlamaConfig:
    # Llama-3.1-8B's rope: head_dim 4096/32 = 128, theta 5e5, llama3 scaling from 8192 tokens.
    return LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )  # fmt: skip


def _hf_inv_freq(cfg) -> torch.Tensor:
    """transformers' own inverse frequencies for ``cfg`` (what its rotary embedding module uses)."""
    rope_type = cfg.rope_parameters["rope_type"]
    if rope_type == "default":
        # transformers 5 keeps the default init on each model's rotary class, not in the registry.
        inv_freq, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](cfg, device="cpu")
    return inv_freq


@pytest.mark.parametrize(
    "make_cfg",
    [
        lambda: tiny_config("llama"),
        _llama31_8b_config,
        lambda: tiny_config("qwen2"),
        lambda: tiny_config("qwen3"),
        lambda: LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0),
    ],
    ids=["llama3-tiny", "llama3.1-8b", "default-qwen2-tiny", "default-qwen3-tiny", "default-8b"],
)
def test_rope_inv_freq_matches_transformers(make_cfg):
    cfg = make_cfg()
    arch = hf_arch(cfg)
    ours = rope_inv_freq(arch.rope, arch.head_dim)
    ref = _hf_inv_freq(cfg)
    assert ours.dtype == torch.float32 and ours.shape == (arch.head_dim // 2,)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)


def test_llama3_scaling_changes_some_but_not_all_frequencies():
    # Guards the comparison above: with these parameters all three llama3 regimes occur, so a
    # default-rope implementation could not pass it by accident.
    arch = hf_arch(_llama31_8b_config())
    scaled = rope_inv_freq(arch.rope, 128)
    plain = rope_inv_freq(RopeSpec(theta=500000.0), 128)
    ratio = plain / scaled
    assert torch.isclose(ratio, torch.tensor(1.0)).sum() > 0  # short wavelengths untouched
    assert torch.isclose(ratio, torch.tensor(8.0)).sum() > 0  # long wavelengths divided by factor
    assert ((ratio > 1.001) & (ratio < 7.999)).sum() > 0  # smoothed band in between


# ---- rejections ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_cfg, named",
    [
        (lambda: GPT2Config(), "gpt2"),
        (lambda: LlamaConfig(architectures=["MistralForCausalLM"]), "MistralForCausalLM"),
        (
            lambda: LlamaConfig(
                max_position_embeddings=256,
                rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
            ),
            "yarn",
        ),
        (lambda: LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 2.0}), "linear"),
        (lambda: LlamaConfig(hidden_act="gelu"), "gelu"),
        (lambda: Qwen2Config(use_sliding_window=True), "use_sliding_window"),
        (lambda: LlamaConfig(mlp_bias=True), "mlp_bias"),
    ],
    ids=["gpt2", "mistral-arch", "yarn", "linear-rope", "gelu", "sliding-window", "mlp-bias"],
)
def test_unsupported_configs_are_rejected_in_one_line(make_cfg, named):
    with pytest.raises(UnsupportedModelError) as err:
        hf_arch(make_cfg())
    message = str(err.value)
    assert named in message
    assert "\n" not in message
