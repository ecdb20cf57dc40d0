"""Prompts: short and long prompts differ only in the context block; answer extraction rules.

Tokenizers are built here with the ``tokenizers`` library (nothing can be downloaded): a word-level
one with a ChatML chat template and a BOS post-processor, a GPT-2-style byte-level BPE without a
template, and a byte-level BPE with the Llama-3/Qwen2 pre-tokenizer regex (the documented caveat).
"""

from __future__ import annotations

import pytest

from megatron_lcr.data.prompts import DEFAULT_INSTRUCTION, PromptConfig, extract_answer, prompt_ids, prompt_text
from megatron_lcr.data.schema import Document, Sample, render_context

CHATML = (
    "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
# Qwen2 / Llama-3 style: punctuation absorbs following newlines ("." + "\n\n" is one pre-token).
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

GOLD = Document(title="Eiffel Tower", text="The Eiffel Tower is in Paris.")
DISTRACTORS = [
    Document(title="Big Ben", text="Big Ben is a clock tower in London."),
    Document(title="Colosseum", text="The Colosseum is an amphitheatre in Rome!"),
    Document(title="Alhambra", text="The Alhambra is a palace in Granada"),
    Document(title="Petra", text="Petra is a city carved into rock in Jordan."),
]


def make_sample() -> Sample:
    short = [DISTRACTORS[0], GOLD]
    long = [DISTRACTORS[2], DISTRACTORS[0], DISTRACTORS[3], GOLD, DISTRACTORS[1]]
    return Sample(
        id="q1", family="multihop", question="In which city is the Eiffel Tower?", answers=["Paris"],
        metric="em", gold_documents=[GOLD], short_context=short, long_context=long,
    )


def _corpus(cfg: PromptConfig) -> list[str]:
    sample = make_sample()
    texts = [cfg.instruction, sample.question, "Question: Response: system user assistant"]
    texts += [render_context(sample.long_context)]
    return texts


def word_level_tokenizer(cfg: PromptConfig):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in _corpus(cfg) for w in text.split()})
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "</s>"],
    )
    fast.chat_template = CHATML
    return fast


def byte_bpe_tokenizer(cfg: PromptConfig, *, regex: str | None, chat_template: str | None):
    """Byte-level BPE trained on the test texts; GPT-2's pre-tokenizer, or Split(``regex``) + bytes."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if regex is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(cfg) * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "</s>"],
    )
    fast.chat_template = chat_template
    return fast


def split_at_context(text: str, context_text: str) -> tuple[str, str]:
    start = text.index(context_text)
    assert text.find(context_text, start + 1) == -1, "context must occur once"
    return text[:start], text[start + len(context_text) :]


def split_tokens(tokenizer, text: str, context_text: str) -> tuple[list[int], list[int], list[int], int]:
    """Ids of ``text`` grouped by character span: (head, context, tail, number straddling an edge)."""
    start = text.index(context_text)
    end = start + len(context_text)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    head, context, tail, straddling = [], [], [], 0
    for token, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]):
        if e <= start:
            head.append(token)
        elif s >= end:
            tail.append(token)
        elif s >= start and e <= end:
            context.append(token)
        else:
            straddling += 1
    return head, context, tail, straddling


# --------------------------------------------------------------------------- prompt structure


# The user message of make_sample() with its short context.
SHORT_USER = (
    f"{DEFAULT_INSTRUCTION}\n\n"
    "Document [1] Big Ben\nBig Ben is a clock tower in London.\n\n"
    "Document [2] Eiffel Tower\nThe Eiffel Tower is in Paris.\n\n"
    "Question: In which city is the Eiffel Tower?"
)


def test_plain_template_exact_text_without_tokenizer_or_template():
    cfg = PromptConfig(system_prompt="You are careful.")
    sample = make_sample()
    expected = f"You are careful.\n\n{SHORT_USER}\n\nResponse:\n"
    assert prompt_text(sample, "short", cfg) == expected
    no_template = byte_bpe_tokenizer(cfg, regex=None, chat_template=None)
    assert prompt_text(sample, "short", cfg, no_template) == expected
    assert prompt_text(sample, "short", PromptConfig(), no_template) == expected.removeprefix("You are careful.\n\n")


def test_chat_template_exact_text_and_switches():
    cfg = PromptConfig(system_prompt="You are careful.")
    sample = make_sample()
    tok = word_level_tokenizer(cfg)
    expected = (
        "<s><|im_start|>system\nYou are careful.<|im_end|>\n"
        f"<|im_start|>user\n{SHORT_USER}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt_text(sample, "short", cfg, tok) == expected
    always = PromptConfig(use_chat_template="always", system_prompt="You are careful.")
    assert prompt_text(sample, "short", always, tok) == expected
    never = PromptConfig(use_chat_template="never")
    assert prompt_text(sample, "short", never, tok) == prompt_text(sample, "short", never)
    with pytest.raises(ValueError, match="always.*no tokenizer"):
        prompt_text(sample, "short", PromptConfig(use_chat_template="always"))
    no_template = byte_bpe_tokenizer(cfg, regex=None, chat_template=None)
    with pytest.raises(ValueError, match="always.*no chat_template"):
        prompt_text(sample, "short", PromptConfig(use_chat_template="always"), no_template)
    with pytest.raises(ValueError, match="'short' or 'long'"):
        prompt_text(sample, "medium", cfg)  # type: ignore[arg-type]


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_question_instruction_and_every_document_appear_in_order(template):
    cfg = PromptConfig(use_chat_template="auto" if template == "chat" else "never")
    sample = make_sample()
    tok = word_level_tokenizer(cfg)
    for kind, docs in (("short", sample.short_context), ("long", sample.long_context)):
        text = prompt_text(sample, kind, cfg, tok)
        positions = [text.index(cfg.instruction)]
        positions += [text.index(f"Document [{i}] {d.title}\n{d.text}") for i, d in enumerate(docs, start=1)]
        positions.append(text.index(f"Question: {sample.question}"))
        assert positions == sorted(positions), f"{kind}: instruction, documents, question out of order"
        assert f"Document [{len(docs) + 1}]" not in text


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_short_and_long_prompts_share_prefix_and_suffix_text(template):
    cfg = PromptConfig(use_chat_template="auto" if template == "chat" else "never", system_prompt="Be brief.")
    sample = make_sample()
    tok = word_level_tokenizer(cfg)
    short_ctx, long_ctx = render_context(sample.short_context), render_context(sample.long_context)
    short_head, short_tail = split_at_context(prompt_text(sample, "short", cfg, tok), short_ctx)
    long_head, long_tail = split_at_context(prompt_text(sample, "long", cfg, tok), long_ctx)
    assert short_head == long_head and short_tail == long_tail
    assert cfg.instruction in short_head and sample.question in short_tail


@pytest.mark.parametrize("name", ["word-level+chat", "gpt2-bpe+chat", "gpt2-bpe+plain"])
def test_token_level_prefix_and_suffix_identical(name):
    """Word-level and GPT-2 byte-level BPE split at both context edges: ids = head + context + tail."""
    cfg = PromptConfig()
    if name == "word-level+chat":
        tok = word_level_tokenizer(cfg)
    else:
        tok = byte_bpe_tokenizer(cfg, regex=None, chat_template=CHATML if name.endswith("chat") else None)
    sample = make_sample()
    parts = {}
    for kind, docs in (("short", sample.short_context), ("long", sample.long_context)):
        text = prompt_text(sample, kind, cfg, tok)
        head, context, tail, straddling = split_tokens(tok, text, render_context(docs))
        assert straddling == 0
        assert tok(text, add_special_tokens=False)["input_ids"] == head + context + tail
        parts[kind] = (head, tail)
    assert parts["short"] == parts["long"]
    assert len(parts["short"][0]) > 5 and len(parts["short"][1]) > 5


def test_token_level_with_qwen2_regex_one_token_may_straddle_the_end():
    """Documented caveat: "." + "\\n\\n" is one pre-token, so a token may straddle the context's end.

    Whether it does depends on the BPE merges: this corpus learned ".\\n\\n" (inside the long
    context) but never saw "!" before a newline. Every other head and tail token is shared.
    """
    cfg = PromptConfig()
    tok = byte_bpe_tokenizer(cfg, regex=QWEN2_REGEX, chat_template=CHATML)
    sample = make_sample()
    parts = {}
    for kind, docs in (("short", sample.short_context), ("long", sample.long_context)):
        text = prompt_text(sample, kind, cfg, tok)
        head, _, tail, straddling = split_tokens(tok, text, render_context(docs))
        parts[kind] = (head, tail, straddling)
    # The short context ends "Paris." (one ".\\n\\n" token), the long one "Rome!" ("!", "\\n\\n").
    assert (parts["short"][2], parts["long"][2]) == (1, 0)
    assert parts["short"][0] == parts["long"][0]
    short_tail, long_tail = parts["short"][1], parts["long"][1]
    assert len(long_tail) == len(short_tail) + 1 and long_tail[1:] == short_tail


def test_prompt_ids_bos_once_for_chat_and_plain():
    cfg = PromptConfig()
    tok = word_level_tokenizer(cfg)
    sample = make_sample()
    bos = tok.bos_token_id
    chat = prompt_ids(sample, "long", cfg, tok)
    assert chat == tok(prompt_text(sample, "long", cfg, tok), add_special_tokens=False)["input_ids"]
    plain = prompt_ids(sample, "long", PromptConfig(use_chat_template="never"), tok)
    for ids in (chat, plain):
        assert ids[0] == bos and ids.count(bos) == 1
    assert tok.unk_token_id not in chat + plain


def test_config_validation_names_values():
    with pytest.raises(ValueError, match="'Give the result.'.*'Answer:'"):
        PromptConfig(instruction="Give the result.")
    with pytest.raises(ValueError, match="single line"):
        PromptConfig(answer_prefix="Answer\n:")
    with pytest.raises(ValueError, match="auto, always or never"):
        PromptConfig(use_chat_template="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="system_prompt"):
        PromptConfig(system_prompt="  ")
    assert PromptConfig(instruction="End with a line 'final: X'.", answer_prefix="Final:").answer_prefix == "Final:"


# --------------------------------------------------------------------------- answer extraction

EXTRACTION_CASES = [
    ("Answer: Rome\nWait, that is wrong.\nAnswer: Paris", "Paris"),
    ("answer: Paris.", "Paris"),
    ("**Answer:** Paris", "Paris"),
    ("**Answer**: Paris", "Paris"),
    ("Answer: *Paris*", "Paris"),
    ('Answer: "Paris".', "Paris"),
    ("ANSWER:   The Eiffel Tower  ", "The Eiffel Tower"),
    ("Final answer: Paris!", "Paris"),
    ("Answer: St. Louis, Missouri.", "St. Louis, Missouri"),
    ("Answer: Paris\nBecause the gold document says so.", "Paris"),
    ("Answer:\n\nParis", "Paris"),
    ("Answer: $\\boxed{42}$", "42"),
    ("The result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("First \\boxed{a}, then \\boxed{{b}c}", "{b}c"),
    ("Answer:\nno answer here", "no answer here"),
    ("Answer: .\n\n", None),
    ("<think>Answer: Rome</think>\nAnswer: Paris", "Paris"),
    ("<think>So the answer: Rome</think>\nI am not sure.", None),
    ("Answer:", None),
    ("\\boxed{unbalanced", None),
    ("I do not know.", None),
    ("", None),
]


@pytest.mark.parametrize("response,expected", EXTRACTION_CASES)
def test_extract_answer(response, expected):
    assert extract_answer(response, PromptConfig()) == expected


def test_extract_answer_custom_prefix_and_boxed_fallback():
    cfg = PromptConfig(instruction="End with 'Final: X'.", answer_prefix="Final:")
    assert extract_answer("Answer: no\nfinal: 7", cfg) == "7"
    assert extract_answer("Answer: no", cfg) is None
    assert extract_answer("Final:\n\n\\boxed{x^{2}}", cfg) == "x^{2}"
