"""Hugging Face <-> Megatron-Core parameter maps for the Llama / Qwen2 / Qwen3 dense families.

A :class:`TensorMap` ties one Megatron parameter of one pipeline chunk to the Hugging Face tensors
it is made of, with three pure pieces:

* ``fuse``  HF tensors -> the *full* (TP=1) Megatron tensor, e.g. q/k/v -> ``linear_qkv``;
* ``split`` the inverse, e.g. ``linear_qkv`` -> q/k/v (vocab padding stripped);
* ``tp``    how the full tensor is sharded over tensor-parallel ranks (see :func:`tp_shard`).

Megatron layouts, as Megatron-Core 0.16 builds them:

* ``linear_qkv``: rows grouped by key/value head: for each of the ``g`` query groups,
  ``[q heads of the group (h/g * d rows), k (d rows), v (d rows)]``. TP splits whole groups, so a
  plain row split of the full tensor is each rank's shard.
* ``linear_fc1``: ``[gate; up]`` per rank. TP shards gate and up separately and concatenates the
  halves on each rank (``tp="glu"``), so rank r holds ``[gate_r; up_r]``.
* Embedding and output layer: rows padded with zeros to the padded vocabulary, then row-split.
* Pipeline stage p (of P) holds global layers ``offset .. offset + L/P - 1`` under local names
  ``decoder.layers.0 ..``; with virtual stages, chunk v holds ``v*L/V + p*L/(P*V) ..``.
* Transformer Engine fuses the pre-attention / pre-MLP RMSNorm weights into the following linear:
  ``self_attention.linear_qkv.layer_norm_weight`` / ``mlp.linear_fc1.layer_norm_weight``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from megatron_lcr.models.families import HFArch

TPMode = Literal["replicated", "row", "col", "glu"]


@dataclass(frozen=True)
class TensorMap:
    """One Megatron parameter of a pipeline chunk and the Hugging Face tensors it is made of."""

    megatron: str
    """Local Megatron name, e.g. ``decoder.layers.0.self_attention.linear_qkv.weight``."""
    hf: tuple[str, ...]
    """Hugging Face names, in the order ``fuse`` takes and ``split`` returns them."""
    tp: TPMode
    """How the full tensor is sharded over TP ranks."""
    fuse: Callable[[Sequence[torch.Tensor]], torch.Tensor]
    """HF tensors -> full (unsharded) Megatron tensor."""
    split: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    """Full Megatron tensor -> HF tensors (inverse of ``fuse``)."""
    export: bool = True
    """False for a copy whose HF tensor another chunk exports (the last stage's tied embedding)."""


# ---- pure layout transforms ---------------------------------------------------------------


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """``q[h*d, ...], k[g*d, ...], v[g*d, ...]`` -> Megatron ``linear_qkv`` ``[g*(h/g+2)*d, ...]``."""
    rest = q.shape[1:]
    q = q.reshape(groups, -1, *rest)
    k = k.reshape(groups, -1, *rest)
    v = v.reshape(groups, -1, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, groups: int, heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`fuse_qkv`."""
    rest = qkv.shape[1:]
    per_group = heads // groups * head_dim
    grouped = qkv.reshape(groups, per_group + 2 * head_dim, *rest)
    q, k, v = torch.split(grouped, [per_group, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *rest).contiguous() for t in (q, k, v))


def pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero-pad ``weight[V, H]`` to ``[rows, H]`` (Megatron's padded vocabulary)."""
    if rows < weight.shape[0]:
        raise ValueError(f"cannot pad {weight.shape[0]} rows down to {rows}")
    if rows == weight.shape[0]:
        return weight
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])])


def tp_shard(full: torch.Tensor, mode: TPMode, rank: int, size: int) -> torch.Tensor:
    """This TP rank's shard of a full Megatron tensor."""
    if mode == "replicated" or size == 1:
        return full
    if mode == "row":
        return full.chunk(size, dim=0)[rank]
    if mode == "col":
        return full.chunk(size, dim=1)[rank]
    gate, up = full.chunk(2, dim=0)
    return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]])


def tp_unshard(shards: Sequence[torch.Tensor], mode: TPMode) -> torch.Tensor:
    """The full Megatron tensor from all TP ranks' shards, in rank order (inverse of tp_shard)."""
    if mode == "replicated" or len(shards) == 1:
        return shards[0]
    if mode == "row":
        return torch.cat(list(shards), dim=0)
    if mode == "col":
        return torch.cat(list(shards), dim=1)
    halves = [s.chunk(2, dim=0) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves])


def layer_offset(
    num_layers: int, pp_rank: int, pp_size: int, vp_stage: int | None = None, vp_size: int | None = None
) -> int:
    """Global index of the first layer of a pipeline chunk (uniform split, as Megatron's default)."""
    if vp_size is None:
        return pp_rank * (num_layers // pp_size)
    per_virtual_stage = num_layers // (pp_size * vp_size)
    return (vp_stage or 0) * (num_layers // vp_size) + pp_rank * per_virtual_stage


# ---- maps -----------------------------------------------------------------------------------


def _identity(name_m: str, name_hf: str, tp: TPMode) -> TensorMap:
    return TensorMap(name_m, (name_hf,), tp, lambda ts: ts[0], lambda t: (t,))


def _vocab(name_m: str, name_hf: str, arch: HFArch, padded_vocab: int) -> TensorMap:
    return TensorMap(
        name_m,
        (name_hf,),
        "row",
        lambda ts: pad_rows(ts[0], padded_vocab),
        lambda t: (t[: arch.vocab_size].contiguous(),),
    )


def layer_maps(arch: HFArch, *, te: bool, global_index: int, local_index: int) -> list[TensorMap]:
    """Maps for one transformer layer (Megatron local index <- HF global index)."""
    m = f"decoder.layers.{local_index}."
    h = f"model.layers.{global_index}."
    g, heads, d = arch.num_query_groups, arch.num_attention_heads, arch.head_dim
    attn_norm = "self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight"
    mlp_norm = "mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight"
    qkv_names = tuple(f"{h}self_attn.{p}_proj.weight" for p in "qkv")
    maps = [
        _identity(m + attn_norm, h + "input_layernorm.weight", "replicated"),
        TensorMap(
            m + "self_attention.linear_qkv.weight",
            qkv_names,
            "row",
            lambda ts: fuse_qkv(*ts, groups=g),
            lambda t: split_qkv(t, g, heads, d),
        ),
        _identity(m + "self_attention.linear_proj.weight", h + "self_attn.o_proj.weight", "col"),
        _identity(m + mlp_norm, h + "post_attention_layernorm.weight", "replicated"),
        TensorMap(
            m + "mlp.linear_fc1.weight",
            (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"),
            "glu",
            lambda ts: torch.cat(list(ts)),
            lambda t: tuple(x.contiguous() for x in t.chunk(2, dim=0)),
        ),
        _identity(m + "mlp.linear_fc2.weight", h + "mlp.down_proj.weight", "col"),
    ]
    if arch.qkv_bias:
        maps.append(
            TensorMap(
                m + "self_attention.linear_qkv.bias",
                tuple(f"{h}self_attn.{p}_proj.bias" for p in "qkv"),
                "row",
                lambda ts: fuse_qkv(*ts, groups=g),
                lambda t: split_qkv(t, g, heads, d),
            )
        )
    if arch.qk_norm:
        maps.append(_identity(m + "self_attention.q_layernorm.weight", h + "self_attn.q_norm.weight", "replicated"))
        maps.append(_identity(m + "self_attention.k_layernorm.weight", h + "self_attn.k_norm.weight", "replicated"))
    return maps


def chunk_maps(
    arch: HFArch,
    *,
    te: bool,
    padded_vocab: int,
    pp_rank: int = 0,
    pp_size: int = 1,
    vp_stage: int | None = None,
    vp_size: int | None = None,
) -> list[TensorMap]:
    """Maps for every parameter of one pipeline chunk (what ``named_parameters()`` holds)."""
    first = pp_rank == 0 and (vp_stage or 0) == 0
    last = pp_rank == pp_size - 1 and (vp_stage is None or vp_stage == (vp_size or 1) - 1)
    chunks = pp_size * (vp_size or 1)
    per_chunk = arch.num_layers // chunks
    offset = layer_offset(arch.num_layers, pp_rank, pp_size, vp_stage, vp_size)
    maps: list[TensorMap] = []
    if first:
        maps.append(_vocab("embedding.word_embeddings.weight", "model.embed_tokens.weight", arch, padded_vocab))
    for local in range(per_chunk):
        maps += layer_maps(arch, te=te, global_index=offset + local, local_index=local)
    if last:
        maps.append(_identity("decoder.final_layernorm.weight", "model.norm.weight", "replicated"))
        # Tied embeddings: with one stage the output layer *is* the embedding (no parameter); with
        # several, the last stage keeps its own copy, which Megatron keeps equal to the embedding.
        if not arch.tie_word_embeddings:
            maps.append(_vocab("output_layer.weight", "lm_head.weight", arch, padded_vocab))
        elif not first:
            tied = _vocab("output_layer.weight", "model.embed_tokens.weight", arch, padded_vocab)
            maps.append(dataclasses.replace(tied, export=False))
    return maps


def hf_shapes(arch: HFArch) -> dict[str, tuple[int, ...]]:
    """Shape of every Hugging Face tensor of the model, by name, in checkpoint order (embedding, layers, norm,
    head): what a checkpoint of ``arch`` must hold, so converters can check it before reading any data."""
    h, f, d, v = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim, arch.vocab_size
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    if arch.qkv_bias:
        layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    if arch.qk_norm:
        layer.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(arch.num_layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
    shapes["model.norm.weight"] = (h,)
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def hf_names(arch: HFArch) -> list[str]:
    """Every Hugging Face tensor name of the model, in checkpoint order."""
    return list(hf_shapes(arch))


def megatron_shape(tm: TensorMap, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """Shape of the full (TP=1) Megatron tensor ``tm`` fuses from HF tensors of ``shapes``, computed by
    fusing meta tensors: no data is touched, and the answer cannot drift from ``fuse``."""
    return tuple(tm.fuse([torch.empty(shapes[name], device="meta") for name in tm.hf]).shape)
