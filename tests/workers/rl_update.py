"""torchrun worker for tests/train/rl/test_rl_update.py: one guarded RL update under different packings.

Usage: ``rl_update.py MODEL_DIR OUT_JSON [TP] [IMPL]``; IMPL ``triton`` runs the fused kernels' Triton
implementation (under TRITON_INTERPRET=1 on CPU, set by the caller before Python starts). Every rank builds the same fixed set of sequences (GRPO
short-context rows with advantages, DePO long-context rows with teacher log-probs), scores their old
log-probs with the policy, then, for each DePO KD estimator (sampled, full) and token budget, builds
a fresh policy from MODEL_DIR and runs one ``guarded_update`` of the DePO objective's loss: the loss and grad norm must not
depend on the budget (nor on the DP size, compared across two launches by the test). A last update
whose loss is NaN must be skipped: weights and LR schedule unchanged. Rank 0 writes the numbers.
"""

from __future__ import annotations

import json
import random
import sys

import torch

BUDGETS = (4096, 200)
TEMPERATURE = 0.7


def sequences(full_kd: bool = False):
    """12 short-context (POLICY) rows with advantages; every odd one also as a DePO long-context row
    whose teacher log-probs (``old_logp``) are given."""
    from megatron_lcr.rl.sequences import Role, TokenSequence

    rng = random.Random(0)
    out = []
    for k in range(12):
        prompt = [rng.randrange(3, 200) for _ in range(rng.randrange(5, 60))]
        response = [rng.randrange(3, 200) for _ in range(rng.randrange(1, 12))]
        common = {"rollout": k, "advantage": rng.uniform(-1, 1), "reward": float(k % 2)}
        out.append(TokenSequence(prompt, response, Role.POLICY, **common))
        if k % 2:
            long_prompt = [rng.randrange(3, 200) for _ in range(40)] + prompt
            out.append(TokenSequence(long_prompt, response, Role.LONG_CONTEXT, **common,
                                     old_logp=[-rng.uniform(0, 3) for _ in response]))
    return out


def depo_objective(estimator: str = "sampled"):
    """DePO (tau 0: every long row is kept) over GRPO's token-ratio loss."""
    from megatron_lcr.distill.depo import DePO, DePOConfig
    from megatron_lcr.rl.losses import PolicyLossConfig
    from megatron_lcr.rl.objective import PolicyGradient

    return DePO(PolicyGradient(PolicyLossConfig(name="ppo"), max_response_len=12),
                DePOConfig(tau=0.0, kd_estimator=estimator))


def score_policy_rows(policy, seqs, spec, budget, layout) -> None:
    """The POLICY rows' ``old_logp``: the policy's own log-probs (the long rows keep theirs)."""
    from megatron_lcr.rl.sequences import Role
    from megatron_lcr.train.rl.step import score

    views = [s for s in seqs if s.role == Role.POLICY]
    for seq, logp in zip(views, score(policy.chunks, views, spec, token_budget=budget, fixed_length=False,
                                      layout=layout)):
        seq.old_logp = logp


def main(model_dir: str, out_path: str, tp: str = "1", impl: str = "auto") -> None:
    from megatron.core import parallel_state as ps

    from megatron_lcr.kernels import KernelConfig
    from megatron_lcr.models.builder import ModelConfig
    from megatron_lcr.parallel.layout import ParallelConfig
    from megatron_lcr.parallel.state import destroy_megatron, initialize_megatron
    from megatron_lcr.train.micro_batches import PackLayout, plan_micro_batches
    from megatron_lcr.train.model_setup import build_policy
    from megatron_lcr.train.optimizer import OptimizerConfig, build_optimizer
    from megatron_lcr.train.rl.step import objective_loss_fn, training_units
    from megatron_lcr.train.rl.update import gradient_scale, guarded_update
    from megatron_lcr.train.token_logprobs import ScoringSpec

    parallel = ParallelConfig(tensor_model_parallel_size=int(tp))
    layout = PackLayout.for_parallel(parallel)
    initialize_megatron(parallel, seed=1)
    model = ModelConfig(hf_path=model_dir, params_dtype="float32")
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    results = {"dp": dp, "tp": ps.get_tensor_model_parallel_world_size(), "runs": {}}
    for estimator in ("sampled", "full"):
        objective = depo_objective(estimator)
        seqs = sequences(full_kd=estimator == "full")
        for budget in BUDGETS:
            policy = build_policy(model, parallel)
            optimizer, scheduler = build_optimizer(OptimizerConfig(lr=1e-3, warmup_steps=0, decay_style="linear"),
                                                   policy.chunks, params_dtype=torch.float32,
                                                   use_distributed_optimizer=False, total_steps=10)
            kernels = KernelConfig(impl=impl)
            score_policy_rows(policy, seqs, ScoringSpec(vocab_size=policy.arch.vocab_size, temperature=TEMPERATURE,
                                                        kernels=kernels), budget, layout)
            batches = plan_micro_batches(seqs, token_budget=budget, dp_size=dp, dp_rank=rank, pad_id=0,
                                         fixed_length=False, units=training_units(seqs, objective.needs.pair_kl),
                                         layout=layout)
            norms = objective.normalisers(seqs, 12)
            # The sampled runs take Megatron's logits, the exact-KD runs the fused kernels on hidden states.
            train_spec = ScoringSpec(vocab_size=policy.arch.vocab_size, temperature=TEMPERATURE, kernels=kernels,
                                     pair_kl=estimator == "full", from_hidden=estimator == "full")
            metrics = guarded_update(policy.chunks, optimizer, scheduler, batches, train_spec,
                                     objective_loss_fn(objective, norms, scale=gradient_scale(len(batches))))
            results["runs"][f"{estimator}/{budget}"] = {"micro_batches": len(batches), **metrics}

    # The NaN guard: a loss that is NaN on one micro-batch skips the whole step on every rank.
    good = objective_loss_fn(objective, norms, scale=gradient_scale(len(batches)))

    def poisoned(outputs, batch):
        loss, report = good(outputs, batch)
        return (loss * float("nan"), report) if 0 in batch.sequence_ids else (loss, report)

    before = [p.detach().clone() for p in policy.chunks[0].parameters()]
    lr_before = optimizer.param_groups[0]["lr"]
    metrics = guarded_update(policy.chunks, optimizer, scheduler, batches, train_spec, poisoned)
    results["nan_step"] = {
        "skipped": metrics["skipped"],
        "weights_unchanged": all(torch.equal(a, b) for a, b in zip(before, policy.chunks[0].parameters())),
        "lr_unchanged": optimizer.param_groups[0]["lr"] == lr_before,
        "scheduler_steps": scheduler.num_steps,
    }
    if torch.distributed.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=2)
    destroy_megatron()


if __name__ == "__main__":
    main(*sys.argv[1:])
