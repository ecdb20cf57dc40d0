"""``lcr eval`` end to end: a subprocess that launches ``lcr serve`` with the tiny base model, answers
LongBlocks samples (both contexts) and the RULER fixture greedily, and writes its results; every
number in results.json equals what rescoring predictions.jsonl by hand gives."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from megatron_lcr.data.longblocks import LongBlocksConfig, generate
from megatron_lcr.data.schema import write_samples
from megatron_lcr.data.tokenizer import load_tokenizer, token_counter
from megatron_lcr.rl.rewards import exact_match, token_f1

REPO = Path(__file__).resolve().parents[2]
TINY_BASE = REPO / "examples" / "tiny" / "base"
RULER = Path(__file__).parent / "fixtures" / "ruler_qa_1.jsonl"
# The instruction examples/tiny/sft_base.yaml trained the base model with.
INSTRUCTION = 'Answer the question from the documents. End with "Answer:" and the answer.'
WINDOW = 300  # long contexts (~370 tokens) are cut, short ones (~130) are not


def _hand_answer(response: str) -> str | None:
    """The text after the last 'Answer:', trimmed of spaces and final punctuation (no other decoration here)."""
    if "Answer:" not in response:
        return None
    return response.rsplit("Answer:", 1)[1].split("\n")[0].strip().rstrip(".,;:!?") or None


def _mean(values):
    values = list(values)
    return 100.0 * sum(values) / len(values)


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("eval_e2e")
    # Held-out LongBlocks like the base model's training data (sft_base.yaml), another seed.
    cfg = LongBlocksConfig(num_samples=4, seed=7, short_tokens=96, long_tokens=320, tolerance=0.25,
                           families=("multihop",), max_hops=1, max_fillers=1)
    write_samples(str(work / "blocks.jsonl"), generate(cfg, token_counter(load_tokenizer(TINY_BASE))))
    out = work / "out"
    run = subprocess.run(
        [sys.executable, "-m", "megatron_lcr.cli", "eval", "--model", str(TINY_BASE),
         "--data", str(work / "blocks.jsonl"), str(RULER), "--out", str(out), "--max-new-tokens", "12",
         "--max-prompt-tokens", str(WINDOW), "--instruction", INSTRUCTION],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return run, json.loads((out / "results.json").read_text()), rows, out


def test_outputs_and_structure(eval_run):
    run, results, rows, out = eval_run
    assert sorted(p.name for p in out.iterdir()) == ["by_length.png", "config.yaml", "logs", "predictions.jsonl",
                                                     "results.json", "results.md"]
    assert (out / "logs" / "server0.log").is_file()  # lcr serve was launched and logged
    assert results["source"] == "reference" and results["max_prompt_tokens"] == WINDOW
    assert results["decoding"] == {"temperature": 0.0, "samples": 1, "seed": 0, "max_new_tokens": 12}
    blocks, ruler = results["datasets"]["blocks"], results["datasets"]["ruler_qa_1"]
    assert (blocks["items"], blocks["n"], ruler["items"], ruler["n"]) == (4, 8, 2, 2)
    assert list(blocks["groups"]) == ["context"] and list(blocks["groups"]["context"]) == ["short", "long"]
    assert ruler["groups"] == {} and ruler["metric"] == "f1" and blocks["metric"] == "em"
    assert len(rows) == 10 and {r["finish_reason"] for r in rows} <= {"stop", "length"}
    assert run.stdout.strip() == (out / "results.md").read_text().strip()


def test_results_equal_predictions_rescored_by_hand(eval_run):
    _, results, rows, _ = eval_run
    groups = defaultdict(list)
    for r in rows:
        answer = _hand_answer(r["response"])
        assert r["answer"] == answer
        score = (exact_match if r["metric"] == "em" else token_f1)(answer, r["gold"])
        assert r["score"] == score and r["em"] == exact_match(answer, r["gold"])
        assert r["truncated"] == (r["prompt_tokens"] > WINDOW) and r["length_bucket"] == "4K"
        groups[(r["dataset"], "all")].append(r)
        if r["dataset"] == "blocks":
            groups[(r["dataset"], r["context"])].append(r)
    for (name, subset), members in groups.items():
        got = results["datasets"][name] if subset == "all" else results["datasets"][name]["groups"]["context"][subset]
        assert got["n"] == len(members)
        assert got["score"] == pytest.approx(_mean(r["score"] for r in members))
        assert got["em"] == pytest.approx(_mean(r["em"] for r in members))
        assert got["truncated"] == sum(r["truncated"] for r in members)
        assert got["by_length"]["4K"]["score"] == pytest.approx(got["score"])
    blocks = results["datasets"]["blocks"]["groups"]["context"]
    assert blocks["long"]["truncated"] == 4 and blocks["short"]["truncated"] == 0  # long prompts were cut
    # the tiny model answers from its short context (it was trained so): generation and scoring are live
    assert blocks["short"]["em"] > 0


def test_checkpoint_is_exported_and_answers_like_its_hf_model(eval_run, tmp_path):
    """A megatron_lcr checkpoint of the same model gives the same greedy responses, and its temporary
    Hugging Face export is gone afterwards."""
    _, _, rows, out = eval_run
    ckpt, ckpt_out = tmp_path / "ckpt", tmp_path / "out"
    convert = subprocess.run([sys.executable, "-m", "megatron_lcr.cli", "convert", "hf-to-megatron", "--hf",
                              str(TINY_BASE), "--out", str(ckpt)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert convert.returncode == 0, convert.stderr[-3000:]
    run = subprocess.run(
        [sys.executable, "-m", "megatron_lcr.cli", "eval", "--model", str(ckpt), "--data",
         str(out.parent / "blocks.jsonl"), "--limit", "1", "--out", str(ckpt_out), "--max-new-tokens", "12",
         "--max-prompt-tokens", str(WINDOW), "--instruction", INSTRUCTION],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "exporting checkpoint" in run.stderr
    got = [json.loads(line) for line in (ckpt_out / "predictions.jsonl").read_text().splitlines()]
    first = rows[0]["id"]
    assert [(r["id"], r["context"], r["response"]) for r in got] == \
        [(r["id"], r["context"], r["response"]) for r in rows if r["dataset"] == "blocks" and r["id"] == first]
    assert not (ckpt_out / ".model_hf").exists()
    assert json.loads((ckpt_out / "results.json").read_text())["model"] == str(ckpt)
