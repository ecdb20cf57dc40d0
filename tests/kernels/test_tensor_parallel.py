"""TP=2 (2-process gloo) gives the TP=1 results: even, uneven (600 | 403) and padding-only shards.

Checks, per implementation, layout (Triton, under its interpreter, on the uneven one) and input
kind (hidden states / logits): log-probs, entropies and the three KL kinds with their gradients
(``d_hidden`` all-reduced inside the op, each rank's rows of ``d_weight``); and the op on a Megatron
``ColumnParallelLinear`` output layer's weight against that layer + ``vocab_parallel_cross_entropy``,
for both ``reduce_grad_hidden`` conventions; and a GPTModel's hidden-state path (output layer
bypassed, tied and untied embeddings) against its logits path, every parameter's gradient.
Tolerance: 2e-5 abs on values and 1e-4 abs on gradients (fp32; values of magnitude ~10).
"""

from __future__ import annotations

import json

import pytest

from megatron_lcr.kernels.config import triton_available
from tests.distributed import WORKERS, run_torchrun


@pytest.mark.dist
def test_tp2_matches_tp1(tmp_path):
    impls = ["torch", "triton"] if triton_available() else ["torch"]
    out = tmp_path / "errors.json"
    run_torchrun(WORKERS / "kernels_tp.py", 2, [out, *impls], timeout=300)
    errors = json.loads(out.read_text())
    layouts = {"torch": ("even", "uneven", "padding_rank"), "triton": ("uneven",)}
    checks = ("logp", "entropy", "forward/kl", "reverse/kl", "jsd/kl")
    expected = {f"{impl}/{layout}/{kind}/{check}" for impl in impls for layout in layouts[impl]
                for kind in ("hidden", "logits") for check in checks}  # fmt: skip
    assert expected <= errors.keys(), f"checks missing: {sorted(expected - errors.keys())}"
    assert {"megatron/reduce_grad_hidden=True/d_hidden", "megatron/reduce_grad_hidden=False/d_hidden"} <= errors.keys()
    assert {"gpt/tied=False/d_params", "gpt/tied=True/d_params", "gpt/tied=True/num_params"} <= errors.keys()
    too_large = {
        key: err for key, err in errors.items() if err > (2e-5 if key.endswith(("logp", "entropy", "kl")) else 1e-4)
    }
    assert not too_large, f"TP=2 differs from TP=1: {too_large}"
