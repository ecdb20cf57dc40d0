"""Loaders read hand-written fixtures in each released format and reject malformed files with
``file:line:`` errors that name the field."""

import json
import logging
from pathlib import Path

import pytest

from megatron_lcr.data.formats import LOADERS, LONGBENCH_SUMMARY_QUESTION, QARecord, load_qa
from megatron_lcr.data.schema import DataError, Document, Sample, write_samples

FIXTURES = Path(__file__).parent / "fixtures"


def _titles(docs: list[Document]) -> list[str]:
    return [doc.title for doc in docs]


def test_registry_names_every_format():
    assert set(LOADERS) == {"musique", "hotpotqa", "2wiki", "longbench", "lcr"}
    with pytest.raises(DataError, match="unknown format 'squad'"):
        load_qa(str(FIXTURES / "hotpot.json"), "squad")


def test_musique_skips_unanswerable_and_keeps_aliases(caplog):
    path = str(FIXTURES / "musique.jsonl")
    with caplog.at_level(logging.INFO, logger="megatron_lcr.data.formats"):
        records = load_qa(path, "musique")
    assert f"{path}: skipped 1 unanswerable records, kept 2" in caplog.messages
    first, second = records
    assert [r.id for r in records] == ["2hop__13548_13529", "3hop1__9971_106477_107926"]
    assert first.question == "In which county was the author of The Old Man and the Sea born?"
    assert first.answers == ["Cook County", "Cook County, Illinois", "Cook"]
    assert _titles(first.gold) == ["The Old Man and the Sea", "Ernest Hemingway"]
    assert first.gold[1].text == (
        "Ernest Miller Hemingway was an American novelist and short-story writer. "
        "He was born in Oak Park, Illinois, in Cook County, on July 21, 1899."
    )
    assert _titles(first.distractors) == ["A Farewell to Arms", "Chicago", "Oak Park, Illinois", "Key West"]
    assert first.source == "musique" and first.metadata == {"hops": 2}
    assert second.answers == ["Helsinki", "Helsingfors"]
    assert _titles(second.gold) == ["Linux", "Linus Torvalds", "University of Helsinki"]
    assert second.metadata == {"hops": 3}
    assert not first.eval_only


def test_hotpotqa_gold_paragraphs_keep_sentence_spacing():
    records = load_qa(str(FIXTURES / "hotpot.json"), "hotpotqa")
    assert [r.id for r in records] == [
        "5a8b57f25542995d1e6f1371", "5a8c7595554299585d9e36b6", "5a85ea095542994775f606a8",
    ]
    comparison, bridge, third = records
    assert comparison.answers == ["yes"]
    # Supporting-fact order, not context order.
    assert _titles(comparison.gold) == ["Scott Derrickson", "Ed Wood"]
    assert comparison.gold[0].text == (
        "Scott Derrickson (born July 16, 1966) is an American director, screenwriter and producer. "
        "He lives in Los Angeles, California. He is best known for directing horror films such as \"Sinister\"."
    )
    assert _titles(comparison.distractors) == ["Ed Wood (film)", "Woodson, Arkansas"]
    assert comparison.metadata == {
        "supporting_facts": [["Scott Derrickson", 0], ["Ed Wood", 0]], "type": "comparison", "level": "hard",
    }
    assert bridge.answers == ["Chief of Protocol"]
    assert _titles(bridge.gold) == ["Kiss and Tell (1945 film)", "Shirley Temple"]
    assert bridge.gold[1].text.endswith(
        "diplomat. As an adult, she was named United States ambassador to Ghana and to Czechoslovakia and also "
        "served as Chief of Protocol of the United States."
    )
    # A trailing empty sentence adds nothing; a paragraph with no sentences is dropped.
    assert third.distractors == [
        Document(title="Great Stone Face", text="The Great Stone Face is a natural rock formation in New Hampshire.")
    ]


def test_2wiki_joins_unspaced_sentences_with_a_space():
    records = load_qa(str(FIXTURES / "2wiki.json"), "2wiki")
    comparison, compositional = records
    assert comparison.answers == ["no"]
    assert _titles(comparison.gold) == [
        "Move (1970 film)", "Méditerranée (1963 film)", "Stuart Rosenberg", "Jean-Daniel Pollet",
    ]
    assert comparison.gold[0].text == (
        "Move is a 1970 American comedy film starring Elliott Gould, Paula Prentiss and Genevieve Waite, and "
        "directed by Stuart Rosenberg. The screenplay was written by Joel Lieber and Stanley Hart, adapted from "
        "a novel by Lieber."
    )
    assert _titles(comparison.distractors) == ["Brian Saenz"]
    assert comparison.metadata["type"] == "comparison"
    assert comparison.metadata["evidences"][2] == ["Stuart Rosenberg", "country of citizenship", "American"]
    assert compositional.answers == ["Małgorzata Braunek"]
    assert _titles(compositional.gold) == ["Polish-Russian War (film)", "Xawery Żuławski"]
    assert compositional.gold[1].text.endswith(
        "Łódź. He is the son of actress Małgorzata Braunek and director Andrzej Żuławski."
    )
    assert compositional.source == "2wiki"


def test_longbench_records_are_evaluation_only():
    qa, summary = load_qa(str(FIXTURES / "longbench.jsonl"), "longbench")
    assert qa.eval_only and qa.gold == []
    assert qa.question == "Which case was brought to court first Miller v. California or Gates v. Collier ?"
    assert qa.answers == ["Miller v. California"]
    # Split on blank lines (one of them holds spaces).
    assert [doc.text for doc in qa.distractors] == [
        "Passage 1:\nMiller v. California\nMiller v. California, 413 U.S. 15 (1973), was a landmark decision of the "
        "United States Supreme Court.",
        "Passage 2:\nGates v. Collier\nGates v. Collier, 501 F.2d 1291 (5th Cir. 1974), was a case decided in "
        "federal court.",
        "Passage 3:\nOrange County\nOrange County is a county in the U.S. state of California.",
    ]
    assert qa.metadata == {"dataset": "hotpotqa", "length": 52, "language": "en"}
    # No blank line: kept whole. Summarisation sets have an empty input: a fixed instruction stands in.
    assert len(summary.distractors) == 1 and summary.distractors[0].text.startswith("The Government Accountability")
    assert summary.question == LONGBENCH_SUMMARY_QUESTION
    assert summary.metadata["dataset"] == "gov_report"


def test_lcr_samples_map_back_to_records(tmp_path):
    gold = [Document(title="G", text="gold text")]
    other = Document(title="D", text="distractor")
    extra = Document(title="E", text="long only")
    path = str(tmp_path / "samples.jsonl")
    write_samples(path, [
        Sample(id="s1", family="musique", question="Q?", answers=["A", "a"], metric="em", gold_documents=gold,
               short_context=[other, gold[0]], long_context=[extra, other, gold[0]], metadata={"hops": 2}),
        Sample(id="s2", family="longbench", question="Q2?", answers=["B"], metric="f1", gold_documents=[],
               short_context=[], long_context=[other, extra]),
    ])
    trainable, evaluation = load_qa(path, "lcr")
    assert trainable == QARecord(id="s1", question="Q?", answers=["A", "a"], gold=gold, distractors=[other],
                                 source="musique", metadata={"hops": 2, "metric": "em"})
    assert evaluation.eval_only and evaluation.distractors == [other, extra]


# ---------------------------------------------------------------------------------------------
# Malformed files: every error starts with file:line: and names the field


def _jsonl_lines(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text(encoding="utf-8").splitlines()]


def _write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def _musique_case(mutate):
    def make(tmp_path: Path) -> str:
        records = _jsonl_lines("musique.jsonl")
        mutate(records)
        return _write_jsonl(tmp_path / "musique.jsonl", records)
    return make


MUSIQUE_CASES = {
    "missing paragraphs": (_musique_case(lambda r: r[2].pop("paragraphs")), 3, "missing field 'paragraphs'"),
    "is_supporting not bool": (
        _musique_case(lambda r: r[0]["paragraphs"][1].update(is_supporting="yes")), 1,
        "field 'paragraphs[1].is_supporting' must be a boolean",
    ),
    "no supporting paragraph": (
        _musique_case(lambda r: [p.update(is_supporting=False) for p in r[2]["paragraphs"]]), 3,
        "field 'paragraphs': no paragraph has is_supporting",
    ),
    "empty answer": (_musique_case(lambda r: r[2].update(answer=" ")), 3, "field 'answer' is empty"),
    "empty alias": (
        _musique_case(lambda r: r[0].update(answer_aliases=["Cook", ""])), 1, "field 'answer_aliases[1]' is empty",
    ),
    "answerable not bool": (
        _musique_case(lambda r: r[1].update(answerable="no")), 2, "field 'answerable' must be a boolean",
    ),
    "duplicate id": (
        _musique_case(lambda r: r[2].update(id=r[0]["id"])), 3,
        "field 'id': duplicate id '2hop__13548_13529' (first at line 1)",
    ),
}


@pytest.mark.parametrize("case", list(MUSIQUE_CASES))
def test_musique_errors_name_line_and_field(tmp_path, case):
    make, line, message = MUSIQUE_CASES[case]
    path = make(tmp_path)
    with pytest.raises(DataError) as err:
        load_qa(path, "musique")
    assert str(err.value).startswith(f"{path}:{line}: ")
    assert message in str(err.value)


def test_jsonl_invalid_json_names_the_line(tmp_path):
    lines = (FIXTURES / "musique.jsonl").read_text(encoding="utf-8").splitlines()
    lines[1] = lines[1][:-1]  # drop the closing brace
    path = tmp_path / "musique.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:2: invalid JSON"):
        load_qa(str(path), "musique")


def test_jsonl_lines_end_only_at_newlines(tmp_path):
    records = _jsonl_lines("musique.jsonl")
    records[0]["paragraphs"][0]["paragraph_text"] += "\u2028Line separator inside a string."
    records[2]["answer"] = ""
    path = tmp_path / "musique.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:3: field 'answer' is empty"):
        load_qa(str(path), "musique")


# In the pretty-printed fixtures the elements start on these lines (checked by hand).
HOTPOT_STARTS = [2, 16, 30]
WIKI2_STARTS = [2, 18]


def _edit(tmp_path: Path, name: str, old: str, new: str) -> str:
    """Replace one exact snippet of a fixture, keeping every line where it was."""
    text = (FIXTURES / name).read_text(encoding="utf-8")
    assert text.count(old) == 1 and old.count("\n") == new.count("\n")
    path = tmp_path / name
    path.write_text(text.replace(old, new), encoding="utf-8")
    return str(path)


HOTPOT_CASES = {
    "sentences not a list": (
        '["Woodson, Arkansas", ["Woodson is a census-designated place (CDP) in Pulaski County, Arkansas, in the '
        'United States."]]',
        '["Woodson, Arkansas", "Woodson is a census-designated place (CDP) in Pulaski County, Arkansas, in the '
        'United States."]', 0,
        "field 'context[2][1]' must be a list of sentences",
    ),
    "context item not a pair": (
        '["Janet Waldo", [', '["Janet Waldo", "x", [', 1, "field 'context[3]' must be a [title, sentences] pair",
    ),
    "supporting title not in context": (
        '[["Big Stone Gap (film)", 0]', '[["Big Stone Gap (movie)", 0]', 2,
        "field 'supporting_facts[0][0]': title 'Big Stone Gap (movie)' is not in 'context'",
    ),
    "supporting fact not a pair": (
        '["Ed Wood", 0]]', '["Ed Wood", "0"]]', 0, "field 'supporting_facts[1]' must be a [title, sent_id] pair",
    ),
    "empty answer": ('"answer": "Chief of Protocol"', '"answer": ""', 1, "field 'answer' is empty"),
    "question not a string": (
        '"question": "Were Scott Derrickson and Ed Wood of the same nationality?"', '"question": null', 0,
        "field 'question' must be a string, got NoneType",
    ),
    "missing id": ('"_id": "5a85ea095542994775f606a8",', '"id": "5a85ea095542994775f606a8",', 2, "missing field '_id'"),
    "duplicate id": (
        '"_id": "5a85ea095542994775f606a8"', '"_id": "5a8c7595554299585d9e36b6"', 2,
        "field '_id': duplicate id '5a8c7595554299585d9e36b6' (first at line 16, element 1)",
    ),
}


@pytest.mark.parametrize("case", list(HOTPOT_CASES))
def test_hotpot_errors_name_element_line_and_field(tmp_path, case):
    old, new, element, message = HOTPOT_CASES[case]
    path = _edit(tmp_path, "hotpot.json", old, new)
    with pytest.raises(DataError) as err:
        load_qa(path, "hotpotqa")
    assert str(err.value).startswith(f"{path}:{HOTPOT_STARTS[element]}: element {element}: ")
    assert message in str(err.value)


def test_json_array_syntax_errors_name_the_line(tmp_path):
    path = _edit(tmp_path, "hotpot.json", '  "level": "medium"\n },', '  "level": "medium",\n },')
    with pytest.raises(DataError, match=rf"^{path}:29: invalid JSON"):
        load_qa(path, "hotpotqa")
    path = _edit(tmp_path, "hotpot.json", '  "level": "hard"\n }\n]', '  "level": "hard"\n },\n]')
    with pytest.raises(DataError, match=rf"^{path}:44: invalid JSON \(trailing comma"):
        load_qa(path, "hotpotqa")
    path = tmp_path / "one_line.json"
    records = json.loads((FIXTURES / "hotpot.json").read_text(encoding="utf-8"))
    records[2]["context"][0] = ["Adriana Trigiani"]
    path.write_text(json.dumps(records), encoding="utf-8")  # the released files are one line
    with pytest.raises(DataError, match=rf"^{path}:1: element 2: field 'context\[0\]'"):
        load_qa(str(path), "hotpotqa")


WIKI2_CASES = {
    "missing supporting_facts": (
        '  "supporting_facts": [["Polish-Russian War (film)", 0], ["Xawery Żuławski", 2]],\n', '\n', 1,
        "missing field 'supporting_facts'",
    ),
    "evidence not a triple": (
        '["Xawery Żuławski", "mother", "Małgorzata Braunek"]', '["Xawery Żuławski", "mother"]', 1,
        "field 'evidences' must be a list of [subject, relation, object] triples",
    ),
}


@pytest.mark.parametrize("case", list(WIKI2_CASES))
def test_2wiki_errors_name_element_line_and_field(tmp_path, case):
    old, new, element, message = WIKI2_CASES[case]
    path = _edit(tmp_path, "2wiki.json", old, new)
    with pytest.raises(DataError) as err:
        load_qa(path, "2wiki")
    assert str(err.value).startswith(f"{path}:{WIKI2_STARTS[element]}: element {element}: ")
    assert message in str(err.value)


def _longbench_case(mutate):
    def make(tmp_path: Path) -> str:
        records = _jsonl_lines("longbench.jsonl")
        mutate(records)
        return _write_jsonl(tmp_path / "longbench.jsonl", records)
    return make


LONGBENCH_CASES = {
    "no answers": (_longbench_case(lambda r: r[1].update(answers=[])), 2, "field 'answers' is empty"),
    "answers not strings": (
        _longbench_case(lambda r: r[0].update(answers=[3])), 1, "field 'answers' must be a list of strings",
    ),
    "length not int": (_longbench_case(lambda r: r[0].update(length="52")), 1, "field 'length' must be an integer"),
    "missing context": (_longbench_case(lambda r: r[1].pop("context")), 2, "missing field 'context'"),
    "empty question outside summarisation": (
        _longbench_case(lambda r: r[0].update(input="")), 1, "field 'input' is empty",
    ),
    "not an object": (_longbench_case(lambda r: r.insert(1, ["a", "list"])), 2, "expected a JSON object, got list"),
}


@pytest.mark.parametrize("case", list(LONGBENCH_CASES))
def test_longbench_errors_name_line_and_field(tmp_path, case):
    make, line, message = LONGBENCH_CASES[case]
    path = make(tmp_path)
    with pytest.raises(DataError) as err:
        load_qa(path, "longbench")
    assert str(err.value).startswith(f"{path}:{line}: ")
    assert message in str(err.value)


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[\n]\n", encoding="utf-8")
    with pytest.raises(DataError, match="no records"):
        load_qa(str(path), "hotpotqa")


def test_out_of_range_sentence_id_warns_and_keeps_the_gold_paragraph(tmp_path, caplog):
    # Real HotpotQA training files contain a few such facts; the paragraph is gold by its title.
    text = (FIXTURES / "hotpot.json").read_text()
    assert '["Shirley Temple", 1]]' in text
    path = tmp_path / "hotpot.json"
    path.write_text(text.replace('["Shirley Temple", 1]]', '["Shirley Temple", 2]]'))
    with caplog.at_level("WARNING"):
        records = load_qa(str(path), "hotpotqa")
    assert "sentence 2 is out of range for 'Shirley Temple' (2 sentences)" in caplog.text
    original = load_qa(str(FIXTURES / "hotpot.json"), "hotpotqa")
    assert [r.gold for r in records] == [r.gold for r in original]
