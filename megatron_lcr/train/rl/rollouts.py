"""One step's rollouts: sample groups from the engines, reward them, compute group advantages.

For every prompt of the step, ``group_size`` responses are sampled with the prompt's context
(short, long, or both for GRPO(Short-Long)); each gets a reward from the sample's answer (rewards
registry), DAPO's overlong shaping if configured, and a GRPO group advantage. With dynamic
sampling, groups whose rewards are all equal (no learning signal) are dropped and more prompts are
drawn, up to ``advantage.max_sampling_rounds`` extra rounds. Zero-variance groups still feed
DePO's KD term (all-correct groups are exactly what it learns from), so they are kept, flagged.
Sampling seeds derive from (seed, step, round, prompt): a resumed run samples the same responses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_lcr.data.prompts import extract_answer
from megatron_lcr.data.schema import Sample
from megatron_lcr.profiling.timers import StepTimer
from megatron_lcr.rl.advantages import GroupFiller, group_advantages, overlong_penalty
from megatron_lcr.rl.rewards import get_reward, reward_for_family
from megatron_lcr.rl.sequences import Rollout
from megatron_lcr.rollout.engine import Completion, GenerateRequest, SamplingParams
from megatron_lcr.train.rl.config import RLConfig
from megatron_lcr.train.task import TaskContext


def _reward(rl: RLConfig, task: TaskContext, sample: Sample, completion: Completion) -> float:
    answer = extract_answer(task.decode(completion.output_ids), task.prompt)
    fn = get_reward(rl.reward) if rl.reward else reward_for_family(sample.family, sample.metric)
    reward = fn(answer, sample.answers)
    if rl.advantage.overlong_buffer:
        reward += float(overlong_penalty(torch.tensor([len(completion.output_ids)]), max_len=rl.max_new_tokens,
                                         buffer=rl.advantage.overlong_buffer,
                                         factor=rl.advantage.overlong_penalty)[0])
    return reward


def _sample_groups(generate, rl: RLConfig, task: TaskContext, samples: list[Sample], context: str,
                   seed: int, timer: StepTimer) -> list[list[Rollout]]:
    """``group_size`` rollouts per sample with ``context``, rewarded and with advantages (timed as the
    phases ``generation`` and ``reward``)."""
    prompts = task.prompts(samples, context)
    requests = [
        GenerateRequest(input_ids=ids, n=rl.group_size, rid=f"s{seed}-{context}-{i}",
                        sampling=SamplingParams(temperature=rl.temperature, top_p=rl.top_p,
                                                max_new_tokens=rl.max_new_tokens, stop_token_ids=task.stop_token_ids,
                                                seed=(seed * 1000 + i) * rl.group_size % 2**30))
        for i, ids in enumerate(prompts)
    ]
    groups: list[list[Rollout]] = [[] for _ in samples]
    with timer.phase("generation"):
        completions = generate(requests)
    with timer.phase("reward"):
        for c in sorted(completions, key=lambda c: (c.prompt_index, c.sample_index)):
            sample = samples[c.prompt_index]
            groups[c.prompt_index].append(Rollout(
                sample=sample, context=context, prompt=prompts[c.prompt_index], response=list(c.output_ids),
                engine_logp=list(c.output_logprobs), finish_reason=c.finish_reason,
                reward=_reward(rl, task, sample, c)))
        rewards = torch.tensor([[r.reward for r in g] for g in groups], dtype=torch.float32)
        advantages = group_advantages(rewards, normalize_std=rl.advantage.normalize_std, eps=rl.advantage.eps)
    for group, row in zip(groups, advantages.tolist()):
        for rollout, advantage in zip(group, row):
            rollout.advantage = advantage
    return groups


def collect_rollouts(generate, rl: RLConfig, task: TaskContext, draw: Callable[[int], list[Sample]],
                     *, prompts_per_step: int, seed: int, timer: StepTimer | None = None) -> tuple[list[Rollout], dict]:
    """Rollouts of one step (every rank gets the same list) and sampling metrics, with the prompt and
    response tokens the engines processed (every sample of a group counts its prompt).

    ``draw(round)`` returns the samples of a sampling round (round 0: the step's prompts).
    """
    contexts = ["short", "long"] if rl.context == "short_long" else [rl.context]
    timer = timer or StepTimer()

    def sample_round(round_: int) -> list[list[Rollout]]:
        samples = draw(round_)
        return [g for context in contexts
                for g in _sample_groups(generate, rl, task, samples, context, seed * 100 + round_, timer)]

    metrics: dict[str, float] = {}
    if not rl.advantage.dynamic_sampling:
        rollouts = [r for g in sample_round(0) for r in g]
    else:
        filler = GroupFiller(target=prompts_per_step * len(contexts), max_extra_rounds=rl.advantage.max_sampling_rounds)
        left_out: list[list[Rollout]] = []  # no policy-gradient signal (or surplus), still KD data
        while filler.needs_more:
            groups = sample_round(filler.rounds)
            filler.add(torch.tensor([[r.reward for r in g] for g in groups]), groups)
            kept = {id(g) for g in filler.kept}
            left_out += [g for g in groups if id(g) not in kept]
        for group in left_out:
            for r in group:
                r.in_policy_loss = False
        rollouts = [r for g in filler.kept for r in g] + [r for g in left_out for r in g]
        metrics.update(filler.metrics())
    trained = [r for r in rollouts if r.in_policy_loss]
    count = max(len(rollouts), 1)
    metrics.update({
        "rollout/reward_mean": sum(r.reward for r in trained) / max(len(trained), 1),
        "rollout/all_reward_mean": sum(r.reward for r in rollouts) / count,
        "rollout/response_len_mean": sum(len(r.response) for r in rollouts) / count,
        "rollout/truncated_frac": sum(r.finish_reason == "length" for r in rollouts) / count,
        "rollout/prompt_tokens": float(sum(len(r.prompt) for r in rollouts)),
        "rollout/response_tokens": float(sum(len(r.response) for r in rollouts)),
    })
    return rollouts, metrics
