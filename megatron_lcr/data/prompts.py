"""Prompts for short- and long-context samples, and extraction of the final answer from a response.

DePO (RL on the short context, distillation to the long context) needs the two prompts of a sample
to differ *only* in the context block, so the one thing the policy sees change is the context. The
user message is therefore built in a fixed order, ``instruction``, rendered context
(:func:`~megatron_lcr.data.schema.render_context`), ``Question: ...``, and wrapped by the tokenizer's
chat template (or a plain template for base models); nothing else depends on which context is shown.

What holds (tested in ``tests/data/test_prompts.py``):

* Text: the short and long prompt texts are ``head + short_context + tail`` and
  ``head + long_context + tail`` with the same ``head`` and ``tail`` (for any chat template that
  does not transform the message content).
* Tokens: ``prompt_ids`` tokenizes the whole text (the canonical tokenization a rollout engine would
  produce from the text). Where the pre-tokenizer splits at both context edges, the ids are
  ``head_ids + context_ids + tail_ids`` with identical ``head_ids``/``tail_ids``: word-level and
  GPT-2 byte-level BPE do. Llama-3/Qwen2-style pre-tokenizers join punctuation with following
  newlines (``".\\n\\n"``): when the last document ends in punctuation, a token (if the BPE merged
  it) may straddle the context's end; every other head/tail token is still shared.

:func:`extract_answer` pulls the final answer out of a response for the rewards (EM, F1, ROUGE-L);
it does no normalisation beyond trimming decoration (answer normalisation belongs to the rewards).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from megatron_lcr.data.schema import Sample, render_context

ContextKind = Literal["short", "long"]

DEFAULT_INSTRUCTION = (
    "Answer the question using the documents below. Think briefly, then give the final answer "
    'on a last line starting with "Answer:".'
)
# Base models (no chat template) continue after this cue.
_PLAIN_RESPONSE_CUE = "Response:\n"


@dataclass(kw_only=True)
class PromptConfig:
    """How a sample becomes a prompt, and how the answer is read back from a response."""

    instruction: str = DEFAULT_INSTRUCTION
    """Task instruction, first in the user message (text; must mention ``answer_prefix``)."""
    answer_prefix: str = "Answer:"
    """Marker of the final-answer line (text, one line; matched case-insensitively)."""
    use_chat_template: Literal["auto", "always", "never"] = "auto"
    """``auto``: the tokenizer's chat template when it has one, else the plain template."""
    system_prompt: str | None = None
    """System message (text), or None for none (a template may still insert its default)."""

    def __post_init__(self) -> None:
        if not self.instruction.strip():
            raise ValueError("instruction must be non-empty")
        if not self.answer_prefix.strip() or "\n" in self.answer_prefix:
            raise ValueError(f"answer_prefix ({self.answer_prefix!r}) must be a non-empty single line")
        if self.answer_prefix.lower() not in self.instruction.lower():
            raise ValueError(
                f"instruction ({self.instruction!r}) must tell the model to use "
                f"answer_prefix ({self.answer_prefix!r})"
            )
        if self.use_chat_template not in ("auto", "always", "never"):
            raise ValueError(f"use_chat_template must be auto, always or never, got {self.use_chat_template!r}")
        if self.system_prompt is not None and not self.system_prompt.strip():
            raise ValueError("system_prompt must be None or non-empty")


def _user_parts(sample: Sample, context: ContextKind, cfg: PromptConfig) -> tuple[str, str, str]:
    """``(before, context_text, after)`` of the user message; ``before``/``after`` ignore ``context``."""
    if context not in ("short", "long"):
        raise ValueError(f"context must be 'short' or 'long', got {context!r}")
    documents = sample.short_context if context == "short" else sample.long_context
    return f"{cfg.instruction}\n\n", render_context(documents), f"\n\nQuestion: {sample.question}"


def uses_chat_template(cfg: PromptConfig, tokenizer: Any | None) -> bool:
    """Whether prompts for ``tokenizer`` go through its chat template (errors if required but absent)."""
    has_template = tokenizer is not None and getattr(tokenizer, "chat_template", None) is not None
    if cfg.use_chat_template == "always" and not has_template:
        what = "no tokenizer was given" if tokenizer is None else f"{type(tokenizer).__name__} has no chat_template"
        raise ValueError(f"use_chat_template='always' but {what}")
    return cfg.use_chat_template != "never" and has_template


def prompt_text(sample: Sample, context: ContextKind, cfg: PromptConfig, tokenizer: Any | None = None) -> str:
    """The prompt for ``sample`` with its ``short`` or ``long`` context, ready for generation.

    With a chat template: ``[system], user`` messages and ``add_generation_prompt=True``. Plain:
    ``[system_prompt + "\\n\\n"] + user message + "\\n\\nResponse:\\n"``.
    """
    content = "".join(_user_parts(sample, context, cfg))
    if uses_chat_template(cfg, tokenizer):
        messages = [{"role": "user", "content": content}]
        if cfg.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": cfg.system_prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    system = f"{cfg.system_prompt}\n\n" if cfg.system_prompt is not None else ""
    return f"{system}{content}\n\n{_PLAIN_RESPONSE_CUE}"


def prompt_ids(sample: Sample, context: ContextKind, cfg: PromptConfig, tokenizer: Any) -> list[int]:
    """Token ids of :func:`prompt_text`.

    A chat template writes its own BOS, so the text is encoded without special tokens; the plain
    template is encoded with them (BOS where the tokenizer adds one, as a base model expects).
    """
    if tokenizer is None:
        raise ValueError("prompt_ids needs a tokenizer")
    text = prompt_text(sample, context, cfg, tokenizer)
    add_special = not uses_chat_template(cfg, tokenizer)
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


# --------------------------------------------------------------------------- answer extraction

_THINK_END = "</think>"
_EMPHASIS = "*_"
_QUOTES = "\"'`\u201c\u201d\u2018\u2019"
_TRAILING_PUNCT = ".,;:!?"
_BOXED = "\\boxed{"


def _prefix_pattern(answer_prefix: str) -> re.Pattern[str]:
    # "**Answer:**" and "**Answer**:" both count: emphasis may sit between the word and the colon.
    body = answer_prefix.rstrip(":").rstrip()
    colon = r"[*_]*[ \t]*:" if answer_prefix.rstrip().endswith(":") else ""
    return re.compile(re.escape(body) + colon, re.IGNORECASE)


def _boxed_contents(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` with balanced braces, in order (unbalanced ones skipped)."""
    found, start = [], text.find(_BOXED)
    while start != -1:
        depth, i = 1, start + len(_BOXED)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found.append(text[start + len(_BOXED) : i - 1])
        start = text.find(_BOXED, start + 1)
    return found


def _clean(answer: str) -> str:
    """Trim whitespace, emphasis, quotes (both ends) and punctuation (end) until nothing changes."""
    while True:
        before = answer
        answer = answer.strip().strip(_EMPHASIS + _QUOTES).rstrip(_TRAILING_PUNCT)
        unwrapped = answer.strip("$")
        inner = _boxed_contents(unwrapped) if unwrapped.startswith(_BOXED) else []
        if inner and len(_BOXED) + len(inner[0]) + 1 == len(unwrapped):  # the box spans the whole answer
            answer = inner[0]
        if answer == before:
            return answer


def extract_answer(response: str, cfg: PromptConfig) -> str | None:
    """The final answer in ``response``, or None when there is none.

    Rules, in order:

    1. If the response contains ``</think>``, only the text after its last occurrence is searched
       (an answer written only inside the reasoning does not count).
    2. The LAST occurrence of ``cfg.answer_prefix``, case-insensitive; with a colon-ended prefix,
       markdown emphasis may sit before the colon (``**Answer**:``). The answer is the rest of that
       line, or the next non-blank line when the rest cleans (rule 3) to nothing. Earlier
       occurrences are never used.
    3. Cleaning, repeated until stable: surrounding whitespace, markdown emphasis (``*``, ``_``) and
       quotes are stripped from both ends, punctuation ``.,;:!?`` from the end, and an answer that is
       entirely ``\\boxed{X}`` (optionally in ``$...$``) becomes ``X``.
    4. If the prefix is absent or gives an empty answer: the contents of the last ``\\boxed{...}`` with balanced
       braces (nested braces kept), cleaned as in 3.
    5. Otherwise None (also when the only candidates clean to the empty string).
    """
    text = response.rsplit(_THINK_END, 1)[-1]
    matches = list(_prefix_pattern(cfg.answer_prefix).finditer(text))
    if matches:
        lines = text[matches[-1].end() :].split("\n")
        answer = _clean(lines[0]) or next((_clean(line) for line in lines[1:] if line.strip()), "")
        if answer:
            return answer
    boxed = _boxed_contents(text)
    if boxed:
        answer = _clean(boxed[-1])
        if answer:
            return answer
    return None
