"""train/rl/step.py: ``train_step`` with several optimizer updates per rollout batch, against updates
driven by hand (tests/workers/rl_mini_batches.py); how rollouts are split into updates, which views
share a micro-batch, and how the updates' metrics combine."""

from __future__ import annotations

import json

import pytest

from tests.distributed import WORKERS, run_torchrun
from tests.tiny_hf import make_tiny_hf


@pytest.mark.dist
def test_mini_batches_equal_hand_driven_updates(tmp_path):
    """trainer.mini_batches / epochs: one mini-batch is the single update of before, bit for bit; four
    are four updates on a quarter of the rollouts each, old log-probs the rollout policy's throughout,
    so from the second update on the ratio is off 1 (and the clip can act); two epochs of two repeat
    the two updates."""
    model = make_tiny_hf("llama", tmp_path / "llama", num_layers=2)
    out = tmp_path / "mini.json"
    run_torchrun(WORKERS / "rl_mini_batches.py", 1, [str(model), str(out)])
    runs = json.loads(out.read_text())
    for mini_batches, run in runs.items():
        assert run["weights_equal"] and run["weights_moved"], mini_batches
        losses = [u["loss"] for u in run["updates"]]
        assert run["step"]["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
        assert run["step"]["train/micro_batches"] == len(losses)
    one, four = runs["1x1"], runs["4x1"]
    assert one["step"]["loss"] == one["updates"][0]["loss"] and one["step"]["ratio_mean"] == pytest.approx(1.0)
    ratios = [u["ratio_mean"] for u in four["updates"]]
    assert ratios[0] == pytest.approx(1.0) and all(abs(r - 1.0) > 1e-4 for r in ratios[1:]), ratios
    assert four["step"]["train/updates"] == 4 and four["step"]["skipped"] == 0.0
    assert runs["2x2"]["step"]["train/updates"] == 4  # two passes of two updates
    assert abs(runs["2x2"]["updates"][2]["ratio_mean"] - 1.0) > 1e-4  # the second pass is off-policy too


def test_rollout_parts_split_the_rollouts_in_order():
    from megatron_lcr.train.rl.step import rollout_parts

    assert rollout_parts(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert rollout_parts(8, 1) == [range(0, 8)]
    assert [len(p) for p in rollout_parts(10, 4)] == [2, 3, 2, 3]  # dynamic sampling's extra groups: near-equal


def test_training_units_pair_a_view_with_its_policy_row_only_when_asked():
    from megatron_lcr.rl.sequences import Role, TokenSequence
    from megatron_lcr.train.rl.step import training_units

    seqs = [TokenSequence([1], [2], Role.POLICY, rollout=0), TokenSequence([1], [2], Role.LONG_CONTEXT, rollout=0),
            TokenSequence([1], [2], Role.POLICY, rollout=1), TokenSequence([1], [2], Role.LONG_CONTEXT, rollout=2)]
    assert training_units(seqs, paired=True) == [[0, 1], [2], [3]]  # rollout 2's POLICY row is not in this update
    assert training_units(seqs, paired=False) == [[0], [1], [2], [3]]


def test_combine_updates_means_maxes_and_counts():
    from megatron_lcr.train.rl.step import combine_updates

    one = {"loss": 1.0, "ratio_max": 1.0, "lr": 1e-3, "skipped": 0.0, "train/sequences": 4.0}
    assert combine_updates([one]) is one
    two = {"loss": 3.0, "ratio_max": 1.5, "lr": 5e-4, "skipped": 0.0, "train/sequences": 6.0}
    bad = {"loss": float("nan"), "ratio_max": 9.0, "lr": 5e-4, "skipped": 1.0, "train/sequences": 5.0}
    out = combine_updates([one, two, bad])
    assert out["loss"] == 2.0 and out["ratio_max"] == 9.0 and out["lr"] == 5e-4  # NaN of a skipped update left out
    assert out["train/sequences"] == 15.0 and out["train/updates"] == 3.0 and out["train/skipped_updates"] == 1.0
    assert out["skipped"] == 0.0 and combine_updates([bad, bad])["skipped"] == 1.0
