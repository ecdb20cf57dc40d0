"""torchrun worker for tests/train/rl/test_rl_step.py: ``train_step`` with several updates per step.

Usage: ``rl_mini_batches.py MODEL_DIR OUT_JSON``. Eight GRPO rollouts. For (``mini_batches``,
``epochs``) (1, 1), (4, 1) and (2, 2),
one policy runs ``train_step`` and a second, identical policy is driven by hand the way the trainer
worked before mini-batches existed: the old log-probs scored once, then per part of the rollouts (and
per epoch) one
``guarded_update`` with ``policy_loss`` written out here over that part's global token count. Rank
0 writes both policies' weights checksums, whether they are bit-for-bit equal, and the hand-driven
updates' losses and ratio means.
"""

from __future__ import annotations

import json
import random
import sys

import torch

LR = 0.05
ROLLOUTS = 8


def rollouts():
    from megatron_lcr.rl.sequences import Rollout

    rng = random.Random(3)
    out = []
    for _ in range(ROLLOUTS):
        response = [rng.randrange(3, 200) for _ in range(rng.randrange(2, 10))]
        out.append(Rollout(sample=None, context="short", prompt=[rng.randrange(3, 200) for _ in range(rng.randrange(5, 30))],
                           response=response, engine_logp=[0.0] * len(response), finish_reason="stop",
                           reward=float(rng.random() > 0.5), advantage=rng.uniform(-1, 1)))
    return out


def fresh(model, parallel):
    from megatron_lcr.train.model_setup import build_policy
    from megatron_lcr.train.optimizer import OptimizerConfig, build_optimizer

    policy = build_policy(model, parallel)
    optimizer, scheduler = build_optimizer(OptimizerConfig(lr=LR, warmup_steps=0, decay_style="constant", clip_grad=0.0),
                                           policy.chunks, params_dtype=torch.float32, use_distributed_optimizer=False,
                                           total_steps=10)
    return policy, optimizer, scheduler


def by_hand(policy, optimizer, scheduler, spec, loss_cfg, mini_batches: int, epochs: int) -> list[dict]:
    """The pre-mini-batch trainer's steps, one per part: score once, then guarded updates."""
    from megatron_lcr.rl.losses import Normaliser, policy_loss
    from megatron_lcr.rl.sequences import Role, TokenSequence
    from megatron_lcr.train.micro_batches import plan_micro_batches
    from megatron_lcr.train.rl.step import score
    from megatron_lcr.train.rl.update import gradient_scale, guarded_update

    seqs = [TokenSequence(r.prompt, r.response, Role.POLICY, rollout=k, advantage=r.advantage)
            for k, r in enumerate(rollouts())]
    for seq, logp in zip(seqs, score(policy.chunks, seqs, spec, token_budget=512, fixed_length=False)):
        seq.old_logp = logp
    size = ROLLOUTS // mini_batches
    reports = []
    for part in [p for _ in range(epochs) for p in range(mini_batches)]:
        chosen = seqs[part * size:(part + 1) * size]
        norm = Normaliser(num_tokens=sum(len(s.response) for s in chosen), num_sequences=len(chosen), max_response_len=16)
        batches = plan_micro_batches(chosen, token_budget=512, dp_size=1, dp_rank=0, pad_id=0, fixed_length=False)
        scale = gradient_scale(len(batches))

        def loss_fn(outputs, batch, norm=norm, scale=scale):
            loss, metrics = policy_loss(outputs["logp"], batch.old_logp, batch.advantage, batch.response_mask,
                                        loss_cfg, norm)
            return loss * scale, metrics

        reports.append(guarded_update(policy.chunks, optimizer, scheduler, batches, spec, loss_fn))
    return reports


def main(model_dir: str, out_path: str) -> None:
    from megatron_lcr.models.builder import ModelConfig
    from megatron_lcr.parallel.layout import ParallelConfig
    from megatron_lcr.parallel.state import destroy_megatron, initialize_megatron
    from megatron_lcr.rl.losses import PolicyLossConfig
    from megatron_lcr.rl.objective import PolicyGradient
    from megatron_lcr.train.rl.step import StepContext, train_step
    from megatron_lcr.train.token_logprobs import ScoringSpec

    parallel = ParallelConfig()
    initialize_megatron(parallel, seed=1)
    model = ModelConfig(hf_path=model_dir, params_dtype="float32")
    loss_cfg = PolicyLossConfig(name="ppo")
    results = {}
    for mini_batches, epochs in ((1, 1), (4, 1), (2, 2)):
        policy, optimizer, scheduler = fresh(model, parallel)
        spec = ScoringSpec(vocab_size=policy.arch.vocab_size, temperature=0.7)
        ctx = StepContext(optimizer=optimizer, scheduler=scheduler, spec=spec, token_budget=512,
                          mini_batches=mini_batches, epochs=epochs)
        step = train_step(policy, rollouts(), PolicyGradient(loss_cfg, max_response_len=16), ctx)
        reference, ref_opt, ref_sched = fresh(model, parallel)
        updates = by_hand(reference, ref_opt, ref_sched, spec, loss_cfg, mini_batches, epochs)
        pairs = list(zip(policy.chunks[0].parameters(), reference.chunks[0].parameters()))
        results[f"{mini_batches}x{epochs}"] = {
            "step": step, "updates": updates,
            "weights_equal": all(torch.equal(a, b) for a, b in pairs),
            "weights_moved": any(not torch.equal(a, b) for a, b in zip(policy.chunks[0].parameters(),
                                                                        fresh(model, parallel)[0].chunks[0].parameters())),
        }
    if torch.distributed.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=2)
    destroy_megatron()


if __name__ == "__main__":
    main(*sys.argv[1:])
