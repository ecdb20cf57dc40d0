"""LongBlocks: seeded synthetic long-context tasks with a short and a long context per question.

Three families, all over invented entities (names built from syllable lists), so nothing can be
answered from pre-training knowledge and every answer is in the documents:

* ``multihop``: a chain ``entity0 -r1-> entity1 -r2-> ... -> value`` of 1-4 facts, one fact per
  document (plus filler sentences); the question composes the relations ("In which city was the
  mentor of the company founded by X born?"), so it needs every hop. Metric: exact match.
* ``grounding``: a gold document among 2-4 near-duplicates (same fillers, same template, other
  values); the question names the gold one by a distinguishing attribute and the answer is quoted
  from it: a date (``release``: which version), a value (``weight``: which model), or the title
  of the document that states a claim (``source``). Metric: exact match.
* ``longform``: 3-6 facts about one person spread over 2-4 documents; the question asks for a
  summary and the answer is every fact sentence in a fixed relation order. Metric: ROUGE-L.

Distractors are documents about *other* fresh entities with the same relation types (so surface
cues such as "was born in" do not locate the answer); a distractor never mentions a gold entity
nor contains the answer string (checked with a word-boundary match on its title and text).
``long_noise`` makes a share of the documents that only the long context has *noise* instead:
filler sentences about a fresh entity and no fact (RULER's haystack), so that the long context
differs from the short one in length alone and not in how much it distracts.

Contexts: ``short_context`` = gold + the near-duplicates that fit + distractors up to
``short_tokens``; ``long_context`` = the short context's documents + more distractors (or noise)
up to ``long_tokens``; each is shuffled. Lengths are measured on ``render_context(docs)`` with
the caller's ``count_tokens``: documents are added while an estimate (cached per-document counts
plus per-position headers) is under the budget, then the rendered text is counted and a
distractor is removed or added until it lands in ``budget * (1 +- tolerance)``.

What holds (tests/data/test_longblocks.py): same config -> byte-identical JSONL; sample ``i``
depends only on ``(seed, i)``; both lengths within the tolerance; long is a strict superset of
short; every gold document is in both; :func:`solve` answers every question from the short or the
long context and no multihop/grounding question from the distractors alone; ``long_noise`` changes
only the documents the long context adds, and noise documents state no fact.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from megatron_lcr.data.schema import Document, Sample, render_context

FAMILIES = ("multihop", "grounding", "longform")

# --------------------------------------------------------------------------- word lists

_FIRST_ONSETS = ("Al", "Bel", "Cor", "Dar", "El", "Fen", "Gal", "Hal", "Is", "Jor", "Kel", "Lor", "Mar",
                 "Ner", "Or", "Per", "Quen", "Ros", "Sel", "Tam", "Ul", "Var", "Wen", "Yan", "Zor")
_FIRST_ENDINGS = ("a", "en", "ic", "wyn", "ara", "iel")
FIRST_NAMES = tuple(onset + ending for onset in _FIRST_ONSETS for ending in _FIRST_ENDINGS)
_SURNAME_ROOTS = ("Ash", "Brin", "Crow", "Dun", "Fair", "Gold", "Hart", "Iron", "Kest", "Lark", "Moor",
                  "Nettle", "Oak", "Pike", "Quill", "Rook", "Stone", "Thorn", "Vale", "Wick")
SURNAMES = tuple(root + tail for root in _SURNAME_ROOTS for tail in ("by", "ford", "ley", "more", "ton", "well"))
COMPANY_WORDS = tuple(root + tail for root in ("Zen", "Vor", "Tal", "Kro", "Lum", "Nex", "Qua", "Syl", "Vek",
                                               "Orn", "Pax", "Ryn")
                      for tail in ("trix", "ora", "dyne", "lith", "cor", "vex"))
COMPANY_SUFFIXES = ("Labs", "Works", "Systems", "Industries", "Holdings", "Foundry", "Dynamics", "Collective")
PRODUCT_NOUNS = ("router", "lantern", "compass", "kettle", "camera", "drone", "printer", "radio", "scanner",
                 "telescope", "bicycle", "clock")
CITIES = tuple(root + tail for root in ("Vel", "Mor", "Kas", "Tir", "Ost", "Dra", "Lun", "Esk")
               for tail in ("heim", "dale", "port", "mar", "gard"))
COLORS = ("amber", "azure", "crimson", "cyan", "emerald", "indigo", "ivory", "jade", "lavender", "magenta",
          "maroon", "ochre", "olive", "saffron", "scarlet", "teal", "turquoise", "umber", "violet", "vermilion")
PROFESSIONS = ("baker", "cartographer", "carpenter", "chemist", "falconer", "glassblower", "jeweler",
               "librarian", "locksmith", "mason", "navigator", "potter", "sculptor", "surveyor", "tailor",
               "translator", "weaver", "beekeeper", "bookbinder", "clockmaker")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
PERIODICALS = ("Gazette", "Chronicle", "Ledger", "Herald", "Register", "Courier")

# Filler sentences make documents read like passages. They use none of the value words above, no
# digits and no fact phrasing, so they never state a fact or contain an answer. {n}: the subject.
FILLERS = {
    "person": (
        "{n} kept a small notebook of ideas.", "{n} enjoyed long walks along the river.",
        "Friends described {n} as patient and curious.", "{n} rarely spoke about private matters.",
        "Little else is recorded about the early years of {n}.", "{n} was fond of old maps and letters.",
        "Several letters written by {n} survive today.", "{n} often worked late into the night.",
        "Neighbors remember {n} as a quiet presence.", "{n} collected stones from distant shores.",
    ),
    "company": (
        "{n} began as a small workshop.", "{n} employs a modest team.", "Customers praise {n} for careful work.",
        "{n} publishes a short report each season.", "Few outsiders have visited the offices of {n}.",
        "{n} avoids public attention.",
    ),
    "product": (
        "The {n} is sold in a plain box.", "Reviewers call the {n} sturdy and simple.",
        "The {n} needs little maintenance.", "Spare parts for the {n} are easy to find.",
        "The manual of the {n} is short and clear.",
    ),
    "periodical": (
        "This issue collects notes on local families.", "The editors thank their readers for many letters.",
        "Corrections from earlier issues appear at the end.", "The notes below were gathered from public records.",
    ),
}

# --------------------------------------------------------------------------- relations and templates

_NAME = r"[A-Z][a-z]+ [A-Z][a-z]+"
_SLOTS = {  # value kind -> regex the solver reads it with
    "person": _NAME, "company": _NAME, "city": r"[A-Z][a-z]+", "color": r"[a-z]+", "profession": r"[a-z]+",
    "year": r"\d{4}", "product": r"[A-Z][a-z]+ [a-z]+", "version": r"\d+\.\d+", "model": r"\d+",
    "date": r"\d{1,2} [A-Z][a-z]+ \d{4}", "grams": r"\d+",
}


def _pattern(template: str, slots: dict[str, str]) -> re.Pattern[str]:
    """``template`` with each ``{slot}`` turned into a named group of the given regex."""
    parts, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
        parts += [re.escape(template[pos : m.start()]), f"(?P<{m[1]}>{slots[m[1]]})"]
        pos = m.end()
    return re.compile("".join(parts) + re.escape(template[pos:]))


@dataclass(frozen=True)
class Relation:
    """A fact type ``subject -name-> object`` and how it is written and asked about."""

    name: str
    """Identifier, recorded in sample metadata (``relations``)."""
    subject: str
    """Entity kind of the subject: ``person`` or ``company``."""
    value: str
    """Kind of the object: an entity kind (bridge relation) or a value kind (terminal relation)."""
    fact: str
    """Fact sentence, ``{s}`` subject and ``{o}`` object."""
    ask: str
    """Bridge: noun phrase for the object of ``{x}``; terminal: the question about ``{x}``."""

    @property
    def bridge(self) -> bool:
        return self.value in ("person", "company")

    @functools.cached_property
    def regex(self) -> re.Pattern[str]:
        return _pattern(self.fact, {"s": _SLOTS[self.subject], "o": _SLOTS[self.value]})


# Person relations in the order a long-form answer lists them.
PERSON_RELATIONS = (
    Relation("born_in", "person", "city", "{s} was born in {o}.", "In which city was {x} born?"),
    Relation("graduated", "person", "year", "{s} graduated in {o}.", "In which year did {x} graduate?"),
    Relation("profession", "person", "profession", "{s} works as a {o}.", "What is the profession of {x}?"),
    Relation("color", "person", "color", "{s}'s favorite color is {o}.", "What is the favorite color of {x}?"),
    Relation("mentor", "person", "person", "{s}'s mentor is {o}.", "the mentor of {x}"),
    Relation("rival", "person", "person", "{s}'s rival is {o}.", "the rival of {x}"),
    Relation("founder", "person", "company", "{s} is the founder of {o}.", "the company founded by {x}"),
)
COMPANY_RELATIONS = (
    Relation("headquarters", "company", "city", "{s} is headquartered in {o}.", "In which city is {x} headquartered?"),
    Relation("founded_in", "company", "year", "{s} was founded in {o}.", "In which year was {x} founded?"),
    Relation("engineer", "company", "person", "The chief engineer of {s} is {o}.", "the chief engineer of {x}"),
)
RELATIONS = PERSON_RELATIONS + COMPANY_RELATIONS

_RELEASE = "Version {v} of the {p} was released on {o}."
_RELEASE_ASK = "On what date was version {v} of the {p} released?"
_RELEASE_TITLE = "{p} version {v}"
_WEIGHT = "The {p} model {v} weighs {o} grams."
_WEIGHT_ASK = "How many grams does the {p} model {v} weigh?"
_WEIGHT_TITLE = "{p} model {v}"
_SOURCE_ASK = "Which document states that {claim}? Answer with the title of that document."
_LONGFORM_ASK = "Summarise everything the documents say about {x}."
_PERIODICAL_TITLE = "{surname} {kind}"
# Grounding kind -> (fact, question, title, version kind, value kind).
_SPECS = {
    "release": (_RELEASE, _RELEASE_ASK, _RELEASE_TITLE, "version", "date"),
    "weight": (_WEIGHT, _WEIGHT_ASK, _WEIGHT_TITLE, "model", "grams"),
}


def vocabulary_texts() -> list[str]:
    """Every word list and template LongBlocks writes from (the tiny tokenizer derives its vocabulary here)."""
    texts = [*FIRST_NAMES, *SURNAMES, *COMPANY_WORDS, *COMPANY_SUFFIXES, *PRODUCT_NOUNS, *CITIES, *COLORS,
             *PROFESSIONS, *MONTHS, *PERIODICALS, *(s for group in FILLERS.values() for s in group)]
    texts += [text for rel in RELATIONS for text in (rel.fact, rel.ask)]
    texts += [text for spec in _SPECS.values() for text in spec[:3]]
    texts += [_SOURCE_ASK, _LONGFORM_ASK, render_context([Document(title="", text="")])]
    return texts


# --------------------------------------------------------------------------- config


@dataclass(kw_only=True)
class LongBlocksConfig:
    """LongBlocks generation: how many samples, which families, and the two context budgets."""

    num_samples: int = 100
    """Number of samples to generate (samples)."""
    seed: int = 0
    """Seed of every random draw; sample ``i`` depends only on ``(seed, i)`` (integer)."""
    short_tokens: int = 1024
    """Short-context budget: length of ``render_context(short_context)`` (tokens of the given tokenizer)."""
    long_tokens: int = 8192
    """Long-context budget (tokens of the given tokenizer); 4K-32K for real runs, a few hundred on CPU."""
    tolerance: float = 0.1
    """Allowed relative deviation of both rendered context lengths from their budgets (fraction)."""
    families: tuple[str, ...] = FAMILIES
    """Task families, assigned to samples round-robin in this order (names from ``FAMILIES``)."""
    min_hops: int = 1
    """Fewest facts in a multi-hop chain (facts)."""
    max_hops: int = 4
    """Most facts in a multi-hop chain (facts)."""
    min_facts: int = 3
    """Fewest facts about the person of a long-form question (facts)."""
    max_facts: int = 6
    """Most facts about the person of a long-form question (facts; at most one per person relation, 7)."""
    min_near_duplicates: int = 2
    """Fewest near-duplicate documents beside the gold one in a grounding question (documents)."""
    max_near_duplicates: int = 4
    """Most near-duplicate documents beside the gold one (documents; at most 5)."""
    min_fillers: int = 1
    """Fewest filler sentences per document (sentences)."""
    max_fillers: int = 3
    """Most filler sentences per document (sentences; at most 4)."""
    long_noise: float = 0.0
    """Chance that a document only the long context has is noise (filler sentences, no fact) rather
    than a distractor (probability; 1: the long context is the short one plus a haystack, so a
    model's long-context failure is the length alone)."""

    def __post_init__(self) -> None:
        self.families = tuple(self.families)
        if self.num_samples < 1 or self.short_tokens < 1:
            raise ValueError(f"num_samples ({self.num_samples}) and short_tokens ({self.short_tokens}) must be >= 1")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"tolerance ({self.tolerance}) must be in (0, 1)")
        short_hi, long_lo = self.short_tokens * (1 + self.tolerance), self.long_tokens * (1 - self.tolerance)
        if long_lo <= short_hi:
            raise ValueError(
                f"long_tokens ({self.long_tokens}) must exceed short_tokens ({self.short_tokens}) beyond the "
                f"tolerance ({self.tolerance}): long * (1 - tol) = {long_lo:g} <= short * (1 + tol) = {short_hi:g}"
            )
        unknown = [f for f in self.families if f not in FAMILIES]
        if not self.families or unknown or len(set(self.families)) != len(self.families):
            raise ValueError(f"families ({list(self.families)}) must be distinct names from {list(FAMILIES)}")
        for name, lo, hi, cap in (
            ("hops", self.min_hops, self.max_hops, None),
            ("facts", self.min_facts, self.max_facts, len(PERSON_RELATIONS)),
            ("near_duplicates", self.min_near_duplicates, self.max_near_duplicates, len(PERIODICALS) - 1),
            ("fillers", self.min_fillers, self.max_fillers, min(len(f) for f in FILLERS.values())),
        ):
            floor = 0 if name in ("near_duplicates", "fillers") else 1
            if not floor <= lo <= hi:
                raise ValueError(f"min_{name} ({lo}) must be >= {floor} and <= max_{name} ({hi})")
            if cap is not None and hi > cap:
                raise ValueError(f"max_{name} ({hi}) must be <= {cap}")
        if not 0 <= self.long_noise <= 1:
            raise ValueError(f"long_noise ({self.long_noise}) must be in [0, 1]")


# --------------------------------------------------------------------------- entities and documents


class _Names:
    """Fresh entity names for one sample: never the same name twice."""

    _MAKERS = {
        "person": lambda rng: f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAMES)}",
        "company": lambda rng: f"{rng.choice(COMPANY_WORDS)} {rng.choice(COMPANY_SUFFIXES)}",
        "product": lambda rng: f"{rng.choice(COMPANY_WORDS)} {rng.choice(PRODUCT_NOUNS)}",
        "periodical": lambda rng: f"{rng.choice(SURNAMES)} {rng.choice(PERIODICALS)}",
    }

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()  # membership only: never iterated, so its order cannot leak

    def fresh(self, kind: str) -> str | None:
        """An unused name of ``kind``, or None when 64 draws all collided (the pool is nearly used up)."""
        for _ in range(64):
            name = self._MAKERS[kind](self.rng)
            if name not in self.used:
                self.used.add(name)
                return name
        return None

    def claim(self, name: str) -> str:
        self.used.add(name)
        return name


def _value(rng: random.Random, kind: str) -> str:
    """A random attribute value of ``kind`` (the right-hand side of a terminal fact)."""
    draw = {
        "city": lambda: rng.choice(CITIES), "color": lambda: rng.choice(COLORS),
        "profession": lambda: rng.choice(PROFESSIONS), "year": lambda: str(rng.randint(1700, 1999)),
        "date": lambda: f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1700, 1999)}",
        "version": lambda: f"{rng.randint(1, 9)}.{rng.randint(0, 9)}",
        "model": lambda: str(rng.randint(100, 999)), "grams": lambda: str(rng.randint(100, 999)),
    }
    return draw[kind]()


def _distinct_values(rng: random.Random, kind: str, n: int, exclude: tuple[str, ...] = ()) -> list[str]:
    values: list[str] = []
    while len(values) < n:
        value = _value(rng, kind)
        if value not in values and value not in exclude:
            values.append(value)
    return values


def _object(rng: random.Random, names: _Names, kind: str) -> str | None:
    return names.fresh(kind) if kind in ("person", "company") else _value(rng, kind)


def _fillers(rng: random.Random, kind: str, name: str, cfg: LongBlocksConfig) -> list[str]:
    count = rng.randint(cfg.min_fillers, cfg.max_fillers)
    return [template.format(n=name) for template in rng.sample(FILLERS[kind], count)]


def _document(rng: random.Random, title: str, fillers: list[str], facts: list[str]) -> Document:
    """Facts inserted at random places among the filler sentences."""
    sentences = list(fillers)
    for fact in facts:
        sentences.insert(rng.randint(0, len(sentences)), fact)
    return Document(title=title, text=" ".join(sentences))


def _mention_pattern(strings: list[str]) -> re.Pattern[str]:
    """Matches any of ``strings`` as whole words (``4 May 1801`` does not match ``14 May 1801``)."""
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(s) for s in strings) + r")(?!\w)")


# Distractors state facts of the same relation types as the gold documents, about fresh entities.
def _entity_distractor(rng: random.Random, names: _Names, cfg: LongBlocksConfig, kind: str) -> Document | None:
    subject = names.fresh(kind)
    rel = rng.choice(PERSON_RELATIONS if kind == "person" else COMPANY_RELATIONS)
    obj = _object(rng, names, rel.value)
    if subject is None or obj is None:
        return None
    return _document(rng, subject, _fillers(rng, kind, subject, cfg), [rel.fact.format(s=subject, o=obj)])


def _product_distractor(rng: random.Random, names: _Names, cfg: LongBlocksConfig) -> Document | None:
    product = names.fresh("product")
    if product is None:
        return None
    fact, _, title, version_kind, value_kind = _SPECS[rng.choice(sorted(_SPECS))]
    version = _value(rng, version_kind)
    sentence = fact.format(p=product, v=version, o=_value(rng, value_kind))
    return _document(rng, title.format(p=product, v=version), _fillers(rng, "product", product, cfg), [sentence])


def _periodical_distractor(rng: random.Random, names: _Names, cfg: LongBlocksConfig) -> Document | None:
    title, person = names.fresh("periodical"), names.fresh("person")
    if title is None or person is None:
        return None
    rel = rng.choice([r for r in PERSON_RELATIONS if not r.bridge])
    claim = rel.fact.format(s=person, o=_value(rng, rel.value))
    return _document(rng, title, _fillers(rng, "periodical", title, cfg), [claim])


_DISTRACTORS: dict[str, Callable[..., Document | None]] = {
    "person": functools.partial(_entity_distractor, kind="person"),
    "company": functools.partial(_entity_distractor, kind="company"),
    "product": _product_distractor,
    "periodical": _periodical_distractor,
}
_DISTRACTOR_WEIGHTS = {"person": 5, "company": 2, "product": 2, "periodical": 1}


def _noise(rng: random.Random, names: _Names, cfg: LongBlocksConfig) -> Document | None:
    """A document about a fresh person, company or product that states no fact: only fillers.

    One filler more than a distractor's fillers, so it is about as long as a distractor (fillers + fact).
    """
    kind = rng.choice(("person", "company", "product"))
    name = names.fresh(kind)
    if name is None:
        return None
    count = min(rng.randint(cfg.min_fillers, cfg.max_fillers) + 1, len(FILLERS[kind]))
    return Document(title=name, text=" ".join(t.format(n=name) for t in rng.sample(FILLERS[kind], count)))


def _distractor(
    rng: random.Random, names: _Names, forbidden: re.Pattern[str], cfg: LongBlocksConfig, *, noise: bool = False
) -> Document:
    """A document about fresh entities that mentions nothing ``forbidden`` matches (``noise``: no fact either)."""
    kinds = list(_DISTRACTOR_WEIGHTS)
    for _ in range(1000):
        if noise:
            doc = _noise(rng, names, cfg)
        else:
            kind = rng.choices(kinds, weights=[_DISTRACTOR_WEIGHTS[k] for k in kinds])[0]
            doc = _DISTRACTORS[kind](rng, names, cfg)
        if doc is not None and not forbidden.search(f"{doc.title}\n{doc.text}"):
            return doc
    raise RuntimeError("LongBlocks ran out of fresh distractor entities (context far too long for the name pools)")


def _long_only(rng: random.Random, names: _Names, forbidden: re.Pattern[str], cfg: LongBlocksConfig) -> Document:
    """A document for the long context alone: noise with chance ``cfg.long_noise``, else a distractor."""
    # No draw at long_noise=0: the random stream, hence every file made before the option, is unchanged.
    noise = bool(cfg.long_noise) and rng.random() < cfg.long_noise
    return _distractor(rng, names, forbidden, cfg, noise=noise)


# --------------------------------------------------------------------------- families


@dataclass(kw_only=True)
class _Task:
    """One question of a family, before contexts are built around its gold documents."""

    question: str
    answer: str
    metric: str
    gold: list[Document]
    hard_negatives: list[Document] = field(default_factory=list)
    """Near-duplicates of the gold document: short context first, then long."""
    forbidden: list[str]
    """Strings no distractor may contain (the answer, the gold entities)."""
    metadata: dict[str, Any]


def _multihop(rng: random.Random, names: _Names, cfg: LongBlocksConfig) -> _Task:
    hops = rng.randint(cfg.min_hops, cfg.max_hops)
    kind, entity = "person", names.fresh("person")
    chain, relations, gold = [entity], [], []
    for _ in range(hops - 1):
        rel = rng.choice([r for r in RELATIONS if r.bridge and r.subject == kind])
        nxt = names.fresh(rel.value)
        gold.append(_document(rng, entity, _fillers(rng, kind, entity, cfg), [rel.fact.format(s=entity, o=nxt)]))
        relations.append(rel)
        chain.append(nxt)
        kind, entity = rel.value, nxt
    rel = rng.choice([r for r in RELATIONS if not r.bridge and r.subject == kind])
    answer = _value(rng, rel.value)
    gold.append(_document(rng, entity, _fillers(rng, kind, entity, cfg), [rel.fact.format(s=entity, o=answer)]))
    phrase = chain[0]
    for bridge in relations:
        phrase = bridge.ask.format(x=phrase)
    return _Task(
        question=rel.ask.format(x=phrase), answer=answer, metric="em", gold=gold, forbidden=[answer, *chain],
        metadata={"hops": hops, "relations": [r.name for r in [*relations, rel]]},
    )


def _grounding(rng: random.Random, names: _Names, cfg: LongBlocksConfig) -> _Task:
    kind = rng.choice(("release", "weight", "source"))
    n = 1 + rng.randint(cfg.min_near_duplicates, cfg.max_near_duplicates)
    if kind == "source":
        person = names.fresh("person")
        rel = rng.choice([r for r in PERSON_RELATIONS if not r.bridge])
        surname = rng.choice(SURNAMES)
        titles = [names.claim(_PERIODICAL_TITLE.format(surname=surname, kind=k)) for k in rng.sample(PERIODICALS, n)]
        facts = [rel.fact.format(s=person, o=value) for value in _distinct_values(rng, rel.value, n)]
        question, answer = _SOURCE_ASK.format(claim=facts[0].removesuffix(".")), titles[0]
        fillers, forbidden = _fillers(rng, "periodical", "", cfg), [answer, person]
    else:
        fact, ask, title, version_kind, value_kind = _SPECS[kind]
        product = names.fresh("product")
        versions = _distinct_values(rng, version_kind, n)
        # Values never equal a version: "model 433" in a near-duplicate must not contain the answer 433.
        values = _distinct_values(rng, value_kind, n, exclude=tuple(versions))
        titles = [title.format(p=product, v=v) for v in versions]
        facts = [fact.format(p=product, v=v, o=o) for v, o in zip(versions, values)]
        question, answer = ask.format(p=product, v=versions[0]), values[0]
        fillers, forbidden = _fillers(rng, "product", product, cfg), [answer, product]
    # Near-duplicates: the same fillers with the fact at the same place; only the fact differs.
    position = rng.randint(0, len(fillers))
    texts = [" ".join([*fillers[:position], fact, *fillers[position:]]) for fact in facts]
    docs = [Document(title=title, text=text) for title, text in zip(titles, texts)]
    return _Task(
        question=question, answer=answer, metric="em", gold=docs[:1], hard_negatives=docs[1:],
        forbidden=forbidden, metadata={"hops": 1, "kind": kind, "near_duplicates": n - 1},
    )


def _longform(rng: random.Random, names: _Names, cfg: LongBlocksConfig) -> _Task:
    person = names.fresh("person")
    count = rng.randint(cfg.min_facts, cfg.max_facts)
    chosen = set(rng.sample(range(len(PERSON_RELATIONS)), count))
    relations = [rel for i, rel in enumerate(PERSON_RELATIONS) if i in chosen]  # canonical order
    objects = [_object(rng, names, rel.value) for rel in relations]
    facts = [rel.fact.format(s=person, o=obj) for rel, obj in zip(relations, objects)]
    shuffled = rng.sample(facts, len(facts))
    num_docs = rng.randint(min(2, count), min(count, 4))
    cuts = [0, *sorted(rng.sample(range(1, count), num_docs - 1)), count]
    gold = [
        _document(rng, person, _fillers(rng, "person", person, cfg), shuffled[a:b]) for a, b in zip(cuts, cuts[1:])
    ]
    entities = [obj for rel, obj in zip(relations, objects) if rel.bridge]
    return _Task(
        question=_LONGFORM_ASK.format(x=person), answer=" ".join(facts), metric="rougeL", gold=gold,
        forbidden=[person, *entities], metadata={"hops": count, "relations": [r.name for r in relations]},
    )


_TASKS: dict[str, Callable[[random.Random, _Names, LongBlocksConfig], _Task]] = {
    "multihop": _multihop, "grounding": _grounding, "longform": _longform,
}

# --------------------------------------------------------------------------- token budgets


class _Lengths:
    """Token lengths under one counter: per-document counts are cached, rendered contexts recounted."""

    def __init__(self, count_tokens: Callable[[str], int]) -> None:
        self.count = count_tokens
        self._bodies: dict[Document, int] = {}
        self._headers: dict[int, int] = {}
        self._separator = max(0, count_tokens("x\n\nx") - 2 * count_tokens("x"))

    def document(self, doc: Document, position: int) -> int:
        """Estimated tokens ``doc`` adds to a rendered context at 1-based ``position``."""
        if doc not in self._bodies:
            self._bodies[doc] = self.count(f"{doc.title}\n{doc.text}")
        if position not in self._headers:
            self._headers[position] = self.count(f"Document [{position}]")
        return self._bodies[doc] + self._headers[position] + (self._separator if position > 1 else 0)

    def estimate(self, docs: list[Document]) -> int:
        return sum(self.document(doc, i) for i, doc in enumerate(docs, start=1))

    def context(self, docs: list[Document]) -> int:
        return self.count(render_context(docs))


def _fitting(draw: Callable[[], Document], room: float, lengths: _Lengths, position: int) -> Document | None:
    """A drawn distractor whose estimated length fits in ``room`` tokens (32 tries), else None."""
    for _ in range(32):
        doc = draw()
        if lengths.document(doc, position) <= room:
            return doc
    return None


def _fill(
    fixed: list[Document], candidates: list[Document], draw: Callable[[], Document], budget: int,
    cfg: LongBlocksConfig, lengths: _Lengths, rng: random.Random,
) -> tuple[list[Document], int, list[Document]]:
    """``fixed`` + candidates that fit + distractors up to ``budget``, shuffled.

    Returns ``(documents, rendered tokens, candidates left out)``; the length is verified on the
    rendered text and corrected by removing or adding a distractor.
    """
    lo, hi = budget * (1 - cfg.tolerance), budget * (1 + cfg.tolerance)
    docs = list(fixed)
    total = lengths.estimate(docs)
    if total > hi:
        raise ValueError(
            f"the gold documents alone take ~{total} tokens, over short_tokens ({budget}) + {cfg.tolerance:.0%}: "
            f"raise short_tokens or lower max_hops ({cfg.max_hops}), max_facts ({cfg.max_facts}), "
            f"max_fillers ({cfg.max_fillers})"
        )
    added, left_out = [], []
    for doc in candidates:
        cost = lengths.document(doc, len(docs) + 1)
        if total < budget and total + cost <= hi:
            docs.append(doc)
            added.append(doc)
            total += cost
        else:
            left_out.append(doc)
    # Add a distractor only if it ends nearer the budget than stopping short would (at most 2x the gap).
    while total < budget:
        doc = _fitting(draw, min(hi - total, 2 * (budget - total)), lengths, len(docs) + 1)
        if doc is None:
            break
        docs.append(doc)
        added.append(doc)
        total += lengths.document(doc, len(docs))
    rng.shuffle(docs)
    for _ in range(16):
        n = lengths.context(docs)
        if lo <= n <= hi:
            return docs, n, left_out
        if n > hi and added:
            docs.remove(added.pop())
        elif n < lo and (doc := _fitting(draw, hi - n, lengths, len(docs) + 1)) is not None:
            docs.insert(rng.randrange(len(docs) + 1), doc)
            added.append(doc)
        else:
            break
    raise ValueError(f"could not fit a context to {budget} tokens +-{cfg.tolerance:.0%} (got {n})")


# --------------------------------------------------------------------------- generation


def _sample(cfg: LongBlocksConfig, index: int, lengths: _Lengths) -> Sample:
    # A string seed is hashed with SHA-512 by random.Random: stable across runs and processes.
    rng = random.Random(f"longblocks/{cfg.seed}/{index}")
    family = cfg.families[index % len(cfg.families)]
    names = _Names(rng)
    task = _TASKS[family](rng, names, cfg)
    forbidden = _mention_pattern(task.forbidden)
    draw = functools.partial(_distractor, rng, names, forbidden, cfg)
    short, short_len, left_out = _fill(task.gold, task.hard_negatives, draw, cfg.short_tokens, cfg, lengths, rng)
    draw_long = functools.partial(_long_only, rng, names, forbidden, cfg)
    long, long_len, _ = _fill(short, left_out, draw_long, cfg.long_tokens, cfg, lengths, rng)
    if len(long) <= len(short):
        raise ValueError(f"long context ({long_len} tokens) added no document to the short one ({short_len})")
    gold, near = set(task.gold), set(task.hard_negatives)
    metadata = {
        **task.metadata, "seed": cfg.seed, "index": index,
        "gold_positions_short": [i for i, doc in enumerate(short) if doc in gold],
        "gold_positions_long": [i for i, doc in enumerate(long) if doc in gold],
        "short_tokens": short_len, "long_tokens": long_len,
    }
    if cfg.long_noise:  # only then, so files made before the option are unchanged
        in_short = set(short)
        metadata["noise_positions_long"] = [
            i for i, doc in enumerate(long) if doc not in in_short and not _read_facts([doc])
        ]
    if task.hard_negatives:
        metadata["near_duplicate_positions_short"] = [i for i, doc in enumerate(short) if doc in near]
        metadata["near_duplicate_positions_long"] = [i for i, doc in enumerate(long) if doc in near]
    return Sample(
        id=f"longblocks-{cfg.seed}-{index:06d}", family=family, question=task.question, answers=[task.answer],
        metric=task.metric, gold_documents=task.gold, short_context=short, long_context=long, metadata=metadata,
    )


def generate(cfg: LongBlocksConfig, count_tokens: Callable[[str], int], *, progress: bool = False) -> list[Sample]:
    """``cfg.num_samples`` LongBlocks samples; budgets are in ``count_tokens`` units (of the rendered context).

    Deterministic: the same ``cfg`` gives the same samples; sample ``i`` uses only the random
    stream seeded by ``(cfg.seed, i)``. Metadata: ``hops`` (facts the answer needs), ``relations``
    or ``kind``, ``gold_positions_short`` / ``gold_positions_long`` (0-based indices into the
    contexts), ``short_tokens`` / ``long_tokens`` (rendered lengths), ``seed``, ``index``; with
    ``long_noise`` also ``noise_positions_long`` (the noise documents); grounding
    also ``near_duplicates`` and ``near_duplicate_positions_short`` / ``_long``.
    """
    from tqdm import tqdm

    lengths = _Lengths(count_tokens)
    indices = tqdm(range(cfg.num_samples), desc="longblocks", unit="sample", disable=not progress, mininterval=1.0)
    return [_sample(cfg, index, lengths) for index in indices]


# --------------------------------------------------------------------------- rule-based solver


def _sentences(text: str) -> list[str]:
    # Sentences end with "." and the next starts with a capital; "3.2" and dates never split.
    return re.split(r"(?<=\.) (?=[A-Z])", text)


@functools.cache
def _grounding_patterns() -> dict[str, re.Pattern[str]]:
    return {kind: _pattern(spec[0], {"p": _SLOTS["product"], "v": _SLOTS[spec[3]], "o": _SLOTS[spec[4]]})
            for kind, spec in _SPECS.items()}


def _read_facts(documents: list[Document]) -> dict[tuple[str, str], list[str]]:
    """``(relation, subject) -> objects`` (document order) of every fact sentence in ``documents``."""
    grounding = _grounding_patterns()
    facts: dict[tuple[str, str], list[str]] = {}
    for doc in documents:
        for sentence in _sentences(doc.text):
            for rel in RELATIONS:
                if m := rel.regex.fullmatch(sentence):
                    facts.setdefault((rel.name, m["s"]), []).append(m["o"])
            for kind, regex in grounding.items():
                if m := regex.fullmatch(sentence):
                    facts.setdefault((kind, f"{m['p']}|{m['v']}"), []).append(m["o"])
    return facts


@functools.lru_cache(maxsize=None)
def _ask_pattern(template: str, **slots: str) -> re.Pattern[str]:
    return _pattern(template, {"x": ".+", "claim": ".+", **slots})


def _solve_multihop(question: str, facts: dict[tuple[str, str], list[str]]) -> str | None:
    for terminal in (r for r in RELATIONS if not r.bridge):
        if m := _ask_pattern(terminal.ask).fullmatch(question):
            phrase, path = m["x"], [terminal]
            while bridge := next((r for r in RELATIONS if r.bridge and phrase.startswith(r.ask[:-3])), None):
                phrase, path = phrase[len(bridge.ask) - 3 :], [bridge, *path]
            entity: str | None = phrase
            for rel in path:
                entity = facts.get((rel.name, entity), [None])[0]
                if entity is None:
                    return None
            return entity
    return None


def solve(sample: Sample, documents: list[Document]) -> str | None:
    """Answer ``sample.question`` from ``documents`` by reading their fact sentences; None if they do not say.

    A rule-based reader used by the tests to show the data is answerable (from the short or the
    long context) and not answerable from distractors alone. It lives here because it must mirror
    the generator's templates exactly. The family is read from the question text alone.
    """
    question = sample.question
    facts = _read_facts(documents)
    if m := _ask_pattern(_LONGFORM_ASK, x=_NAME).fullmatch(question):
        person = m["x"]
        said = [rel.fact.format(s=person, o=facts[(rel.name, person)][0])
                for rel in PERSON_RELATIONS if (rel.name, person) in facts]
        return " ".join(said) or None
    if m := _ask_pattern(_SOURCE_ASK).fullmatch(question):
        claim = m["claim"] + "."
        return next((doc.title for doc in documents if claim in _sentences(doc.text)), None)
    for kind, (_, ask, _, version_kind, _) in _SPECS.items():
        if m := _ask_pattern(ask, p=_SLOTS["product"], v=_SLOTS[version_kind]).fullmatch(question):
            return facts.get((kind, f"{m['p']}|{m['v']}"), [None])[0]
    return _solve_multihop(question, facts)
