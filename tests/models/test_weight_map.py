"""megatron_lcr.models.weight_map: layout transforms, TP sharding, pipeline chunking, name coverage.

Pure tensor tests. References: hand-written row orders, plain index loops, Megatron-Core's own
``get_transformer_layer_offset``, and the tensor names ``transformers`` writes to safetensors.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from megatron_lcr.models.families import UnsupportedModelError, hf_arch
from megatron_lcr.models.weight_map import (
    chunk_maps,
    fuse_qkv,
    hf_names,
    layer_offset,
    pad_rows,
    split_qkv,
    tp_shard,
    tp_unshard,
)
from tests.tiny_hf import FAMILIES, make_tiny_hf, tiny_config

PADDED_VOCAB = 1024  # tiny vocab 1000 padded to a multiple of 128 (TP 1, 2, 4 all divide it)


# ---- fuse_qkv / split_qkv ---------------------------------------------------------------------


def test_fuse_qkv_hand_example():
    # 4 query heads in 2 groups, head_dim 1, hidden 1: each row is one head, named by its value.
    q = torch.tensor([[0.0], [1.0], [2.0], [3.0]])  # q0 q1 | q2 q3
    k = torch.tensor([[10.0], [11.0]])  # k0 | k1
    v = torch.tensor([[20.0], [21.0]])  # v0 | v1
    fused = fuse_qkv(q, k, v, groups=2)
    # Megatron: per group, that group's query heads then its key then its value.
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]


def _fuse_qkv_reference(q, k, v, groups: int, head_dim: int) -> torch.Tensor:
    """Row-by-row construction of Megatron's linear_qkv layout, as a plain loop."""
    per_group = q.shape[0] // head_dim // groups
    rows = []
    for g in range(groups):
        for h in range(per_group):
            head = g * per_group + h
            rows += [q[head * head_dim + i] for i in range(head_dim)]
        rows += [k[g * head_dim + i] for i in range(head_dim)]
        rows += [v[g * head_dim + i] for i in range(head_dim)]
    return torch.stack(rows)


@pytest.mark.parametrize("heads, groups, head_dim", [(8, 2, 8), (8, 8, 4), (8, 1, 16), (6, 3, 2)])
def test_fuse_qkv_matches_loop_and_split_inverts(heads, groups, head_dim):
    gen = torch.Generator().manual_seed(heads * 100 + groups * 10 + head_dim)
    hidden = 12
    q = torch.randn(heads * head_dim, hidden, generator=gen)
    k = torch.randn(groups * head_dim, hidden, generator=gen)
    v = torch.randn(groups * head_dim, hidden, generator=gen)
    fused = fuse_qkv(q, k, v, groups=groups)
    assert torch.equal(fused, _fuse_qkv_reference(q, k, v, groups, head_dim))
    for got, want in zip(split_qkv(fused, groups, heads, head_dim), (q, k, v)):
        assert torch.equal(got, want)
    # 1-D biases (Qwen2) go through the same layout.
    bq, bk, bv = q[:, 0].clone(), k[:, 0].clone(), v[:, 0].clone()
    fused_bias = fuse_qkv(bq, bk, bv, groups=groups)
    assert torch.equal(fused_bias, fused[:, 0])
    for got, want in zip(split_qkv(fused_bias, groups, heads, head_dim), (bq, bk, bv)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("tp", [2, 4])
def test_qkv_row_shard_is_fused_qkv_of_the_ranks_own_groups(tp):
    # Megatron's TP rank r computes query groups [r*g/tp, (r+1)*g/tp) with their own heads, so a
    # plain row split of the fused tensor must equal fusing the rank's slices of q, k and v.
    heads, groups, head_dim, hidden = 8, 4, 2, 5
    gen = torch.Generator().manual_seed(tp)
    q = torch.randn(heads * head_dim, hidden, generator=gen)
    k = torch.randn(groups * head_dim, hidden, generator=gen)
    v = torch.randn(groups * head_dim, hidden, generator=gen)
    full = fuse_qkv(q, k, v, groups=groups)
    for rank in range(tp):
        own = fuse_qkv(q.chunk(tp)[rank], k.chunk(tp)[rank], v.chunk(tp)[rank], groups=groups // tp)
        assert torch.equal(tp_shard(full, "row", rank, tp), own)


# ---- tp_shard / tp_unshard ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["replicated", "row", "col", "glu"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_shard_unshard_round_trip(mode, tp):
    full = torch.randn(16, 8, generator=torch.Generator().manual_seed(tp))
    shards = [tp_shard(full, mode, rank, tp) for rank in range(tp)]
    if mode in ("row", "glu"):
        assert all(s.shape == (16 // tp, 8) for s in shards)
    elif mode == "col":
        assert all(s.shape == (16, 8 // tp) for s in shards)
    else:
        assert all(torch.equal(s, full) for s in shards)
    assert torch.equal(tp_unshard(shards, mode), full)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_glu_shard_holds_the_ranks_gate_then_up_rows(tp):
    # Megatron's linear_fc1 on rank r is [gate_r; up_r]: a plain row split would give rank 0 all
    # of gate and rank 1 all of up at TP=2.
    gate = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)
    up = 1000 + gate
    full = torch.cat([gate, up])
    for rank in range(tp):
        expected = torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
        assert torch.equal(tp_shard(full, "glu", rank, tp), expected)


# ---- layer_offset -------------------------------------------------------------------------


@pytest.mark.parametrize("pp, vpp", [(2, None), (4, None), (2, 2)])
def test_layer_offset_matches_megatron(pp, vpp):
    # Megatron's get_transformer_layer_offset reads parallel_state only when pp_rank is None; with
    # pp_rank given (and no uneven/custom layout) it is a pure function of the config, so it is
    # called here directly as the reference, without process groups.
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    config = TransformerConfig(
        num_layers=8,
        hidden_size=64,
        num_attention_heads=8,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
    )
    for pp_rank in range(pp):
        for vp_stage in [None] if vpp is None else range(vpp):
            expected = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
            assert layer_offset(8, pp_rank, pp, vp_stage, vpp) == expected, (pp_rank, vp_stage)


# ---- chunk_maps / hf_names -----------------------------------------------------------------


def _all_chunks(arch, pp: int, vpp: int | None):
    """Maps of every (pp_rank, vp_stage) chunk, keyed by the chunk."""
    return {
        (rank, stage): chunk_maps(
            arch, te=False, padded_vocab=PADDED_VOCAB, pp_rank=rank, pp_size=pp, vp_stage=stage, vp_size=vpp
        )
        for rank in range(pp)
        for stage in ([None] if vpp is None else range(vpp))
    }


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pp, vpp", [(1, None), (2, None), (4, None), (2, 2)])
def test_chunks_cover_every_hf_name_once(family, pp, vpp):
    arch = hf_arch(tiny_config(family, num_layers=8))
    chunks = _all_chunks(arch, pp, vpp)
    read = Counter(name for maps in chunks.values() for tm in maps for name in tm.hf)
    tied_copy = arch.tie_word_embeddings and pp > 1
    # The one exception: with tied embeddings over several stages, the last stage's output layer is
    # a copy of the embedding, so model.embed_tokens.weight is read twice.
    extra = Counter({"model.embed_tokens.weight": 1}) if tied_copy else Counter()
    assert read == Counter(hf_names(arch)) + extra
    for (rank, stage), maps in chunks.items():
        names = [tm.megatron for tm in maps]
        assert len(names) == len(set(names)), (rank, stage)
        # Local layer indices restart at 0 in every chunk.
        local = {int(n.split(".")[2]) for n in names if n.startswith("decoder.layers.")}
        assert local == set(range(8 // (pp * (vpp or 1))))
        has_output = "output_layer.weight" in names
        last = rank == pp - 1 and (vpp is None or stage == vpp - 1)
        assert has_output == (last and (not arch.tie_word_embeddings or tied_copy)), (rank, stage)


def test_interleaved_chunks_hold_megatrons_layers():
    # pp=2, vpp=2, 8 layers: rank 0 holds layers 0-1 and 4-5, rank 1 holds 2-3 and 6-7.
    arch = hf_arch(tiny_config("llama", num_layers=8))
    chunks = _all_chunks(arch, 2, 2)
    held = {
        key: sorted({int(n.split(".")[2]) for tm in maps for n in tm.hf if n.startswith("model.layers.")})
        for key, maps in chunks.items()
    }
    assert held == {(0, 0): [0, 1], (0, 1): [4, 5], (1, 0): [2, 3], (1, 1): [6, 7]}


@pytest.fixture(scope="module")
def saved_names(tmp_path_factory):
    """Tensor names transformers' save_pretrained writes for each tiny family (and tied Llama)."""
    root = tmp_path_factory.mktemp("weight_map")
    out = {}
    for key, family, tie in [*((f, f, None) for f in FAMILIES), ("llama-tied", "llama", True)]:
        path = make_tiny_hf(family, root / key, num_layers=2, tie=tie)
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            out[key] = (hf_arch(tiny_config(family, num_layers=2, tie=tie)), set(f.keys()))
    return out


@pytest.mark.parametrize("key", [*FAMILIES, "llama-tied"])
def test_hf_names_are_the_checkpoint_names(saved_names, key):
    arch, names = saved_names[key]
    assert sorted(hf_names(arch)) == sorted(names)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_attention_bias_is_rejected_or_fully_mapped(family):
    # Llama/Qwen3 attention_bias=True puts a bias on q, k, v *and* o_proj. Either hf_arch rejects
    # it, or every tensor of the model is mapped; silently dropping o_proj.bias is wrong.
    cfg = tiny_config(family, num_layers=1)
    cfg.attention_bias = True
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    try:
        arch = hf_arch(cfg)
    except UnsupportedModelError:
        return
    assert not arch.tie_word_embeddings  # so lm_head.weight is a tensor of its own in both sets
    assert set(hf_names(arch)) == set(model.state_dict())


# ---- vocab padding ------------------------------------------------------------------------------


def test_pad_rows_appends_zero_rows():
    weight = torch.randn(1000, 8)
    padded = pad_rows(weight, PADDED_VOCAB)
    assert padded.shape == (PADDED_VOCAB, 8)
    assert torch.equal(padded[:1000], weight)
    assert torch.count_nonzero(padded[1000:]) == 0
    assert pad_rows(weight, 1000) is weight
    with pytest.raises(ValueError, match="1000 rows down to 999"):
        pad_rows(weight, 999)


@pytest.mark.parametrize("family", FAMILIES)
def test_vocab_maps_pad_and_strip_exactly(family):
    arch = hf_arch(tiny_config(family, tie=False, num_layers=2))
    maps = {tm.megatron: tm for tm in chunk_maps(arch, te=False, padded_vocab=PADDED_VOCAB)}
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        tm = maps[name]
        hf = torch.randn(arch.vocab_size, arch.hidden_size)
        full = tm.fuse([hf])
        assert full.shape == (PADDED_VOCAB, arch.hidden_size)
        assert torch.count_nonzero(full[arch.vocab_size :]) == 0
        (back,) = tm.split(full)
        assert torch.equal(back, hf)
