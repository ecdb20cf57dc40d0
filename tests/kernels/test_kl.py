"""``kl_divergence`` / ``kl_divergence_from_logits`` against a float64 PyTorch reference.

Forward ``KL(q||p)``, reverse ``KL(p||q)`` and GKD's JSD(beta) between a student and a teacher with a
different hidden size, at ragged shapes, temperatures {0.5, 1, 2} (on both sides), padded vocabulary,
masked rows, random per-token upstream gradients, gradients to all four inputs. Tolerances as in
``test_logprob.py`` (fp32 vs float64: 2e-5 values, 1e-4 gradients, scaled by max(1, max|ref|)).
Identical distributions give exactly 0 and exactly 0 gradients (``torch.equal``).
"""

from __future__ import annotations

import pytest
import torch

from megatron_lcr.kernels import kl_divergence, kl_divergence_from_logits
from megatron_lcr.kernels.config import triton_available
from tests.kernels.conftest import TRITON_SKIP_REASON, impl_params
from tests.kernels.reference import assert_close, ref_kl, ref_logits
from tests.kernels.test_logprob import GRAD_TOL, VALUE_TOL, kernel_config

H_STUDENT, H_TEACHER = 24, 40
BETA = 0.3


def make_pair(num_tokens: int, vocab: int, *, seed: int, device, dtype=torch.float32):
    """Student ``[T, 24]`` / teacher ``[T, 40]`` heads with logits ~ N(0, 3^2), their mask and upstream grad."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [
        torch.randn(num_tokens, H_STUDENT, generator=gen),
        torch.randn(vocab, H_STUDENT, generator=gen) * (3.0 / H_STUDENT**0.5),
        torch.randn(num_tokens, H_TEACHER, generator=gen),
        torch.randn(vocab, H_TEACHER, generator=gen) * (3.0 / H_TEACHER**0.5),
    ]
    mask = torch.arange(num_tokens) % 3 != 1
    g = torch.randn(num_tokens, generator=gen)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in tensors], mask.to(device), g.to(device)


def reference_grads(tensors, mask, g, *, kind, temperature, valid):
    leaves = [t.detach().double().requires_grad_() for t in tensors]
    kl = ref_kl(
        ref_logits(leaves[0], leaves[1], 1.0, valid), ref_logits(leaves[2], leaves[3], 1.0, valid),
        kind=kind, beta=BETA, temperature=temperature, valid_vocab_end=valid, mask=mask,
    )  # fmt: skip
    (kl * g.double()).sum().backward()
    return kl.detach(), [leaf.grad for leaf in leaves]


def check_kl(impl, kind, num_tokens, vocab, temperature, device, *, padding=3):
    tensors, mask, g = make_pair(num_tokens, vocab, seed=num_tokens * 7 + vocab, device=device)
    valid = vocab - padding
    kl = kl_divergence(*tensors, kind=kind, beta=BETA, temperature=temperature, mask=mask,
                       valid_vocab_end=valid, config=kernel_config(impl))  # fmt: skip
    (kl * g).sum().backward()
    ref_value, ref_grads = reference_grads(tensors, mask, g, kind=kind, temperature=temperature, valid=valid)
    assert kl.dtype == torch.float32 and kl.shape == (num_tokens,)
    assert_close(kl, ref_value, rtol=VALUE_TOL, atol=VALUE_TOL, name=f"{kind} kl")
    for name, tensor, expected in zip(("d_h_s", "d_w_s", "d_h_t", "d_w_t"), tensors, ref_grads, strict=False):
        assert_close(tensor.grad, expected, rtol=GRAD_TOL, atol=GRAD_TOL, name=f"{kind} {name}")
    assert (
        torch.all(kl[~mask] == 0) and torch.all(tensors[0].grad[~mask] == 0) and torch.all(tensors[2].grad[~mask] == 0)
    )
    assert torch.all(tensors[1].grad[valid:] == 0) and torch.all(tensors[3].grad[valid:] == 0)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("num_tokens,vocab", [(1, 17), (7, 1000), (130, 4099)])
def test_torch_matches_float64(kind, num_tokens, vocab, temperature, device):
    check_kl("torch", kind, num_tokens, vocab, temperature, device)


@pytest.mark.skipif(not triton_available(), reason=TRITON_SKIP_REASON)
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("num_tokens,vocab,temperature", [(1, 17, 2.0), (7, 1000, 1.0), (130, 4099, 0.5)])
def test_triton_matches_float64(kind, num_tokens, vocab, temperature, device):
    check_kl("triton", kind, num_tokens, vocab, temperature, device)


@pytest.mark.parametrize("impl", impl_params())
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_from_logits_matches_float64(impl, kind, device):
    gen = torch.Generator().manual_seed(3)
    z_s = (torch.randn(130, 1000, generator=gen) * 3).to(device).requires_grad_()
    z_t = (torch.randn(130, 1000, generator=gen) * 3).to(device).requires_grad_()
    g = torch.randn(130, generator=gen).to(device)
    mask = (torch.arange(130) % 5 != 0).to(device)
    kl = kl_divergence_from_logits(
        z_s, z_t, kind=kind, beta=BETA, temperature=0.7, mask=mask, valid_vocab_end=996, config=kernel_config(impl)
    )
    (kl * g).sum().backward()
    leaves = [z.detach().double().requires_grad_() for z in (z_s, z_t)]
    ref = ref_kl(*leaves, kind=kind, beta=BETA, temperature=0.7, valid_vocab_end=996, mask=mask)
    (ref * g.double()).sum().backward()
    assert_close(kl, ref.detach(), rtol=VALUE_TOL, atol=VALUE_TOL, name="kl")
    assert_close(z_s.grad, leaves[0].grad, rtol=GRAD_TOL, atol=GRAD_TOL, name="d_student_logits")
    assert_close(z_t.grad, leaves[1].grad, rtol=GRAD_TOL, atol=GRAD_TOL, name="d_teacher_logits")
    assert torch.all(z_s.grad[:, 996:] == 0) and torch.all(z_t.grad[:, 996:] == 0)


@pytest.mark.parametrize("impl", impl_params())
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_identical_distributions_give_exact_zeros(impl, kind, device):
    """Same weights and hidden states on both sides: KL == 0 and every gradient == 0, bit for bit."""
    (h, w, _, _), mask, g = make_pair(130, 1000, seed=9, device=device)
    h_t, w_t = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    kl = kl_divergence(
        h, w, h_t, w_t, kind=kind, beta=BETA, temperature=0.7, valid_vocab_end=997, config=kernel_config(impl)
    )
    (kl * g).sum().backward()
    assert torch.equal(kl, torch.zeros_like(kl))
    for grad in (h.grad, w.grad, h_t.grad, w_t.grad):
        assert torch.equal(grad, torch.zeros_like(grad))
    z = (h.detach() @ w.detach().t()).requires_grad_()
    z_t = z.detach().clone().requires_grad_()
    kl = kl_divergence_from_logits(z, z_t, kind=kind, beta=BETA, temperature=2.0, config=kernel_config(impl))
    (kl * g).sum().backward()
    assert torch.equal(kl, torch.zeros_like(kl))
    assert torch.equal(z.grad, torch.zeros_like(z)) and torch.equal(z_t.grad, torch.zeros_like(z_t))


@pytest.mark.parametrize("impl", impl_params())
def test_detached_teacher_gets_no_gradient_work(impl, device):
    """Stop-gradient on the teacher: only the student's inputs get gradients, and they are unchanged."""
    tensors, mask, g = make_pair(7, 1000, seed=4, device=device)
    teacher = [t.detach() for t in tensors[2:]]
    kl = kl_divergence(
        tensors[0], tensors[1], *teacher, kind="reverse", temperature=0.7, mask=mask, config=kernel_config(impl)
    )
    (kl * g).sum().backward()
    _, ref_grads = reference_grads(tensors, mask, g, kind="reverse", temperature=0.7, valid=1000)
    assert_close(tensors[0].grad, ref_grads[0], rtol=GRAD_TOL, atol=GRAD_TOL, name="d_h_s")
    assert_close(tensors[1].grad, ref_grads[1], rtol=GRAD_TOL, atol=GRAD_TOL, name="d_w_s")


def test_invalid_arguments():
    (h_s, w_s, h_t, w_t), _, _ = make_pair(4, 20, seed=0, device="cpu")
    with pytest.raises(ValueError, match="kind must be one of"):
        kl_divergence(h_s, w_s, h_t, w_t, kind="symmetric")
    with pytest.raises(ValueError, match="0 < beta < 1, got beta=1.0"):
        kl_divergence(h_s, w_s, h_t, w_t, kind="jsd", beta=1.0)
    with pytest.raises(ValueError, match="same tokens and local vocabulary"):
        kl_divergence(h_s, w_s, h_t, w_t[:10], kind="forward")
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        kl_divergence(h_s, w_s, h_t, w_t, mask=torch.ones(4))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_bf16_on_gpu(impl, kind):
    if impl == "triton" and not triton_available():
        pytest.skip(TRITON_SKIP_REASON)
    tensors, mask, g = make_pair(1000, 32000, seed=2, device="cuda", dtype=torch.bfloat16)
    kl = kl_divergence(
        *tensors, kind=kind, beta=BETA, temperature=0.7, mask=mask, valid_vocab_end=31990, config=kernel_config(impl)
    )
    (kl * g).sum().backward()
    ref_value, ref_grads = reference_grads(tensors, mask, g, kind=kind, temperature=0.7, valid=31990)
    assert_close(kl, ref_value, rtol=2e-2, atol=2e-2, name="kl")
    for name, tensor, expected in zip(("d_h_s", "d_w_s", "d_h_t", "d_w_t"), tensors, ref_grads, strict=False):
        assert_close(tensor.grad, expected, rtol=2e-2, atol=2e-2, name=name)
