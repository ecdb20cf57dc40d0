"""tests/tiny_hf.py: the tiny models and tokenizer other tests build on are what they claim to be.

The parity and conversion tests are only as strong as these models: norms that are all ones or
biases that are all zero would let a misplaced norm or bias go unnoticed.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from tests.tiny_hf import FAMILIES, VOCAB_SIZE, hf_logits, make_tiny_hf


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_hf")
    return {f: make_tiny_hf(f, root / f, num_layers=2) for f in FAMILIES}


def test_tokenizer_loads_offline_and_matches_the_config(tiny_dirs):
    path = tiny_dirs["llama"]
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    config = json.loads((path / "config.json").read_text())
    assert len(tok) == VOCAB_SIZE == config["vocab_size"]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]) == (0, 1, 2)
    assert tok("w4 w999 nope", add_special_tokens=False).input_ids == [4, 999, 3]
    assert tok.decode([5, 6, 7]) == "w5 w6 w7"


@pytest.mark.parametrize("family", FAMILIES)
def test_parameters_are_perturbed(tiny_dirs, family):
    tensors = load_file(str(tiny_dirs[family] / "model.safetensors"))
    for name, t in tensors.items():
        assert t.dtype == torch.float32, name
        if name.endswith("norm.weight"):
            assert not torch.allclose(t, torch.ones_like(t)), name
        if name.endswith(".bias"):
            assert t.abs().min() > 0, name
    assert any(n.endswith("q_proj.bias") for n in tensors) == (family == "qwen2")
    assert any(n.endswith("q_norm.weight") for n in tensors) == (family == "qwen3")
    # Tied Qwen2 stores only the embedding; transformers ties lm_head to it on load.
    assert ("lm_head.weight" in tensors) == (family != "qwen2")


def test_seed_changes_the_model(tmp_path):
    ids = torch.arange(4, 20).reshape(2, 8)
    a = hf_logits(make_tiny_hf("qwen3", tmp_path / "a", seed=0, num_layers=1), ids)
    b = hf_logits(make_tiny_hf("qwen3", tmp_path / "b", seed=0, num_layers=1), ids)
    c = hf_logits(make_tiny_hf("qwen3", tmp_path / "c", seed=1, num_layers=1), ids)
    assert a.shape == (2, 8, VOCAB_SIZE)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2
