"""``lcr eval --predictions`` on the hand-labelled fixture of every format: results.json equals the
scores computed by hand from fixed responses; bad input ends in one line naming file:line. The
command runs in this process (``cli.main``): these paths start no server."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from megatron_lcr.cli import main
from megatron_lcr.data.schema import DataError
from megatron_lcr.eval.run import read_predictions

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures"
TINY_BASE = REPO / "examples" / "tiny" / "base"
FILES = ["longbench_hotpotqa.jsonl", "longbench_v2.json", "ruler_qa_1.jsonl", "docmath_testmini.json",
         "frames_test.tsv", "lcr.jsonl"]

# (dataset, id, context) -> the fixed response scored by hand below
RESPONSES = {
    ("longbench_hotpotqa", "lb-1", "long"): "Answer: Paris",
    ("longbench_hotpotqa", "lb-2", "long"): "The founder.\nAnswer: John Smith",
    ("longbench_hotpotqa", "lb-3", "long"): "no answer here",
    ("longbench_v2", "v2-1", "long"): "Answer: B",
    ("longbench_v2", "v2-2", "long"): "Answer: (C) The Greens",
    ("longbench_v2", "v2-3", "long"): "It is aqua.\nAnswer: A.",
    ("ruler_qa_1", "0", "long"): "Answer: Switzerland.",
    ("ruler_qa_1", "1", "long"): "Answer: Pierre Curie",
    ("docmath_testmini", "dm-1", "long"): "Answer: 12.51%",
    ("docmath_testmini", "dm-2", "long"): "Answer: 25%",
    ("docmath_testmini", "dm-3", "long"): "Answer: $1,502.5 million",
    ("frames_test", "0", "long"): "Answer: Jane Ballou",
    ("frames_test", "1", "long"): "Answer: Everest",
    ("lcr", "lcr-1", "short"): "Answer: Ashby",
    ("lcr", "lcr-1", "long"): "Answer: Ashford",
    ("lcr", "lcr-2", "short"): "Answer: the river floods every spring",
    ("lcr", "lcr-2", "long"): "Answer: spring",
}

# Percent scores worked out by hand (score, EM):
HAND = {
    # F1: Paris 1; "John Smith" vs "John Smith Jr": P 1, R 2/3 -> 0.8; no Answer line -> 0. EM: 1, 0, 0
    "longbench_hotpotqa": (100 * 1.8 / 3, 100 / 3),
    # choice: B right, C (gold D) wrong, "A." -> A right. EM of the answers "B", "(C) The Greens", "A": 1, 0, 1
    "longbench_v2": (200 / 3, 200 / 3),
    # F1: Switzerland 1; "Pierre Curie" vs golds: "Marie Curie" 1/2, "Curie" P 1/2 R 1 -> 2/3, max 2/3. EM 1, 0
    "ruler_qa_1": (100 * (1 + 2 / 3) / 2, 50.0),
    # numeric (0.15%): 12.51 vs 12.5 in; 25% / 100 = 0.25 in; 1502.5 vs 1500: 2.5 > 2.25 out. EM all 0
    "docmath_testmini": (200 / 3, 0.0),
    # F1: Jane Ballou 1; "Everest" vs "Mount Everest": P 1, R 1/2 -> 2/3. EM 1, 0
    "frames_test": (100 * (1 + 2 / 3) / 2, 50.0),
    # em sample: short 1, long 0; rougeL sample: short 3/4 (LCS river floods spring of 4 and 4 tokens),
    # long [spring] vs 4 tokens -> 2 * 1 * 1/4 / (5/4) = 0.4. EM 1, 0, 0, 0
    "lcr": (100 * (1 + 0 + 0.75 + 0.4) / 4, 25.0),
}
HAND_GROUPS = {
    ("longbench_v2", "length", "short"): (100.0, 100.0), ("longbench_v2", "length", "medium"): (0.0, 0.0),
    ("longbench_v2", "length", "long"): (100.0, 100.0), ("longbench_v2", "difficulty", "easy"): (100.0, 100.0),
    ("longbench_v2", "difficulty", "hard"): (50.0, 50.0),
    ("lcr", "context", "short"): (87.5, 50.0), ("lcr", "context", "long"): (20.0, 0.0),
}


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def lcr(capsys):
    """``lcr ARGS`` in this process (no servers start in these tests): exit status, stdout, stderr."""
    def run(*args: str) -> Run:
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)
    return run


def _write_predictions(path: Path, responses: dict) -> None:
    path.write_text("".join(json.dumps({"dataset": d, "id": i, "context": c, "sample": j, "response": r}) + "\n"
                            for (d, i, c), rs in responses.items() for j, r in enumerate([rs] if isinstance(rs, str) else rs)))


def test_every_format_scores_as_by_hand(tmp_path, lcr):
    _write_predictions(tmp_path / "preds.jsonl", RESPONSES)
    out = tmp_path / "out"
    run = lcr("eval", "--model", str(TINY_BASE), "--data", *(str(FIXTURES / f) for f in FILES),
              "--predictions", str(tmp_path / "preds.jsonl"), "--out", str(out))
    assert run.returncode == 0, run.stderr
    results = json.loads((out / "results.json").read_text())
    assert set(results["datasets"]) == set(HAND)
    for name, (score, em) in HAND.items():
        got = results["datasets"][name]
        assert (got["score"], got["em"]) == (pytest.approx(score), pytest.approx(em)), name
        assert got["truncated"] == 0 and list(got["by_length"]) == ["4K"]  # every fixture prompt is short
        assert got["by_length"]["4K"]["score"] == pytest.approx(score)
    for (name, group, value), (score, em) in HAND_GROUPS.items():
        got = results["datasets"][name]["groups"][group][value]
        assert (got["score"], got["em"]) == (pytest.approx(score), pytest.approx(em)), (name, group, value)
    assert results["datasets"]["docmath_testmini"]["metric"] == "numeric"
    assert results["datasets"]["lcr"]["metric"] == "em, rougeL"
    # the table on stdout is results.md; one row per dataset and per group value
    assert run.stdout.strip() == (out / "results.md").read_text().strip()
    assert "| lcr | context=long | em, rougeL | 2 | 20.0 | 0.0 | 20.0 (2) | 0 |" in run.stdout
    assert (out / "by_length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len(RESPONSES)
    by_key = {(r["dataset"], r["id"], r["context"]): r for r in rows}
    assert by_key[("docmath_testmini", "dm-2", "long")]["answer"] == "25%"
    assert by_key[("longbench_hotpotqa", "lb-2", "long")]["score"] == pytest.approx(0.8)


def test_avg_at_k_and_metric_override(tmp_path, lcr):
    """Two samples per prompt: each prompt's score is their mean; --metric sub_em replaces F1."""
    responses = {("ruler_qa_1", "0", "long"): ["Answer: Switzerland", "Answer: France"],
                 ("ruler_qa_1", "1", "long"): ["Answer: Pierre Curie", "Answer: Marie Curie"]}
    _write_predictions(tmp_path / "preds.jsonl", responses)
    run = lcr("eval", "--model", str(TINY_BASE), "--data", str(FIXTURES / "ruler_qa_1.jsonl"), "--metric", "sub_em",
              "--samples", "2", "--temperature", "0.7", "--predictions", str(tmp_path / "preds.jsonl"),
              "--out", str(tmp_path / "out"), "--api-key", "sekret")
    assert run.returncode == 0, run.stderr
    assert "sekret" not in (tmp_path / "out" / "config.yaml").read_text()  # the API key is not written to disk
    got = json.loads((tmp_path / "out" / "results.json").read_text())["datasets"]["ruler_qa_1"]
    # sub_em: prompt 0: 1, 0 -> 0.5; prompt 1: "Pierre Curie" contains gold "Curie" -> 1, "Marie Curie" 1 -> 1
    assert got["score"] == pytest.approx(75.0) and got["n"] == 2 and got["metric"] == "sub_em"
    # EM: prompt 0: 1, 0 -> 0.5; prompt 1: 0, 1 -> 0.5
    assert got["em"] == pytest.approx(50.0)


def test_predictions_must_cover_every_prompt(tmp_path):
    from megatron_lcr.eval.formats import load_benchmark
    from megatron_lcr.eval.run import EvalPrompt

    item = load_benchmark(str(FIXTURES / "ruler_qa_1.jsonl")).items[0]
    prompts = [EvalPrompt(dataset="ruler_qa_1", item=item, context="long", ids=[1], tokens=1, truncated=False)]
    path = tmp_path / "p.jsonl"
    _write_predictions(path, {("ruler_qa_1", "0", "long"): ["Answer: a"]})
    with pytest.raises(DataError, match=r"p\.jsonl: no response 1 for dataset 'ruler_qa_1' id '0'"):
        read_predictions(str(path), prompts, samples=2)
    _write_predictions(path, {("ruler_qa_1", "9", "long"): "Answer: a"})
    with pytest.raises(DataError, match=r"p\.jsonl:1: no prompt \('ruler_qa_1', '9', 'long'\)"):
        read_predictions(str(path), prompts, samples=1)


def test_wrong_format_file_is_one_line_naming_file_and_line(tmp_path, lcr):
    bad = tmp_path / "bench.jsonl"
    good = '{"index": 0, "input": "Question: a?", "outputs": ["a"]}\n'
    bad.write_text(good + good.replace('"index": 0', '"index": 1') + '{"index": 2, "input": "Question: c?"}\n')
    out = tmp_path / "out"
    run = lcr("eval", "--model", str(TINY_BASE), "--data", str(bad), "--out", str(out))
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"lcr: error: {bad}:3: missing field 'outputs'"
    assert not out.exists()  # failed before any server started or anything was written


def test_missing_model_is_one_line(tmp_path, lcr):
    run = lcr("eval", "--model", str(tmp_path / "nope"), "--data", str(FIXTURES / "lcr.jsonl"), "--out", str(tmp_path / "o"))
    assert run.returncode == 1
    assert run.stderr.strip() == f"lcr: error: {tmp_path / 'nope'}: model directory not found"
    (tmp_path / "empty").mkdir()
    run = lcr("eval", "--model", str(tmp_path / "empty"), "--data", str(FIXTURES / "lcr.jsonl"), "--out", str(tmp_path / "o"))
    assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1
    assert "neither a Hugging Face model directory (no config.json) nor a megatron_lcr checkpoint" in run.stderr
