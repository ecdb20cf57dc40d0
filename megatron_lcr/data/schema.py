"""megatron_lcr's sample format: one JSON object per line, the same for every source.

A sample is a question with its answers, the gold (supporting) documents, and two contexts built
from them: ``short_context`` (gold documents plus a few distractors, ~1K tokens) and
``long_context`` (the short context's documents plus many more distractors, 4K-32K tokens; always a
strict superset). This is the input of DePO: RL on the short context, distillation from short to
long. LongBlocks (``longblocks.py``) generates such samples; ``contexts.py`` builds them from real QA
datasets read by ``formats.py``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Metric = Literal["em", "f1", "rougeL"]
METRICS = ("em", "f1", "rougeL")


class DataError(ValueError):
    """A data file or record is malformed; the message names the file, line and field."""


@dataclass(frozen=True, kw_only=True)
class Document:
    """One passage of a context."""

    title: str
    """Document title (entity name, page title)."""
    text: str
    """Document body."""


@dataclass(kw_only=True)
class Sample:
    """A question with short and long contexts (one line of a megatron_lcr JSONL file)."""

    id: str
    """Unique id within the file."""
    family: str
    """Task family or source dataset, e.g. ``multihop``, ``grounding``, ``longform``, ``musique``."""
    question: str
    """The question, without context."""
    answers: list[str]
    """Acceptable answers (any one scores full marks)."""
    metric: Metric
    """How answers are scored: exact match, token F1, or ROUGE-L (long-form)."""
    gold_documents: list[Document]
    """Documents the answer depends on."""
    short_context: list[Document]
    """Gold documents plus a few distractors, shuffled."""
    long_context: list[Document]
    """The short context's documents plus more distractors, shuffled (a strict superset)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form facts: hops, gold positions, token lengths, source ids."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=False)

    @classmethod
    def from_record(cls, record: Any, *, where: str) -> Sample:
        """Validate a decoded JSON record; ``where`` (``file:line``) prefixes every error."""
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        required = ("id", "family", "question", "answers", "metric", "gold_documents", "short_context", "long_context")
        for key in required:
            if key not in record:
                raise DataError(f"{where}: missing field '{key}'")
        unknown = set(record) - set(required) - {"metadata"}
        if unknown:
            raise DataError(f"{where}: unknown field '{sorted(unknown)[0]}'")
        for key in ("id", "family", "question"):
            if not isinstance(record[key], str) or not record[key]:
                raise DataError(f"{where}: field '{key}' must be a non-empty string")
        answers = record["answers"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{where}: field 'answers' must be a non-empty list of strings")
        if record["metric"] not in METRICS:
            raise DataError(f"{where}: field 'metric' must be one of {', '.join(METRICS)}, got {record['metric']!r}")
        docs = {key: _documents(record[key], f"{where}: field '{key}'") for key in required[5:]}
        metadata = record.get("metadata", {})
        if not isinstance(metadata, dict):
            raise DataError(f"{where}: field 'metadata' must be an object")
        return cls(
            id=record["id"], family=record["family"], question=record["question"], answers=list(answers),
            metric=record["metric"], metadata=metadata, **docs,
        )


def _documents(value: Any, where: str) -> list[Document]:
    if not isinstance(value, list):
        raise DataError(f"{where} must be a list of documents")
    docs = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != {"title", "text"}:
            raise DataError(f"{where}[{i}] must be an object with exactly 'title' and 'text'")
        if not isinstance(item["title"], str) or not isinstance(item["text"], str):
            raise DataError(f"{where}[{i}]: 'title' and 'text' must be strings")
        docs.append(Document(title=item["title"], text=item["text"]))
    return docs


def render_context(documents: list[Document]) -> str:
    """The context text a prompt shows: numbered documents, blank-line separated.

    Token budgets (short/long context lengths) are measured on exactly this text.
    """
    return "\n\n".join(f"Document [{i}] {doc.title}\n{doc.text}" for i, doc in enumerate(documents, start=1))


def iter_jsonl(path: str, file=None) -> Iterator[tuple[int, Any]]:
    """``(line number, decoded object)`` for each non-blank line; bad JSON names ``path:line``.

    ``file``: an already open text file to read instead of opening ``path``.
    """
    with contextlib.nullcontext(file) if file is not None else open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})") from None


def read_samples(path: str) -> list[Sample]:
    """Read a megatron_lcr JSONL file; every error names ``path:line``."""
    samples, seen = [], {}
    for lineno, record in iter_jsonl(path):
        where = f"{path}:{lineno}"
        sample = Sample.from_record(record, where=where)
        if sample.id in seen:
            raise DataError(f"{where}: duplicate id '{sample.id}' (first at line {seen[sample.id]})")
        seen[sample.id] = lineno
        samples.append(sample)
    if not samples:
        raise DataError(f"{path}: no samples")
    return samples


def write_samples(path: str, samples: list[Sample]) -> None:
    """Write samples as JSONL atomically (a temporary file renamed into place)."""
    from megatron_lcr.atomic import atomic_write_text

    atomic_write_text(path, "".join(sample.to_json() + "\n" for sample in samples))
