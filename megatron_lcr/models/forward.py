"""Forward passes of Megatron GPT chunks through Megatron's own pipeline schedules.

Used for evaluation-style forwards (logits for parity checks, teacher scoring). Training goes through
the same ``get_forward_backward_func`` with a loss function; see ``megatron_lcr.train``.
"""

from __future__ import annotations

import torch


def causal_mask(seq_len: int, device: torch.device) -> torch.Tensor | None:
    """The attention mask to pass Megatron for causal attention.

    None on GPU, where the causal attention kernels need no mask; on CPU an explicit boolean
    ``[1, 1, S, S]`` (True = masked), because Megatron's default causal mask is built on CUDA.
    """
    if device.type == "cuda":
        return None
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]


def gather_vocab_parallel(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[..., V/tp]`` shards on each TP rank -> ``[..., vocab_size]`` (vocab padding dropped)."""
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() > 1:
        group = ps.get_tensor_model_parallel_group()
        shards = [torch.empty_like(logits) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(shards, logits.contiguous(), group=group)
        logits = torch.cat(shards, dim=-1)
    return logits[..., :vocab_size]


@torch.no_grad()
def forward_logits(chunks: list[torch.nn.Module], input_ids: torch.Tensor, *, vocab_size: int) -> torch.Tensor | None:
    """Full-vocabulary logits ``[B, S, vocab_size]`` (fp32) of ``input_ids [B, S]``.

    Returns the logits on the last pipeline stage and None on the others. One micro-batch holds the
    whole batch; pipeline stages exchange activations through Megatron's p2p communication.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq_len = input_ids.shape
    device = next(chunks[0].parameters()).device
    input_ids = input_ids.to(device)
    positions = torch.arange(seq_len, device=device).expand(batch, seq_len)
    mask = causal_mask(seq_len, device)

    def forward_step(data_iterator, model):
        del data_iterator  # a single micro-batch, captured above
        return model(input_ids, positions, mask), None

    for chunk in chunks:
        chunk.eval()
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([None] * len(chunks)),
        model=chunks,
        num_microbatches=1,
        seq_length=seq_len,
        micro_batch_size=batch,
        forward_only=True,
    )
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return gather_vocab_parallel(outputs[0].float(), vocab_size)
