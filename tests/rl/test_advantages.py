"""megatron_lcr.rl.advantages: GRPO group advantages, DAPO dynamic sampling and overlong handling."""

import pytest
import torch

from megatron_lcr.config import from_dict
from megatron_lcr.rl.advantages import (
    AdvantageConfig,
    GroupFiller,
    group_advantages,
    informative_groups,
    overlong_penalty,
    response_mask,
)

# Three prompts, four responses each. Row 1 is a zero-variance group.
REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])


def test_group_advantages_hand_values_unbiased_std():
    adv = group_advantages(REWARDS, normalize_std=True, eps=1e-6)
    # Row 0: mean 1/2, deviations +-1/2, unbiased var = 4 * 1/4 / 3 = 1/3, std 0.57735 -> +-0.866025.
    a = 0.5 / (3**-0.5 + 1e-6)
    # Row 2: mean 1/4, deviations (-1/4 x3, 3/4), var = (3/16 + 9/16) / 3 = 1/4, std 1/2.
    b = 1.0 / (0.5 + 1e-6)
    expected = torch.tensor(
        [[a, -a, -a, a], [0.0, 0.0, 0.0, 0.0], [-0.25 * b, -0.25 * b, -0.25 * b, 0.75 * b]]
    )
    torch.testing.assert_close(adv, expected)
    assert torch.isfinite(adv).all()


def test_group_advantages_without_std_is_mean_centred():
    adv = group_advantages(REWARDS, normalize_std=False)
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0], [-0.25, -0.25, -0.25, 0.75]])
    torch.testing.assert_close(adv, expected)


def test_single_response_groups_have_zero_advantage():
    adv = group_advantages(torch.tensor([[3.0], [0.0]]))
    assert torch.equal(adv, torch.zeros(2, 1))


def test_group_advantages_rejects_flat_rewards():
    with pytest.raises(ValueError, match=r"rewards must be \[N, G\], got shape \(4,\)"):
        group_advantages(torch.zeros(4))


def test_informative_groups():
    assert informative_groups(REWARDS).tolist() == [True, False, True]
    assert informative_groups(torch.tensor([[0.0, 0.0], [0.5, 0.5 + 1e-7]])).tolist() == [False, True]


def test_group_filler_keeps_first_informative_groups_in_order():
    filler = GroupFiller(target=3, max_extra_rounds=2)
    assert filler.needs_more
    kept = filler.add(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]), ["a", "b", "c", "d"])
    assert kept == 2 and filler.kept == ["a", "c"] and filler.dropped == 2
    assert filler.needs_more and not filler.done
    kept = filler.add(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), ["e", "f", "g"])
    assert kept == 1 and filler.kept == ["a", "c", "f"]
    assert (filler.dropped, filler.surplus, filler.rounds) == (3, 1, 2)
    assert filler.done and not filler.needs_more
    assert filler.metrics() == {
        "dynamic_sampling/rounds": 2.0,
        "dynamic_sampling/kept_groups": 3.0,
        "dynamic_sampling/dropped_groups": 3.0,
        "dynamic_sampling/surplus_groups": 1.0,
    }


def test_group_filler_stops_after_its_rounds_and_names_groups_by_default():
    filler = GroupFiller(target=5, max_extra_rounds=1)
    filler.add(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    filler.add(torch.tensor([[2.0, 2.0], [0.0, 3.0]]))
    assert filler.kept == [(0, 0), (1, 1)]
    assert not filler.done and not filler.needs_more
    with pytest.raises(RuntimeError, match=r"round 3 exceeds 1 \+ max_extra_rounds \(2\)"):
        filler.add(torch.tensor([[1.0, 0.0]]))


def test_group_filler_validation():
    with pytest.raises(ValueError, match="target must be >= 1, got 0"):
        GroupFiller(target=0, max_extra_rounds=1)
    with pytest.raises(ValueError, match="2 groups for rewards of shape"):
        GroupFiller(target=1, max_extra_rounds=0).add(torch.zeros(3, 2), ["a", "b"])


def test_overlong_penalty_at_each_boundary():
    # max_len 20, buffer 4: free up to 16, ramp (16 - L) / 4 over 17..20, -1 at 20 and beyond.
    lengths = torch.tensor([0, 10, 16, 17, 18, 20, 21, 100])
    got = overlong_penalty(lengths, max_len=20, buffer=4, factor=1.0)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]))
    half = overlong_penalty(lengths, max_len=20, buffer=4, factor=0.5)
    torch.testing.assert_close(half, 0.5 * got)


def test_overlong_penalty_without_buffer_and_validation():
    got = overlong_penalty(torch.tensor([19, 20, 21]), max_len=20, buffer=0, factor=1.0)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -1.0]))
    with pytest.raises(ValueError, match=r"buffer \(30\) must be in \[0, max_len \(20\)\]"):
        overlong_penalty(torch.tensor([1]), max_len=20, buffer=30, factor=1.0)


def test_response_mask_zeroes_truncated_rows_when_asked():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    reasons = ["stop", "length", None]
    masked = response_mask(reasons, mask, mask_truncated=True)
    torch.testing.assert_close(masked, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    assert masked.dtype == mask.dtype
    assert torch.equal(response_mask(reasons, mask, mask_truncated=False), mask)
    assert response_mask(reasons, mask.bool(), mask_truncated=True).tolist()[1] == [False] * 3
    with pytest.raises(ValueError, match="2 finish reasons"):
        response_mask(["stop", "stop"], mask, mask_truncated=True)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"eps": 0.0}, "eps must be > 0, got 0.0"),
        ({"max_sampling_rounds": -1}, "max_sampling_rounds must be >= 0, got -1"),
        ({"overlong_buffer": -4}, "overlong_buffer must be >= 0, got -4"),
        ({"overlong_penalty": -1.0}, "overlong_penalty must be >= 0, got -1.0"),
    ],
)
def test_config_validation(fields, message):
    with pytest.raises(ValueError, match=message):
        AdvantageConfig(**fields)


def test_config_from_yaml_mapping():
    cfg = from_dict(AdvantageConfig, {"dynamic_sampling": True, "overlong_buffer": 4096})
    assert cfg.dynamic_sampling and cfg.overlong_buffer == 4096 and cfg.normalize_std
