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
- ``math``: symbolic equivalence with Hugging Face's ``math-verify``: gold and prediction are each
  parsed (a string with no ``$``, ``\\(``, ``\\[`` or ``\\boxed`` is wrapped in ``$...$`` first, so
  ``2x+1`` is read as one expression, not as the number 2), then ``verify(gold, prediction)``.
  Parse failures and timeouts score 0. math-verify bounds each parse and comparison with SIGALRM,
  which works only on a process's main thread; off the main thread the check runs in a helper
  child process (its main thread) with a hard deadline, killed and restarted if it ever hangs.

``REWARDS`` maps names to functions; ``reward_name_for(family, metric)`` picks a sample's reward.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import string
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

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

MATH_TIMEOUT_S = 5
"""Default bound, in whole seconds (SIGALRM's unit), on each math-verify parse and comparison."""


def _as_math_text(text: str) -> str:
    """Wrap a bare answer in ``$...$`` so math-verify parses it as one LaTeX expression."""
    if any(marker in text for marker in ("$", "\\(", "\\[", "\\boxed")):
        return text
    return f"${text}$"


def _math_equal_here(prediction: str, golds: Sequence[str], timeout_s: int) -> bool:
    """math-verify on this thread, which must be the main one (its timeouts are SIGALRM)."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    try:
        predicted = parse(_as_math_text(prediction), parsing_timeout=timeout_s)
        if not predicted:
            return False
        for gold in golds:
            parsed_gold = parse(_as_math_text(gold), parsing_timeout=timeout_s)
            if parsed_gold and verify(parsed_gold, predicted, timeout_seconds=timeout_s):
                return True
    except (Exception, TimeoutException):  # a malformed answer scores 0; it must not stop training
        return False
    return False


@contextlib.contextmanager
def _preserving_real_timer() -> Iterator[None]:
    """Re-arm an outer ITIMER_REAL (e.g. pytest-timeout's) that math-verify's ``alarm(0)`` cancels."""
    delay, interval = signal.setitimer(signal.ITIMER_REAL, 0)
    start = time.monotonic()
    try:
        yield
    finally:
        if delay > 0:  # an overdue outer timer fires now rather than never
            remaining = max(delay - (time.monotonic() - start), 1e-6)
            signal.setitimer(signal.ITIMER_REAL, remaining, interval)


class _MathChild:
    """A child Python process answering math checks, one JSON line per request, on its main thread."""

    STARTUP_TIMEOUT_S = 120.0  # importing sympy on a loaded machine

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def equal(self, prediction: str, golds: Sequence[str], timeout_s: int) -> bool:
        # Worst case: one parse per gold and the prediction, four timed comparisons per gold.
        deadline_s = timeout_s * (5 * len(golds) + 1) + 5.0
        request = json.dumps({"prediction": prediction, "golds": list(golds), "timeout_s": timeout_s}) + "\n"
        with self._lock:
            for _ in range(2):  # a child that died since the last request is replaced once
                proc = self._started()
                try:
                    proc.stdin.write(request)
                    proc.stdin.flush()
                except OSError:
                    self._stop()
                    continue
                line = self._read_line(proc, deadline_s)
                if line is None:  # hung past every math-verify timeout, or crashed on this input
                    self._stop()
                    return False
                return bool(json.loads(line))
            raise RuntimeError("math reward helper process keeps dying before it reads a request")

    def _started(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        code = "from megatron_lcr.rl.rewards import serve_math_requests; serve_math_requests()"
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )  # fmt: skip
        if self._read_line(self._proc, self.STARTUP_TIMEOUT_S) != "ready":
            self._stop()
            raise RuntimeError("math reward helper process failed to start (see its stderr above)")
        return self._proc

    @staticmethod
    def _read_line(proc: subprocess.Popen, timeout_s: float) -> str | None:
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
        line = proc.stdout.readline() if ready else ""
        return line.strip() if line else None

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for pipe in (self._proc.stdin, self._proc.stdout):
                with contextlib.suppress(OSError):  # unflushed input to a dead child
                    pipe.close()
            self._proc = None


_MATH_CHILD = _MathChild()


def serve_math_requests() -> None:
    """The helper child's loop: read ``{prediction, golds, timeout_s}`` lines, answer ``true``/``false``."""
    protocol = sys.stdout
    sys.stdout = sys.stderr  # stray prints from libraries must not corrupt the protocol
    import math_verify  # noqa: F401  (import before "ready": the first request's deadline excludes it)

    protocol.write("ready\n")
    protocol.flush()
    for line in sys.stdin:
        request = json.loads(line)
        result = _math_equal_here(request["prediction"], request["golds"], request["timeout_s"])
        protocol.write(json.dumps(result) + "\n")
        protocol.flush()


def math_equal(prediction: str | None, answers: Sequence[str], *, timeout_s: int = MATH_TIMEOUT_S) -> float:
    """1.0 if math-verify finds the prediction equivalent to some gold answer, else 0.0.

    ``timeout_s``: whole seconds allowed per parse and per comparison (SIGALRM resolution).
    """
    golds = _gold_list(answers)
    if prediction is None:
        return 0.0
    if threading.current_thread() is threading.main_thread():
        with _preserving_real_timer():
            return float(_math_equal_here(prediction, golds, timeout_s))
    return float(_MATH_CHILD.equal(prediction, golds, timeout_s))


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
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; valid rewards: {', '.join(REWARDS)}")
    return REWARDS[name]


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

