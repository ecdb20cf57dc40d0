"""Held-out evaluation through the rollout engines: greedy answers on the short and the long context.

The number DePO is about is the gap between a question answered with its short context (gold
documents + a few distractors) and the same question with its long context (many more
distractors). Both are measured on the same held-out samples, greedy decoding, with the same
prompt template as training; EM is SQuAD-normalised exact match in percent, ``score`` the sample's
own metric (EM, F1 or ROUGE-L) in percent. Each response is scored by
:func:`megatron_lcr.eval.metrics.score_prediction`, the function ``lcr eval`` scores benchmarks with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from megatron_lcr.data.prompts import PromptConfig
from megatron_lcr.data.schema import Sample
from megatron_lcr.eval.metrics import score_prediction
from megatron_lcr.rollout.engine import Completion, GenerateRequest, SamplingParams

Generate = Callable[[list[GenerateRequest]], list[Completion]]


@dataclass(kw_only=True)
class EvalConfig:
    """When and how held-out samples are scored."""

    interval: int = 0
    """Optimizer steps between evaluations during training (steps); 0: only before and after."""
    max_new_tokens: int = 64
    """Longest greedy answer (tokens)."""
    contexts: tuple[str, ...] = ("short", "long")
    """Contexts to score each held-out sample with."""

    def __post_init__(self) -> None:
        self.contexts = tuple(self.contexts)
        if self.interval < 0 or self.max_new_tokens < 1:
            raise ValueError(f"interval ({self.interval}) must be >= 0 and max_new_tokens ({self.max_new_tokens}) >= 1")
        if not self.contexts or any(c not in ("short", "long") for c in self.contexts):
            raise ValueError(f"contexts must be a non-empty subset of ('short', 'long'), got {list(self.contexts)}")


def evaluate(generate: Generate, samples: Sequence[Sample], prompts: dict[str, list[list[int]]], *, cfg: EvalConfig,
             prompt_cfg: PromptConfig, decode: Callable[[list[int]], str], stop_token_ids: list[int]) -> dict:
    """``{"short_em", "short_score", "long_em", "long_score"}`` (percent) for the contexts in ``cfg``.

    ``prompts[context][i]`` are the token ids of sample i's prompt with that context.
    """
    sampling = SamplingParams(temperature=0.0, max_new_tokens=cfg.max_new_tokens, stop_token_ids=stop_token_ids,
                              seed=0)
    results: dict[str, float] = {}
    for context in cfg.contexts:
        requests = [GenerateRequest(input_ids=ids, sampling=sampling, n=1, rid=f"eval-{context}-{i}",
                                    return_logprob=False)
                    for i, ids in enumerate(prompts[context])]
        completions = sorted(generate(requests), key=lambda c: c.prompt_index)
        em = score = 0.0
        for sample, completion in zip(samples, completions):
            scored = score_prediction(decode(completion.output_ids), sample, prompt_cfg)
            em += scored.em
            score += scored.score
        results[f"{context}_em"] = 100.0 * em / len(samples)
        results[f"{context}_score"] = 100.0 * score / len(samples)
    return results
