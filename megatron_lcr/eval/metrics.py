"""Scoring one response: the answer read from it, its score under a metric, and its exact match.

:func:`score_prediction` is the one place a response becomes numbers: ``lcr eval`` scores every
benchmark with it and ``lcr train``'s held-out evaluation (``train/evaluate.py``) scores its samples
with it, so the two can never disagree on what a response is worth. The answer is read back with
:func:`~megatron_lcr.data.prompts.extract_answer` (the last ``Answer:`` line, or the last
``\\boxed{}``); no answer scores 0 under every metric.

Metrics (``METRICS``: name -> ``(answer | None, golds) -> [0, 1]``, the maximum over the golds):

========== ============================================================ ===========================
name       what it measures                                             where it is defined
========== ============================================================ ===========================
em         SQuAD v1.1 exact match of normalised strings                 ``rl.rewards.exact_match``
f1         SQuAD v1.1 bag-of-tokens F1 (the QA metric of LongBench,     ``rl.rewards.token_f1``
           and of the DePO paper)
sub_em     a gold occurs in the answer on word boundaries               ``rl.rewards.sub_em``
rougeL     ROUGE-L F1 on normalised tokens (long-form answers)          ``rl.rewards.rouge_l``
math       symbolic equivalence (math-verify)                           ``rl.rewards.math_equal``
numeric    number within 0.15% relative (DocMath-Eval's tolerance)      ``rl.rewards.numeric_match``
choice     multiple-choice letter accuracy (LongBench v2)               :func:`choice_match`, here
========== ============================================================ ===========================

``em`` is reported next to every metric, on the same extracted answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_lcr.data.prompts import PromptConfig, extract_answer
from megatron_lcr.data.schema import Sample
from megatron_lcr.registry import lookup
from megatron_lcr.rl.rewards import REWARDS, RewardFn, exact_match, numeric_match, reward_name_for

CHOICE_LETTERS = ("A", "B", "C", "D")
# A leading capital letter A-D, optionally in parentheses, alone or followed by punctuation or a space:
# "B", "(B)", "B.", "B) Paris", "B: Paris". A lowercase "a" is an article, not a choice.
_CHOICE = re.compile(r"\(?([A-D])\)?(?=$|[\s.):,])")


def choice_letter(answer: str) -> str | None:
    """The choice letter an answer starts with (``"(B) Paris"`` -> ``"B"``), or None."""
    match = _CHOICE.match(answer.strip())
    return match.group(1) if match else None


def choice_match(prediction: str | None, answers: Sequence[str]) -> float:
    """1.0 if the answer's leading choice letter is a gold letter (LongBench v2 accuracy), else 0.0.

    Deviation: LongBench v2's own script reads the letter from "The correct answer is (X)"; here the
    letter is read from the ``Answer:`` line every megatron_lcr prompt asks for.
    """
    golds = [answers] if isinstance(answers, str) else list(answers)
    if not golds:
        raise ValueError("no gold answers to score against (answers is empty)")
    letter = None if prediction is None else choice_letter(prediction)
    return float(letter is not None and letter in golds)


METRICS: dict[str, RewardFn] = {**REWARDS, "numeric": numeric_match, "choice": choice_match}
"""Every metric ``lcr eval`` can score with (the training rewards plus ``numeric`` and ``choice``)."""


def get_metric(name: str) -> RewardFn:
    """The metric registered as ``name``; ValueError lists the valid names."""
    return lookup(METRICS, name, "metric")


@dataclass(frozen=True, kw_only=True)
class PredictionScore:
    """What one response is worth."""

    answer: str | None
    """The final answer read from the response (None: the response gives none)."""
    score: float
    """The metric's value in [0, 1]."""
    em: float
    """SQuAD exact match of the answer, 0.0 or 1.0."""


def sample_metric(sample: Sample) -> str:
    """The metric of a megatron_lcr sample: the reward training gives it (``reward_name_for``)."""
    return reward_name_for(sample.family, sample.metric)


def score_prediction(response: str, sample: Sample, prompt: PromptConfig, *,
                     metric: str | None = None) -> PredictionScore:
    """Score ``response`` (decoded text) against ``sample.answers``.

    ``metric``: a ``METRICS`` name; None scores the sample as training rewards it (:func:`sample_metric`).
    """
    answer = extract_answer(response, prompt)
    name = sample_metric(sample) if metric is None else metric
    return PredictionScore(answer=answer, score=get_metric(name)(answer, sample.answers),
                           em=exact_match(answer, sample.answers))
