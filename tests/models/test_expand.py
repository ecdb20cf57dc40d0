"""Block expansion (models/expand.py): the deeper model computes the original's logits exactly.

The models are the perturbed tiny ones of tests/tiny_hf.py (non-trivial norms, GQA, Llama 3.1 rope
scaling; Qwen3's q/k norms), so a copy placed or zeroed wrongly changes the logits.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_lcr.models.expand import ExpandError, NewLayer, expand_checkpoint, expansion_plan
from megatron_lcr.models.hf_checkpoint import HFCheckpointError
from tests.tiny_hf import VOCAB_SIZE, hf_logits, make_tiny_hf

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "expand_blocks.py"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("expand")
    return {family: make_tiny_hf(family, root / family, num_layers=4) for family in ("llama", "qwen3")}


def test_plan_places_copies_after_each_group():
    orig, copy = (lambda i: NewLayer(source=i, identity=False)), (lambda i: NewLayer(source=i, identity=True))
    assert expansion_plan(4, 5) == [orig(0), orig(1), orig(2), orig(3), copy(3)]
    assert expansion_plan(4, 6) == [orig(0), orig(1), copy(1), orig(2), orig(3), copy(3)]
    assert expansion_plan(4, 8) == [orig(0), copy(0), orig(1), copy(1), orig(2), copy(2), orig(3), copy(3)]
    assert expansion_plan(2, 6) == [orig(0), copy(0), copy(0), orig(1), copy(1), copy(1)]


@pytest.mark.parametrize("family,layers", [("llama", 5), ("llama", 6), ("llama", 8), ("llama", 12), ("qwen3", 8)])
def test_expanded_model_has_the_same_logits(tiny, tmp_path, family, layers):
    src, out = tiny[family], tmp_path / "expanded"
    expand_checkpoint(src, out, layers)
    ids = torch.randint(4, VOCAB_SIZE, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hf_logits(out, ids), hf_logits(src, ids), rtol=0, atol=1e-5)

    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == layers
    old, new = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    per_layer = sum(t.numel() for n, t in old.items() if n.startswith("model.layers.0."))
    assert sum(t.numel() for t in new.values()) == sum(t.numel() for t in old.values()) + (layers - 4) * per_layer
    # Not an identity by accident: a copy keeps its source's trained q/k/v and zeroes only o_proj/down_proj.
    plan = expansion_plan(4, layers)
    index = next(i for i, n in enumerate(plan) if n.identity)
    copy, source = f"model.layers.{index}.", f"model.layers.{plan[index].source}."
    assert torch.equal(new[copy + "self_attn.q_proj.weight"], old[source + "self_attn.q_proj.weight"])
    assert not new[copy + "self_attn.o_proj.weight"].any() and not new[copy + "mlp.down_proj.weight"].any()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()


@pytest.mark.parametrize("layers,message", [
    (4, "new layer count (4) must exceed the current one (4)"),
    (3, "new layer count (3) must exceed the current one (4)"),
    (7, "cannot spread 3 new layers evenly over 4"),
    (10, "cannot spread 6 new layers evenly over 4"),
])
def test_layer_counts_that_cannot_be_expanded_are_one_line_errors(tiny, tmp_path, layers, message):
    with pytest.raises(ExpandError, match=re.escape(message)) as err:
        expand_checkpoint(tiny["llama"], tmp_path / "out", layers)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_missing_files_are_one_line_errors(tiny, tmp_path):
    with pytest.raises(HFCheckpointError, match="config.json: not found") as err:
        expand_checkpoint(tmp_path / "nowhere", tmp_path / "out", 8)
    assert "\n" not in str(err.value)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_bytes((tiny["llama"] / "config.json").read_bytes())
    with pytest.raises(HFCheckpointError, match="neither model.safetensors.index.json nor model.safetensors"):
        expand_checkpoint(bare, tmp_path / "out", 8)
    assert not (tmp_path / "out").exists()


def test_cli_writes_the_model_and_reports_errors_in_one_line(tiny, tmp_path):
    out = tmp_path / "expanded"
    ok = subprocess.run([sys.executable, str(TOOL), str(tiny["llama"]), "--layers", "8", "--out", str(out)],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 8
    again = subprocess.run([sys.executable, str(TOOL), str(tiny["llama"]), "--layers", "8", "--out", str(out)],
                           capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 1
    assert again.stderr.startswith("expand_blocks: error: ") and "already exists" in again.stderr
    assert again.stderr.count("\n") == 1
