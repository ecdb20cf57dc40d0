"""Loaders for the QA datasets that ``contexts.py`` turns into short/long-context samples.

Each loader reads one released file format, checks it record by record, and returns
:class:`QARecord` s: a question, its answers, the gold (supporting) documents and the record's own
non-supporting paragraphs. Formats (fields as released; extra fields are ignored):

- ``musique``: ``musique_{ans,full}_v1.0_*.jsonl`` (MuSiQue, Trivedi et al. 2022), one object per line:
  ``id``, ``question``, ``answer``, ``answer_aliases``, ``answerable`` (full version),
  ``paragraphs: [{idx, title, paragraph_text, is_supporting}]``, ``question_decomposition``.
  Unanswerable records (``answerable: false``) are skipped and counted (logged at INFO).
- ``hotpotqa``: ``hotpot_*.json`` (HotpotQA, Yang et al. 2018), a JSON array of ``_id``, ``question``,
  ``answer``, ``supporting_facts: [[title, sent_id]]``, ``context: [[title, [sentence, ...]]]``,
  ``type``, ``level``.
- ``2wiki``: ``train.json``/``dev.json`` (2WikiMultihopQA, Ho et al. 2020), the HotpotQA layout plus
  ``evidences: [[subject, relation, object]]``.
- ``longbench``: ``data/<dataset>.jsonl`` (LongBench, Bai et al. 2023): ``input``, ``context`` (one
  string), ``answers``, ``length``, ``dataset``, ``language``, ``all_classes``, ``_id``. There are no
  gold documents: the context, split on blank lines, becomes ``distractors`` and the record is
  evaluation-only (:attr:`QARecord.eval_only`).
- ``lcr``: megatron_lcr's own JSONL (``schema.read_samples``).

HotpotQA/2Wiki gold documents are the whole paragraphs whose title a supporting fact names, in
supporting-fact order. A paragraph's text is its sentences joined as the dataset spaces them:
HotpotQA sentences after the first carry their own leading space (joined with ``''``), 2Wiki
sentences carry none (joined with ``' '``); :func:`_join_sentences` inserts a space only where the
next sentence does not start with whitespace, which handles both.

Every error is a :class:`DataError` that starts with ``file:line:``. For JSON arrays the line is the
one on which the offending element starts, followed by ``element <i>`` (0-based index in the
array) because the released HotpotQA/2Wiki files are a single line; then the field path, e.g.
``hotpot.json:14: element 2: field 'context[2][1]' must be a list of sentences``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from megatron_lcr.data.schema import DataError, Document, iter_jsonl, read_samples

logger = logging.getLogger(__name__)

Format = Literal["musique", "hotpotqa", "2wiki", "longbench", "lcr"]

# LongBench summarisation sets have an empty ``input``; their task instruction lives in LongBench's
# prompt templates, so the question becomes this fixed instruction.
LONGBENCH_SUMMARY_DATASETS = frozenset({"gov_report", "qmsum", "multi_news", "vcsum", "samsum"})
LONGBENCH_SUMMARY_QUESTION = "Summarize the context."


@dataclass(kw_only=True)
class QARecord:
    """One question of a source dataset, before short/long contexts are built."""

    id: str
    """Unique id within the file (the dataset's own id)."""
    question: str
    """The question, without context."""
    answers: list[str]
    """Acceptable answers: the answer first, then aliases (MuSiQue); never empty strings."""
    gold: list[Document]
    """Supporting documents; empty for evaluation-only records (LongBench)."""
    distractors: list[Document]
    """The record's own non-supporting paragraphs; for evaluation-only records, the whole context."""
    source: str
    """Source dataset (``musique``, ``hotpotqa``, ``2wiki``, ``longbench``) or, for ``lcr``, the family."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Source facts carried into the samples: type, level, hops, LongBench length/dataset."""

    @property
    def eval_only(self) -> bool:
        """No gold documents: the record can be evaluated on its context but not trained on."""
        return not self.gold


def load_qa(path: str, fmt: Format) -> list[QARecord]:
    """Read and check ``path`` in format ``fmt``; see the module docstring for the formats."""
    if fmt not in LOADERS:
        raise DataError(f"{path}: unknown format {fmt!r} (known: {', '.join(LOADERS)})")
    return LOADERS[fmt](path)


# ---------------------------------------------------------------------------------------------
# Reading records with their line numbers


def raw_records(path: str) -> Iterator[tuple[int, int | None, Any]]:
    """Yield ``(line, array index or None, decoded record)``; a file starting with ``[`` is a JSON array.

    JSONL is streamed line by line (only ``\n`` ends a line: JSON strings may hold U+2028 and the
    like, which ``str.splitlines`` would split on); a JSON array is read whole.
    """
    with open(path, encoding="utf-8") as f:
        head = f.read(4096)
        first = _skip_ws(head, 0)
        if first < len(head) and head[first] == "[":
            yield from _json_array_records(path, head + f.read(), first)
            return
        f.seek(0)
        for lineno, record in iter_jsonl(path, f):
            yield lineno, None, record


_WS = re.compile(r"[ \t\n\r]*")


def _skip_ws(text: str, pos: int) -> int:
    return _WS.match(text, pos).end()


def _json_array_records(path: str, text: str, pos: int) -> Iterator[tuple[int, int, Any]]:
    """Walk a top-level JSON array element by element, tracking the line each one starts on."""
    decoder = json.JSONDecoder()
    line, counted_to = 1, 0

    def line_at(offset: int) -> int:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, offset)
        counted_to = offset
        return line

    pos = _skip_ws(text, pos + 1)
    index = 0
    while pos < len(text) and text[pos] != "]":
        start_line = line_at(pos)
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
        yield start_line, index, record
        index += 1
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
            if pos < len(text) and text[pos] == "]":
                raise DataError(f"{path}:{line_at(pos)}: invalid JSON (trailing comma before ']')")
        elif pos < len(text) and text[pos] != "]":
            raise DataError(f"{path}:{line_at(pos)}: invalid JSON (expected ',' or ']' after element {index - 1})")
    if pos >= len(text):
        raise DataError(f"{path}:{line_at(len(text))}: invalid JSON (unterminated top-level array)")
    end = _skip_ws(text, pos + 1)
    if end < len(text):
        raise DataError(f"{path}:{line_at(end)}: invalid JSON (extra data after the top-level array)")


def _load(path: str, parse: Callable[[dict, str], QARecord | None], id_field: str) -> list[QARecord]:
    """Parse every record; ``parse`` returns None for a record the format says to skip."""
    records: list[QARecord] = []
    first_seen: dict[str, str] = {}
    skipped = 0
    for line, index, raw in raw_records(path):
        where = f"{path}:{line}" if index is None else f"{path}:{line}: element {index}"
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        record = parse(raw, where)
        if record is None:
            skipped += 1
            continue
        if record.id in first_seen:
            first = first_seen[record.id]
            raise DataError(f"{where}: field '{id_field}': duplicate id {record.id!r} (first at {first})")
        first_seen[record.id] = f"line {line}" if index is None else f"line {line}, element {index}"
        records.append(record)
    if skipped:
        logger.info("%s: skipped %d unanswerable records, kept %d", path, skipped, len(records))
    if not records:
        raise DataError(f"{path}: no records")
    return records


# ---------------------------------------------------------------------------------------------
# Field checks: each returns the value or raises a DataError naming ``where`` and the field path


def get_field(obj: dict, key: str, kind: type, where: str, path: str, what: str) -> Any:
    if key not in obj:
        raise DataError(f"{where}: missing field '{path}'")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise DataError(f"{where}: field '{path}' must be {what}, got {type(value).__name__}")
    return value


def text_field(obj: dict, key: str, where: str, path: str | None = None, *, allow_empty: bool = False) -> str:
    path = path or key
    value = get_field(obj, key, str, where, path, "a string")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field '{path}' is empty")
    return value


def string_list(value: Any, where: str, path: str) -> list[str]:
    """A list of non-blank strings."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise DataError(f"{where}: field '{path}' must be a list of strings")
    for i, item in enumerate(value):
        if not item.strip():
            raise DataError(f"{where}: field '{path}[{i}]' is empty")
    return value


def optional_field(obj: dict, key: str, kind: type, where: str, what: str) -> Any:
    if key not in obj or obj[key] is None:
        return None
    return get_field(obj, key, kind, where, key, what)


# ---------------------------------------------------------------------------------------------
# Formats


def _parse_musique(raw: dict, where: str) -> QARecord | None:
    answerable = optional_field(raw, "answerable", bool, where, "a boolean")
    record_id = text_field(raw, "id", where)
    if answerable is False:
        return None
    question, answer = text_field(raw, "question", where), text_field(raw, "answer", where)
    aliases = string_list(raw.get("answer_aliases", []), where, "answer_aliases")
    paragraphs = get_field(raw, "paragraphs", list, where, "paragraphs", "a list of paragraphs")
    gold, distractors = [], []
    for i, para in enumerate(paragraphs):
        path = f"paragraphs[{i}]"
        if not isinstance(para, dict):
            raise DataError(f"{where}: field '{path}' must be an object")
        get_field(para, "idx", int, where, f"{path}.idx", "an integer")
        title = text_field(para, "title", where, f"{path}.title", allow_empty=True)
        text = text_field(para, "paragraph_text", where, f"{path}.paragraph_text", allow_empty=True)
        supporting = get_field(para, "is_supporting", bool, where, f"{path}.is_supporting", "a boolean")
        if supporting:
            gold.append(Document(title=title, text=text))
        elif text.strip():
            distractors.append(Document(title=title, text=text))
    if not gold:
        raise DataError(f"{where}: field 'paragraphs': no paragraph has is_supporting true in an answerable record")
    decomposition = optional_field(raw, "question_decomposition", list, where, "a list")
    metadata: dict[str, Any] = {}
    if decomposition is not None:
        metadata["hops"] = len(decomposition)
    return QARecord(
        id=record_id, question=question, answers=list(dict.fromkeys([answer, *aliases])), gold=gold,
        distractors=distractors, source="musique", metadata=metadata,
    )


def _join_sentences(sentences: list[str]) -> str:
    """One paragraph: a space between sentences unless the next already starts with whitespace."""
    text = ""
    for sentence in sentences:
        if text and sentence and not sentence[0].isspace():
            text += " "
        text += sentence
    return text.strip()


def _wiki_context(raw: dict, where: str) -> list[tuple[str, list[str]]]:
    context = get_field(raw, "context", list, where, "context", "a list of [title, sentences] pairs")
    paragraphs = []
    for i, item in enumerate(context):
        if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str):
            raise DataError(f"{where}: field 'context[{i}]' must be a [title, sentences] pair")
        if not isinstance(item[1], list) or not all(isinstance(s, str) for s in item[1]):
            raise DataError(f"{where}: field 'context[{i}][1]' must be a list of sentences")
        paragraphs.append((item[0], item[1]))
    return paragraphs


def _wiki_supporting_titles(raw: dict, where: str, paragraphs: list[tuple[str, list[str]]]) -> list[str]:
    """Titles named by ``supporting_facts``, in first-mention order, each checked against the context."""
    facts = get_field(raw, "supporting_facts", list, where, "supporting_facts", "a list of [title, sent_id] pairs")
    if not facts:
        raise DataError(f"{where}: field 'supporting_facts' is empty")
    sentences_per_title: dict[str, int] = {}
    for title, sentences in paragraphs:
        sentences_per_title[title] = max(sentences_per_title.get(title, 0), len(sentences))
    titles: list[str] = []
    for j, fact in enumerate(facts):
        path = f"supporting_facts[{j}]"
        if (not isinstance(fact, list) or len(fact) != 2 or not isinstance(fact[0], str)
                or not isinstance(fact[1], int) or isinstance(fact[1], bool)):
            raise DataError(f"{where}: field '{path}' must be a [title, sent_id] pair")
        title, sent_id = fact
        if title not in sentences_per_title:
            raise DataError(f"{where}: field '{path}[0]': title {title!r} is not in 'context'")
        if not 0 <= sent_id < sentences_per_title[title]:
            # A few released HotpotQA training records point past a paragraph's last sentence. The
            # gold document is the whole paragraph, chosen by title, so the record stays usable.
            logger.warning(
                "%s: field '%s[1]': sentence %d is out of range for %r (%d sentences); the title is kept",
                where, path, sent_id, title, sentences_per_title[title],
            )
        if title not in titles:
            titles.append(title)
    return titles


def _parse_wiki(raw: dict, where: str, source: str) -> QARecord:
    """HotpotQA and 2WikiMultihopQA share one layout."""
    record_id = text_field(raw, "_id", where)
    question, answer = text_field(raw, "question", where), text_field(raw, "answer", where)
    paragraphs = _wiki_context(raw, where)
    titles = _wiki_supporting_titles(raw, where, paragraphs)
    gold = [
        Document(title=title, text=_join_sentences(sentences))
        for wanted in titles for title, sentences in paragraphs if title == wanted
    ]
    distractors = [
        Document(title=title, text=text)
        for title, sentences in paragraphs
        if title not in titles and (text := _join_sentences(sentences))
    ]
    metadata: dict[str, Any] = {"supporting_facts": raw["supporting_facts"]}
    for key in ("type", "level"):
        value = optional_field(raw, key, str, where, "a string")
        if value is not None:
            metadata[key] = value
    evidences = raw.get("evidences")
    if evidences is not None:
        if not isinstance(evidences, list) or not all(
            isinstance(e, list) and len(e) == 3 and all(isinstance(part, str) for part in e) for e in evidences
        ):
            raise DataError(f"{where}: field 'evidences' must be a list of [subject, relation, object] triples")
        metadata["evidences"] = evidences
    return QARecord(
        id=record_id, question=question, answers=[answer], gold=gold, distractors=distractors,
        source=source, metadata=metadata,
    )


_BLANK_LINES = re.compile(r"\n[ \t]*\n")


def parse_longbench(raw: dict, where: str) -> QARecord:
    record_id = text_field(raw, "_id", where)
    dataset = text_field(raw, "dataset", where)
    question = text_field(raw, "input", where, allow_empty=dataset in LONGBENCH_SUMMARY_DATASETS)
    context = text_field(raw, "context", where)
    answers = string_list(get_field(raw, "answers", list, where, "answers", "a list of strings"), where, "answers")
    if not answers:
        raise DataError(f"{where}: field 'answers' is empty")
    length = get_field(raw, "length", int, where, "length", "an integer")
    language = optional_field(raw, "language", str, where, "a string")
    all_classes = optional_field(raw, "all_classes", list, where, "a list or null")
    pieces = [piece.strip() for piece in _BLANK_LINES.split(context)]
    documents = [Document(title="", text=piece) for piece in pieces if piece]
    metadata: dict[str, Any] = {"dataset": dataset, "length": length}
    if language is not None:
        metadata["language"] = language
    if all_classes is not None:
        metadata["all_classes"] = all_classes
    return QARecord(
        id=record_id, question=question.strip() or LONGBENCH_SUMMARY_QUESTION, answers=list(answers), gold=[],
        distractors=documents, source="longbench", metadata=metadata,
    )


def _load_lcr(path: str) -> list[QARecord]:
    """Our own samples back as records: distractors are the short context's non-gold documents
    (for a sample without gold documents, the long context, so evaluation-only samples survive)."""
    records = []
    for sample in read_samples(path):
        gold = set(sample.gold_documents)
        pool = sample.short_context if gold else sample.long_context
        records.append(QARecord(
            id=sample.id, question=sample.question, answers=list(sample.answers), gold=list(sample.gold_documents),
            distractors=[doc for doc in pool if doc not in gold], source=sample.family,
            metadata={**sample.metadata, "metric": sample.metric},
        ))
    return records


LOADERS: dict[str, Callable[[str], list[QARecord]]] = {
    "musique": lambda path: _load(path, _parse_musique, "id"),
    "hotpotqa": lambda path: _load(path, lambda raw, where: _parse_wiki(raw, where, "hotpotqa"), "_id"),
    "2wiki": lambda path: _load(path, lambda raw, where: _parse_wiki(raw, where, "2wiki"), "_id"),
    "longbench": lambda path: _load(path, parse_longbench, "_id"),
    "lcr": _load_lcr,
}
"""Format name -> loader ``path -> list[QARecord]``."""
