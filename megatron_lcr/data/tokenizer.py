"""The tiny CPU model's tokenizer: whole words over the LongBlocks vocabulary, built locally.

Hugging Face tokenizers cannot be downloaded here, so the tiny model's tokenizer is built with the
``tokenizers`` library and shipped in the package (``tiny_tokenizer/``). Regenerate it with::

    python -m megatron_lcr.data.tokenizer megatron_lcr/data/tiny_tokenizer

(``tests/data/test_tokenizer.py`` checks the shipped files equal a fresh build.)

Design: a word-level vocabulary, encoded with the ``WordPiece`` model so that the pieces of a
whitespace-separated word after its first keep a ``##`` mark. Normalizer NFKC; pre-tokenizer: split
on whitespace. Vocabulary: special tokens, then the digits and ASCII punctuation and letters, each
bare and ``##``-marked, then every word LongBlocks writes (derived from
:func:`~megatron_lcr.data.longblocks.vocabulary_texts`) and a few hundred common English words
for prompts. A known word is one token; digits and punctuation are one token each (so numbers,
dates and versions need no vocabulary); any other ASCII word falls back to a known prefix plus
single letters. Deviation from a plain word-level model: the ``##`` marks let the decoder glue
pieces back (``Ashby's`` -> ``Ashby ##' ##s`` -> ``Ashby's``) instead of spacing them apart, so
decoded answers (``1987``, ``3.2``) compare equal to the references.

What holds (tested):

* For any text ``t`` whose NFKC form is printable ASCII plus whitespace, and where no
  whitespace-separated word starts with ``##`` followed by another character:
  ``decode(encode(t)) == " ".join(nfkc(t).split())``, with no ``<unk>``. Runs of whitespace,
  newlines included, come back as one space: the tokenizer has no newline token.
* For LongBlocks text (titles, documents, questions, answers, rendered contexts) every letter run
  is a single token: ``len(encode(t)) == len(re.findall(r"[A-Za-z]+|[0-9]|[^A-Za-z0-9\\s]", t))``.
"""

from __future__ import annotations

import re
import string
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

TINY_TOKENIZER_DIR = Path(__file__).resolve().parent / "tiny_tokenizer"

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CONTINUATION = "##"

# Each message is "<|role|> content <|end|>"; a generation prompt ends with "<|assistant|>".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|> {{ message['content'] }} <|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

# Words prompts, instructions and short reasoning use (LongBlocks' own words are added separately).
COMMON_WORDS = """
a about above after again against all also always am an and another answer answers any are as ask asked
at back based be because been before begin being below best between both brief briefly but by call can
cannot case check choose clear close come complete consider context contexts contain contains correct
could date day days did different do document documents does done down during each early end enough
every evidence example exactly fact facts false few final find first follow following for found four
from full give given go good has have he her here high his how however i if important in information
instruction into is it its itself just keep know known last later least less let like line list long
look made make many may me mention mentioned might more most much must my name named names need never
new next no none not note nothing now number of off often old on once one only or order other others
our out over own part passage passages people person place please point possible provide provided
question questions read reason reasoning relevant reply report response result right said same say says
second see short should show since single so some something source start state stated statement step
steps still such summarise summarize summary sure system take tell text than that the their them then
there these they thing think third this those three through time title titles to too true two under
until up use used user using very was way we well were what when where which while who whole whom whose
why will with within without word words would write year years yes yet you your according appears
chain hence hop hops looking mentions starting therefore thus titled unknown
Answer Context Document Documents Final Question Response Step Summary The This Think Title
"""


def _vocabulary() -> list[str]:
    """Token strings in id order: specials, marked and bare characters, then sorted words."""
    from megatron_lcr.data.longblocks import vocabulary_texts

    chars = string.digits + string.punctuation + string.ascii_letters
    tokens = [*SPECIAL_TOKENS, *chars, *(CONTINUATION + c for c in chars)]
    longblocks_words = re.findall(r"[A-Za-z]+", re.sub(r"\{\w+\}", " ", "\n".join(vocabulary_texts())))
    words = sorted(set(longblocks_words) | set(COMMON_WORDS.split()))
    known = set(tokens)
    return tokens + [w for w in words if w not in known]


def build_tiny_tokenizer(out_dir: str | Path) -> None:
    """Build the tiny tokenizer and save it (``transformers`` files) into ``out_dir``, atomically."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from megatron_lcr.atomic import atomic_dir

    vocab = {token: i for i, token in enumerate(_vocabulary())}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>", continuing_subword_prefix=CONTINUATION))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # cleanup=False: keep the text's own spacing around punctuation (" ." stays " .").
    tok.decoder = decoders.WordPiece(prefix=CONTINUATION, cleanup=False)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=list(SPECIAL_TOKENS[4:]), chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False, model_max_length=1 << 20,
    )
    with atomic_dir(out_dir, overwrite=True) as tmp:
        # save_jinja_files=False: the chat template stays in tokenizer_config.json (package data is *.json).
        fast.save_pretrained(str(tmp), save_jinja_files=False)


def load_tokenizer(path: str | Path | None = None) -> Any:
    """``AutoTokenizer`` from ``path``, or the shipped tiny tokenizer when ``path`` is None (offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR if path is None else path))


def token_counter(tokenizer: Any) -> Callable[[str], int]:
    """``text -> number of tokens`` under ``tokenizer``, without added special tokens (BOS/EOS)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer directly: ~10x faster than the Python wrapper
        return lambda text: len(backend.encode(text, add_special_tokens=False).ids)
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m megatron_lcr.data.tokenizer OUT_DIR")
    build_tiny_tokenizer(sys.argv[1])
    print(f"wrote the tiny tokenizer to {sys.argv[1]}", file=sys.stderr)
