"""Glue to Megatron-Core's vocab-parallel output layer (``ColumnParallelLinear``, vocabulary padded).

Megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by * tp`` and gives TP rank
``r`` the weight rows ``[r * V_local, (r + 1) * V_local)``; the real vocabulary size (the tokenizer's)
is the ``valid_vocab_end`` of the fused ops. Megatron is imported only when these are called.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def megatron_vocab_shard(weight: torch.Tensor) -> tuple[int, dist.ProcessGroup | None]:
    """``(vocab_start, tp_group)`` of this rank's output-layer ``weight [V_local, H]`` under Megatron.

    Use as ``logprob_entropy(hidden, weight, labels, vocab_start=start, tp_group=group,
    valid_vocab_end=tokenizer_vocab_size)`` with ``hidden`` the ``[T, H]`` input of the output layer
    (after the final norm; with sequence parallelism, gathered over the sequence first and
    ``reduce_grad_hidden=False``, see ``logprob.py``). tp_group is None without tensor parallelism.
    """
    from megatron.core import parallel_state as ps

    world = ps.get_tensor_model_parallel_world_size()
    start = ps.get_tensor_model_parallel_rank() * weight.shape[0]
    return start, (ps.get_tensor_model_parallel_group() if world > 1 else None)
