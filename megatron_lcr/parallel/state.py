"""Bring up (and tear down) Megatron-Core's parallel state for one process.

Order matters: the CPU compat layer before any Megatron object, then the default process group
(from torchrun / SLURM variables), then ``parallel_state`` groups, then the model-parallel RNG.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist

from megatron_lcr.parallel import cpu_compat
from megatron_lcr.parallel.env import init_process_group, read_dist_env
from megatron_lcr.parallel.layout import DEFAULT_COLLECTIVE_TIMEOUT_S, ModelDims, ParallelConfig, validate_layout


def initialize_megatron(
    parallel: ParallelConfig,
    *,
    seed: int = 1234,
    dims: ModelDims | None = None,
    seq_length: int | None = None,
) -> int:
    """Initialise distributed + Megatron parallel state; returns the data-parallel size.

    The layout is validated against the world size and ``dims`` before any group is created, so an
    impossible layout fails with one line instead of a hang inside a collective.
    """
    cpu_compat.install()
    from megatron.core import parallel_state

    env = read_dist_env(os.environ)
    dp = validate_layout(parallel, world_size=env.world_size, dims=dims, seq_length=seq_length)
    init_process_group(env, timeout_s=parallel.timeout_s or DEFAULT_COLLECTIVE_TIMEOUT_S)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
    )
    set_seed(seed)
    return dp


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch identically on every rank, then Megatron's TP RNG streams.

    CPU weight initialisation draws from the global torch generator, which must agree across TP
    ranks (each builds the full matrix and keeps its slice); dropout inside TP regions uses the
    tracker's per-rank streams.
    """
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_megatron() -> None:
    """Tear down Megatron's groups and the default process group (for tests and tools)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
