"""eval/formats.py: each benchmark layout read from a hand-written fixture, detection, and one-line
errors that name file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_lcr.data.schema import DataError, Document
from megatron_lcr.eval.formats import CHOICE_INSTRUCTION, detect_format, load_benchmark

FIXTURES = Path(__file__).parent / "fixtures"
FORMAT_OF = {"longbench_hotpotqa.jsonl": "longbench", "longbench_v2.json": "longbench_v2",
             "ruler_qa_1.jsonl": "ruler_qa", "docmath_testmini.json": "docmath", "frames_test.tsv": "frames",
             "lcr.jsonl": "lcr"}


@pytest.mark.parametrize("name", sorted(FORMAT_OF))
def test_detect_format(name):
    assert detect_format(str(FIXTURES / name)) == FORMAT_OF[name]


def test_longbench_v1_mapping():
    items = load_benchmark(str(FIXTURES / "longbench_hotpotqa.jsonl")).items
    first = items[0].sample
    assert [i.sample.id for i in items] == ["lb-1", "lb-2", "lb-3"]
    assert first.question == "Which city is the capital of the country where the Eiffel Tower stands?"
    # the context split on blank lines: one document per passage
    assert first.long_context == [Document(title="", text="Passage 1:\nEiffel Tower\nThe Eiffel Tower is a tower in France."),
                                  Document(title="", text="Passage 2:\nFrance\nParis is the capital of France.")]
    assert items[2].sample.answers == ["1987", "in 1987"]
    assert {i.metric for i in items} == {"f1"} and all(i.contexts == ("long",) for i in items)
    assert first.metadata["dataset"] == "hotpotqa" and first.metadata["length"] == 24


def test_longbench_v2_mapping():
    items = load_benchmark(str(FIXTURES / "longbench_v2.json")).items
    second = items[1]
    assert second.sample.question == ("Which team won the final?\n\n(A) The Reds\n(B) The Blues\n(C) The Greens\n"
                                      f"(D) The Whites\n\n{CHOICE_INSTRUCTION}")
    assert second.sample.answers == ["D"] and second.metric == "choice"
    assert second.groups == {"length": "medium", "difficulty": "hard"}
    assert [i.groups["length"] for i in items] == ["short", "medium", "long"]
    assert second.sample.long_context == [Document(title="", text="Article one: the Reds lost in the semi final. "
                                                                   "Article two: the Whites beat the Blues in the final.")]
    assert second.sample.metadata == {"domain": "Multi-Document QA", "sub_domain": "News"}


def test_ruler_qa_mapping():
    items = load_benchmark(str(FIXTURES / "ruler_qa_1.jsonl")).items
    assert [i.sample.id for i in items] == ["0", "1"]
    first = items[0].sample
    assert first.question == "Which country is the city on the Rhine in?"
    # RULER's instruction lines are dropped; its "Document N:" documents become ours
    assert first.long_context == [Document(title="", text="The Rhine flows through Basel."),
                                  Document(title="", text="Basel is a city in Switzerland.")]
    assert items[1].sample.answers == ["Marie Curie", "Curie"] and items[1].metric == "f1"
    assert first.metadata == {"source_length": 64}


def test_ruler_qa_without_newlines(tmp_path):
    """RULER's --remove_newline_tab joins everything onto one line: the markers still split it."""
    record = json.loads((FIXTURES / "ruler_qa_1.jsonl").read_text().splitlines()[0])
    record["input"] = " ".join(record["input"].split())
    path = tmp_path / "flat.jsonl"
    path.write_text(json.dumps(record) + "\n")
    sample = load_benchmark(str(path)).items[0].sample
    assert [d.text for d in sample.long_context] == ["The Rhine flows through Basel.", "Basel is a city in Switzerland."]
    assert sample.question == "Which country is the city on the Rhine in?"


def test_docmath_mapping():
    items = load_benchmark(str(FIXTURES / "docmath_testmini.json")).items
    assert [i.sample.answers for i in items] == [["12.5"], ["0.25"], ["1500"]]
    assert {i.metric for i in items} == {"numeric"}
    first = items[0].sample
    assert first.id == "dm-1" and len(first.long_context) == 2  # a paragraph and a markdown table
    assert first.long_context[1].text.startswith("| year | revenue")
    assert first.metadata == {"source": "finqa", "table_evidence": [1], "paragraph_evidence": [0]}


def test_frames_mapping():
    items = load_benchmark(str(FIXTURES / "frames_test.tsv")).items
    assert [i.sample.id for i in items] == ["0", "1"]
    assert items[1].sample.question == "Which is the highest mountain on Earth?\nGive its common English name."
    assert [i.sample.answers for i in items] == [["Jane Ballou"], ["Mount Everest"]]
    assert all(i.sample.long_context == [] for i in items)  # closed-book: the file has no context
    assert items[0].sample.metadata["reasoning_types"] == "Multiple constraints"


def test_frames_context_column(tmp_path):
    path = tmp_path / "frames.tsv"
    path.write_text("Prompt\tAnswer\tcontext\nWho?\tAnn\tAnn wrote it.\n")
    assert load_benchmark(str(path)).items[0].sample.long_context == [Document(title="", text="Ann wrote it.")]


def test_lcr_mapping_and_limit():
    items = load_benchmark(str(FIXTURES / "lcr.jsonl"), contexts=("long",)).items
    assert [(i.sample.id, i.metric, i.contexts) for i in items] == [("lcr-1", "em", ("long",)), ("lcr-2", "rougeL", ("long",))]
    assert len(load_benchmark(str(FIXTURES / "lcr.jsonl"), limit=1).items) == 1
    assert {i.metric for i in load_benchmark(str(FIXTURES / "lcr.jsonl"), metric="f1").items} == {"f1"}


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name, text, fmt, message", [
    ("lb.jsonl", '{"input": "q", "context": "c", "answers": ["a"], "length": 1, "dataset": "hotpotqa", "_id": "1"}\n'
     '\n{"input": "q", "context": "c", "answers": "a", "length": 1, "dataset": "hotpotqa", "_id": "2"}\n', "auto",
     r"lb\.jsonl:3: field 'answers' must be a list of strings"),
    ("lb.jsonl", '{"input": "q", "context": "c", "answers": ["a"], "length": 1, "dataset": "lcc", "_id": "1"}\n', "auto",
     r"lb\.jsonl:1: field 'dataset': LongBench set 'lcc' has no metric here .* pass --metric"),
    ("v2.json", '[\n {"_id": "a", "question": "q", "choice_A": "1", "choice_B": "2", "choice_C": "3", "choice_D": "4",\n'
     '  "answer": "E", "length": "short", "context": "c"}\n]\n', "auto",
     r"v2\.json:2: element 0: field 'answer' must be one of A, B, C, D, got 'E'"),
    ("v2.json", '[\n {"_id": "a", "question": "q", "choice_A": "1", "choice_B": "2", "choice_C": "3", "choice_D": "4",\n'
     '  "answer": "A", "length": "short", "context": "c"}\n]\n', "docmath",
     r"v2\.json:2: element 0: missing field 'question_id'"),
    ("dm.json", '[{"question_id": "1", "question": "q", "paragraphs": ["p"]}]', "auto",
     r"dm\.json:1: element 0: missing field 'ground_truth' \(DocMath-Eval hides it in its test split"),
    ("dm.json", '[{"question_id": "1", "question": "q", "paragraphs": ["p"], "ground_truth": true}]', "auto",
     r"dm\.json:1: element 0: field 'ground_truth' must be a number, got bool"),
    ("r.jsonl", '{"index": 0, "input": "no question here", "outputs": ["a"]}\n', "auto",
     r"r\.jsonl:1: field 'input' has no 'Question:'"),
    ("r.jsonl", '{"index": 0, "input": "Question: a?", "outputs": ["a"]}\n{"index": 0, "input": "Question: b?", '
     '"outputs": ["b"]}\n', "auto", r"r\.jsonl:2: duplicate id '0' \(first at .*r\.jsonl:1\)"),
    ("hotpot.json", '[{"_id": "x", "question": "q", "answer": "a", "supporting_facts": [], "context": []}]', "auto",
     r"hotpot\.json:1: element 0: cannot tell the benchmark format from the fields .*pass --format"),
    ("f.tsv", "Question\tAnswer\nq\ta\n", "auto", r"f\.tsv:1: missing column 'Prompt'"),
    ("f.tsv", 'Prompt\tAnswer\nq\ta\n"multi\nline"\t\n', "auto", r"f\.tsv:3: field 'Answer' is empty"),
    ("f.tsv", "Prompt\tAnswer\nq\ta\textra\n", "auto", r"f\.tsv:2: the row has more fields than the header"),
    ("bad.jsonl", '{"input": "q", "context": "c", "answers": ["a"]\n', "auto", r"bad\.jsonl:1: invalid JSON"),
    ("empty.jsonl", "\n", "auto", r"empty\.jsonl: no records"),
])
def test_errors_name_file_and_line(tmp_path, name, text, fmt, message):
    path = _write(tmp_path, name, text)
    with pytest.raises(DataError, match=message):
        load_benchmark(path, fmt)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        load_benchmark(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="unknown format 'ruler'"):
        load_benchmark(str(FIXTURES / "lcr.jsonl"), "ruler")
