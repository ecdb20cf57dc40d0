"""Short/long contexts from QA data with supporting documents (DePO's data; RULER-style construction).

For each :class:`~megatron_lcr.data.formats.QARecord` with gold documents:

- ``short_context`` = the gold documents plus distractors (the record's own non-supporting
  paragraphs first, in a per-record random order, then random draws from the pool) until the
  rendered context (``schema.render_context``) reaches ``short_tokens`` within ``tolerance``; then
  shuffled. If the gold documents alone exceed the budget they are all kept (never dropped) with no
  distractor, and ``metadata["over_budget"]`` is set.
- ``long_context`` = every document of the short context plus more distractors (the record's unused
  own paragraphs, then the pool; never one equal to a gold or already present document) up to
  ``long_tokens`` within ``tolerance``; shuffled independently. It always holds at least one
  document more than the short context (a strict superset, as ``schema.Sample`` promises).

A distractor never contains any of the record's answers (case-insensitive substring): a
"distractor" that holds the answer would leak it. ``yes``/``no`` (HotpotQA/2Wiki comparison
questions) are exempt: they are not spans of any document, and the filter would reject nearly all.

Lengths are estimated from per-document token counts (cached; each distinct document is counted
once) and then checked with one ``count_tokens`` call on the final rendering. When a tokenizer is
not additive over the rendering (document numbers, separators), the gap is measured and the
context is trimmed or grown again, up to ``_CORRECTION_ROUNDS`` times; ``metadata["short_in_budget"]``
/ ``["long_in_budget"]`` say whether the final, verified length landed in the band.

Evaluation-only records (LongBench: no gold documents) cannot get a short context, so they become
samples with an empty ``short_context`` and the record's own documents, in their original order, as
``long_context``; ``metadata["eval_only"]`` is true and the training recipes must skip them. Their
metric follows LongBench's own scoring: ROUGE-L for summarisation sets, token F1 for the sets LongBench
scores with ``qa_f1``, exact match for the rest. MuSiQue, HotpotQA and 2Wiki are scored by exact match,
as in DePO.

Randomness is a ``random.Random(f"{seed}:{record.id}")`` per record (string seeds hash through
SHA-512: the same across runs, processes and Python versions; ``hash()`` is not).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from megatron_lcr.data.formats import QARecord
from megatron_lcr.data.schema import DataError, Document, Metric, Sample, render_context

METRIC_BY_SOURCE: dict[str, Metric] = {"musique": "em", "hotpotqa": "em", "2wiki": "em"}
"""Metric of each training source (DePO scores exact match)."""

LONGBENCH_METRICS: dict[str, Metric] = {
    **dict.fromkeys(("gov_report", "qmsum", "multi_news", "vcsum", "samsum", "dureader"), "rougeL"),
    **dict.fromkeys(
        ("narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa", "musique",
         "triviaqa"),
        "f1",
    ),
}
"""LongBench dataset -> metric (LongBench's rouge -> rougeL, qa_f1 -> f1); any other set: em."""

_NON_SPAN_ANSWERS = frozenset({"yes", "no"})
_CORRECTION_ROUNDS = 3
_MAX_MISSES = 64  # consecutive candidates too long for the remaining budget before giving up
_MAX_REJECTS = 1000  # consecutive pool draws rejected (used, gold, holds the answer) before giving up


@dataclass(kw_only=True)
class ContextConfig:
    """How short and long contexts are built from QA records."""

    short_tokens: int = 1024
    """Target length of the rendered short context (tokens of ``count_tokens``)."""
    long_tokens: int = 8192
    """Target length of the rendered long context (tokens of ``count_tokens``)."""
    tolerance: float = 0.1
    """Accepted relative deviation from each target (fraction: 0.1 = +-10%)."""
    seed: int = 0
    """Seed of the per-record generators (with the record id)."""
    max_short_distractors: int | None = None
    """Most distractors in the short context (documents); None = as many as the budget takes."""

    def __post_init__(self) -> None:
        if self.short_tokens <= 0:
            raise ValueError(f"short_tokens ({self.short_tokens}) must be positive")
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance ({self.tolerance}) must be in [0, 1)")
        if self.long_tokens * (1 - self.tolerance) <= self.short_tokens * (1 + self.tolerance):
            raise ValueError(
                f"long_tokens ({self.long_tokens}) must exceed short_tokens ({self.short_tokens}) by more than "
                f"the tolerance band ({self.tolerance})"
            )
        if self.max_short_distractors is not None and self.max_short_distractors < 0:
            raise ValueError(f"max_short_distractors ({self.max_short_distractors}) must be >= 0 or None")


@dataclass(frozen=True)
class _Band:
    """A token budget: aim at ``target``, accept anything in ``[lo, hi]``."""

    target: int
    lo: float
    hi: float

    @classmethod
    def around(cls, target: int, tolerance: float) -> _Band:
        return cls(target, target * (1 - tolerance), target * (1 + tolerance))

    def shifted(self, bias: int) -> _Band:
        """The band for an estimate that undercounts the real length by ``bias`` tokens."""
        return _Band(self.target - bias, self.lo - bias, self.hi - bias)


class _TokenCache:
    """Per-document token counts; the rendering's length is their sum plus one separator per gap."""

    def __init__(self, count_tokens: Callable[[str], int]) -> None:
        self.count = count_tokens
        self.separator = count_tokens("\n\n")
        self._blocks: dict[Document, int] = {}

    def cost(self, doc: Document) -> int:
        """Tokens one document adds to a non-empty context (its block plus a separator)."""
        block = self._blocks.get(doc)
        if block is None:
            # A two-digit number stands in for the position, unknown until the shuffle.
            block = self._blocks[doc] = self.count(f"Document [10] {doc.title}\n{doc.text}")
        return block + self.separator

    def estimate(self, docs: Sequence[Document]) -> int:
        return sum(self.cost(doc) for doc in docs) - self.separator if docs else 0


def distractor_pool(records: Iterable[QARecord], extra: Iterable[Document] = ()) -> list[Document]:
    """Every record's own non-gold paragraphs (training records only), then ``extra``; no duplicates."""
    own = (doc for record in records if not record.eval_only for doc in record.distractors)
    return list(dict.fromkeys([*own, *extra]))


def build_samples(
    records: Sequence[QARecord], pool: Sequence[Document], count_tokens: Callable[[str], int], cfg: ContextConfig,
    *, progress: bool = False,
) -> list[Sample]:
    """One sample per record; see the module docstring. ``pool`` is usually :func:`distractor_pool`."""
    from tqdm import tqdm

    tokens = _TokenCache(count_tokens)
    records = tqdm(records, desc="contexts", unit="sample", disable=not progress, mininterval=1.0)
    return [_eval_only_sample(record, tokens) if record.eval_only else _sample(record, pool, tokens, cfg)
            for record in records]


def _sample(record: QARecord, pool: Sequence[Document], tokens: _TokenCache, cfg: ContextConfig) -> Sample:
    rng = random.Random(f"{cfg.seed}:{record.id}")
    gold = list(dict.fromkeys(record.gold))
    leaks = _leak_check(record.answers)
    own = [doc for doc in dict.fromkeys(record.distractors) if not leaks(doc)]
    rng.shuffle(own)
    short_band = _Band.around(cfg.short_tokens, cfg.tolerance)
    short = _fill(
        gold, _candidates(own, pool, rng, set(gold), leaks), short_band, tokens, rng,
        min_added=0, max_added=cfg.max_short_distractors,
    )
    over_budget = not short.added and short.tokens > short_band.hi
    short_set = set(short.docs)
    long = _fill(
        short.docs, _candidates([doc for doc in own if doc not in short_set], pool, rng, short_set, leaks),
        _Band.around(cfg.long_tokens, cfg.tolerance), tokens, rng, min_added=1, max_added=None,
    )
    if not long.added:
        raise DataError(f"record {record.id!r}: no distractor left for the long context (pool exhausted)")
    gold_set = set(gold)
    metadata = {
        **record.metadata,
        "source": record.source,
        "gold_positions_short": [i for i, doc in enumerate(short.docs) if doc in gold_set],
        "gold_positions_long": [i for i, doc in enumerate(long.docs) if doc in gold_set],
        "short_tokens": short.tokens,
        "long_tokens": long.tokens,
        "over_budget": over_budget,
        "short_in_budget": short.in_budget,
        "long_in_budget": long.in_budget,
    }
    return Sample(
        id=record.id, family=record.source, question=record.question, answers=list(record.answers),
        metric=_metric(record), gold_documents=gold, short_context=short.docs, long_context=long.docs,
        metadata=metadata,
    )


def _eval_only_sample(record: QARecord, tokens: _TokenCache) -> Sample:
    """LongBench-style record: the whole context as the long context, no short context, no gold."""
    metadata = {
        **record.metadata,
        "source": record.source,
        "eval_only": True,
        "long_tokens": tokens.count(render_context(record.distractors)),
    }
    return Sample(
        id=record.id, family=record.source, question=record.question, answers=list(record.answers),
        metric=_metric(record), gold_documents=[], short_context=[], long_context=list(record.distractors),
        metadata=metadata,
    )


def _metric(record: QARecord) -> Metric:
    if record.source == "longbench":
        return LONGBENCH_METRICS.get(record.metadata.get("dataset", ""), "em")
    return METRIC_BY_SOURCE.get(record.source) or record.metadata.get("metric", "em")


def _leak_check(answers: Sequence[str]) -> Callable[[Document], bool]:
    """``doc -> True`` when the document's title or text contains an answer (case-insensitive)."""
    needles = [a.casefold() for a in answers if a.strip() and a.strip().casefold() not in _NON_SPAN_ANSWERS]

    def leaks(doc: Document) -> bool:
        haystack = f"{doc.title}\n{doc.text}".casefold()
        return any(needle in haystack for needle in needles)

    return leaks


def _candidates(
    own: Sequence[Document], pool: Sequence[Document], rng: random.Random, taken: set[Document],
    leaks: Callable[[Document], bool],
) -> Iterator[Document]:
    """Distractor candidates: ``own`` (already filtered, in order), then random pool draws.

    A document is offered once; ``taken`` (gold and already chosen documents) and documents holding
    the answer are never offered. Draws are with replacement, rejecting repeats, so a large pool
    costs nothing per record; after ``_MAX_REJECTS`` rejections in a row the pool counts as spent.
    """
    offered = set(taken)
    for doc in own:
        if doc not in offered:
            offered.add(doc)
            yield doc
    rejects = 0
    while pool and rejects < _MAX_REJECTS:
        doc = pool[rng.randrange(len(pool))]
        if doc in offered or leaks(doc):
            rejects += 1
            continue
        rejects = 0
        offered.add(doc)
        yield doc


@dataclass
class _Filled:
    docs: list[Document]
    """The context, shuffled."""
    tokens: int
    """Verified length: ``count_tokens(render_context(docs))``."""
    in_budget: bool
    added: int
    """Distractors added to the base documents."""


def _fill(
    base: list[Document], candidates: Iterator[Document], band: _Band, tokens: _TokenCache, rng: random.Random,
    *, min_added: int, max_added: int | None,
) -> _Filled:
    """``base`` plus distractors from ``candidates`` until the rendering lands in ``band``; shuffled."""
    added: list[Document] = []
    bias = 0
    for _ in range(_CORRECTION_ROUNDS):
        shifted = band.shifted(bias)
        estimate = tokens.estimate(base + added)
        while len(added) > min_added and estimate > shifted.hi:
            estimate -= tokens.cost(added.pop())
        _grow(added, estimate, candidates, shifted, tokens, min_added, max_added)
        docs = base + added
        rng.shuffle(docs)
        actual = tokens.count(render_context(docs))
        if band.lo <= actual <= band.hi:
            return _Filled(docs, actual, True, len(added))
        new_bias = actual - tokens.estimate(docs)
        if new_bias == bias:
            break  # the estimate was right: the band is out of reach (gold too long or pool spent)
        bias = new_bias
    return _Filled(docs, actual, False, len(added))


def _grow(
    added: list[Document], estimate: int, candidates: Iterator[Document], band: _Band, tokens: _TokenCache,
    min_added: int, max_added: int | None,
) -> None:
    """Append candidates while below the target: a document is taken if it keeps the estimate under
    ``band.hi`` and, once past ``band.lo``, moves it closer to the target. ``min_added`` are forced."""
    misses = 0
    while (max_added is None or len(added) < max_added) and (estimate < band.target or len(added) < min_added):
        doc = next(candidates, None)
        if doc is None:
            return
        cost = tokens.cost(doc)
        after = estimate + cost
        fits = after <= band.hi and (estimate < band.lo or after - band.target <= band.target - estimate)
        if not fits and len(added) >= min_added:
            misses += 1
            if misses >= _MAX_MISSES:
                return
            continue
        added.append(doc)
        estimate = after
        misses = 0
