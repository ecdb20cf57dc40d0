"""`lcr data ...` through the real CLI: files on disk, exit codes, one-line errors, stats by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lcr.data.commands import context_lengths, stats_table
from megatron_lcr.data.schema import Document, Sample, read_samples, render_context
from megatron_lcr.data.tokenizer import load_tokenizer, token_counter

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures"


def lcr(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "megatron_lcr.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr[-2000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("lcr: error:")]
    return line


def test_longblocks_command_is_deterministic_and_within_budget(tmp_path):
    args = ["--num", "12", "--short-tokens", "256", "--long-tokens", "1024"]
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        proc = lcr("data", "longblocks", "--out", str(tmp_path / f"{name}.jsonl"), "--seed", seed, *args)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()
    count = token_counter(load_tokenizer())
    samples = read_samples(str(tmp_path / "a.jsonl"))
    assert {s.family for s in samples} == {"multihop", "grounding", "longform"}
    for sample in samples:
        assert abs(count(render_context(sample.short_context)) - 256) <= 25.6
        assert abs(count(render_context(sample.long_context)) - 1024) <= 102.4


def test_families_option_restricts_the_mix(tmp_path):
    out = tmp_path / "mh.jsonl"
    proc = lcr("data", "longblocks", "--out", str(out), "--num", "4", "--short-tokens", "256",
               "--long-tokens", "1024", "--families", "multihop")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {s.family for s in read_samples(str(out))} == {"multihop"}


def test_long_noise_option_fills_the_long_context_with_noise(tmp_path):
    out = tmp_path / "noise.jsonl"
    proc = lcr("data", "longblocks", "--out", str(out), "--num", "3", "--short-tokens", "256",
               "--long-tokens", "1024", "--long-noise", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for sample in read_samples(str(out)):
        extra = [i for i, doc in enumerate(sample.long_context) if doc not in sample.short_context]
        near = sample.metadata.get("near_duplicate_positions_long", [])
        assert sample.metadata["noise_positions_long"] == [i for i in extra if i not in near]
    bad = lcr("data", "longblocks", "--out", str(tmp_path / "bad.jsonl"), "--num", "3", "--long-noise", "1.5")
    assert bad.returncode != 0 and "long_noise (1.5) must be in [0, 1]" in bad.stderr
    assert not (tmp_path / "bad.jsonl").exists()


def test_contexts_command_builds_superset_contexts_from_hotpotqa(tmp_path):
    out = tmp_path / "hotpot.jsonl"
    distractors = tmp_path / "extra.jsonl"
    distractors.write_text("".join(json.dumps({"title": f"Filler {i}", "text": f"filler text number {i} " * 5}) + "\n"
                                   for i in range(40)))
    proc = lcr("data", "contexts", "--source", str(FIXTURES / "hotpot.json"), "--format", "hotpotqa", "--out",
               str(out), "--short-tokens", "400", "--long-tokens", "1200", "--distractors", str(distractors))
    assert proc.returncode == 0, proc.stderr[-2000:]
    samples = read_samples(str(out))
    assert len(samples) == 3
    for sample in samples:
        assert all(doc in sample.short_context for doc in sample.gold_documents)
        assert set(sample.short_context) < set(sample.long_context)


def test_stats_table_by_hand():
    docs = [Document(title="T", text="a b c")]
    sample = Sample(id="x", family="f", question="q", answers=["a"], metric="em", gold_documents=docs,
                    short_context=docs, long_context=docs + [Document(title="U", text="d e")])
    words = lambda text: len(text.split())  # noqa: E731 - a one-line counter
    # "Document [1] T\na b c" = 6 words; the long context adds "Document [2] U\nd e" = 5 more.
    lengths = context_lengths([sample, sample], words)
    assert lengths == {"short": [6, 6], "long": [11, 11]}
    table = stats_table({"train": lengths})
    assert "| train | short | 2 | 6 | 6 |" in table
    assert "| train | long | 2 | 11 | 11 |" in table


def test_stats_command_prints_one_row_per_split_and_kind(tmp_path):
    out = tmp_path / "dev.jsonl"
    assert lcr("data", "longblocks", "--out", str(out), "--num", "3", "--short-tokens", "256",
               "--long-tokens", "1024").returncode == 0
    proc = lcr("data", "stats", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| dev |")]
    assert [row.split("|")[2].strip() for row in rows] == ["short", "long"]
    assert all(row.split("|")[3].strip() == "3" for row in rows)


@pytest.mark.parametrize(
    "line, needle",
    [
        ('{"id": "x"', "invalid JSON"),
        ('{"id": "x", "family": "f", "question": "q", "answers": [], "metric": "em", "gold_documents": [], '
         '"short_context": [], "long_context": []}', "field 'answers' must be a non-empty list"),
        ('{"id": "x", "family": "f", "question": "q", "answers": ["a"], "metric": "bleu", "gold_documents": [], '
         '"short_context": [], "long_context": []}', "field 'metric' must be one of em, f1, rougeL"),
    ],
)
def test_malformed_sample_files_name_file_and_line(tmp_path, line, needle):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n" + line + "\n")
    message = one_error_line(lcr("data", "stats", str(bad)))
    assert f"{bad}:2:" in message and needle in message


def test_malformed_source_fails_without_writing_output(tmp_path):
    bad = tmp_path / "musique.jsonl"
    bad.write_text((FIXTURES / "musique.jsonl").read_text().replace('"question"', '"questionz"', 1))
    out = tmp_path / "out.jsonl"
    message = one_error_line(lcr("data", "contexts", "--source", str(bad), "--format", "musique", "--out", str(out)))
    assert f"{bad}:1:" in message and "question" in message
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]
