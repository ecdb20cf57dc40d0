"""Benchmark files ``lcr eval`` reads, in their published layouts, and how each becomes a prompt.

Every record becomes an :class:`EvalItem`: a megatron_lcr :class:`~megatron_lcr.data.schema.Sample`
(question, gold answers, context documents) plus the metric that scores it and the benchmark's own
groups. Prompts are then built exactly as for training (``data.prompts``: instruction, numbered
documents, ``Question: ...``, answer on an ``Answer:`` line), so a policy is evaluated with the
template it was trained with. Single-context benchmarks put their context in the sample's
``long_context`` and are prompted with it; megatron_lcr samples are prompted with both contexts.
Nothing is downloaded: each reader takes the local file as its benchmark publishes it; fields not
listed are ignored.

=============  ===================================  =====================================================
format         file as published                     field mapping (published field -> prompt / scoring)
=============  ===================================  =====================================================
longbench      LongBench v1 ``data/<dataset>.jsonl``  ``input`` -> question (summarisation sets, empty
               (Bai et al. 2023; THUDM/LongBench),    ``input``: "Summarize the context."); ``context``
               LongBench-E ``<dataset>_e.jsonl``      split on blank lines -> documents; ``answers`` ->
                                                      golds; ``_id`` -> id; ``dataset`` -> metric
                                                      (``LONGBENCH_METRICS``); ``length``, ``language``,
                                                      ``all_classes`` kept in metadata (checked by
                                                      ``data.formats``' LongBench reader, reused here)
longbench_v2   LongBench v2 ``data.json``: a JSON     ``question`` + ``choice_A`` .. ``choice_D`` ->
               list (Bai et al. 2024; JSONL too)      question with the four choices; ``context`` -> one
                                                      document; ``answer`` (a letter) -> gold; ``_id`` ->
                                                      id; ``length`` (short/medium/long) and
                                                      ``difficulty`` (easy/hard) -> groups; ``domain``,
                                                      ``sub_domain`` -> metadata. Metric ``choice``
ruler_qa       RULER's generated ``qa_1/validation    ``input`` (the task template filled in by RULER's
               .jsonl``, ``qa_2/...`` (Hsieh et al.   ``scripts/data/synthetic/qa.py``): the text after its
               2024; ``scripts/data/synthetic/        last ``Question:`` -> question; the text between
               qa.py``)                               "The following are given documents." and the
                                                      repeated instruction, split at each "Document N:"
                                                      -> documents; ``outputs`` -> golds; ``index`` -> id;
                                                      ``length`` -> metadata. Generate with
                                                      ``--model_template_type base`` (the default), so no
                                                      chat template is baked into ``input``. Metric ``f1``
                                                      (RULER's own ``string_match_part`` is closest to
                                                      ``--metric sub_em``)
docmath        DocMath-Eval ``<subset>_testmini       ``question`` -> question; ``paragraphs`` (text and
               .json`` (Zhao et al. 2024; a JSON      markdown tables) -> one document each;
               list; JSONL too)                       ``ground_truth`` (a number) -> gold; ``question_id``
                                                      -> id; ``source``, ``table_evidence``,
                                                      ``paragraph_evidence`` -> metadata. The test split
                                                      hides ``ground_truth``: use testmini. Metric
                                                      ``numeric`` (0.15% relative, ``rl.rewards``)
frames         google/frames-benchmark ``test.tsv``   ``Prompt`` -> question; ``Answer`` -> gold; row
               (Krishna et al. 2024; ``.csv`` read    number (0-based) -> id; ``reasoning_types``,
               as comma-separated)                    ``wiki_links`` -> metadata. The file holds no
                                                      context: without a ``context`` column the question
                                                      is asked closed-book (no documents); a ``context``
                                                      column a user adds (e.g. the text of the linked
                                                      Wikipedia articles) becomes one document. Metric
                                                      ``f1`` (Frames reports accuracy judged by an LLM;
                                                      there is no judge here)
lcr            megatron_lcr JSONL (``data/schema.py``  every field; prompted with ``short_context`` and
               ``Sample``)                            ``long_context`` (group ``context``); metric: the
                                                      reward training gives the sample
=============  ===================================  =====================================================

``--format auto`` (:func:`detect_format`): ``.tsv``/``.csv`` files are Frames; otherwise the first
record's fields decide (``short_context`` + ``long_context``: lcr; ``choice_A``: longbench_v2;
``input`` + ``outputs``: ruler_qa; ``question`` + ``paragraphs``: docmath; ``input`` + ``context`` +
``answers``: longbench). ``--metric`` replaces every record's metric. Every error is a
:class:`~megatron_lcr.data.schema.DataError` that starts with ``file:line`` (JSON lists: the line the
element starts on, then ``element i``), raised before any model or server starts.
"""

from __future__ import annotations

import csv
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from megatron_lcr.data.formats import get_field, optional_field, parse_longbench, raw_records, string_list, text_field
from megatron_lcr.data.schema import METRICS as SCHEMA_METRICS
from megatron_lcr.data.schema import DataError, Document, Sample, read_samples
from megatron_lcr.eval.metrics import CHOICE_LETTERS, sample_metric

FORMATS = ("longbench", "longbench_v2", "ruler_qa", "docmath", "frames", "lcr")

LONGBENCH_METRICS: dict[str, str] = {
    **dict.fromkeys(("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa"), "f1"),
    **dict.fromkeys(("gov_report", "qmsum", "multi_news", "samsum"), "rougeL"),
    **dict.fromkeys(("trec", "passage_retrieval_en", "passage_count"), "em"),
}
"""LongBench v1 dataset -> metric, after LongBench's ``dataset2metric``: its ``qa_f1_score`` sets are
``f1``, its ``rouge_score`` sets ``rougeL``. Deviation: ``trec`` (classification), ``passage_retrieval_en``
and ``passage_count`` are scored by exact match of the answer line, where LongBench gives partial
credit or searches the free text. Chinese sets and the code sets (``lcc``, ``repobench-p``: edit
similarity) have no mapping: pass ``--metric``. LongBench-E names (``hotpotqa_e``) map as their base set."""

LONGBENCH_V2_LENGTHS = ("short", "medium", "long")
CHOICE_INSTRUCTION = "Answer with the letter (A, B, C or D) of the correct choice."

_RULER_DOCS_HEAD = "The following are given documents."
_RULER_INSTRUCTION = "Answer the question based on the given documents."
_RULER_QUESTION = "Question:"
_RULER_DOC_MARK = re.compile(r"Document \d+:")

# JSON record -> format: the first signature whose fields the first record has.
_SIGNATURES = (
    ("lcr", {"short_context", "long_context"}),
    ("longbench_v2", {"choice_A", "answer", "context"}),
    ("ruler_qa", {"input", "outputs"}),
    ("docmath", {"question", "paragraphs"}),
    ("longbench", {"input", "context", "answers"}),
)


@dataclass(frozen=True, kw_only=True)
class EvalItem:
    """One benchmark record, ready to be prompted and scored."""

    sample: Sample
    """Question, gold answers and context documents (single-context benchmarks: ``long_context``)."""
    metric: str
    """``eval.metrics.METRICS`` name that scores its responses."""
    contexts: tuple[str, ...] = ("long",)
    """Contexts it is prompted with: ``("long",)``, or for megatron_lcr samples ``("short", "long")``."""
    groups: dict[str, str] = field(default_factory=dict)
    """The benchmark's own categories, e.g. LongBench v2 ``{"length": "short", "difficulty": "hard"}``."""


@dataclass(frozen=True, kw_only=True)
class Benchmark:
    """One ``--data`` file, read."""

    path: str
    """The file."""
    format: str
    """One of ``FORMATS``."""
    items: list[EvalItem]
    """Its records, in file order."""


def _item(fmt: str, record_id: str, question: str, documents: list[Document], answers: list[str], metric: str,
          *, groups: dict[str, str] | None = None, metadata: dict | None = None) -> EvalItem:
    # Sample.metric must be a schema metric; the item's own metric (possibly numeric/choice) scores it.
    sample = Sample(id=record_id, family=fmt, question=question, answers=answers,
                    metric=metric if metric in SCHEMA_METRICS else "em", gold_documents=[],
                    short_context=documents, long_context=documents, metadata=metadata or {})
    return EvalItem(sample=sample, metric=metric, groups=groups or {})


def _longbench(raw: dict, where: str, metric: str | None) -> EvalItem:
    record = parse_longbench(raw, where)
    dataset = record.metadata["dataset"]
    if metric is None:
        metric = LONGBENCH_METRICS.get(dataset.removesuffix("_e"))
        if metric is None:
            raise DataError(f"{where}: field 'dataset': LongBench set {dataset!r} has no metric here "
                            f"(mapped: {', '.join(LONGBENCH_METRICS)}); pass --metric")
    return _item("longbench", record.id, record.question, record.distractors, record.answers, metric,
                 metadata=record.metadata)


def _longbench_v2(raw: dict, where: str, metric: str | None) -> EvalItem:
    record_id, question = text_field(raw, "_id", where), text_field(raw, "question", where)
    choices = [text_field(raw, f"choice_{letter}", where) for letter in CHOICE_LETTERS]
    answer = text_field(raw, "answer", where).strip()
    if answer not in CHOICE_LETTERS:
        raise DataError(f"{where}: field 'answer' must be one of {', '.join(CHOICE_LETTERS)}, got {answer!r}")
    length = text_field(raw, "length", where)
    if length not in LONGBENCH_V2_LENGTHS:
        raise DataError(f"{where}: field 'length' must be one of {', '.join(LONGBENCH_V2_LENGTHS)}, got {length!r}")
    context = text_field(raw, "context", where)
    groups = {"length": length}
    difficulty = optional_field(raw, "difficulty", str, where, "a string")
    if difficulty is not None:
        groups["difficulty"] = difficulty
    listed = "\n".join(f"({letter}) {choice.strip()}" for letter, choice in zip(CHOICE_LETTERS, choices))
    text = f"{question.strip()}\n\n{listed}\n\n{CHOICE_INSTRUCTION}"
    metadata = {key: raw[key] for key in ("domain", "sub_domain") if isinstance(raw.get(key), str)}
    return _item("longbench_v2", record_id, text, [Document(title="", text=context.strip())], [answer],
                 metric or "choice", groups=groups, metadata=metadata)


def _ruler_qa(raw: dict, where: str, metric: str | None) -> EvalItem:
    index = get_field(raw, "index", int, where, "index", "an integer")
    text = text_field(raw, "input", where)
    answers = string_list(get_field(raw, "outputs", list, where, "outputs", "a list of strings"), where, "outputs")
    if not answers:
        raise DataError(f"{where}: field 'outputs' is empty")
    at = text.rfind(_RULER_QUESTION)
    if at < 0:
        raise DataError(f"{where}: field 'input' has no '{_RULER_QUESTION}' (not a RULER qa_1/qa_2 record)")
    question = text[at + len(_RULER_QUESTION):].strip()
    if not question:
        raise DataError(f"{where}: field 'input': nothing follows its last '{_RULER_QUESTION}'")
    head = text[:at]
    start = head.find(_RULER_DOCS_HEAD)
    start = 0 if start < 0 else start + len(_RULER_DOCS_HEAD)
    end = head.rfind(_RULER_INSTRUCTION)
    pieces = _RULER_DOC_MARK.split(head[start:end if end > start else len(head)])
    documents = [Document(title="", text=piece.strip()) for piece in pieces if piece.strip()]
    length = optional_field(raw, "length", int, where, "an integer")
    return _item("ruler_qa", str(index), question, documents, list(answers), metric or "f1",
                 metadata={} if length is None else {"source_length": length})


def _docmath(raw: dict, where: str, metric: str | None) -> EvalItem:
    record_id, question = text_field(raw, "question_id", where), text_field(raw, "question", where)
    paragraphs = get_field(raw, "paragraphs", list, where, "paragraphs", "a list of strings")
    if not all(isinstance(p, str) for p in paragraphs):
        raise DataError(f"{where}: field 'paragraphs' must be a list of strings")
    if raw.get("ground_truth") is None:
        raise DataError(f"{where}: missing field 'ground_truth' (DocMath-Eval hides it in its test split: "
                        "use a testmini file)")
    truth = raw["ground_truth"]
    if not isinstance(truth, (int, float)) or isinstance(truth, bool):
        raise DataError(f"{where}: field 'ground_truth' must be a number, got {type(truth).__name__}")
    documents = [Document(title="", text=p.strip()) for p in paragraphs if p.strip()]
    metadata = {key: raw[key] for key in ("source", "table_evidence", "paragraph_evidence") if key in raw}
    return _item("docmath", record_id, question, documents, [str(truth)], metric or "numeric", metadata=metadata)


_PARSERS: dict[str, Callable[[dict, str, str | None], EvalItem]] = {
    "longbench": _longbench, "longbench_v2": _longbench_v2, "ruler_qa": _ruler_qa, "docmath": _docmath,
}


def _load_json_records(path: str, fmt: str, metric: str | None, limit: int) -> list[EvalItem]:
    """Records of a JSONL file or JSON list, parsed by ``fmt``'s parser; duplicate ids are errors."""
    items: list[EvalItem] = []
    first_seen: dict[str, str] = {}
    for line, index, raw in raw_records(path):
        where = f"{path}:{line}" if index is None else f"{path}:{line}: element {index}"
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        item = _PARSERS[fmt](raw, where, metric)
        if item.sample.id in first_seen:
            raise DataError(f"{where}: duplicate id {item.sample.id!r} (first at {first_seen[item.sample.id]})")
        first_seen[item.sample.id] = where
        items.append(item)
        if limit and len(items) == limit:
            break
    return items


def _load_frames(path: str, metric: str | None, limit: int) -> list[EvalItem]:
    """The Frames TSV (or CSV): a header row, then one question per row (quoted fields may span lines)."""
    csv.field_size_limit(max(csv.field_size_limit(), min(sys.maxsize, 2**31 - 1)))  # a context column is long
    items: list[EvalItem] = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="," if path.lower().endswith(".csv") else "\t")
        header = reader.fieldnames or []
        for column in ("Prompt", "Answer"):
            if column not in header:
                raise DataError(f"{path}:1: missing column '{column}' (a Frames file has Prompt, Answer, "
                                f"reasoning_types, wiki_links; this header has {header[:8]})")
        start = reader.line_num + 1
        for row_index, row in enumerate(reader):
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if None in row:
                raise DataError(f"{where}: the row has more fields than the header")
            question, answer = (row.get(key) or "" for key in ("Prompt", "Answer"))
            for key, value in (("Prompt", question), ("Answer", answer)):
                if not value.strip():
                    raise DataError(f"{where}: field '{key}' is empty")
            context = (row.get("context") or "").strip()
            documents = [Document(title="", text=context)] if context else []
            metadata = {key: row[key] for key in ("reasoning_types", "wiki_links") if row.get(key)}
            items.append(_item("frames", str(row_index), question.strip(), documents, [answer.strip()],
                               metric or "f1", metadata=metadata))
            if limit and len(items) == limit:
                break
    return items


def _load_lcr(path: str, metric: str | None, limit: int, contexts: tuple[str, ...]) -> list[EvalItem]:
    samples = read_samples(path)
    return [EvalItem(sample=s, metric=metric or sample_metric(s), contexts=contexts)
            for s in (samples[:limit] if limit else samples)]


LOADERS: dict[str, Callable[[str, str | None, int, tuple[str, ...]], list[EvalItem]]] = {
    **{fmt: (lambda path, metric, limit, contexts, fmt=fmt: _load_json_records(path, fmt, metric, limit))
       for fmt in _PARSERS},
    "frames": lambda path, metric, limit, contexts: _load_frames(path, metric, limit),
    "lcr": _load_lcr,
}
"""Format -> reader ``(path, metric override, limit, contexts) -> items``."""


def detect_format(path: str) -> str:
    """The format of ``path`` (see the module docstring); a DataError naming ``path:line`` if unknown."""
    if Path(path).suffix.lower() in (".tsv", ".csv"):
        return "frames"
    records = raw_records(path)
    try:
        line, index, raw = next(records)
    except StopIteration:
        raise DataError(f"{path}: no records") from None
    finally:
        records.close()
    where = f"{path}:{line}" if index is None else f"{path}:{line}: element {index}"
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    for fmt, fields in _SIGNATURES:
        if fields <= raw.keys():
            return fmt
    raise DataError(f"{where}: cannot tell the benchmark format from the fields {sorted(raw)[:10]}; "
                    f"pass --format (one of {', '.join(FORMATS)})")


def load_benchmark(path: str, fmt: str = "auto", *, metric: str | None = None, limit: int = 0,
                   contexts: tuple[str, ...] = ("short", "long")) -> Benchmark:
    """Read and check ``path``: its first ``limit`` records (0: all), each scored by ``metric`` when
    given; ``contexts`` are the contexts megatron_lcr samples are prompted with."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown format {fmt!r} (known: auto, {', '.join(FORMATS)})")
    items = LOADERS[fmt](path, metric, limit, contexts)
    if not items:
        raise DataError(f"{path}: no records")
    return Benchmark(path=path, format=fmt, items=items)
