"""torchrun worker for tests/train/rl/test_rl_update.py: one RL update in float32 and in float16.

Usage: ``fp16_update.py MODEL_DIR OUT_JSON``. Megatron's fp16 optimizer divides the gradients by its
loss scale before clipping and stepping; the schedule must multiply the loss by the same scale
(``config.grad_scale_func``), else every fp16 gradient reaches Adam 2^16 times too small. Rank 0
writes both updates' loss, gradient norm and, for fp16, the loss scale.
"""

from __future__ import annotations

import json
import sys

import torch

from tests.workers.rl_update import TEMPERATURE, depo_objective, score_policy_rows, sequences


def main(model_dir: str, out_path: str) -> None:
    from megatron_lcr.models.builder import ModelConfig
    from megatron_lcr.parallel.layout import ParallelConfig
    from megatron_lcr.parallel.state import destroy_megatron, initialize_megatron
    from megatron_lcr.train.micro_batches import PackLayout, plan_micro_batches
    from megatron_lcr.train.model_setup import build_policy
    from megatron_lcr.train.optimizer import OptimizerConfig, build_optimizer
    from megatron_lcr.train.rl.step import objective_loss_fn, training_units
    from megatron_lcr.train.rl.update import gradient_scale, guarded_update
    from megatron_lcr.train.token_logprobs import ScoringSpec

    parallel = ParallelConfig()
    initialize_megatron(parallel, seed=1)
    results = {}
    objective = depo_objective()
    for dtype in ("float32", "float16"):
        model = ModelConfig(hf_path=model_dir, params_dtype=dtype)
        seqs = sequences()
        policy = build_policy(model, parallel)
        optimizer, scheduler = build_optimizer(OptimizerConfig(lr=1e-3), policy.chunks,
                                               params_dtype=getattr(torch, dtype), use_distributed_optimizer=False,
                                               total_steps=10)
        spec = ScoringSpec(vocab_size=policy.arch.vocab_size, temperature=TEMPERATURE)
        score_policy_rows(policy, seqs, spec, 4096, PackLayout())
        batches = plan_micro_batches(seqs, token_budget=4096, dp_size=1, dp_rank=0, pad_id=0, fixed_length=False,
                                     units=training_units(seqs, False), layout=PackLayout())
        loss_fn = objective_loss_fn(objective, objective.normalisers(seqs, 12), scale=gradient_scale(len(batches)))
        metrics = guarded_update(policy.chunks, optimizer, scheduler, batches, spec, loss_fn)
        results[dtype] = {k: metrics[k] for k in ("loss", "grad_norm", "skipped") if k in metrics}
        results[dtype].update({k: metrics[k] for k in ("loss_scale", "overflow") if k in metrics})
    with open(out_path, "w") as f:
        json.dump(results, f, indent=2)
    destroy_megatron()


if __name__ == "__main__":
    main(*sys.argv[1:])
