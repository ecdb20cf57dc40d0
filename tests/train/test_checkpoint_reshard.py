"""A training checkpoint saved at TP=2 loads at TP=1 and gives the same logits.

tests/workers/reshard_checkpoint.py builds fp32 policies from tiny HF models at TP=2, trains them
two steps (so the weights are no longer the HF ones), saves them with ``save_checkpoint`` and records
their logits; a TP=1 job then builds each policy from its checkpoint (``build_policy(load=...)``).
Families: Llama with untied embeddings (vocab 1000, padded to 1024 at TP=1 and TP=2 alike) and
Qwen2 with tied embeddings and its vocabulary grown to 1100, which pads to 1280 at TP=2 but 1152 at
TP=1: only the padded size recorded in the checkpoint lets TP=1 rebuild the saved embedding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed import WORKERS, run_torchrun
from tests.tiny_hf import VOCAB_SIZE, hf_logits, make_tiny_hf

# TP=2 and TP=1 differ only in fp32 summation order (row-parallel all-reduce, sharded vocab):
# measured max abs logit diff 9.5e-7 (llama) and 4.8e-7 (qwen2).
RESHARD_ATOL = 1e-5
# Before training the TP=2 policy is the HF model (parity, measured ~4e-7); two steps at lr 1e-2
# move logits by ~1.8 (llama) and ~2.0 (qwen2).
PARITY_ATOL = 1e-4
TRAINED_MIN_DIFF = 1e-1
QWEN2_VOCAB = 1100
BATCH, SEQ = 2, 16


def grow_vocab(model_dir: Path, vocab_size: int) -> None:
    """Resize a saved HF model's (tied) embedding to ``vocab_size`` rows, in place, deterministically."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    model.save_pretrained(str(model_dir), safe_serialization=True)


@pytest.fixture(scope="module")
def resharded(tmp_path_factory) -> dict:
    """Worker outputs: logits per case and stage, the save/load reports, HF logits, checkpoint paths."""
    root = tmp_path_factory.mktemp("reshard")
    llama = make_tiny_hf("llama", root / "llama")
    qwen2 = make_tiny_hf("qwen2", root / "qwen2")  # tie_word_embeddings=True
    grow_vocab(qwen2, QWEN2_VOCAB)
    ids = torch.randint(0, VOCAB_SIZE, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    torch.save(ids, root / "ids.pt")
    cases = [{"name": "llama", "model": str(llama)}, {"name": "qwen2", "model": str(qwen2)}]
    spec = root / "spec.json"
    spec.write_text(json.dumps({"ids": str(root / "ids.pt"), "steps": 2, "lr": 1e-2, "cases": cases}))
    run_torchrun(WORKERS / "reshard_checkpoint.py", 2, ["save", "2", str(spec), str(root)])
    run_torchrun(WORKERS / "reshard_checkpoint.py", 1, ["load", "1", str(spec), str(root)])
    out = {"save": json.loads((root / "save.json").read_text()), "load": json.loads((root / "load.json").read_text())}
    for case in cases:
        name = case["name"]
        out[name] = {
            **torch.load(root / f"{name}.save.pt"),
            **torch.load(root / f"{name}.load.pt"),
            "hf": hf_logits(case["model"], ids),
        }
    return out


@pytest.mark.dist
@pytest.mark.parametrize("name, vocab", [("llama", VOCAB_SIZE), ("qwen2", QWEN2_VOCAB)])
def test_tp2_checkpoint_loads_at_tp1_with_the_same_logits(resharded, name, vocab):
    logits = resharded[name]
    for stage in ("step0", "trained", "loaded", "hf"):
        assert logits[stage].shape == (BATCH, SEQ, vocab), (stage, logits[stage].shape)
    diff = (logits["loaded"] - logits["trained"]).abs().max().item()
    assert diff <= RESHARD_ATOL, f"{name}: TP=1 loaded vs TP=2 trained logits differ by {diff:.3g}"
    # The checkpoint carried the trained weights, not the HF ones: the trained model is far from
    # the HF model, although the same TP=2 policy matched it before training.
    assert (logits["step0"] - logits["hf"]).abs().max().item() <= PARITY_ATOL
    assert (logits["loaded"] - logits["hf"]).abs().max().item() > TRAINED_MIN_DIFF


@pytest.mark.dist
def test_tp1_reuses_the_padded_vocab_recorded_at_tp2(resharded):
    from megatron_lcr.models.megatron_checkpoint import read_meta
    from megatron_lcr.parallel.layout import padded_vocab_size

    save, load = resharded["save"], resharded["load"]
    # qwen2's 1100 tokens pad to 1280 at TP=2 (multiple of 256), but would pad to 1152 at TP=1.
    assert padded_vocab_size(QWEN2_VOCAB, 2) == 1280 and padded_vocab_size(QWEN2_VOCAB, 1) == 1152
    for name, padded in (("llama", 1024), ("qwen2", 1280)):
        meta = read_meta(save[name]["checkpoint"])
        assert (meta.tensor_model_parallel_size, meta.padded_vocab_size, meta.iteration) == (2, padded, 2)
        assert save[name]["embedding_shape"] == [padded // 2, 64]  # this TP rank's half
        assert load[name]["padded_vocab_size"] == padded
        assert load[name]["embedding_shape"] == [padded, 64]
