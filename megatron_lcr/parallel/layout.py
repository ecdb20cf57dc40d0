"""Parallel layout: how the ranks split into tensor, context, expert, data and pipeline groups.

Checks a layout against the world size and the model's dimensions before any process group or model
is built, so a bad YAML fails in a second with one line instead of deep inside Megatron-Core. The
rank order and vocab padding follow Megatron-Core 0.16.1
(`parallel_state.initialize_model_parallel`, Megatron-LM's `_vocab_size_with_padding`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

# Megatron-Core 0.16.1's `initialize_model_parallel(..., order="tp-cp-ep-dp-pp")`: the default rank
# order, first name varying fastest (checked in the installed package's parallel_state.py, and by
# tests/parallel/test_layout.py against its RankGenerator). Its attention/dense groups use this
# order with ep = 1; its expert groups use it with cp = 1 and expert-tp = tp.
MEGATRON_RANK_ORDER = "tp-cp-ep-dp-pp"
# torch's own default for a collective's timeout, ours when the config does not need longer (seconds).
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0


@dataclass(kw_only=True)
class ParallelConfig:
    """How the policy model is split over the ranks of the job."""

    ALIASES: ClassVar[dict[str, str]] = {
        "tp": "tensor_model_parallel_size",
        "pp": "pipeline_model_parallel_size",
        "cp": "context_parallel_size",
        "ep": "expert_model_parallel_size",
        "vpp": "virtual_pipeline_model_parallel_size",
        "sp": "sequence_parallel",
    }

    tensor_model_parallel_size: int = 1
    """Tensor-parallel degree (ranks sharing each layer's matrices)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel degree (ranks each holding a contiguous slice of the layers)."""
    context_parallel_size: int = 1
    """Context-parallel degree (ranks each holding 1/cp of every sequence's tokens)."""
    expert_model_parallel_size: int = 1
    """Expert-parallel degree (ranks each holding 1/ep of every MoE layer's experts)."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per pipeline rank for the interleaved schedule; None: not interleaved."""
    sequence_parallel: bool = False
    """Split LayerNorm/dropout activations along the sequence over the tensor-parallel ranks."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over the data-parallel ranks (ZeRO-1 style)."""
    timeout_s: float | None = None
    """Longest wait of one collective before the job fails (seconds); None: 1800, or longer where the run's
    config needs it (``lcr train``: rank 0 starts the rollout servers while the other ranks wait)."""

    def __post_init__(self) -> None:
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "context_parallel_size",
            "expert_model_parallel_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 (or None), got {self.timeout_s}")
        tp, pp, vpp = (
            self.tensor_model_parallel_size,
            self.pipeline_model_parallel_size,
            self.virtual_pipeline_model_parallel_size,
        )
        if self.sequence_parallel and tp == 1:
            raise ValueError(
                f"sequence_parallel={self.sequence_parallel} requires "
                f"tensor_model_parallel_size > 1, got {tp}"
            )
        if vpp is not None:
            if vpp < 1:
                raise ValueError(f"virtual_pipeline_model_parallel_size must be >= 1, got {vpp}")
            if pp == 1:
                raise ValueError(
                    f"virtual_pipeline_model_parallel_size={vpp} requires "
                    f"pipeline_model_parallel_size > 1, got {pp}"
                )


@dataclass(frozen=True, kw_only=True)
class ModelDims:
    """The model dimensions that parallel layouts must divide."""

    num_layers: int
    """Transformer layers (count)."""
    hidden_size: int
    """Width of the residual stream (features)."""
    num_attention_heads: int
    """Query heads per layer (count)."""
    num_query_groups: int
    """Key/value heads per layer (count; == num_attention_heads without GQA)."""
    ffn_hidden_size: int
    """Width of the MLP's intermediate layer (features, per expert for MoE)."""
    vocab_size: int
    """Tokenizer vocabulary (tokens), before padding."""
    num_experts: int = 0
    """Routed experts per MoE layer (count); 0: dense model."""

    def __post_init__(self) -> None:
        for name in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "ffn_hidden_size",
            "vocab_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_experts < 0:
            raise ValueError(f"num_experts must be >= 0, got {self.num_experts}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_query_groups {self.num_query_groups}"
            )


def validate_layout(
    cfg: ParallelConfig,
    *,
    world_size: int,
    dims: ModelDims | None = None,
    seq_length: int | None = None,
) -> int:
    """Checks `cfg` against the job and model; returns the data-parallel size.

    seq_length: tokens per (packed) sequence; checked only when context/sequence parallel split it.
    Raises ValueError with one line naming the values that disagree.
    """
    tp, pp, cp, ep = (
        cfg.tensor_model_parallel_size,
        cfg.pipeline_model_parallel_size,
        cfg.context_parallel_size,
        cfg.expert_model_parallel_size,
    )
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    # The model's dimensions first: no world size fixes a layout the model cannot be split by.
    if dims is not None:
        _check_dims(cfg, dims)
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by "
            f"tp({tp}) x pp({pp}) x cp({cp}) = {model_parallel}"
        )
    # Megatron's expert groups tile the world as tp x ep x expert-dp x pp (expert-tp = tp here).
    if world_size % (tp * ep * pp):
        raise ValueError(
            f"world size {world_size} is not divisible by "
            f"tp({tp}) x ep({ep}) x pp({pp}) = {tp * ep * pp}"
        )
    if seq_length is not None:
        _check_seq_length(cfg, seq_length)
    return world_size // model_parallel


def _check_dims(cfg: ParallelConfig, dims: ModelDims) -> None:
    tp, pp, ep = (
        cfg.tensor_model_parallel_size,
        cfg.pipeline_model_parallel_size,
        cfg.expert_model_parallel_size,
    )
    for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        if getattr(dims, name) % tp:
            raise ValueError(f"{name} {getattr(dims, name)} is not divisible by tp({tp})")
    if dims.num_layers % pp:
        raise ValueError(f"num_layers {dims.num_layers} is not divisible by pp({pp})")
    vpp = cfg.virtual_pipeline_model_parallel_size
    if vpp is not None and dims.num_layers % (pp * vpp):
        raise ValueError(
            f"num_layers {dims.num_layers} is not divisible by pp({pp}) x vpp({vpp}) = {pp * vpp}"
        )
    if dims.num_experts == 0 and ep != 1:
        raise ValueError(f"ep({ep}) must be 1 for a dense model (num_experts 0)")
    if dims.num_experts and dims.num_experts % ep:
        raise ValueError(f"num_experts {dims.num_experts} is not divisible by ep({ep})")


def _check_seq_length(cfg: ParallelConfig, seq_length: int) -> None:
    tp, cp = cfg.tensor_model_parallel_size, cfg.context_parallel_size
    # Zigzag CP cuts each sequence into 2*cp chunks and gives rank i chunks i and 2*cp-1-i, which
    # balances causal-attention work; the chunks must be equal.
    if cp > 1 and seq_length % (2 * cp):
        raise ValueError(
            f"seq_length {seq_length} is not divisible by 2 x cp({cp}) = {2 * cp} (zigzag split)"
        )
    # Sequence parallel then scatters each rank's seq_length/cp tokens over the tp ranks.
    if cfg.sequence_parallel and seq_length % (cp * tp):
        raise ValueError(
            f"seq_length {seq_length} is not divisible by cp({cp}) x tp({tp}) = {cp * tp} "
            "(sequence parallel)"
        )


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Rounds `vocab_size` up to a multiple of `multiple * tp`.

    Megatron's --make-vocab-size-divisible-by convention: every tensor-parallel rank then holds an
    equal, `multiple`-aligned slice of the embedding.
    """
    if vocab_size < 1 or tp < 1 or multiple < 1:
        raise ValueError(f"vocab_size {vocab_size}, tp {tp}, multiple {multiple} must all be >= 1")
    step = multiple * tp
    return -(-vocab_size // step) * step


def rank_coordinates(rank: int, cfg: ParallelConfig, world_size: int) -> dict[str, int]:
    """Position of global `rank` in each parallel group, in Megatron-Core's default rank order.

    Returns {"tp", "cp", "dp", "pp", "ep"}: rank = tp + TP*(cp + CP*(dp + DP*pp)) with tp fastest
    (order "tp-cp-ep-dp-pp", ep = 1 for the dense groups). "ep" is the rank within the
    expert-parallel group, whose groups use the same order with cp = 1 and expert-tp = tp:
    rank = tp + TP*(ep + EP*(expert_dp + EDP*pp)).
    """
    dp_size = validate_layout(cfg, world_size=world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    tp, cp, ep = (
        cfg.tensor_model_parallel_size,
        cfg.context_parallel_size,
        cfg.expert_model_parallel_size,
    )
    return {
        "tp": rank % tp,
        "cp": rank // tp % cp,
        "dp": rank // (tp * cp) % dp_size,
        "pp": rank // (tp * cp * dp_size),
        "ep": rank // tp % ep,
    }
