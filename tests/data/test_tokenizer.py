"""The shipped tiny tokenizer: equal to a fresh build, loadable offline, lossless on LongBlocks text."""

from __future__ import annotations

import random
import re
import string

import pytest

from megatron_lcr.data.longblocks import LongBlocksConfig, generate, vocabulary_texts
from megatron_lcr.data.schema import render_context
from megatron_lcr.data.tokenizer import (
    SPECIAL_TOKENS,
    TINY_TOKENIZER_DIR,
    build_tiny_tokenizer,
    load_tokenizer,
    token_counter,
)

# One token per letter run, digit and punctuation mark: what a LongBlocks text costs.
PIECES = re.compile(r"[A-Za-z]+|[0-9]|[^A-Za-z0-9\s]")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def longblocks_texts(tok):
    samples = generate(LongBlocksConfig(num_samples=12, seed=3, short_tokens=256, long_tokens=1024), token_counter(tok))
    texts = [render_context(s.long_context) for s in samples]
    texts += [t for s in samples for t in (s.question, *s.answers)]
    texts += [t for s in samples for d in s.long_context for t in (d.title, d.text)]
    return texts


def test_shipped_files_equal_a_fresh_build(tmp_path):
    build_tiny_tokenizer(tmp_path / "tok")
    shipped = sorted(p.name for p in TINY_TOKENIZER_DIR.iterdir())
    assert shipped == sorted(p.name for p in (tmp_path / "tok").iterdir())
    assert set(shipped) == {"tokenizer.json", "tokenizer_config.json"}  # setup.py ships **/*.json
    for name in shipped:
        assert (TINY_TOKENIZER_DIR / name).read_bytes() == (tmp_path / "tok" / name).read_bytes(), (
            f"{name} is stale: run python -m megatron_lcr.data.tokenizer megatron_lcr/data/tiny_tokenizer"
        )


def test_autotokenizer_loads_it_with_special_tokens(tok):
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR), local_files_only=True)
    assert again.get_vocab() == tok.get_vocab()
    assert [tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(len(SPECIAL_TOKENS)))
    assert len(tok) < 2000  # keeps the tiny model's embedding small


def test_chat_template(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where was Ala Ashby born?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|system|> Be brief. <|end|>\n<|user|> Where was Ala Ashby born? <|end|>\n<|assistant|> "
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[0] == "<|system|>" and tokens[-1] == "<|assistant|>" and tokens.count("<|end|>") == 2
    assert "<unk>" not in tokens
    answer = [*messages[1:], {"role": "assistant", "content": "Velheim"}]
    assert tok.apply_chat_template(answer, tokenize=False).endswith("<|assistant|> Velheim <|end|>\n")
    with pytest.raises(Exception, match="unknown chat role: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_longblocks_text_round_trips_one_token_per_word(tok, longblocks_texts):
    for text in longblocks_texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == " ".join(text.split())
        assert len(ids) == len(PIECES.findall(text)), text


def test_every_longblocks_word_is_one_token(tok):
    words = set(re.findall(r"[A-Za-z]+", re.sub(r"\{\w+\}", " ", " ".join(vocabulary_texts()))))
    assert all(len(tok.encode(w, add_special_tokens=False)) == 1 for w in words)


def test_any_ascii_text_round_trips(tok):
    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + string.punctuation + "  \n\t"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(300)]
    texts += ["Unknownword (parenthesised) x-ray 3.14159 e=mc^2 ## Heading", "\uff21\uff22\uff23 fullwidth"]
    for text in texts:
        if re.search(r"(?:^|\s)##\S", text):  # the documented exception: a word starting with "##x"
            continue
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids) == " ".join(text.replace("\uff21\uff22\uff23", "ABC").split()), text


def test_token_counter_counts_without_special_tokens(tok, longblocks_texts):
    count = token_counter(tok)
    for text in longblocks_texts[:20]:
        assert count(text) == len(tok(text, add_special_tokens=False)["input_ids"])
    assert count("<s> Ala </s>") == 3  # special tokens written in the text are counted, none are added
    assert count("") == 0
