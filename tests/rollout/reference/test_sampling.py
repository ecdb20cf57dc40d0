"""Sampling math and stop rules of the reference server against hand-computed values."""

import math

import pytest
import torch

from megatron_lcr.rollout.reference.sampling import (
    DEFAULT_MAX_NEW_TOKENS,
    SamplingSpec,
    check_finish,
    generator_seed,
    keep_mask,
    parse_sampling_params,
    sample_token,
    temperature_logprobs,
    top_logprobs,
    trim_stop_string,
    visible_output,
)


def _hand_log_softmax(values: list[float]) -> list[float]:
    log_z = math.log(sum(math.exp(v) for v in values))
    return [v - log_z for v in values]


def test_temperature_logprobs_divide_logits_by_temperature():
    logits = torch.tensor([1.0, 2.0, 3.0])
    # T = 2: log_softmax([0.5, 1.0, 1.5]); log Z = 1.5 + log(1 + e^-0.5 + e^-1) = 2.1802697...
    expected = [0.5 - 2.1802697, 1.0 - 2.1802697, 1.5 - 2.1802697]
    assert temperature_logprobs(logits, 2.0).tolist() == pytest.approx(expected, abs=1e-6)
    assert temperature_logprobs(logits, 0.7).tolist() == pytest.approx(
        _hand_log_softmax([1 / 0.7, 2 / 0.7, 3 / 0.7]), abs=1e-6)


def test_greedy_temperature_counts_as_one():
    logits = torch.tensor([0.3, -1.0, 2.5])
    assert temperature_logprobs(logits, 0.0).tolist() == pytest.approx(_hand_log_softmax([0.3, -1.0, 2.5]), abs=1e-6)


# probs sorted: 0.4 (id 1), 0.3 (id 3), 0.2 (id 2), 0.1 (id 0); mass before each: 0, 0.4, 0.7, 0.9.
PROBS = torch.tensor([0.1, 0.4, 0.2, 0.3])


@pytest.mark.parametrize(
    "top_k, top_p, min_p, kept",
    [
        (-1, 1.0, 0.0, {0, 1, 2, 3}),
        (2, 1.0, 0.0, {1, 3}),
        (1, 1.0, 0.0, {1}),
        (-1, 0.5, 0.0, {1, 3}),  # 0.4 < 0.5 needs the next token; 0.4 + 0.3 >= 0.5
        (-1, 0.4, 0.0, {1}),  # the first token alone reaches 0.4
        (-1, 0.75, 0.0, {1, 3, 2}),
        (-1, 1e-9, 0.0, {1}),  # the most likely token always survives
        (3, 0.5, 0.0, {1, 3}),  # joint: both limits apply to the same (unrenormalised) ranking
        (-1, 1.0, 0.6, {1, 3}),  # min_p: keep p >= 0.6 * 0.4 = 0.24
        (-1, 1.0, 0.5, {1, 3, 2}),  # keep p >= 0.2
    ],
)
def test_keep_mask(top_k, top_p, min_p, kept):
    mask = keep_mask(PROBS, top_k=top_k, top_p=top_p, min_p=min_p)
    assert {i for i, k in enumerate(mask.tolist()) if k} == kept


def test_keep_mask_breaks_ties_by_token_id():
    mask = keep_mask(torch.tensor([0.25, 0.25, 0.25, 0.25]), top_k=2, top_p=1.0, min_p=0.0)
    assert mask.tolist() == [True, True, False, False]


def test_sample_token_greedy_and_top_k_one_pick_the_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    gen = torch.Generator().manual_seed(0)
    for spec in (SamplingSpec(temperature=0.0), SamplingSpec(temperature=1.3, top_k=1)):
        token, logprobs = sample_token(logits, spec, gen)
        assert token == 1
    # The reported log-prob of top_k=1 at T=1.3 is still log_softmax(logits / 1.3), not 0.
    assert float(logprobs[1]) == pytest.approx(_hand_log_softmax([v / 1.3 for v in logits.tolist()])[1], abs=1e-6)


def test_sample_token_logprob_is_after_temperature_before_truncation():
    logits = torch.log(PROBS)
    spec = SamplingSpec(temperature=0.5, top_k=2)
    gen = torch.Generator().manual_seed(1)
    token, logprobs = sample_token(logits, spec, gen)
    assert token in (1, 3)
    # Untruncated p_T(i) = p_i^2 / sum p^2 at T = 0.5; sum p^2 = 0.01 + 0.16 + 0.04 + 0.09 = 0.30.
    assert float(logprobs[token]) == pytest.approx(math.log(PROBS[token].item() ** 2 / 0.30), abs=1e-6)


def test_sample_token_draws_from_the_kept_mass():
    logits = torch.log(PROBS)
    spec = SamplingSpec(temperature=1.0, top_k=2)
    gen = torch.Generator().manual_seed(2)
    draws = [sample_token(logits, spec, gen)[0] for _ in range(4000)]
    assert set(draws) == {1, 3}
    # Renormalised over the kept tokens: 0.4 / 0.7 for token 1.
    assert draws.count(1) / len(draws) == pytest.approx(0.4 / 0.7, abs=0.03)


def test_same_generator_seed_repeats_the_samples():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    spec = SamplingSpec(temperature=1.0)

    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        return [sample_token(logits, spec, gen)[0] for _ in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_generator_seed():
    by_seed = generator_seed(sampling_seed=5, server_seed=0, rid="a", copy_index=0)
    assert by_seed == generator_seed(sampling_seed=5, server_seed=9, rid="b", copy_index=0)  # rid unused
    assert by_seed != generator_seed(sampling_seed=5, server_seed=0, rid="a", copy_index=1)
    by_rid = generator_seed(sampling_seed=None, server_seed=0, rid="a", copy_index=0)
    assert by_rid != generator_seed(sampling_seed=None, server_seed=0, rid="b", copy_index=0)
    assert by_rid != generator_seed(sampling_seed=None, server_seed=1, rid="a", copy_index=0)
    assert 0 <= by_seed < 2**63


def test_top_logprobs_largest_first():
    assert top_logprobs(torch.tensor([-3.0, -1.0, -2.0]), 2) == [(-1.0, 1), (-2.0, 2)]


def test_parse_sampling_params_defaults_and_normalisation():
    assert parse_sampling_params(None) == SamplingSpec()
    assert SamplingSpec().max_new_tokens == DEFAULT_MAX_NEW_TOKENS == 128
    spec = parse_sampling_params({"temperature": None, "stop": "x", "stop_token_ids": [4, None, 5],
                                  "spaces_between_special_tokens": True, "max_new_tokens": None})
    assert spec.temperature == 1.0 and spec.stop == ("x",) and spec.stop_token_ids == frozenset({4, 5})
    assert spec.max_new_tokens is None
    assert parse_sampling_params({"temperature": 1e-7}).greedy


@pytest.mark.parametrize(
    "params, message",
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"temperature": -1}, "temperature"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"min_p": 2}, "min_p"),
        ({"n": 0}, "n must"),
        ({"stop": [""]}, "stop"),
        ({"bogus": 1}, "bogus"),
        ({"repetition_penalty": 1.2}, "repetition_penalty"),
        ({"regex": "a+"}, "regex"),
    ],
)
def test_parse_sampling_params_refuses(params, message):
    with pytest.raises(ValueError, match=message):
        parse_sampling_params(params)


def _finish(ids, spec, max_new=10, eos=frozenset({2})):
    return check_finish(ids, spec, max_new_tokens=max_new, eos_token_ids=eos,
                        decode=lambda t: " ".join(f"w{i}" for i in t))


def test_check_finish_order_and_rules():
    spec = SamplingSpec()
    assert _finish([5, 6], spec) is None
    assert _finish([5, 2], spec) == {"type": "stop", "matched": 2}
    assert _finish([5, 2], SamplingSpec(ignore_eos=True)) is None
    assert _finish([5, 9], SamplingSpec(stop_token_ids=frozenset({9}))) == {"type": "stop", "matched": 9}
    # ignore_eos ignores stop_token_ids too, as SGLang 0.5.23 does (found by the contract suite)
    assert _finish([9], SamplingSpec(ignore_eos=True, stop_token_ids=frozenset({9}))) is None
    assert _finish([9], SamplingSpec(stop_token_ids=frozenset({9}))) == {"type": "stop", "matched": 9}
    # length comes first, as SGLang's Req.check_finished
    assert _finish([5, 2], spec, max_new=2) == {"type": "length", "length": 2}
    assert _finish([5, 61], SamplingSpec(stop=("w6",))) == {"type": "stop", "matched": "w6"}
    assert _finish([5, 7], SamplingSpec(stop=("w6",))) is None


def test_trimming():
    stop_tok = {"type": "stop", "matched": 9}
    assert visible_output([5, 9], stop_tok, SamplingSpec()) == [5]
    assert visible_output([5, 9], stop_tok, SamplingSpec(no_stop_trim=True)) == [5, 9]
    assert visible_output([5, 9], {"type": "length", "length": 2}, SamplingSpec()) == [5, 9]
    stop_str = {"type": "stop", "matched": "w6"}
    assert trim_stop_string("w5 w61 w7", stop_str, SamplingSpec()) == "w5 "
    assert trim_stop_string("w5 w61 w7", stop_str, SamplingSpec(no_stop_trim=True)) == "w5 w6"
    assert trim_stop_string("w5 w7", {"type": "length", "length": 2}, SamplingSpec()) == "w5 w7"


def test_top_p_one_keeps_every_token_despite_rounding():
    # Peaked: the fp32 cumulative mass reaches 1.0 long before the tail, so "mass before < 1.0" would drop it.
    probs = torch.softmax(torch.randn(5000, generator=torch.Generator().manual_seed(0)) * 10, dim=-1)
    assert keep_mask(probs, top_k=-1, top_p=1.0, min_p=0.0).all()
