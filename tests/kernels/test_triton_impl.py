"""``triton_impl``'s int64 offsets and its tiles (autotuned on GPUs, fixed under the interpreter).

64-bit offsets, checked two ways. (1) Numerically: a probe kernel applies the kernels' one offset
helper, ``_offsets(index, stride)``, to int32 indices and strides at the realistic maxima (local
vocabulary 256K, hidden 16K, 64K tokens), whose products pass 2^31 (up to 1.7e10), and compares with
Python's exact integers; the same product without the helper wraps (shown, so the check has teeth).
Under ``TRITON_INTERPRET=1`` int32 arithmetic is numpy int32, which wraps like the GPU's. (2) From the
source: no kernel multiplies a stride argument outside ``_offsets``, nor ``T`` by a non-constant. The
kernels themselves are not run past 2^31 elements: that needs >= 8 GB buffers.
"""

from __future__ import annotations

import ast
import inspect
import re

import pytest
import torch

from megatron_lcr.kernels import KernelConfig, kl_divergence, logprob_entropy
from megatron_lcr.kernels.config import triton_available
from tests.kernels.conftest import TRITON_SKIP_REASON
from tests.kernels.reference import assert_close
from tests.kernels.test_kl import make_pair, reference_grads
from tests.kernels.test_logprob import GRAD_TOL, HIDDEN, VALUE_TOL, make_case, reference

pytestmark = pytest.mark.skipif(not triton_available(), reason=TRITON_SKIP_REASON)

if triton_available():
    import triton
    import triton.language as tl

    from megatron_lcr.kernels import triton_impl

    _offsets = triton_impl._offsets

    @triton.jit
    def _offsets_probe(idx_ptr, out_ptr, stride, N: tl.constexpr, WIDEN: tl.constexpr):
        """``out[i] = idx[i] * stride`` through ``_offsets`` (WIDEN) or as plain int32 arithmetic."""
        idx = tl.load(idx_ptr + tl.arange(0, N))
        if WIDEN:
            off = _offsets(idx, stride)
        else:
            off = (idx * stride).to(tl.int64)
        tl.store(out_ptr + tl.arange(0, N), off)

    @triton.jit
    def _tile_probe(rows_ptr, cols_ptr, out_ptr, s0, s1, R: tl.constexpr, C: tl.constexpr):
        """``out[r, c] = rows[r] * s0 + cols[c] * s1``, composed as the kernels compose a tile's offsets."""
        rows = tl.load(rows_ptr + tl.arange(0, R))
        cols = tl.load(cols_ptr + tl.arange(0, C))
        off = _offsets(rows, s0)[:, None] + _offsets(cols, s1)[None, :]
        tl.store(out_ptr + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :], off)


# (index, stride) pairs at the realistic maxima: the weight's cols * H (V_local 256K x H 16K), a transposed
# weight's hidden index * V_local, logits' / dz's token index * V_local (64K tokens), plus one exactly 2^31.
PRODUCTS = [(262_143, 16_384), (16_383, 262_144), (65_535, 262_144), (131_072, 16_384), (7, 3)]


def _probe(widen: bool, device) -> list[int]:
    """``index * stride`` of every pair in PRODUCTS, computed by ``_offsets_probe``."""
    out = []
    for index, stride in PRODUCTS:
        idx = torch.tensor([index, 0], dtype=torch.int32, device=device)
        res = torch.zeros(2, dtype=torch.int64, device=device)
        _offsets_probe[(1,)](idx, res, stride, N=2, WIDEN=widen)
        out.append(int(res[0]))
    return out


def test_offsets_are_exact_past_int32(device):
    assert all(index < 2**31 and stride < 2**31 for index, stride in PRODUCTS)  # both int32 in the kernels
    exact = [index * stride for index, stride in PRODUCTS]
    assert max(exact) > 2**33
    assert _probe(widen=True, device=device) == exact


def test_int32_products_wrap_without_offsets(device):
    """The control: the plain int32 product wraps, so the test above would catch a missing widening."""
    exact = [index * stride for index, stride in PRODUCTS]
    assert _probe(widen=False, device=device) == [((e + 2**31) % 2**32) - 2**31 for e in exact]  # as on a GPU


def test_tile_offsets_are_exact_past_int32(device):
    rows = torch.tensor([0, 1, 65_534, 65_535], dtype=torch.int32, device=device)  # token ids
    cols = torch.tensor([0, 1, 131_071, 262_143], dtype=torch.int32, device=device)  # vocabulary ids
    s0, s1 = 262_144, 1  # a [64K, 256K] logits / dz buffer, row-major
    out = torch.zeros(4, 4, dtype=torch.int64, device=device)
    _tile_probe[(1,)](rows, cols, out, s0, s1, R=4, C=4)
    expected = [[r * s0 + c * s1 for c in cols.tolist()] for r in rows.tolist()]
    assert out.tolist() == expected and out.max().item() > 2**33


def _jit_functions(module) -> list[ast.FunctionDef]:
    tree = ast.parse(inspect.getsource(module))

    def is_jit(dec) -> bool:
        return isinstance(dec, ast.Attribute) and dec.attr == "jit"

    return [node for node in tree.body if isinstance(node, ast.FunctionDef) and any(map(is_jit, node.decorator_list))]


def test_every_stride_product_goes_through_offsets():
    """No kernel multiplies a stride argument (``sx0``, ``sws1``, ...) outside ``_offsets``, nor ``T`` by
    anything but a small constant (``out + 3 * T``: at most 4T, tokens < 2^29)."""
    stride = re.compile(r"^s[a-z]{1,2}[01]$")
    functions = _jit_functions(triton_impl)
    assert {f.name for f in functions} >= {"_logit_tile", "_logprob_fwd_kernel", "_kl_bwd_kernel", "_offsets"}
    offenders = []
    for fn in functions:
        if fn.name == "_offsets":
            continue
        strides = {a.arg for a in fn.args.args if stride.match(a.arg)}
        for node in ast.walk(fn):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
                names = {n.id for n in (node.left, node.right) if isinstance(n, ast.Name)}
                constant = any(isinstance(n, ast.Constant) for n in (node.left, node.right))
                if names & strides or ("T" in names and not constant):
                    offenders.append(f"{fn.name}: {ast.unparse(node)}")
    assert not offenders, offenders
    uses = sum(
        isinstance(n, ast.Call) and getattr(n.func, "id", None) == "_offsets" for f in functions for n in ast.walk(f)
    )
    assert uses >= 12  # 2-D tiles of x, w, z, dz and the partials' [P, k, T] offsets


# ---------------------------------------------------------------------------------------------
# Tiles


def _tile_config(tile: tuple) -> KernelConfig:
    bt, bv, bh, warps, stages = tile
    return KernelConfig(impl="triton", autotune=False, block_tokens=bt, block_vocab=bv, block_hidden=bh,
                        num_warps=warps, num_stages=stages, vocab_chunk_size=512)  # fmt: skip


@pytest.mark.parametrize("tile", sorted(set(triton_impl.TUNING_SPACE)) if triton_available() else [])
def test_every_tuned_tile_matches_float64(tile, device):
    """Each tile the autotuner may pick gives the reference's values and gradients (on CPU: its block
    shapes under the interpreter; warps and stages only matter on a GPU)."""
    config = _tile_config(tile)
    hidden, weight, labels, g_logp, g_entropy, valid = make_case(70, 600, seed=5, device=device, padding=3)
    logp, entropy = logprob_entropy(hidden, weight, labels, temperature=0.7, valid_vocab_end=valid, config=config)
    (logp * g_logp + entropy * g_entropy).sum().backward()
    ref = reference(hidden, weight, labels, g_logp, g_entropy, 0.7, valid)
    for name, actual, expected, tol in zip(
        ("logp", "entropy", "d_hidden", "d_weight"),
        (logp, entropy, hidden.grad, weight.grad),
        ref,
        (VALUE_TOL, VALUE_TOL, GRAD_TOL, GRAD_TOL),
        strict=True,
    ):
        assert_close(actual, expected, rtol=tol, atol=tol, name=f"{tile} {name}")
    tensors, mask, g = make_pair(70, 600, seed=6, device=device)
    kl = kl_divergence(*tensors, kind="forward", temperature=0.7, mask=mask, valid_vocab_end=597, config=config)
    (kl * g).sum().backward()
    ref_kl, ref_grads = reference_grads(tensors, mask, g, kind="forward", temperature=0.7, valid=597)
    assert_close(kl, ref_kl, rtol=VALUE_TOL, atol=VALUE_TOL, name=f"{tile} kl")
    for name, tensor, expected in zip(("d_h_s", "d_w_s", "d_h_t", "d_w_t"), tensors, ref_grads, strict=True):
        assert_close(tensor.grad, expected, rtol=GRAD_TOL, atol=GRAD_TOL, name=f"{tile} {name}")


def test_chosen_tiles_reports_the_tile_that_ran(device):
    """On CPU: the fixed tile, marked as the interpreter's; on a GPU: a tile of the tuning space, autotuned."""
    config = KernelConfig(impl="triton", block_tokens=32, block_vocab=64, block_hidden=16, vocab_chunk_size=512)
    hidden, weight, labels, g_logp, _, valid = make_case(40, 777, seed=8, device=device)
    logp, _ = logprob_entropy(hidden, weight, labels, temperature=1.0, config=config)
    (logp * g_logp).sum().backward()
    tiles = triton_impl.chosen_tiles(hidden=HIDDEN, vocab=valid, dtype=torch.float32)
    assert set(tiles) == {"logprob_forward", "logprob_backward"}
    assert triton_impl.chosen_tiles(hidden=HIDDEN, vocab=valid + 1, dtype=torch.float32) == {}
    for tile in tiles.values():
        source = tile.pop("source")
        if device.type == "cuda":
            assert source == "autotuned"
            assert tuple(tile.values()) in triton_impl.TUNING_SPACE
        else:
            assert source == "fixed (interpreter)"
            assert tile == triton_impl.fixed_tile(config) == {
                "BT": 32, "BV": 64, "BH": 16, "num_warps": 8, "num_stages": 3
            }  # fmt: skip


def test_autotuned_vocabulary_splits_fit_every_tuned_tile(monkeypatch):
    """With autotuning the split is fixed before a tile is chosen: a multiple of every tuned BV."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # _splits' arithmetic only; no kernel runs here
    widths = {bv for _, bv, _, _, _ in triton_impl.TUNING_SPACE}
    for n_valid, splits_wanted in ((1000, 3), (151_936, 7), (64, 1)):
        config = KernelConfig(vocab_splits=splits_wanted)
        splits, cols = triton_impl._splits(4096, n_valid, torch.device("cpu"), config)
        assert all(cols % bv == 0 for bv in widths), (n_valid, cols)
        assert (splits - 1) * cols < n_valid <= splits * cols


@pytest.mark.gpu
def test_autotuned_bf16_and_compiled_offsets_on_gpu():
    """Compiled kernels: the offset probes above, then bf16 log-probs with the autotuner's tiles (from
    ``TUNING_SPACE``, reported as autotuned) within 2e-2 of the float64 reference."""
    cuda = torch.device("cuda")
    test_offsets_are_exact_past_int32(cuda)
    test_int32_products_wrap_without_offsets(cuda)
    test_tile_offsets_are_exact_past_int32(cuda)
    hidden, weight, labels, g_logp, g_entropy, valid = make_case(
        1000, 32000, seed=4, device=cuda, dtype=torch.bfloat16, padding=3
    )
    config = KernelConfig(impl="triton")
    logp, entropy = logprob_entropy(hidden, weight, labels, temperature=0.7, valid_vocab_end=valid, config=config)
    (logp * g_logp + entropy * g_entropy).sum().backward()
    ref = reference(hidden, weight, labels, g_logp, g_entropy, 0.7, valid)
    for name, actual, expected in zip(
        ("logp", "entropy", "d_hidden", "d_weight"), (logp, entropy, hidden.grad, weight.grad), ref, strict=True
    ):
        assert_close(actual, expected, rtol=2e-2, atol=2e-2, name=name)
    tiles = triton_impl.chosen_tiles(hidden=HIDDEN, vocab=valid, dtype=torch.bfloat16)
    assert set(tiles) == {"logprob_forward", "logprob_backward"}
    for tile in tiles.values():
        assert tile.pop("source") == "autotuned" and tuple(tile.values()) in triton_impl.TUNING_SPACE
