"""Middle truncation of prompts longer than the model's window, as LongBench does.

LongBench's ``pred.py`` keeps ``input_ids[:max_len // 2] + input_ids[-max_len // 2:]`` of an
over-long prompt: the first ``floor(max_len / 2)`` and the last ``ceil(max_len / 2)`` tokens, so the
task instruction at the head and the question at the tail survive and the middle of the context
goes. Here the same cut is applied to the token ids of the whole prompt (chat template included),
not to the text before templating, and the ids are sent as they are: LongBench decodes the kept ids
back to text and tokenizes again, which can change the count by a few tokens at the cut.
"""

from __future__ import annotations

from collections.abc import Sequence


def truncate_middle(ids: Sequence[int], max_tokens: int) -> tuple[list[int], bool]:
    """``(kept ids, whether any were dropped)``: all of ``ids`` when they fit in ``max_tokens``,
    else the first ``max_tokens // 2`` and the last ``max_tokens - max_tokens // 2`` of them."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    ids = list(ids)
    if len(ids) <= max_tokens:
        return ids, False
    head = max_tokens // 2
    return ids[:head] + ids[len(ids) - (max_tokens - head):], True
