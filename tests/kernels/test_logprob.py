"""``logprob_entropy`` / ``logprob_entropy_from_logits`` against a float64 PyTorch reference.

Values and gradients (random per-token upstream gradients on both outputs) at ragged shapes
(T in {1, 7, 130}, V in {17, 1000, 4099}, H = 24, which no tile size divides), temperatures
{0.5, 1, 2}, padded vocabularies, masked rows, labels on tile edges, large-magnitude logits.
Tolerances, fp32 implementation vs float64: ``|a - e| <= atol * max(1, max|e|) + rtol * |e|`` with
atol = rtol = 2e-5 for values and 1e-4 for gradients (logits of magnitude ~10); bf16 on GPU uses
2e-2. The Triton kernels run under ``TRITON_INTERPRET=1`` on CPU (fp32).
"""

from __future__ import annotations

import pytest
import torch

from megatron_lcr.kernels import KernelConfig, logprob_entropy, logprob_entropy_from_logits, resolve_impl
from megatron_lcr.kernels.config import triton_available
from tests.kernels.conftest import TRITON_SKIP_REASON, impl_params
from tests.kernels.reference import assert_close, ref_logits, ref_logprob_entropy

HIDDEN = 24
VALUE_TOL = 2e-5
GRAD_TOL = 1e-4


def kernel_config(impl: str) -> KernelConfig:
    """Small tiles so that every shape here spans several ragged tiles, chunks and vocabulary splits."""
    if impl == "torch":
        return KernelConfig(impl="torch", token_chunk_size=64, vocab_chunk_size=512)
    if torch.cuda.is_available():
        return KernelConfig(impl="triton", vocab_chunk_size=512)
    # Interpreter: each program iteration costs Python time, so fewer, larger tiles.
    return KernelConfig(
        impl="triton", block_tokens=64, block_vocab=256, block_hidden=16, vocab_chunk_size=512, vocab_splits=3
    )


def make_case(
    num_tokens: int, vocab: int, *, seed: int, device, dtype=torch.float32, padding: int = 0, scale: float = 1.0
):
    """Inputs with logits ~ N(0, 4^2) * scale, every 4th row masked, labels on tile edges."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, HIDDEN, generator=gen) * scale
    weight = torch.randn(vocab, HIDDEN, generator=gen) * (4.0 / HIDDEN**0.5)
    valid = vocab - padding
    labels = torch.randint(0, valid, (num_tokens,), generator=gen)
    edges = [0, valid - 1, 255, 256, 511, 512, 513]  # tile / chunk boundaries of kernel_config
    for i, label in enumerate(e for e in edges if e < valid):
        if i < num_tokens:
            labels[i] = label
    labels[3::4] = -100
    g_logp, g_entropy = torch.randn(num_tokens, generator=gen), torch.randn(num_tokens, generator=gen)
    move = lambda t: t.to(device)  # noqa: E731
    return (move(hidden).to(dtype).requires_grad_(), move(weight).to(dtype).requires_grad_(), move(labels),
            move(g_logp), move(g_entropy), valid)  # fmt: skip


def reference(hidden, weight, labels, g_logp, g_entropy, temperature, valid):
    """float64 ``(logp, entropy, d_hidden, d_weight)``."""
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    logp, entropy = ref_logprob_entropy(ref_logits(h64, w64, 1.0, valid), labels, temperature, valid)
    (logp * g_logp.double() + entropy * g_entropy.double()).sum().backward()
    return logp.detach(), entropy.detach(), h64.grad, w64.grad


def check_against_reference(impl, num_tokens, vocab, temperature, device, *, padding, tol=(VALUE_TOL, GRAD_TOL)):
    hidden, weight, labels, g_logp, g_entropy, valid = make_case(
        num_tokens, vocab, seed=num_tokens + vocab, device=device, padding=padding
    )
    logp, entropy = logprob_entropy(
        hidden, weight, labels, temperature=temperature, valid_vocab_end=valid, config=kernel_config(impl)
    )
    assert logp.dtype == entropy.dtype == torch.float32 and logp.shape == (num_tokens,)
    (logp * g_logp + entropy * g_entropy).sum().backward()
    ref = reference(hidden, weight, labels, g_logp, g_entropy, temperature, valid)
    for name, actual, expected, t in zip(
        ("logp", "entropy", "d_hidden", "d_weight"),
        (logp, entropy, hidden.grad, weight.grad),
        ref,
        (tol[0], tol[0], tol[1], tol[1]),
        strict=False,
    ):
        assert_close(actual, expected, rtol=t, atol=t, name=name)
    masked = labels == -100
    assert torch.all(logp[masked] == 0) and torch.all(entropy[masked] == 0)
    assert torch.all(hidden.grad[masked] == 0), "masked rows must get exactly zero gradient"
    assert torch.all(weight.grad[valid:] == 0), "padding rows of the weight must get zero gradient"


SHAPES = [(t, v) for t in (1, 7, 130) for v in (17, 1000, 4099)]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("num_tokens,vocab", SHAPES)
def test_torch_matches_float64(num_tokens, vocab, temperature, device):
    check_against_reference("torch", num_tokens, vocab, temperature, device, padding=min(3, vocab // 5))


@pytest.mark.skipif(not triton_available(), reason=TRITON_SKIP_REASON)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("num_tokens,vocab", SHAPES)
def test_triton_matches_float64(num_tokens, vocab, temperature, device):
    check_against_reference("triton", num_tokens, vocab, temperature, device, padding=min(3, vocab // 5))


@pytest.mark.parametrize("impl", impl_params())
def test_all_rows_masked_gives_zeros_and_zero_grads(impl, device):
    hidden, weight, labels, g_logp, g_entropy, valid = make_case(7, 1000, seed=1, device=device)
    labels = torch.full_like(labels, -100)
    logp, entropy = logprob_entropy(hidden, weight, labels, temperature=0.7, config=kernel_config(impl))
    (logp * g_logp + entropy * g_entropy).sum().backward()
    assert torch.equal(logp, torch.zeros_like(logp)) and torch.equal(entropy, torch.zeros_like(entropy))
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("impl", impl_params())
def test_large_magnitude_logits(impl, device):
    """Logits ~ +-1e3: values within a few fp32 ulps of the logits' magnitude; entropy stays accurate.

    The entropy is ``log S - U / S`` with U relative to the running max; ``logZ - E[z]`` would lose
    ~1e-4 here to cancellation.
    """
    hidden, weight, labels, g_logp, g_entropy, valid = make_case(130, 1000, seed=7, device=device, scale=250.0)
    logp, entropy = logprob_entropy(hidden, weight, labels, temperature=1.0, config=kernel_config(impl))
    (logp * g_logp + entropy * g_entropy).sum().backward()
    ref = reference(hidden, weight, labels, g_logp, g_entropy, 1.0, valid)
    z_max = float(ref_logits(hidden.detach(), weight.detach(), 1.0, valid).abs().max())
    assert z_max > 1e3
    assert_close(logp, ref[0], rtol=0, atol=4e-7 * z_max, name="logp")
    assert_close(entropy, ref[1], rtol=0, atol=1e-5, name="entropy")
    assert_close(hidden.grad, ref[2], rtol=1e-3, atol=1e-3, name="d_hidden")
    assert_close(weight.grad, ref[3], rtol=1e-3, atol=1e-3, name="d_weight")


@pytest.mark.parametrize("impl", impl_params())
def test_from_logits_matches_float64_and_hidden_path(impl, device):
    hidden, weight, labels, g_logp, g_entropy, valid = make_case(130, 1000, seed=3, device=device, padding=5)
    logits = (hidden.detach() @ weight.detach().t()).requires_grad_()
    # Padding columns hold garbage that must not leak into the softmax.
    logits.data[:, valid:] = 1e4
    logp, entropy = logprob_entropy_from_logits(
        logits, labels, temperature=0.5, valid_vocab_end=valid, config=kernel_config(impl)
    )
    (logp * g_logp + entropy * g_entropy).sum().backward()
    z64 = logits.detach().double().requires_grad_()
    ref_lp, ref_ent = ref_logprob_entropy(z64, labels, 0.5, valid)
    (ref_lp * g_logp.double() + ref_ent * g_entropy.double()).sum().backward()
    assert_close(logp, ref_lp, rtol=VALUE_TOL, atol=VALUE_TOL, name="logp")
    assert_close(entropy, ref_ent, rtol=VALUE_TOL, atol=VALUE_TOL, name="entropy")
    assert_close(logits.grad, z64.grad, rtol=GRAD_TOL, atol=GRAD_TOL, name="d_logits")
    assert torch.all(logits.grad[:, valid:] == 0)
    lp_h, ent_h = logprob_entropy(
        hidden, weight, labels, temperature=0.5, valid_vocab_end=valid, config=kernel_config(impl)
    )
    assert_close(lp_h, logp, rtol=VALUE_TOL, atol=VALUE_TOL, name="hidden vs logits")


@pytest.mark.parametrize("impl", impl_params())
def test_non_contiguous_inputs(impl, device):
    """Strided hidden, a transposed weight view, a stride-0 upstream gradient: same as contiguous."""
    hidden, weight, labels, _, g_entropy, valid = make_case(130, 1000, seed=5, device=device)
    wide = torch.zeros(130, 2 * HIDDEN, device=device)
    wide[:, ::2] = hidden.detach()
    h_view = wide[:, ::2].requires_grad_()
    w_view = weight.detach().t().contiguous().t().requires_grad_()  # [V, H] with strides (1, V)
    assert not h_view.is_contiguous() and not w_view.is_contiguous()
    config = kernel_config(impl)
    logp, entropy = logprob_entropy(h_view, w_view, labels, temperature=0.7, config=config)
    (logp.sum() + (entropy * g_entropy).sum()).backward()  # logp's upstream gradient: ones, expanded
    logp_c, entropy_c = logprob_entropy(hidden, weight, labels, temperature=0.7, config=config)
    (logp_c.sum() + (entropy_c * g_entropy).sum()).backward()
    for name, a, b in (
        ("logp", logp, logp_c),
        ("entropy", entropy, entropy_c),
        ("d_hidden", h_view.grad, hidden.grad),
        ("d_weight", w_view.grad, weight.grad),
    ):
        assert_close(a, b, rtol=1e-6, atol=1e-6, name=name)


@pytest.mark.parametrize("impl", impl_params())
@pytest.mark.parametrize("used", ["logp", "entropy"])
def test_gradient_of_one_output_only(impl, used, device):
    """An unused output reaches backward as None (the entropy term is skipped, and vice versa)."""
    hidden, weight, labels, g_logp, g_entropy, valid = make_case(7, 1000, seed=11, device=device)
    logp, entropy = logprob_entropy(hidden, weight, labels, temperature=2.0, config=kernel_config(impl))
    ((logp * g_logp) if used == "logp" else (entropy * g_entropy)).sum().backward()
    zeros = torch.zeros_like(g_logp)
    ref = reference(
        hidden,
        weight,
        labels,
        g_logp if used == "logp" else zeros,
        g_entropy if used == "entropy" else zeros,
        2.0,
        valid,
    )
    assert_close(hidden.grad, ref[2], rtol=GRAD_TOL, atol=GRAD_TOL, name="d_hidden")
    assert_close(weight.grad, ref[3], rtol=GRAD_TOL, atol=GRAD_TOL, name="d_weight")


def test_invalid_arguments_name_the_values():
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    labels = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"\[0, valid_vocab_end=9\)"):
        logprob_entropy(hidden, weight, torch.tensor([0, 1, 9, -100]), valid_vocab_end=9)
    with pytest.raises(ValueError, match="temperature"):
        logprob_entropy(hidden, weight, labels, temperature=0.0)
    with pytest.raises(ValueError, match="share a dtype"):
        logprob_entropy(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match=r"\(4, 8\) and \(10, 7\)"):
        logprob_entropy(hidden, torch.randn(10, 7), labels)
    with pytest.raises(ValueError, match="labels has 3 tokens"):
        logprob_entropy(hidden, weight, labels[:3])


def test_config_validation_and_impl_selection(monkeypatch):
    with pytest.raises(ValueError, match="impl must be one of"):
        KernelConfig(impl="cuda")
    with pytest.raises(ValueError, match="block_vocab must be a power of two >= 16"):
        KernelConfig(block_vocab=96)
    with pytest.raises(ValueError, match=r"vocab_chunk_size \(1000\) must be a multiple of block_vocab \(128\)"):
        KernelConfig(vocab_chunk_size=1000)
    cpu = torch.device("cpu")
    assert resolve_impl(KernelConfig(impl="torch"), cpu) == "torch"
    assert resolve_impl(KernelConfig(impl="auto"), cpu) == "torch"  # the interpreter is for tests only
    if triton_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            resolve_impl(KernelConfig(impl="triton"), cpu)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert resolve_impl(KernelConfig(impl="triton"), cpu) == "triton"
        if torch.cuda.is_available():
            assert resolve_impl(KernelConfig(), torch.device("cuda")) == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("num_tokens,vocab", [(130, 4099), (1000, 32000)])
def test_bf16_on_gpu(impl, num_tokens, vocab):
    """bf16 inputs, fp32 accumulation: within 2e-2 of the float64 reference on the same bf16 values."""
    if impl == "triton" and not triton_available():
        pytest.skip(TRITON_SKIP_REASON)
    hidden, weight, labels, g_logp, g_entropy, valid = make_case(
        num_tokens, vocab, seed=2, device="cuda", dtype=torch.bfloat16, padding=3
    )
    logp, entropy = logprob_entropy(
        hidden, weight, labels, temperature=0.7, valid_vocab_end=valid, config=kernel_config(impl)
    )
    (logp * g_logp + entropy * g_entropy).sum().backward()
    ref = reference(hidden, weight, labels, g_logp, g_entropy, 0.7, valid)
    for name, actual, expected in zip(
        ("logp", "entropy", "d_hidden", "d_weight"), (logp, entropy, hidden.grad, weight.grad), ref, strict=False
    ):
        assert_close(actual, expected, rtol=2e-2, atol=2e-2, name=name)
