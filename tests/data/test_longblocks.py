"""LongBlocks: determinism, token budgets, short/long containment, answerability by a rule-based reader."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from megatron_lcr.data.longblocks import FAMILIES, FILLERS, LongBlocksConfig, generate, solve
from megatron_lcr.data.schema import Sample, read_samples, render_context, write_samples
from megatron_lcr.data.tokenizer import load_tokenizer, token_counter

BUDGETS = [(256, 1024), (1024, 8192)]
PER_FAMILY = 30


def count_words(text: str) -> int:
    return len(text.split())


@pytest.fixture(scope="module")
def count_tiny():
    return token_counter(load_tokenizer())


@pytest.fixture(scope="module")
def samples(count_tiny):
    """``(short, long) -> samples`` with the tiny tokenizer as the counter, 30 per family."""
    return {
        (short, long): generate(
            LongBlocksConfig(num_samples=PER_FAMILY * len(FAMILIES), seed=7, short_tokens=short, long_tokens=long),
            count_tiny,
        )
        for short, long in BUDGETS
    }


@pytest.fixture(scope="module")
def word_samples():
    return {
        (short, long): generate(
            LongBlocksConfig(num_samples=30, seed=7, short_tokens=short, long_tokens=long), count_words
        )
        for short, long in BUDGETS
    }


def all_samples(samples: dict) -> list[Sample]:
    return [s for group in samples.values() for s in group]


def rouge_l(candidate: str | None, reference: str) -> float:
    """ROUGE-L F1 over lowercased whitespace tokens (plain LCS dynamic programme)."""
    a, b = (candidate or "").lower().split(), reference.lower().split()
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    lcs = prev[-1]
    return 0.0 if lcs == 0 else 2 * lcs / (len(a) + len(b))


def distractors(sample: Sample) -> list:
    return [doc for doc in sample.long_context if doc not in sample.gold_documents]


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_byte_identical_files(tmp_path, count_tiny):
    cfg = LongBlocksConfig(num_samples=9, seed=11, short_tokens=256, long_tokens=1024)
    write_samples(tmp_path / "a.jsonl", generate(cfg, count_tiny))
    write_samples(tmp_path / "b.jsonl", generate(LongBlocksConfig(**vars(cfg)), count_tiny))
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    reread = read_samples(str(tmp_path / "a.jsonl"))  # the schema accepts every sample
    assert [s.to_json() for s in reread] == [s.to_json() for s in generate(cfg, count_tiny)]

    other = generate(LongBlocksConfig(num_samples=9, seed=12, short_tokens=256, long_tokens=1024), count_tiny)
    write_samples(tmp_path / "c.jsonl", other)
    assert (tmp_path / "c.jsonl").read_bytes() != (tmp_path / "a.jsonl").read_bytes()
    first = generate(cfg, count_tiny)
    assert all(x.question != y.question for x, y in zip(first, other))


def test_output_does_not_depend_on_string_hashing(tmp_path):
    # Two processes with different PYTHONHASHSEED: set/dict order of strings must not leak into the data.
    script = (
        "import sys; from megatron_lcr.data.longblocks import LongBlocksConfig, generate; "
        "from megatron_lcr.data.schema import write_samples; "
        "cfg = LongBlocksConfig(num_samples=6, seed=2, short_tokens=256, long_tokens=1024); "
        "write_samples(sys.argv[1], generate(cfg, lambda text: len(text.split())))"
    )
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-c", script, str(tmp_path / hash_seed)], env=env, check=True, timeout=120)
    assert (tmp_path / "1").read_bytes() == (tmp_path / "2").read_bytes()


def test_sample_i_depends_only_on_seed_and_i(count_tiny):
    cfg = dict(seed=5, short_tokens=256, long_tokens=1024)
    few = generate(LongBlocksConfig(num_samples=3, **cfg), count_tiny)
    more = generate(LongBlocksConfig(num_samples=6, **cfg), count_tiny)
    assert [s.to_json() for s in few] == [s.to_json() for s in more[:3]]


# --------------------------------------------------------------------------- budgets and containment


@pytest.mark.parametrize("budget", BUDGETS)
def test_token_lengths_within_ten_percent(samples, budget, count_tiny):
    short, long = budget
    assert Counter(s.family for s in samples[budget]) == {f: PER_FAMILY for f in FAMILIES}
    for s in samples[budget]:
        n_short, n_long = count_tiny(render_context(s.short_context)), count_tiny(render_context(s.long_context))
        assert 0.9 * short <= n_short <= 1.1 * short, (s.id, n_short)
        assert 0.9 * long <= n_long <= 1.1 * long, (s.id, n_long)
        assert (s.metadata["short_tokens"], s.metadata["long_tokens"]) == (n_short, n_long)


@pytest.mark.parametrize("budget", BUDGETS)
def test_budgets_follow_the_given_counter(word_samples, budget, count_tiny):
    short, long = budget
    for s in word_samples[budget]:
        assert 0.9 * short <= count_words(render_context(s.short_context)) <= 1.1 * short
        assert 0.9 * long <= count_words(render_context(s.long_context)) <= 1.1 * long
        # The same contexts in tiny-tokenizer tokens (digits and punctuation count) overshoot the budget.
        assert count_tiny(render_context(s.long_context)) > 1.1 * long


def test_long_is_a_strict_superset_of_short_and_gold_is_in_both(samples, word_samples):
    for s in all_samples(samples) + all_samples(word_samples):
        assert len(set(s.short_context)) == len(s.short_context)
        assert len(set(s.long_context)) == len(s.long_context)
        assert set(s.short_context) < set(s.long_context)
        assert set(s.gold_documents) <= set(s.short_context)
        assert s.metadata["gold_positions_short"] == [i for i, d in enumerate(s.short_context) if d in s.gold_documents]
        assert s.metadata["gold_positions_long"] == [i for i, d in enumerate(s.long_context) if d in s.gold_documents]
        assert len(s.metadata["gold_positions_short"]) == len(s.gold_documents)


def test_contexts_are_shuffled(samples):
    # Gold documents land at varied positions rather than always first.
    firsts = {s.metadata["gold_positions_long"][0] for s in samples[(1024, 8192)]}
    assert len(firsts) > 30


def test_sample_shape_per_family(samples):
    for s in all_samples(samples):
        assert s.metric == {"multihop": "em", "grounding": "em", "longform": "rougeL"}[s.family]
        if s.family == "multihop":
            assert len(s.gold_documents) == s.metadata["hops"] == len(s.metadata["relations"])
        if s.family == "longform":
            assert 3 <= s.metadata["hops"] <= 6 and 2 <= len(s.gold_documents) <= 4
            assert len(re.findall(r"\.(?: |$)", s.answers[0])) == s.metadata["hops"]  # one sentence per fact
    hops = Counter(s.metadata["hops"] for s in all_samples(samples) if s.family == "multihop")
    assert set(hops) == {1, 2, 3, 4}
    kinds = Counter(s.metadata["kind"] for s in all_samples(samples) if s.family == "grounding")
    assert set(kinds) == {"release", "weight", "source"}


def test_grounding_near_duplicates_differ_from_gold_in_one_sentence(samples):
    for budget, group in samples.items():
        for s in group:
            if s.family != "grounding":
                continue
            gold = s.gold_documents[0].text.split(". ")
            positions = s.metadata["near_duplicate_positions_long"]
            assert len(positions) == s.metadata["near_duplicates"] >= 2
            for i in positions:
                text = s.long_context[i].text.split(". ")
                assert len(text) == len(gold) and sum(a != b for a, b in zip(text, gold)) == 1
            if budget == (1024, 8192):  # room for all of them in the short context
                assert len(s.metadata["near_duplicate_positions_short"]) == len(positions)


# --------------------------------------------------------------------------- answerability


def test_solver_answers_every_question_from_short_and_long(samples):
    for s in all_samples(samples):
        assert solve(s, s.short_context) in s.answers, s.id
        assert solve(s, s.long_context) in s.answers, s.id
        assert solve(s, s.gold_documents) in s.answers, s.id


def test_every_gold_document_is_needed(samples):
    for s in samples[(256, 1024)]:
        for gold in s.gold_documents:
            without = [d for d in s.long_context if d != gold]
            assert solve(s, without) not in s.answers, (s.id, gold.title)


def test_distractors_alone_do_not_answer(samples):
    for s in all_samples(samples):
        only = distractors(s)
        if s.family == "longform":
            assert rouge_l(solve(s, only), s.answers[0]) < 0.2 < 0.99 < rouge_l(solve(s, s.long_context), s.answers[0])
        else:
            assert solve(s, only) not in s.answers, s.id
            # Stronger: no distractor (near-duplicates included) contains the answer as a whole word.
            answer = re.compile(r"(?<!\w)" + re.escape(s.answers[0]) + r"(?!\w)")
            assert not any(answer.search(f"{d.title}\n{d.text}") for d in only), s.id


# --------------------------------------------------------------------------- long-context noise


def _is_noise(doc) -> bool:
    """Every sentence is a filler template about the document's title (hence no fact, no answer)."""
    fillers = {t.format(n=doc.title) for group in FILLERS.values() for t in group}
    return all(sentence in fillers for sentence in re.split(r"(?<=\.) (?=[A-Z])", doc.text))


@pytest.fixture(scope="module")
def noise_samples(count_tiny):
    """``long_noise -> samples`` at (256, 1024), every family."""
    return {
        p: generate(LongBlocksConfig(num_samples=PER_FAMILY * len(FAMILIES), seed=7, short_tokens=256,
                                     long_tokens=1024, long_noise=p), count_tiny)
        for p in (0.5, 1.0)
    }


def test_long_noise_changes_only_what_the_long_context_adds(noise_samples, samples):
    for p, group in noise_samples.items():
        for s, plain in zip(group, samples[(256, 1024)]):
            # The question, gold documents and short context are drawn before the long context.
            assert (s.question, s.short_context, s.gold_documents) == (plain.question, plain.short_context,
                                                                        plain.gold_documents), s.id
            assert "noise_positions_long" not in plain.metadata
            extra = [i for i, doc in enumerate(s.long_context) if doc not in s.short_context]
            near = set(s.metadata.get("near_duplicate_positions_long", []))
            noise = [i for i in extra if i not in near and _is_noise(s.long_context[i])]
            assert s.metadata["noise_positions_long"] == noise, s.id
            if p == 1.0:  # every added document that is not a left-over near-duplicate is noise
                assert noise == [i for i in extra if i not in near], s.id
            if s.family == "longform":
                assert rouge_l(solve(s, s.long_context), s.answers[0]) > 0.99, s.id
            else:
                assert solve(s, s.long_context) in s.answers, s.id
            assert solve(s, [s.long_context[i] for i in noise]) is None, s.id
            assert abs(s.metadata["long_tokens"] - 1024) <= 0.1 * 1024


def test_long_noise_share_follows_the_probability(noise_samples):
    extra = noise = 0
    for s in noise_samples[0.5]:
        near = set(s.metadata.get("near_duplicate_positions_long", []))
        added = [doc for i, doc in enumerate(s.long_context) if doc not in s.short_context and i not in near]
        extra += len(added)
        noise += sum(map(_is_noise, added))
    # Binomial(n ~ 900, 0.5): +-0.1 is about six standard deviations.
    assert extra > 500 and 0.4 < noise / extra < 0.6, (noise, extra)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(short_tokens=1024, long_tokens=1024), r"long_tokens \(1024\) must exceed short_tokens \(1024\)"),
        (dict(short_tokens=1000, long_tokens=1200), r"long_tokens \(1200\) must exceed short_tokens \(1000\)"),
        (dict(families=("multihop", "trivia")), r"families \(\['multihop', 'trivia'\]\)"),
        (dict(min_hops=3, max_hops=2), r"min_hops \(3\) .* max_hops \(2\)"),
        (dict(max_facts=8), r"max_facts \(8\) must be <= 7"),
        (dict(tolerance=0.0), r"tolerance \(0.0\)"),
        (dict(long_noise=1.5), r"long_noise \(1.5\) must be in \[0, 1\]"),
    ],
)
def test_config_errors_name_the_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LongBlocksConfig(**kwargs)


def test_budget_too_small_for_the_gold_documents(count_tiny):
    with pytest.raises(ValueError, match=r"gold documents alone take ~\d+ tokens, over short_tokens \(40\)"):
        generate(LongBlocksConfig(num_samples=3, short_tokens=40, long_tokens=400), count_tiny)
