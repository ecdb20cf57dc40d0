"""Length buckets at their edges, middle truncation against hand-built id lists, and the summaries."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_lcr.data.prompts import PromptConfig
from megatron_lcr.data.schema import Document, Sample
from megatron_lcr.data.tasks import TaskDataConfig
from megatron_lcr.eval.buckets import Scored, describe_buckets, length_bucket, summarize, summarize_groups
from megatron_lcr.eval.formats import Benchmark, EvalItem
from megatron_lcr.eval.run import build_prompts
from megatron_lcr.eval.truncate import truncate_middle
from megatron_lcr.train.task import TaskContext

TINY_BASE = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "base"


@pytest.mark.parametrize("tokens, bucket", [
    (0, "4K"), (1, "4K"), (4095, "4K"), (4096, "4K"), (4097, "8K"), (8192, "8K"), (8193, "16K"),
    (16384, "16K"), (16385, "32K"), (32768, "32K"), (32769, ">32K"), (10**6, ">32K"),
])
def test_length_bucket_edges(tokens, bucket):
    assert length_bucket(tokens) == bucket


def test_bucket_rule_as_results_state_it():
    assert describe_buckets() == ("prompt tokens n (model tokenizer, before truncation): 4K n<=4096, 8K 4096<n<=8192, "
                                  "16K 8192<n<=16384, 32K 16384<n<=32768, >32K n>32768")


def test_length_bucket_rejects_negative():
    with pytest.raises(ValueError, match="negative"):
        length_bucket(-1)


@pytest.mark.parametrize("max_tokens, kept", [
    (10, list(range(10))), (11, list(range(10))),       # fits: unchanged
    (4, [0, 1, 8, 9]),                                   # 2 head + 2 tail
    (5, [0, 1, 7, 8, 9]),                                # floor(5/2) = 2 head, ceil = 3 tail (LongBench's slices)
    (9, [0, 1, 2, 3, 5, 6, 7, 8, 9]),
    (1, [9]),                                            # 0 head, 1 tail: the end of the prompt survives
])
def test_truncate_middle_keeps_head_and_tail(max_tokens, kept):
    ids = list(range(10))
    out, truncated = truncate_middle(ids, max_tokens)
    assert out == kept
    assert truncated == (max_tokens < 10)
    assert ids == list(range(10))  # the input is not modified


def test_truncate_middle_equals_longbench_slices():
    ids = list(range(100, 137))  # 37 ids
    for max_len in range(1, 37):
        assert truncate_middle(ids, max_len)[0] == ids[:max_len // 2] + ids[-max_len // 2:]


def test_truncate_middle_rejects_empty_window():
    with pytest.raises(ValueError, match=">= 1"):
        truncate_middle([1, 2], 0)


def _row(score, em, bucket, truncated=False, **groups):
    return Scored(score=score, em=em, bucket=bucket, truncated=truncated, groups=groups)


def test_summarize_by_hand():
    rows = [_row(1.0, 1.0, "4K", context="short"), _row(0.5, 0.0, "8K", True, context="long"),
            _row(0.0, 0.0, "8K", True, context="long"), _row(0.25, 0.0, ">32K", context="short")]
    out = summarize(rows)
    assert out["n"] == 4 and out["truncated"] == 2
    assert out["score"] == pytest.approx(100 * 1.75 / 4) and out["em"] == pytest.approx(25.0)
    assert list(out["by_length"]) == ["4K", "8K", ">32K"]  # shortest first, empty buckets left out
    assert out["by_length"]["8K"] == {"n": 2, "score": pytest.approx(25.0), "em": 0.0, "truncated": 2}
    groups = summarize_groups(rows)
    assert list(groups["context"]) == ["short", "long"]
    assert groups["context"]["short"]["score"] == pytest.approx(62.5)
    assert groups["context"]["long"]["by_length"] == {"8K": {"n": 2, "score": pytest.approx(25.0), "em": 0.0,
                                                             "truncated": 2}}
    with pytest.raises(ValueError, match="nothing"):
        summarize([])


def test_long_prompt_is_bucketed_by_its_full_length_and_cut_to_the_window():
    """A prompt of > 4096 tokens lands in 8K however small the window, and what is sent is the head and
    tail of its full token ids."""
    task = TaskContext.create(TaskDataConfig(), PromptConfig(), TINY_BASE)
    # "river" is one token of the tiny tokenizer: 4200 of them make a > 4096-token prompt
    docs = [Document(title="River", text=" ".join(["river"] * 4200))]
    item = EvalItem(sample=Sample(id="x", family="ruler_qa", question="Which river?", answers=["Rhine"], metric="f1",
                                  gold_documents=[], short_context=docs, long_context=docs), metric="f1")
    short_docs = [Document(title="River", text="river")]
    small = EvalItem(sample=Sample(id="y", family="ruler_qa", question="Which river?", answers=["Rhine"], metric="f1",
                                   gold_documents=[], short_context=short_docs, long_context=short_docs), metric="f1")

    full = task.prompts([item.sample], "long")[0]
    assert 4096 < len(full) <= 8192
    prompts = build_prompts({"b": Benchmark(path="b", format="ruler_qa", items=[item, small])}, task, window=768)
    long, short = prompts
    assert long.tokens == len(full) and length_bucket(long.tokens) == "8K"
    assert long.truncated and long.ids == full[:384] + full[-384:]
    assert not short.truncated and short.ids == task.prompts([small.sample], "long")[0]
    rows = [Scored(score=0.0, em=0.0, bucket=length_bucket(p.tokens), truncated=p.truncated) for p in prompts]
    assert summarize(rows)["truncated"] == 1 and summarize(rows)["by_length"]["8K"]["truncated"] == 1
