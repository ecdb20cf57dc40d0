"""Rule-based answer rewards: SQuAD exact match and token F1, sub-EM, ROUGE-L, and math equivalence.

Every reward is ``reward(prediction, answers) -> float`` in [0, 1]: ``prediction`` is the answer
already extracted from a response (``None`` when none could be extracted: every reward is then 0.0),
``answers`` the sample's acceptable gold answers; the score is the maximum over them.

- ``em`` / ``f1``: the official SQuAD v1.1 evaluation script (Rajpurkar et al., 2016): answers are
  normalised (lowercase, ASCII punctuation removed, the articles a/an/the removed, whitespace
  collapsed), then compared whole (EM) or as bags of tokens (F1). As in v1.1, F1 is 0 when the two
  share no token, including when both normalise to nothing (v2.0 scores that case 1); EM of two
  empty normalised strings is 1.
- ``sub_em``: the normalised gold's tokens occur as a contiguous run of the normalised prediction's
  tokens, i.e. containment on word boundaries ("paris" is in "it is paris france", not in
  "parisian"). A gold that normalises to nothing matches only a prediction that does too.
- ``rougeL``: ROUGE-L (Lin, 2004) F-measure with beta = 1 (F1 of LCS precision and recall, as
  Google's ``rouge-score`` reports for rougeL), on SQuAD-normalised whitespace tokens. Deviation:
  ``rouge-score`` tokenises by replacing non-alphanumerics with spaces and keeps articles; here the
  normalisation is SQuAD's, so all text rewards agree on what a token is.
- ``math``: symbolic equivalence with Hugging Face's ``math-verify``; parse failures and timeouts
  score 0. How answers are parsed, the SIGALRM timeouts and the helper child process that runs the
  check off the main thread are ``megatron_lcr.verify.math_verify``'s.
- ``numeric``: numeric accuracy for DocMath-style answers (Zhao et al., 2024). The number read
  from the prediction is the first one after its last ``=`` (or ``≈``), thousands commas allowed
  (``$1,234.5 million`` -> 1234.5); the gold's is read the same way. It matches when
  ``|p - g| <= 0.0015 * |g|`` (DocMath-Eval's ``within_eps``: 0.15% relative tolerance; ``g = 0``
  needs ``p = 0``), for ``p`` as written, ``100 p`` or ``p / 100`` (percent vs fraction, a scaling
  DocMath-Eval's comparison accepts too). Deviation: DocMath-Eval also accepts other powers of ten
  and answers equal after rounding up to 3 decimals; here only the 100x scalings count.

``REWARDS`` maps names to functions; ``reward_name_for(family, metric)`` picks a sample's reward.
``numeric`` is not a training reward (no sample family uses it): ``lcr eval`` registers it.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

from megatron_lcr.registry import lookup
from megatron_lcr.verify.math_verify import MATH_TIMEOUT_S, math_equivalent

RewardFn = Callable[[str | None, Sequence[str]], float]

_PUNCTUATION = frozenset(string.punctuation)  # ASCII only, as SQuAD v1.1's script
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lowercase, drop punctuation, drop articles, collapse whitespace.

    The order matters and is the script's: punctuation goes before articles, so "the-cat" -> "thecat".
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _gold_list(answers: Sequence[str]) -> list[str]:
    """``answers`` as a list; a bare string is one answer (not a sequence of characters)."""
    golds = [answers] if isinstance(answers, str) else list(answers)
    if not golds:
        raise ValueError("no gold answers to score against (answers is empty)")
    return golds


def _best(prediction: str | None, answers: Sequence[str], score: Callable[[str, str], float]) -> float:
    """``max(score(prediction, gold) for gold in answers)``; 0.0 for a ``None`` prediction."""
    golds = _gold_list(answers)
    if prediction is None:
        return 0.0
    return max(score(prediction, gold) for gold in golds)


def _em(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def _f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _sub_em(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not gold_tokens:
        return float(not pred_tokens)
    n = len(gold_tokens)
    return float(any(pred_tokens[i : i + n] == gold_tokens for i in range(len(pred_tokens) - n + 1)))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a) * len(b)) time)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)  # row[j] = LCS(a[:i], b[:j]) for the current i
    for token in a:
        diagonal = 0  # LCS(a[:i-1], b[:j-1])
        for j, other in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if token == other else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def _rouge_l(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    lcs = lcs_length(pred_tokens, gold_tokens)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred_tokens), lcs / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str | None, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals some normalised answer, else 0.0 (SQuAD EM)."""
    return _best(prediction, answers, _em)


def token_f1(prediction: str | None, answers: Sequence[str]) -> float:
    """SQuAD v1.1 token F1 (bag-of-tokens overlap of normalised strings), max over answers."""
    return _best(prediction, answers, _f1)


def sub_em(prediction: str | None, answers: Sequence[str]) -> float:
    """1.0 if some normalised answer occurs in the normalised prediction on word boundaries."""
    return _best(prediction, answers, _sub_em)


def rouge_l(prediction: str | None, answers: Sequence[str]) -> float:
    """ROUGE-L F1 (beta = 1) on SQuAD-normalised tokens, max over answers."""
    return _best(prediction, answers, _rouge_l)


# --- math equivalence (math-verify) ---


def math_equal(prediction: str | None, answers: Sequence[str], *, timeout_s: int = MATH_TIMEOUT_S) -> float:
    """1.0 if math-verify finds the prediction equivalent to some gold answer, else 0.0.

    ``timeout_s``: whole seconds allowed per parse and per comparison (SIGALRM resolution).
    """
    golds = _gold_list(answers)
    if prediction is None:
        return 0.0
    return float(math_equivalent(prediction, golds, timeout_s))


# --- numeric accuracy (DocMath-Eval) ---

NUMERIC_REL_TOL = 0.0015
"""Relative tolerance of ``numeric`` (DocMath-Eval's ``within_eps``: 0.15% of the gold value)."""

_NUMBER = re.compile(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")


def read_number(text: str) -> float | None:
    """The first number after the last ``=``/``≈`` of ``text`` (thousands commas allowed), or None."""
    tail = re.split(r"[=≈]", text)[-1]
    match = _NUMBER.search(tail)
    return float(match.group().replace(",", "")) if match else None


def _numeric(prediction: str, gold: str, rel_tol: float) -> float:
    value, target = read_number(prediction), read_number(gold)
    if value is None or target is None:
        return 0.0
    return float(any(abs(v - target) <= rel_tol * abs(target) for v in (value, value * 100, value / 100)))


def numeric_match(prediction: str | None, answers: Sequence[str], *, rel_tol: float = NUMERIC_REL_TOL) -> float:
    """1.0 if the prediction's number equals some gold number within ``rel_tol`` (relative), else 0.0."""
    return _best(prediction, answers, lambda pred, gold: _numeric(pred, gold, rel_tol))


# --- registry and per-family defaults ---

REWARDS: dict[str, RewardFn] = {
    "em": exact_match,
    "f1": token_f1,
    "sub_em": sub_em,
    "math": math_equal,
    "rougeL": rouge_l,
}

MATH_FAMILIES = frozenset({"math", "gsm8k", "math500", "aime", "amc", "olympiadbench", "dapo_math"})
"""Families scored by ``math``: the sample schema's ``metric`` (em/f1/rougeL) has no math value."""

FAMILY_DEFAULT_REWARD: dict[str, str] = {
    "multihop": "em",
    "grounding": "em",
    "musique": "em",
    "hotpotqa": "em",
    "2wiki": "em",
    "longform": "rougeL",
    **{family: "math" for family in sorted(MATH_FAMILIES)},
}
"""Reward per family when a sample names no metric (the DePO paper trains with EM)."""


def get_reward(name: str) -> RewardFn:
    """The reward function registered as ``name``; ValueError lists the valid names."""
    return lookup(REWARDS, name, "reward")


def reward_name_for(family: str, metric: str | None = None) -> str:
    """The reward that scores a sample of ``family`` whose schema ``metric`` is ``metric``.

    Math families -> ``math`` whatever the metric (the schema has no math metric); otherwise the
    sample's own metric (em/f1/rougeL name their rewards) decides, as the dataset builders set it
    (LongBench sets use f1 or rougeL); with no metric, ``FAMILY_DEFAULT_REWARD[family]``.
    """
    if family in MATH_FAMILIES:
        return "math"
    if metric is not None:
        get_reward(metric)
        return metric
    if family not in FAMILY_DEFAULT_REWARD:
        raise ValueError(
            f"family {family!r} has no default reward and the sample names no metric; "
            f"families with a default: {', '.join(FAMILY_DEFAULT_REWARD)}"
        )
    return FAMILY_DEFAULT_REWARD[family]


def reward_for_family(family: str, metric: str | None = None) -> RewardFn:
    """``get_reward(reward_name_for(family, metric))``."""
    return get_reward(reward_name_for(family, metric))

