"""eval/metrics.py and rl.rewards.numeric_match against hand-computed values, and lcr train's held-out
evaluation scoring through the same function."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_lcr.data.prompts import PromptConfig
from megatron_lcr.data.schema import read_samples
from megatron_lcr.eval.metrics import METRICS, choice_letter, choice_match, get_metric, score_prediction
from megatron_lcr.rl.rewards import numeric_match, read_number
from megatron_lcr.rollout.engine import Completion
from megatron_lcr.train.evaluate import EvalConfig, evaluate

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B) Paris", "B"), ("C: the Greens", "C"), (" (D) x", "D"),
    ("Bob", None), ("b", None), ("E", None), ("none", None), ("", None),
])
def test_choice_letter(text, letter):
    assert choice_letter(text) == letter


def test_choice_match():
    assert choice_match("(A) aqua", ["A"]) == 1.0
    assert choice_match("Answer C", ["C"]) == 0.0  # does not start with the letter
    assert choice_match(None, ["A"]) == 0.0
    with pytest.raises(ValueError, match="empty"):
        choice_match("A", [])


@pytest.mark.parametrize("text, value", [
    ("12.5", 12.5), ("$1,234.5 million", 1234.5), ("about -3 units", -3.0), ("x = 100 / 8 = 12.5", 12.5),
    ("1e3", 1000.0), (".5", 0.5), ("1,000,000", 1e6), ("2019 to 2020 grew 5%", 2019.0), ("no number", None),
])
def test_read_number(text, value):
    assert read_number(text) == value


def test_numeric_match_tolerance_and_scaling():
    # 0.15% of 12.5 is 0.01875: 12.51 is inside, 12.52 (0.02 away) outside.
    assert numeric_match("12.51", ["12.5"]) == 1.0
    assert numeric_match("12.52", ["12.5"]) == 0.0
    assert numeric_match("12.48", ["12.5"]) == 0.0
    # percent vs fraction: 25% and 0.25 match both ways; 2500 (x10^4) does not
    assert numeric_match("25%", ["0.25"]) == 1.0
    assert numeric_match("0.25", ["25"]) == 1.0
    assert numeric_match("2500", ["0.25"]) == 0.0
    assert numeric_match("0", ["0"]) == 1.0 and numeric_match("0.0001", ["0"]) == 0.0
    assert numeric_match("1,502.5", ["1500"]) == 0.0  # 2.5 > 0.0015 * 1500 = 2.25
    assert numeric_match("1,502.2", ["1500"]) == 1.0
    assert numeric_match("4", ["3", "4.0"]) == 1.0  # max over golds
    assert numeric_match(None, ["1"]) == 0.0
    assert numeric_match("7", ["seven"]) == 0.0  # a gold without a number matches nothing


def test_metric_registry():
    assert set(METRICS) == {"em", "f1", "sub_em", "math", "rougeL", "numeric", "choice"}
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        get_metric("bleu")


def test_score_prediction_by_hand():
    sample = read_samples(str(FIXTURES / "lcr.jsonl"))[1]  # longform, rougeL, gold "the river floods in spring"
    cfg = PromptConfig()
    # normalised: [river, floods, every, spring] vs [river, floods, in, spring]: LCS 3, P = R = 3/4
    scored = score_prediction("I think so.\nAnswer: The river floods every spring.", sample, cfg)
    assert scored.answer == "The river floods every spring"
    assert scored.score == pytest.approx(0.75) and scored.em == 0.0
    # an explicit metric overrides the sample's: F1 on the same tokens is also 3/4; sub_em 0
    assert score_prediction("Answer: the river floods every spring", sample, cfg, metric="f1").score == pytest.approx(0.75)
    assert score_prediction("Answer: the river floods every spring", sample, cfg, metric="sub_em").score == 0.0
    none = score_prediction("no final line", sample, cfg)
    assert none.answer is None and none.score == 0.0 and none.em == 0.0


def test_train_held_out_evaluation_scores_like_lcr_eval():
    """train/evaluate.py's numbers from fixed responses equal the hand values lcr eval gives the same responses."""
    samples = read_samples(str(FIXTURES / "lcr.jsonl"))
    text = {("short", 0): "Answer: Ashby", ("long", 0): "Answer: Ashford",
            ("short", 1): "Answer: the river floods every spring", ("long", 1): "Answer: spring"}
    vocab = {w: i for i, w in enumerate(sorted({w for t in text.values() for w in t.split()}))}
    words = {i: w for w, i in vocab.items()}

    def generate(requests):
        context = requests[0].rid.split("-")[1]
        return [Completion(prompt_index=i, sample_index=0, rid=r.rid, output_ids=[vocab[w] for w in text[(context, i)].split()],
                           output_logprobs=[], finish_reason="stop", weight_version=None, prompt_tokens=1, seed=0,
                           engine_url="x") for i, r in enumerate(requests)]

    prompts = {c: [[1], [1]] for c in ("short", "long")}
    results = evaluate(generate, samples, prompts, cfg=EvalConfig(), prompt_cfg=PromptConfig(),
                       decode=lambda ids: " ".join(words[i] for i in ids), stop_token_ids=[2])
    # short: EM 1 (Ashby) and ROUGE-L 0.75 -> score 87.5, EM 50; long: 0 and ROUGE-L of [spring] vs 4 golds
    # tokens = 2 * 1 * 0.25 / 1.25 = 0.4 -> score 20, EM 0
    assert results == pytest.approx({"short_em": 50.0, "short_score": 87.5, "long_em": 0.0, "long_score": 20.0})
