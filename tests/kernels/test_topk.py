"""``token_logits``: the logits of chosen ids against float64 ``hidden @ weight.T / T`` (values, both
gradients), at TP=1 and at TP=2 (2 gloo processes, an uneven shard split with ids on both sides of its
edge); and the same from logits columns. Tolerances: 1e-5 on values, 1e-5 on gradients (fp32 inputs of
magnitude ~1, sums of 24 products)."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_lcr.kernels import topk
from megatron_lcr.kernels.topk import token_logits, token_logits_from_logits
from tests.distributed import WORKERS, run_torchrun

T, H, V, K, TEMP = 13, 24, 50, 4, 0.7


def _problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H**0.5
    ids = torch.randint(0, V, (T, K), generator=gen)
    ids[0] = torch.tensor([0, V - 1, 7, 7])  # the ends of the vocabulary and a repeated id
    grad = torch.randn(T, K, generator=gen)
    return hidden, weight, ids, grad


def _reference(hidden, weight, ids, grad):
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    value = (h @ w.t() / TEMP).gather(1, ids)
    (value * grad.double()).sum().backward()
    return value, h.grad, w.grad


@pytest.mark.parametrize("chunk", [1024, 5])  # one chunk, and chunks that split the rows unevenly
def test_token_logits_match_float64(monkeypatch, chunk):
    monkeypatch.setattr(topk, "ROW_CHUNK", chunk)
    hidden, weight, ids, grad = _problem()
    ref, ref_dh, ref_dw = _reference(hidden, weight, ids, grad)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = token_logits(h, w, ids, temperature=TEMP)
    (out * grad).sum().backward()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(h.grad.double(), ref_dh, atol=1e-5, rtol=0)
    torch.testing.assert_close(w.grad.double(), ref_dw, atol=1e-5, rtol=0)  # the repeated id's row sums both


def test_token_logits_from_logits_match_float64():
    hidden, weight, ids, grad = _problem(1)
    ref, _, _ = _reference(hidden, weight, ids, grad)
    logits = (hidden @ weight.t()).requires_grad_()
    out = token_logits_from_logits(logits, ids, temperature=TEMP)
    (out * grad).sum().backward()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    expected = torch.zeros(T, V, dtype=torch.float64).scatter_add_(1, ids, grad.double() / TEMP)
    torch.testing.assert_close(logits.grad.double(), expected, atol=1e-6, rtol=0)


def test_bad_ids_are_refused():
    hidden, weight, ids, _ = _problem()
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 40\)"):
        token_logits(hidden, weight, ids, valid_vocab_end=40)
    with pytest.raises(ValueError, match="int64"):
        token_logits(hidden, weight, ids.int())


@pytest.mark.dist
def test_tp2_matches_float64(tmp_path):
    out = tmp_path / "errors.json"
    run_torchrun(WORKERS / "topk_tp.py", 2, [out], timeout=300)
    errors = json.loads(out.read_text())
    assert set(errors) == {"hidden/value", "hidden/d_hidden", "hidden/d_weight", "logits/value", "logits/d_logits"}
    assert max(errors.values()) < 1e-5, errors
