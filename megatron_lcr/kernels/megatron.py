"""Glue to Megatron-Core's GPT model and its vocab-parallel output layer (``ColumnParallelLinear``).

Megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by * tp`` and gives TP rank
``r`` the weight rows ``[r * V_local, (r + 1) * V_local)``; the real vocabulary size (the tokenizer's)
is the ``valid_vocab_end`` of the fused ops. To use the hidden-state path in a training step::

    with output_layer_returns_hidden(model):
        hidden = model(input_ids, position_ids, attention_mask)      # [b, s, h], not logits
    weight = output_weight(model)                                    # [V_local, h], tied or not
    start, group = megatron_vocab_shard(weight)
    logp, entropy = logprob_entropy(hidden.reshape(-1, h), weight, labels.reshape(-1), temperature=t,
                                    vocab_start=start, valid_vocab_end=vocab_size, tp_group=group)

The bypassed ``ColumnParallelLinear`` would have all-reduced the input gradient over TP; the fused op
does it instead (``reduce_grad_hidden=True``, its default). Megatron is imported only when these run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist


def megatron_vocab_shard(weight: torch.Tensor) -> tuple[int, dist.ProcessGroup | None]:
    """``(vocab_start, tp_group)`` of this rank's output-layer ``weight [V_local, H]`` under Megatron.

    tp_group is None without tensor parallelism.
    """
    from megatron.core import parallel_state as ps

    world = ps.get_tensor_model_parallel_world_size()
    start = ps.get_tensor_model_parallel_rank() * weight.shape[0]
    return start, (ps.get_tensor_model_parallel_group() if world > 1 else None)


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """This rank's ``[V_local, H]`` output-layer weight of a (possibly wrapped) GPTModel.

    The word-embedding weight when input and output embeddings are tied (Qwen2-style).
    """
    from megatron.core.utils import get_attr_wrapped_model

    if get_attr_wrapped_model(model, "share_embeddings_and_output_weights"):
        return get_attr_wrapped_model(model, "shared_embedding_or_output_weight")()
    return get_attr_wrapped_model(model, "output_layer").weight


@contextlib.contextmanager
def output_layer_returns_hidden(model: torch.nn.Module) -> Iterator[None]:
    """While active, the GPTModel's output layer returns its input: ``model(...)`` gives ``[b, s, h]``.

    Those are the final-norm hidden states the output layer would multiply by ``output_weight``.
    Sequence parallelism is refused: there the input is ``[s/tp, b, h]`` and must first be gathered
    with ``gather_from_sequence_parallel_region`` (then ``reduce_grad_hidden=False``), not done here.
    """
    from megatron.core.utils import get_attr_wrapped_model

    layer = get_attr_wrapped_model(model, "output_layer")
    if getattr(layer, "sequence_parallel", False):
        raise ValueError("output_layer_returns_hidden needs sequence_parallel off: with it the hidden states are "
                         "[s/tp, b, h] shards; gather them first and use reduce_grad_hidden=False")

    def identity(input_: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output=None):
        del weight, runtime_gather_output
        return input_, None

    layer.forward = identity  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        del layer.forward
