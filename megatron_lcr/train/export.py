"""Write the running policy as a Hugging Face model directory (what rollout servers and users load).

Every rank calls :func:`export_hf`; the weights are gathered to global rank 0 exactly as for a
weight sync (``rollout.weight_sync.hf_tensors_on_source``), which streams them into safetensors
shards in a temporary directory, adds config.json and the tokenizer files, and renames it into
place. A killed job leaves no half-written model directory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_lcr.atomic import atomic_dir
from megatron_lcr.models.hf_checkpoint import ShardedSafetensorsWriter, copy_hf_metadata, finalize_shards
from megatron_lcr.rollout.weight_sync import hf_tensors_on_source


def export_hf(policy, out_dir: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Collectively write ``policy`` to ``out_dir`` (HF layout); returns the path on every rank."""
    out_dir = Path(out_dir)
    tensors = hf_tensors_on_source(policy)
    if torch.distributed.get_rank() != 0:
        for _ in tensors:  # this rank's share of the gather
            pass
    else:
        with atomic_dir(out_dir, overwrite=True) as tmp:
            writer = ShardedSafetensorsWriter(tmp)
            for name, tensor in tensors:
                writer.add(name, tensor.to(dtype) if dtype is not None else tensor)
            writer.close()
            finalize_shards(tmp, ["0"])
            copy_hf_metadata(policy.hf_config_dir, tmp)
    torch.distributed.barrier()
    return out_dir
