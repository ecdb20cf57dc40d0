"""train/rl/step.py: ``train_step`` with several optimizer updates per rollout batch, against updates
driven by hand (tests/workers/rl_mini_batches.py)."""

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
