"""megatron_lcr.parallel.layout: config rules, layout checks, vocab padding, rank coordinates."""

import pytest

from megatron_lcr.config import ConfigError, from_dict, to_dict
from megatron_lcr.parallel.layout import (
    MEGATRON_RANK_ORDER,
    ModelDims,
    ParallelConfig,
    padded_vocab_size,
    rank_coordinates,
    validate_layout,
)

# Llama-3-8B's shape: 32 layers, 32 heads in 8 KV groups, SwiGLU width 14336.
LLAMA_8B = ModelDims(
    num_layers=32,
    hidden_size=4096,
    num_attention_heads=32,
    num_query_groups=8,
    ffn_hidden_size=14336,
    vocab_size=128256,
)


def dims(**changes) -> ModelDims:
    fields = {k: getattr(LLAMA_8B, k) for k in LLAMA_8B.__dataclass_fields__}
    return ModelDims(**{**fields, **changes})


# --- ParallelConfig ---


def test_parallel_config_defaults_are_one_rank():
    cfg = ParallelConfig()
    assert (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size) == (1, 1)
    assert (cfg.context_parallel_size, cfg.expert_model_parallel_size) == (1, 1)
    assert cfg.virtual_pipeline_model_parallel_size is None
    assert not cfg.sequence_parallel and not cfg.use_distributed_optimizer


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tensor_model_parallel_size": 0}, "tensor_model_parallel_size must be >= 1, got 0"),
        ({"context_parallel_size": -2}, "context_parallel_size must be >= 1, got -2"),
        (
            {"sequence_parallel": True},
            "sequence_parallel=True requires tensor_model_parallel_size > 1, got 1",
        ),
        (
            {"virtual_pipeline_model_parallel_size": 2},
            "virtual_pipeline_model_parallel_size=2 requires "
            "pipeline_model_parallel_size > 1, got 1",
        ),
        (
            {"virtual_pipeline_model_parallel_size": 0, "pipeline_model_parallel_size": 2},
            "virtual_pipeline_model_parallel_size must be >= 1, got 0",
        ),
    ],
)
def test_parallel_config_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**kwargs)


def test_aliases_are_not_fields():
    with pytest.raises(TypeError):
        ParallelConfig(tp=2)


def test_aliases_expand_through_the_config_loader():
    section = {"tp": 2, "pp": 4, "cp": 2, "ep": 1, "vpp": 2, "sp": True, "use_distributed_optimizer": True}
    cfg = from_dict(ParallelConfig, section)
    assert (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size) == (2, 4)
    assert (cfg.context_parallel_size, cfg.expert_model_parallel_size) == (2, 1)
    assert cfg.virtual_pipeline_model_parallel_size == 2
    assert cfg.sequence_parallel and cfg.use_distributed_optimizer
    # Aliases are input only: the resolved config names every field in full.
    assert "tp" not in to_dict(cfg) and to_dict(cfg)["tensor_model_parallel_size"] == 2


def test_alias_typo_is_rejected_as_an_unknown_key():
    with pytest.raises(ConfigError, match="unknown key 'tpp'"):
        from_dict(ParallelConfig, {"tpp": 2})


def test_alias_and_full_name_must_agree():
    cfg = from_dict(ParallelConfig, {"tp": 2, "tensor_model_parallel_size": 2})
    assert cfg.tensor_model_parallel_size == 2
    with pytest.raises(ConfigError, match="parallel.tp=2 conflicts with parallel.tensor_model_parallel_size=4"):
        from_dict(ParallelConfig, {"tp": 2, "tensor_model_parallel_size": 4}, prefix="parallel")


def test_model_dims_rejects_heads_not_divisible_by_groups():
    with pytest.raises(
        ValueError, match="num_attention_heads 32 is not divisible by num_query_groups 6"
    ):
        dims(num_query_groups=6)


# --- validate_layout ---


@pytest.mark.parametrize(
    "world, kwargs, dp",
    [
        (1, {}, 1),
        (8, {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}, 2),
        (
            16,
            {
                "tensor_model_parallel_size": 2,
                "pipeline_model_parallel_size": 2,
                "context_parallel_size": 2,
            },
            2,
        ),
        (64, {"tensor_model_parallel_size": 8}, 8),
        (8, {"expert_model_parallel_size": 8}, 8),  # EP splits the experts, not the dense ranks
    ],
)
def test_validate_layout_returns_data_parallel_size(world, kwargs, dp):
    assert validate_layout(ParallelConfig(**kwargs), world_size=world) == dp


def test_world_size_must_divide_by_model_parallel():
    with pytest.raises(ValueError) as err:
        validate_layout(ParallelConfig(tensor_model_parallel_size=4), world_size=6)
    assert str(err.value) == "world size 6 is not divisible by tp(4) x pp(1) x cp(1) = 4"


def test_world_size_must_divide_by_expert_layout():
    cfg = ParallelConfig(tensor_model_parallel_size=2, expert_model_parallel_size=8)
    with pytest.raises(
        ValueError, match=r"world size 8 is not divisible by tp\(2\) x ep\(8\) x pp\(1\) = 16"
    ):
        validate_layout(cfg, world_size=8)


def test_llama_8b_fits_tp8_pp4():
    cfg = ParallelConfig(
        tensor_model_parallel_size=8,
        pipeline_model_parallel_size=4,
        virtual_pipeline_model_parallel_size=2,
    )
    assert validate_layout(cfg, world_size=64, dims=LLAMA_8B) == 2


@pytest.mark.parametrize(
    "model, kwargs, message",
    [
        (
            dims(num_attention_heads=12, num_query_groups=4),
            {"tensor_model_parallel_size": 8},
            r"num_attention_heads 12 is not divisible by tp\(8\)",
        ),
        (
            LLAMA_8B,
            {"tensor_model_parallel_size": 16},
            r"num_query_groups 8 is not divisible by tp\(16\)",
        ),
        (
            dims(ffn_hidden_size=11004),
            {"tensor_model_parallel_size": 8},
            r"ffn_hidden_size 11004 is not divisible by tp\(8\)",
        ),
        (
            dims(num_layers=30),
            {"pipeline_model_parallel_size": 4},
            r"num_layers 30 is not divisible by pp\(4\)",
        ),
        (
            dims(num_layers=30),
            {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 4},
            r"num_layers 30 is not divisible by pp\(2\) x vpp\(4\) = 8",
        ),
        (
            LLAMA_8B,
            {"expert_model_parallel_size": 2},
            r"ep\(2\) must be 1 for a dense model \(num_experts 0\)",
        ),
        (
            dims(num_experts=60),
            {"expert_model_parallel_size": 8},
            r"num_experts 60 is not divisible by ep\(8\)",
        ),
    ],
)
def test_model_dims_rules(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        validate_layout(ParallelConfig(**kwargs), world_size=16, dims=model)


def test_model_dims_rules_pass_at_their_boundaries():
    # 30 layers split as pp 2 x vpp 3 = 6 chunks of 5; 64 experts over ep 8.
    vpp3 = ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=3)
    assert validate_layout(vpp3, world_size=4, dims=dims(num_layers=30)) == 2
    moe = ParallelConfig(expert_model_parallel_size=8)
    assert validate_layout(moe, world_size=8, dims=dims(num_experts=64)) == 8


@pytest.mark.parametrize(
    "kwargs, seq_length, message",
    [
        (
            {"context_parallel_size": 2},
            4098,
            r"seq_length 4098 is not divisible by 2 x cp\(2\) = 4",
        ),
        (
            {"tensor_model_parallel_size": 4, "sequence_parallel": True},
            4098,
            r"seq_length 4098 is not divisible by cp\(1\) x tp\(4\) = 4 \(sequence parallel\)",
        ),
        (
            {
                "tensor_model_parallel_size": 4,
                "context_parallel_size": 2,
                "sequence_parallel": True,
            },
            4100,
            r"seq_length 4100 is not divisible by cp\(2\) x tp\(4\) = 8",
        ),
    ],
)
def test_seq_length_rules(kwargs, seq_length, message):
    with pytest.raises(ValueError, match=message):
        validate_layout(ParallelConfig(**kwargs), world_size=8, seq_length=seq_length)


@pytest.mark.parametrize(
    "kwargs, seq_length",
    [
        ({}, 4097),  # nothing splits the sequence
        ({"tensor_model_parallel_size": 4}, 4097),  # tp without sp keeps whole sequences
        ({"context_parallel_size": 4}, 8200),  # 8 chunks of 1025
        (
            {
                "tensor_model_parallel_size": 2,
                "context_parallel_size": 2,
                "sequence_parallel": True,
            },
            4100,
        ),
    ],
)
def test_seq_length_rules_pass(kwargs, seq_length):
    validate_layout(ParallelConfig(**kwargs), world_size=8, seq_length=seq_length)


# --- padded_vocab_size ---


@pytest.mark.parametrize(
    "vocab, tp, multiple, padded",
    [
        (32000, 1, 128, 32000),  # Llama-2: already a multiple of 128
        (151936, 8, 128, 152576),  # Qwen2: 148.4 x 1024 -> 149 x 1024
        (1000, 2, 128, 1024),
        (128256, 8, 128, 129024),  # Llama-3: 125.25 x 1024 -> 126 x 1024
        (50257, 1, 128, 50304),  # GPT-2
        (50257, 1, 64, 50304),
        (1, 4, 1, 4),
    ],
)
def test_padded_vocab_size(vocab, tp, multiple, padded):
    assert padded_vocab_size(vocab, tp, multiple) == padded


# --- rank_coordinates ---

# World 8, tp 2, pp 2, dp 2 in Megatron's order tp-cp-ep-dp-pp, listed by hand.
TP2_PP2_DP2_GROUPS = {
    "tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
    "dp": [[0, 2], [1, 3], [4, 6], [5, 7]],
    "pp": [[0, 4], [1, 5], [2, 6], [3, 7]],
}


def test_rank_coordinates_tp2_pp2_dp2_by_hand():
    cfg = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    coords = [rank_coordinates(r, cfg, 8) for r in range(8)]
    assert [(c["tp"], c["dp"], c["pp"]) for c in coords] == [
        (0, 0, 0),
        (1, 0, 0),
        (0, 1, 0),
        (1, 1, 0),
        (0, 0, 1),
        (1, 0, 1),
        (0, 1, 1),
        (1, 1, 1),
    ]
    assert all(c["cp"] == 0 and c["ep"] == 0 for c in coords)
    for kind, groups in TP2_PP2_DP2_GROUPS.items():
        others = [k for k in ("tp", "cp", "dp", "pp") if k != kind]
        for group in groups:
            # Within a group: the kind's coordinate counts 0, 1, ...; every other one is shared.
            assert [coords[r][kind] for r in group] == list(range(len(group)))
            assert len({tuple(coords[r][k] for k in others) for r in group}) == 1


def test_rank_coordinates_cp_and_ep():
    # World 8, tp 2, cp 2: dp 2; rank 6 = tp 0 + 2 x (cp 1 + 2 x dp 1).
    cfg = ParallelConfig(tensor_model_parallel_size=2, context_parallel_size=2)
    assert rank_coordinates(6, cfg, 8) == {"tp": 0, "cp": 1, "dp": 1, "pp": 0, "ep": 0}
    # World 8, tp 2, ep 4: rank 5 = tp 1 + 2 x ep 2.
    moe = ParallelConfig(tensor_model_parallel_size=2, expert_model_parallel_size=4)
    assert rank_coordinates(5, moe, 8) == {"tp": 1, "cp": 0, "dp": 2, "pp": 0, "ep": 2}


def test_rank_coordinates_rejects_rank_outside_world():
    with pytest.raises(ValueError, match="rank 8 is outside world size 8"):
        rank_coordinates(8, ParallelConfig(), 8)


def _groups_from_coords(coords: list[dict], kind: str, keys: tuple[str, ...]) -> list[list[int]]:
    """Ranks that agree on every key except `kind`, ordered by their `kind` coordinate."""
    groups: dict[tuple, list[int]] = {}
    for rank, c in enumerate(coords):
        groups.setdefault(tuple(c[k] for k in keys if k != kind), []).append(rank)
    return sorted(sorted(g, key=lambda r: coords[r][kind]) for g in groups.values())


@pytest.mark.parametrize(
    "tp, cp, ep, pp, world",
    [(2, 1, 1, 2, 8), (2, 2, 1, 2, 16), (1, 2, 1, 3, 12), (2, 1, 2, 1, 8), (4, 1, 2, 2, 32)],
)
def test_rank_coordinates_match_megatron_rank_generator(tp, cp, ep, pp, world):
    # Megatron-Core's own group arithmetic (pure Python; no process group needed).
    from megatron.core.parallel_state import RankGenerator

    cfg = ParallelConfig(
        tensor_model_parallel_size=tp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        pipeline_model_parallel_size=pp,
    )
    coords = [rank_coordinates(r, cfg, world) for r in range(world)]
    dense = RankGenerator(
        tp=tp, ep=1, dp=world // (tp * cp * pp), pp=pp, cp=cp, order=MEGATRON_RANK_ORDER
    )
    for kind in ("tp", "cp", "dp", "pp"):
        assert _groups_from_coords(coords, kind, ("tp", "cp", "dp", "pp")) == sorted(
            dense.get_ranks(kind)
        )
    expert = RankGenerator(
        tp=tp, ep=ep, dp=world // (tp * ep * pp), pp=pp, cp=1, order=MEGATRON_RANK_ORDER
    )
    for group in expert.get_ranks("ep"):
        assert [coords[r]["ep"] for r in group] == list(range(ep))


def test_rank_order_is_megatron_core_default():
    # Guards an upgrade of megatron-core that changes the default order our coordinates assume.
    import inspect

    from megatron.core import parallel_state

    params = inspect.signature(parallel_state.initialize_model_parallel).parameters
    assert params["order"].default == MEGATRON_RANK_ORDER
