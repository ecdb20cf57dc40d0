"""torchrun worker for tests/train/test_pretrain.py: optimizer steps of a Megatron policy on one fixed batch.

Usage: ``train_lm_steps.py SPEC_JSON OUT_JSON``. SPEC_JSON holds ``model`` (a Hugging Face directory),
``global_batch``, ``seq_length``, ``steps`` and ``runs``: a list of ``{"name", "lr", "micro_batch_size",
"distributed_optimizer"}``. Every rank joins one data-parallel group (TP = PP = 1, DP = world size);
each run builds a fresh fp32 policy from the HF weights with its own optimizer and calls
``lm_train_step`` ``steps`` times on the *same* global batch (arithmetic progressions, all of length
``seq_length + 1``), each DP rank taking its contiguous share. Global rank 0 writes, per run, the
per-step loss / grad norm / lr / skipped flag and the loss after the last step (a forward-only pass).
"""

from __future__ import annotations

import json
import sys

import torch


def train_run(model_dir: str, run: dict, tokens: torch.Tensor, steps: int) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_lcr.models.builder import ModelConfig
    from megatron_lcr.parallel.layout import ParallelConfig
    from megatron_lcr.train.lm_step import evaluate_loss
    from megatron_lcr.train.lm_step import lm_train_step, micro_batches_from_sequences
    from megatron_lcr.train.model_setup import build_policy
    from megatron_lcr.train.optimizer import OptimizerConfig, build_optimizer

    parallel = ParallelConfig(use_distributed_optimizer=run["distributed_optimizer"])
    model_cfg = ModelConfig(hf_path=model_dir, params_dtype="float32", transformer_impl="local")
    policy = build_policy(model_cfg, parallel)
    optimizer, scheduler = build_optimizer(
        OptimizerConfig(lr=run["lr"]), policy.chunks, params_dtype=torch.float32,
        use_distributed_optimizer=parallel.use_distributed_optimizer, total_steps=steps,
    )  # fmt: skip
    share = tokens.chunk(ps.get_data_parallel_world_size())[ps.get_data_parallel_rank()]
    micro_batches = micro_batches_from_sequences(share, run["micro_batch_size"])
    curve = [lm_train_step(policy.chunks, optimizer, scheduler, micro_batches, vocab_size=policy.arch.vocab_size) for _ in range(steps)]
    return {
        "num_micro_batches": len(micro_batches),
        "data_parallel_size": ps.get_data_parallel_world_size(),
        # Megatron wraps its optimizers in a ChainedOptimizer; the inner ones say whether state is sharded.
        "optimizers": [type(o).__name__ for o in getattr(optimizer, "chained_optimizers", [optimizer])],
        "loss": [m["loss"] for m in curve],
        "grad_norm": [m["grad_norm"] for m in curve],
        "lr": [m["lr"] for m in curve],
        "skipped": [m["skipped"] for m in curve],
        "final_loss": evaluate_loss(policy.chunks, micro_batches, vocab_size=policy.arch.vocab_size),
    }


def main(spec_path: str, out_path: str) -> None:
    from megatron_lcr.data.synthetic_lm import SyntheticLMConfig, arithmetic_sequences
    from megatron_lcr.parallel.layout import ParallelConfig
    from megatron_lcr.parallel.state import destroy_megatron, initialize_megatron

    with open(spec_path) as f:
        spec = json.load(f)
    initialize_megatron(ParallelConfig(), seed=spec.get("seed", 1234))
    tokens = arithmetic_sequences(SyntheticLMConfig(), spec["global_batch"], spec["seq_length"] + 1)
    results = {run["name"]: train_run(spec["model"], run, tokens, spec["steps"]) for run in spec["runs"]}
    if torch.distributed.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=2)
    destroy_megatron()


if __name__ == "__main__":  # Megatron's dist_checkpointing starts a multiprocessing Manager
    main(sys.argv[1], sys.argv[2])
