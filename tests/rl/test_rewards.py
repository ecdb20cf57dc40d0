"""megatron_lcr.rl.rewards: SQuAD EM/F1, sub-EM, ROUGE-L and math-verify rewards on hand-worked cases.

The math check's process and timer handling is tested in tests/verify/test_math_verify.py.
"""

import pytest

from megatron_lcr.rl.rewards import (
    FAMILY_DEFAULT_REWARD,
    REWARDS,
    exact_match,
    get_reward,
    lcs_length,
    math_equal,
    normalize_answer,
    reward_for_family,
    reward_name_for,
    rouge_l,
    sub_em,
    token_f1,
)

# --- normalisation (SQuAD v1.1: lower, punctuation, articles, whitespace, in that order) ---


@pytest.mark.parametrize(
    "text, normalised",
    [
        ("The Cat!", "cat"),
        ("  An   apple, a pear; THE end.  ", "apple pear end"),
        ("Theater", "theater"),  # articles only as whole words
        ("the-cat", "thecat"),  # punctuation goes first, so the article is no longer a word
        ("U.S.A.", "usa"),
        ("a", ""),
        ("café—naïve", "café—naïve"),  # non-ASCII punctuation is kept, as in the script
    ],
)
def test_normalize_answer(text, normalised):
    assert normalize_answer(text) == normalised


# --- exact match ---


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("The Cat!", ["cat"], 1.0),
        ("cats", ["cat"], 0.0),
        ("dog", ["cat", "a Dog."], 1.0),  # max over answers
        ("black cat", ["cat"], 0.0),
        ("the", ["an"], 1.0),  # both normalise to "": equal
    ],
)
def test_exact_match(prediction, answers, expected):
    assert exact_match(prediction, answers) == expected


# --- token F1 ---


def test_token_f1_partial_overlap_by_hand():
    # "the big black cat" -> [big, black, cat]; "a black dog" -> [black, dog]: 1 common token.
    # precision 1/3, recall 1/2, F1 = 2 * (1/6) / (5/6) = 0.4
    assert token_f1("the big black cat", ["a black dog"]) == pytest.approx(0.4)


def test_token_f1_counts_repeated_tokens_once_per_match():
    # [new, york, new, york] vs [new, york]: common = min counts = 2; P = 2/4, R = 2/2, F1 = 2/3
    assert token_f1("New York, New York", ["new york"]) == pytest.approx(2 / 3)


def test_token_f1_max_over_answers_and_extremes():
    # vs "red": P = 1/2, R = 1 -> 2/3; vs "red apple": exact -> 1.0
    assert token_f1("red apple", ["red", "red apple"]) == 1.0
    assert token_f1("red apple", ["red"]) == pytest.approx(2 / 3)
    assert token_f1("green", ["red apple"]) == 0.0
    assert token_f1("the", ["a"]) == 0.0  # SQuAD v1.1: no common token -> 0, even both empty


# --- sub-EM ---


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("It is Paris, France.", ["paris"], 1.0),
        ("Parisian cafes", ["paris"], 0.0),  # word boundaries, not substrings
        ("New York City", ["York City"], 1.0),  # contiguous run of tokens
        ("New City of York", ["York City"], 0.0),  # tokens present but not contiguous
        ("It is Paris", ["london", "The Paris"], 1.0),
        ("the", ["a"], 1.0),  # empty gold matches only an empty prediction
        ("anything", ["the"], 0.0),
    ],
)
def test_sub_em(prediction, answers, expected):
    assert sub_em(prediction, answers) == expected


# --- ROUGE-L ---


def test_lcs_length_by_hand():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # CLRS's example: "BCBA"
    assert lcs_length(["x"], []) == 0
    assert lcs_length(["b", "c", "d"], ["c", "e"]) == 1


def test_rouge_l_by_hand():
    # [police, killed, gunman] vs [police, kill, gunman]: LCS = [police, gunman] = 2
    # P = 2/3, R = 2/3, F1 = 2/3
    assert rouge_l("police killed the gunman", ["the police kill the gunman"]) == pytest.approx(2 / 3)
    # [one, two, three, four] vs [two, four, five]: LCS = [two, four] = 2; P = 2/4, R = 2/3,
    # F1 = 2 * (1/3) / (7/6) = 4/7
    assert rouge_l("one two three four", ["two four five"]) == pytest.approx(4 / 7)
    assert rouge_l("Two four five.", ["one two three four", "two four five"]) == 1.0
    assert rouge_l("alpha", ["beta"]) == 0.0


def test_rouge_l_order_matters_unlike_f1():
    # Same bag of tokens, reversed order: F1 = 1, LCS = 1 -> P = R = 1/3
    assert token_f1("c b a", ["a b c"]) == 1.0
    assert rouge_l("gamma beta alpha", ["alpha beta gamma"]) == pytest.approx(1 / 3)


# --- math ---


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("0.5", ["\\frac{1}{2}"], 1.0),
        ("\\frac{1}{2}", ["0.5"], 1.0),
        ("1+2x", ["2x+1"], 1.0),  # bare expressions are wrapped in $...$, not read as "2"
        ("The answer is $\\boxed{1+2x}$", ["2x+1"], 1.0),
        ("2x+2", ["2x+1"], 0.0),
        ("4", ["3"], 0.0),
        ("\\sqrt{2}/2", ["\\frac{\\sqrt{2}}{2}"], 1.0),
        ("5", ["3", "5"], 1.0),  # max over answers
        ("\\frac{1}{", ["1"], 0.0),  # unparsable prediction
        ("", ["1"], 0.0),
        ("1", ["\\frac{"], 0.0),  # unparsable gold
    ],
)
def test_math_equal(prediction, answers, expected):
    assert math_equal(prediction, answers) == expected


# --- None prediction, empty answers, registry ---


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_every_reward_scores_none_as_zero(name):
    assert get_reward(name)(None, ["1"]) == 0.0


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_every_reward_gives_full_marks_for_the_gold_and_rejects_empty_answers(name):
    assert get_reward(name)("42", ["42"]) == 1.0
    assert get_reward(name)("42", "42") == 1.0  # a bare string is one answer, not its characters
    with pytest.raises(ValueError, match="no gold answers"):
        get_reward(name)("42", [])


def test_registry_names_and_unknown_reward():
    assert set(REWARDS) == {"em", "f1", "sub_em", "math", "rougeL"}
    assert get_reward("f1") is token_f1
    with pytest.raises(ValueError, match=r"unknown reward 'bleu'; valid: 'em', 'f1', 'sub_em', 'math', 'rougeL'"):
        get_reward("bleu")


@pytest.mark.parametrize(
    "family, metric, name",
    [
        ("multihop", None, "em"),
        ("grounding", None, "em"),
        ("musique", None, "em"),
        ("hotpotqa", None, "em"),
        ("2wiki", None, "em"),
        ("longform", None, "rougeL"),
        ("gsm8k", None, "math"),
        ("math500", "em", "math"),  # math families ignore the schema metric (it has no math value)
        ("longform", "rougeL", "rougeL"),
        ("longbench", "f1", "f1"),  # the sample's metric decides for other families
        ("musique", "f1", "f1"),
    ],
)
def test_reward_name_for(family, metric, name):
    assert reward_name_for(family, metric) == name
    assert reward_for_family(family, metric) is REWARDS[name]


def test_reward_name_for_errors():
    with pytest.raises(ValueError, match="family 'trivia' has no default reward"):
        reward_name_for("trivia")
    with pytest.raises(ValueError, match="unknown reward 'bleu'"):
        reward_name_for("musique", "bleu")
    assert set(FAMILY_DEFAULT_REWARD.values()) <= set(REWARDS)
