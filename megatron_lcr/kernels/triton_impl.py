"""Triton kernels of the fused log-prob / entropy / KL ops (same functions as ``torch_impl``).

Forward: one program per (block of ``BT`` tokens, split of the vocabulary) computes its
logit tiles ``[BT, BV]`` with ``tl.dot`` over the hidden dimension (fp32 accumulation) and keeps an
online softmax over its split; it writes a few floats per token (``[P, k, T]``), merged in PyTorch by
``vocab_parallel.py`` like the partials of tensor-parallel ranks. Splitting the vocabulary over
programs fills the GPU when there are few tokens (the flash-decoding idea).

Backward, per chunk of ``vocab_chunk_size`` columns: a kernel recomputes the logit tiles and writes
the logit gradient ``dz [T, chunk]`` in the weight's dtype; two cuBLAS matmuls then give
``d_hidden += dz @ W_chunk`` (fp32 accumulator) and ``d_weight[chunk] = dz.T @ hidden`` (complete
over all tokens, so the weight gradient is never accumulated across chunks in low precision). This
is the split used by verl's and Cut Cross-Entropy's kernels' simpler variants: the gradient matmuls
run at cuBLAS speed, at the cost of one ``[T, chunk]`` buffer.

Tiles: on a GPU every kernel is autotuned (``triton.autotune``) over ``TUNING_SPACE``, six
``(BT, BV, BH, num_warps, num_stages)`` tiles, keyed on the hidden size, the valid local vocabulary
columns (KL kernels: and the mode) and the tensors' dtypes: the first launch per key compiles and times
them all, later ones reuse the fastest. Token counts are not in the key (they change every
micro-batch). With ``KernelConfig.autotune=False``, and always under the interpreter (interpreted
timings pick nothing useful and would multiply test time), the kernels run the one tile given by
``KernelConfig``'s ``block_*`` / ``num_*`` fields. ``chosen_tiles`` reports which tile each kernel ran
with; ``benchmarks/bench_kernels.py`` records it per shape.

Offsets are int64 wherever a product can pass 2^31: tile indices (``tl.arange``, ``program_id``) and
strides below 2^31 are int32 and their product wraps, while the weight alone holds V_local x H up to
4e9 elements (256K x 16K) and logits / ``dz`` T x V_local up to 1.6e10. Every index x stride product,
and the partials' split x T, goes through ``_offsets``, which widens to int64 first; per-token vectors
(offsets below 4T) stay int32. ``tests/kernels/test_triton_impl.py`` checks ``_offsets`` numerically
past 2^31 and that no kernel multiplies a stride outside it.

fp32 inputs use ``input_precision="ieee"`` (no TF32) so that fp32 results match the reference.
Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (numpy, fp32; no bf16).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from megatron_lcr.kernels.config import KernelConfig, triton_interpreting
from megatron_lcr.kernels.torch_impl import HeadGrads
from megatron_lcr.kernels.vocab_parallel import Head

KL_MODES = {"forward": 0, "reverse": 1, "jsd": 2}

# ---------------------------------------------------------------------------------------------
# Tiles: timed per (H, V_local, dtype) on GPUs, fixed by KernelConfig under the interpreter

TUNING_SPACE = (
    # (BT, BV, BH, num_warps, num_stages)
    (64, 128, 64, 8, 3),  # KernelConfig's fixed tile
    (128, 128, 64, 8, 3),  # many tokens: each weight tile loaded serves twice the rows
    (128, 128, 32, 8, 4),  # the same with a shorter, deeper-pipelined inner step
    (128, 64, 64, 4, 3),
    (64, 64, 64, 4, 4),
    (32, 128, 64, 4, 3),  # few tokens (small micro-batches): more programs along the tokens
)
"""Tiles the autotuner times on a kernel's first launch per key (H, V_local, tensor dtypes)."""
_SPLIT_GRAIN = max(bv for _, bv, _, _, _ in TUNING_SPACE)  # vocabulary splits are multiples of every BV


@functools.cache
def _max_shared_memory(device_index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def _fits_shared_memory(configs: list, named_args: dict, **_launch_kwargs) -> list:
    """Tiles whose pipelined operand buffers (``stages * (BT + BV) * BH`` elements) fit the GPU's shared
    memory, else the smallest one. A tile that still fails to compile is timed as infinitely slow by
    Triton's autotuner (``OutOfResources``), so this only saves compile attempts."""
    first = next(value for value in named_args.values() if isinstance(value, torch.Tensor))

    def need(c: triton.Config) -> int:
        return c.num_stages * (c.kwargs["BT"] + c.kwargs["BV"]) * c.kwargs["BH"] * first.element_size()

    budget = _max_shared_memory(first.device.index)
    return [c for c in configs if need(c) <= budget] or [min(configs, key=need)]


def _autotuned(*key: str):
    """``triton.autotune`` over ``TUNING_SPACE`` keyed on ``key``; Triton appends every tensor argument's
    dtype to the key itself. Token counts are not in the key: they change every micro-batch."""
    configs = [
        triton.Config({"BT": bt, "BV": bv, "BH": bh}, num_warps=warps, num_stages=stages)
        for bt, bv, bh, warps, stages in TUNING_SPACE
    ]
    return triton.autotune(configs=configs, key=list(key), prune_configs_by={"early_config_prune": _fits_shared_memory})


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _offsets(index, stride):
    """``index * stride`` in int64: every offset that multiplies a stride (or a split by T) is built here.

    ``index`` is int32 (``tl.arange`` / ``program_id`` arithmetic) and so is ``stride`` below 2^31, so
    the plain product is int32 and wraps at 2^31: vocab x hidden reaches 4e9 (V_local 256K x H 16K)
    and tokens x vocab 1.6e10 (logits, ``dz``). Widening the index first makes the product exact.
    """
    return index.to(tl.int64) * stride


@triton.jit
def _logit_tile(
    x_ptr, w_ptr, z_ptr, rows, cols, row_ok, col_ok, H, sx0, sx1, sw0, sw1, sz0, sz1, inv_temp,
    FROM_LOGITS: tl.constexpr, DOT_IEEE: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr,
):  # fmt: skip
    """fp32 ``[BT, BV]`` tile of ``z / temperature``; all offsets int64 (``_offsets``)."""
    if FROM_LOGITS:
        ptrs = z_ptr + _offsets(rows, sz0)[:, None] + _offsets(cols, sz1)[None, :]
        z = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    else:
        z = tl.zeros((BT, BV), dtype=tl.float32)
        x_rows = x_ptr + _offsets(rows, sx0)[:, None]  # [BT, 1]; loop-invariant
        w_rows = w_ptr + _offsets(cols, sw0)[:, None]  # [BV, 1]: cols * sw0 is the V x H product
        for k0 in range(0, H, BH):
            ks = k0 + tl.arange(0, BH)
            k_ok = ks < H
            x = tl.load(x_rows + _offsets(ks, sx1)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_rows + _offsets(ks, sw1)[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if DOT_IEEE:
                z = tl.dot(x, tl.trans(w), z, input_precision="ieee")
            else:
                z = tl.dot(x, tl.trans(w), z)
    return z * inv_temp


@triton.jit
def _log_mix_ratio(d, beta):
    """``log(m/p)`` with ``m = (1-beta) p + beta q`` from ``d = log q - log p``; exactly 0 at d = 0."""
    low = tl.log(1.0 + beta * (tl.exp(tl.minimum(d, 0.0)) - 1.0))
    high = d + tl.log(beta + (1.0 - beta) * tl.exp(-tl.maximum(d, 0.0)))
    return tl.where(d <= 0.0, low, high)


@_autotuned("H", "n_valid")
@triton.jit
def _logprob_fwd_kernel(
    x_ptr, w_ptr, z_ptr, lbl_ptr, part_ptr, T, H, n_valid, cols_per_split,
    sx0, sx1, sw0, sw1, sz0, sz1, inv_temp,
    FROM_LOGITS: tl.constexpr, DOT_IEEE: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr,
):  # fmt: skip
    """Partials ``(m, s, u, t)`` of one token block over one vocabulary split -> ``part[split, :, rows]``."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_ok = rows < T
    lbl = tl.load(lbl_ptr + rows, mask=row_ok, other=-1)
    m = tl.full((BT,), float("-inf"), tl.float32)
    s = tl.zeros((BT,), tl.float32)
    u = tl.zeros((BT,), tl.float32)
    t = tl.zeros((BT,), tl.float32)
    v_begin = split * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, n_valid)
    for v0 in range(v_begin, v_end, BV):
        cols = v0 + tl.arange(0, BV)
        col_ok = cols < v_end
        z = _logit_tile(x_ptr, w_ptr, z_ptr, rows, cols, row_ok, col_ok, H, sx0, sx1, sw0, sw1, sz0, sz1,
                        inv_temp, FROM_LOGITS, DOT_IEEE, BT, BV, BH)  # fmt: skip
        t += tl.sum(tl.where(cols[None, :] == lbl[:, None], z, 0.0), axis=1)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every tile has a real column
        zc = z - m_new[:, None]
        e = tl.exp(zc)
        alpha = tl.exp(m - m_new)
        shift = tl.where(s > 0.0, m - m_new, 0.0)  # 0, not -inf * 0, before the first real column
        u = alpha * (u + shift * s) + tl.sum(e * tl.where(col_ok[None, :], zc, 0.0), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    out = part_ptr + _offsets(split * 4, T) + rows  # [P, 4, T]: past 2^31 only with huge vocab_splits
    tl.store(out, m, mask=row_ok)
    tl.store(out + T, s, mask=row_ok)
    tl.store(out + 2 * T, u, mask=row_ok)
    tl.store(out + 3 * T, t, mask=row_ok)


@_autotuned("H", "n_valid")
@triton.jit
def _logprob_bwd_kernel(
    x_ptr, w_ptr, z_ptr, lbl_ptr, logz_ptr, ent_ptr, gl_ptr, gh_ptr, dz_ptr,
    T, H, n_valid, col0, n_cols, sx0, sx1, sw0, sw1, sz0, sz1, sd0, sd1, inv_temp,
    HAS_GL: tl.constexpr, HAS_GH: tl.constexpr,
    FROM_LOGITS: tl.constexpr, DOT_IEEE: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr,
):  # fmt: skip
    """``dz = g_l (1[k=y] - p) - g_h p (log p + H)`` over columns ``[col0, col0 + n_cols)``, / temperature."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_ok = rows < T
    local = tl.program_id(1) * BV + tl.arange(0, BV)
    cols = col0 + local
    in_chunk = local < n_cols
    col_ok = in_chunk & (cols < n_valid)
    z = _logit_tile(x_ptr, w_ptr, z_ptr, rows, cols, row_ok, col_ok, H, sx0, sx1, sw0, sw1, sz0, sz1,
                    inv_temp, FROM_LOGITS, DOT_IEEE, BT, BV, BH)  # fmt: skip
    log_q = z - tl.load(logz_ptr + rows, mask=row_ok, other=0.0)[:, None]
    p = tl.exp(log_q)
    coef = tl.zeros((BT, BV), tl.float32)
    if HAS_GH:
        g_h = tl.load(gh_ptr + rows, mask=row_ok, other=0.0)
        coef = g_h[:, None] * (log_q + tl.load(ent_ptr + rows, mask=row_ok, other=0.0)[:, None])
    dz = -p
    if HAS_GL:
        g_l = tl.load(gl_ptr + rows, mask=row_ok, other=0.0)
        lbl = tl.load(lbl_ptr + rows, mask=row_ok, other=-1)
        dz = dz * (coef + g_l[:, None]) + tl.where(cols[None, :] == lbl[:, None], g_l[:, None], 0.0)
    else:
        dz = dz * coef
    dz = tl.where(row_ok[:, None] & col_ok[None, :], dz * inv_temp, 0.0)
    ptrs = dz_ptr + _offsets(rows, sd0)[:, None] + _offsets(local, sd1)[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & in_chunk[None, :])


@_autotuned("Hs", "Ht", "n_valid", "MODE")
@triton.jit
def _kl_fwd_kernel(
    xs_ptr, ws_ptr, zs_ptr, xt_ptr, wt_ptr, zt_ptr, part_ptr, T, Hs, Ht, n_valid, cols_per_split,
    sxs0, sxs1, sws0, sws1, szs0, szs1, sxt0, sxt1, swt0, swt1, szt0, szt1, inv_temp,
    MODE: tl.constexpr, FROM_LOGITS: tl.constexpr, DOT_IEEE: tl.constexpr,
    BT: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr,
):  # fmt: skip
    """Partials ``(m_s, s_s, m_t, s_t, a)`` of one token block over one split -> ``part[split, :, rows]``.

    MODE 0 (forward): ``a = sum e^{z_t - m_t} (z_t - z_s)``; 1 (reverse): ``sum e^{z_s - m_s} (z_s - z_t)``;
    2 (jsd): ``a = 0`` (the log-sum-exps only).
    """
    split = tl.program_id(1)
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_ok = rows < T
    m_s = tl.full((BT,), float("-inf"), tl.float32)
    m_t = tl.full((BT,), float("-inf"), tl.float32)
    s_s = tl.zeros((BT,), tl.float32)
    s_t = tl.zeros((BT,), tl.float32)
    a = tl.zeros((BT,), tl.float32)
    v_begin = split * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, n_valid)
    for v0 in range(v_begin, v_end, BV):
        cols = v0 + tl.arange(0, BV)
        col_ok = cols < v_end
        z_s = _logit_tile(xs_ptr, ws_ptr, zs_ptr, rows, cols, row_ok, col_ok, Hs, sxs0, sxs1, sws0, sws1,
                          szs0, szs1, inv_temp, FROM_LOGITS, DOT_IEEE, BT, BV, BH)  # fmt: skip
        z_t = _logit_tile(xt_ptr, wt_ptr, zt_ptr, rows, cols, row_ok, col_ok, Ht, sxt0, sxt1, swt0, swt1,
                          szt0, szt1, inv_temp, FROM_LOGITS, DOT_IEEE, BT, BV, BH)  # fmt: skip
        if MODE == 0:
            diff = z_t - z_s  # taken before padding becomes -inf (-inf - -inf = nan)
        else:
            diff = z_s - z_t
        z_s = tl.where(col_ok[None, :], z_s, float("-inf"))
        z_t = tl.where(col_ok[None, :], z_t, float("-inf"))
        ms_new = tl.maximum(m_s, tl.max(z_s, axis=1))
        mt_new = tl.maximum(m_t, tl.max(z_t, axis=1))
        e_s = tl.exp(z_s - ms_new[:, None])
        e_t = tl.exp(z_t - mt_new[:, None])
        alpha_s = tl.exp(m_s - ms_new)
        alpha_t = tl.exp(m_t - mt_new)
        if MODE == 0:
            a = alpha_t * a + tl.sum(tl.where(col_ok[None, :], e_t * diff, 0.0), axis=1)
        if MODE == 1:
            a = alpha_s * a + tl.sum(tl.where(col_ok[None, :], e_s * diff, 0.0), axis=1)
        s_s = alpha_s * s_s + tl.sum(e_s, axis=1)
        s_t = alpha_t * s_t + tl.sum(e_t, axis=1)
        m_s = ms_new
        m_t = mt_new
    out = part_ptr + _offsets(split * 5, T) + rows  # [P, 5, T]: past 2^31 only with huge vocab_splits
    tl.store(out, m_s, mask=row_ok)
    tl.store(out + T, s_s, mask=row_ok)
    tl.store(out + 2 * T, m_t, mask=row_ok)
    tl.store(out + 3 * T, s_t, mask=row_ok)
    tl.store(out + 4 * T, a, mask=row_ok)


@_autotuned("Hs", "Ht", "n_valid")
@triton.jit
def _jsd_fwd_kernel(
    xs_ptr, ws_ptr, zs_ptr, xt_ptr, wt_ptr, zt_ptr, lzs_ptr, lzt_ptr, part_ptr, T, Hs, Ht, n_valid,
    cols_per_split, sxs0, sxs1, sws0, sws1, szs0, szs1, sxt0, sxt1, swt0, swt1, szt0, szt1, inv_temp, beta,
    FROM_LOGITS: tl.constexpr, DOT_IEEE: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr,
):  # fmt: skip
    """``(sum p log(p/m), sum q log(q/m))`` of one token block over one split -> ``part[split, :, rows]``."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_ok = rows < T
    lz_s = tl.load(lzs_ptr + rows, mask=row_ok, other=0.0)
    lz_t = tl.load(lzt_ptr + rows, mask=row_ok, other=0.0)
    kl_pm = tl.zeros((BT,), tl.float32)
    kl_qm = tl.zeros((BT,), tl.float32)
    v_begin = split * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, n_valid)
    for v0 in range(v_begin, v_end, BV):
        cols = v0 + tl.arange(0, BV)
        col_ok = cols < v_end
        log_p = _logit_tile(xs_ptr, ws_ptr, zs_ptr, rows, cols, row_ok, col_ok, Hs, sxs0, sxs1, sws0, sws1,
                            szs0, szs1, inv_temp, FROM_LOGITS, DOT_IEEE, BT, BV, BH) - lz_s[:, None]  # fmt: skip
        log_q = _logit_tile(xt_ptr, wt_ptr, zt_ptr, rows, cols, row_ok, col_ok, Ht, sxt0, sxt1, swt0, swt1,
                            szt0, szt1, inv_temp, FROM_LOGITS, DOT_IEEE, BT, BV, BH) - lz_t[:, None]  # fmt: skip
        d = log_q - log_p
        mix = _log_mix_ratio(d, beta)
        kl_pm += tl.sum(tl.where(col_ok[None, :], -tl.exp(log_p) * mix, 0.0), axis=1)
        kl_qm += tl.sum(tl.where(col_ok[None, :], tl.exp(log_q) * (d - mix), 0.0), axis=1)
    out = part_ptr + _offsets(split * 2, T) + rows  # [P, 2, T]: past 2^31 only with huge vocab_splits
    tl.store(out, kl_pm, mask=row_ok)
    tl.store(out + T, kl_qm, mask=row_ok)


@_autotuned("Hs", "Ht", "n_valid", "MODE")
@triton.jit
def _kl_bwd_kernel(
    xs_ptr, ws_ptr, zs_ptr, xt_ptr, wt_ptr, zt_ptr, lzs_ptr, lzt_ptr, st_ptr, g_ptr, dzs_ptr, dzt_ptr,
    T, Hs, Ht, n_valid, col0, n_cols,
    sxs0, sxs1, sws0, sws1, szs0, szs1, sxt0, sxt1, swt0, swt1, szt0, szt1, sds0, sds1, sdt0, sdt1,
    inv_temp, beta,
    MODE: tl.constexpr, NEED_S: tl.constexpr, NEED_T: tl.constexpr, FROM_LOGITS: tl.constexpr,
    DOT_IEEE: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr,
):  # fmt: skip
    """``(dz_s, dz_t)`` tiles of the KL (formulas in ``torch_impl.kl_logit_grads``), / temperature."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_ok = rows < T
    local = tl.program_id(1) * BV + tl.arange(0, BV)
    cols = col0 + local
    in_chunk = local < n_cols
    col_ok = in_chunk & (cols < n_valid)
    log_p = _logit_tile(xs_ptr, ws_ptr, zs_ptr, rows, cols, row_ok, col_ok, Hs, sxs0, sxs1, sws0, sws1,
                        szs0, szs1, inv_temp, FROM_LOGITS, DOT_IEEE, BT, BV, BH)  # fmt: skip
    log_q = _logit_tile(xt_ptr, wt_ptr, zt_ptr, rows, cols, row_ok, col_ok, Ht, sxt0, sxt1, swt0, swt1,
                        szt0, szt1, inv_temp, FROM_LOGITS, DOT_IEEE, BT, BV, BH)  # fmt: skip
    log_p = log_p - tl.load(lzs_ptr + rows, mask=row_ok, other=0.0)[:, None]
    log_q = log_q - tl.load(lzt_ptr + rows, mask=row_ok, other=0.0)[:, None]
    p = tl.exp(log_p)
    q = tl.exp(log_q)
    k1 = tl.load(st_ptr + 2 * rows, mask=row_ok, other=0.0)[:, None]
    k2 = tl.load(st_ptr + 2 * rows + 1, mask=row_ok, other=0.0)[:, None]
    if MODE == 0:
        dz_s = p - q
        dz_t = q * ((log_q - log_p) - k1)
    elif MODE == 1:
        dz_s = p * ((log_p - log_q) - k1)
        dz_t = q - p
    else:
        d = log_q - log_p
        mix = _log_mix_ratio(d, beta)
        dz_s = (1.0 - beta) * p * (-mix - k1)
        dz_t = beta * q * ((d - mix) - k2)
    scale = tl.load(g_ptr + rows, mask=row_ok, other=0.0)[:, None] * inv_temp
    ok = row_ok[:, None] & col_ok[None, :]
    store_ok = row_ok[:, None] & in_chunk[None, :]
    if NEED_S:
        dz_s = tl.where(ok, dz_s * scale, 0.0)
        ptrs = dzs_ptr + _offsets(rows, sds0)[:, None] + _offsets(local, sds1)[None, :]
        tl.store(ptrs, dz_s.to(dzs_ptr.dtype.element_ty), mask=store_ok)
    if NEED_T:
        dz_t = tl.where(ok, dz_t * scale, 0.0)
        ptrs = dzt_ptr + _offsets(rows, sdt0)[:, None] + _offsets(local, sdt1)[None, :]
        tl.store(ptrs, dz_t.to(dzt_ptr.dtype.element_ty), mask=store_ok)


# ---------------------------------------------------------------------------------------------
# Launchers


def _head_args(head: Head) -> tuple:
    """Pointer and stride arguments ``(x, w, z, H, sx0, sx1, sw0, sw1, sz0, sz1)`` of one head."""
    if head.from_logits:
        z = head.logits
        return (z, z, z, 0, 0, 0, 0, 0, z.stride(0), z.stride(1))
    x, w = head.hidden, head.weight
    return (x, w, x, x.shape[1], x.stride(0), x.stride(1), w.stride(0), w.stride(1), 0, 0)


def _dot_ieee(head: Head) -> bool:
    tensor = head.logits if head.from_logits else head.weight
    return tensor.dtype == torch.float32


_TILES_RUN: dict[tuple[str, int, int, str], dict] = {}
"""``(kernel, H, valid local columns, dtype) -> tile`` of each kernel's latest launch (``chosen_tiles``)."""


def _autotuning(config: KernelConfig) -> bool:
    return config.autotune and not triton_interpreting()


def fixed_tile(config: KernelConfig) -> dict:
    """The one tile kernels run with when not autotuning (``autotune=False``, or the interpreter)."""
    return {"BT": config.block_tokens, "BV": config.block_vocab, "BH": config.block_hidden,
            "num_warps": config.num_warps, "num_stages": config.num_stages}  # fmt: skip


def _launch(name: str, kernel, grid, args: tuple, kwargs: dict, config: KernelConfig, key: tuple) -> None:
    """``kernel[grid](*args, **kwargs)`` with the autotuner's tile or the fixed one; records which ran.

    ``grid(meta)`` reads ``BT`` / ``BV`` from ``meta``; ``key`` is ``(H, n_valid, dtype)`` for the record.
    """
    if _autotuning(config):
        kernel[grid](*args, **kwargs)
        best = kernel.best_config
        tile = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages, "source": "autotuned"}
    else:
        tile = fixed_tile(config)
        kernel.fn[grid](*args, **kwargs, **tile)  # the plain @triton.jit function under the autotuner
        tile["source"] = "fixed (interpreter)" if triton_interpreting() else "fixed (autotune=False)"
    hidden, n_valid, dtype = key
    _TILES_RUN[(name, hidden, n_valid, str(dtype))] = tile


def chosen_tiles(*, hidden: int, vocab: int, dtype: torch.dtype) -> dict[str, dict]:
    """``kernel -> {BT, BV, BH, num_warps, num_stages, source}`` of each kernel's latest launch at this key.

    ``hidden``: H (0 for logits inputs; the student's for KL kernels); ``vocab``: valid local vocabulary
    columns; ``dtype``: the weight's (or logits'). Kernels: logprob_forward, logprob_backward,
    kl_forward, jsd_forward, kl_backward; only those launched at this key appear.
    """
    want = (hidden, vocab, str(dtype))
    return {name: dict(tile) for (name, *rest), tile in _TILES_RUN.items() if tuple(rest) == want}


def _splits(num_tokens: int, n_valid: int, device: torch.device, config: KernelConfig) -> tuple[int, int]:
    """``(splits, cols_per_split)``: programs along the vocabulary per token block, columns each.

    Fixed before the launch (the partials buffer is ``[splits, k, T]``), so with autotuning a split is a
    multiple of every tuned ``BV`` and the programs count uses ``config.block_tokens`` token blocks.
    """
    grain = _SPLIT_GRAIN if _autotuning(config) else config.block_vocab
    tiles = max(1, triton.cdiv(n_valid, grain))
    if config.vocab_splits:
        want = config.vocab_splits
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        want = triton.cdiv(config.programs_per_sm * sms, triton.cdiv(num_tokens, config.block_tokens))
    cols_per_split = triton.cdiv(tiles, min(max(want, 1), tiles)) * grain
    return max(1, triton.cdiv(n_valid, cols_per_split)), cols_per_split


def _head_key(head: Head, n_valid: int) -> tuple:
    """``(H, n_valid, dtype)`` under which ``_launch`` records a tile."""
    if head.from_logits:
        return 0, n_valid, head.logits.dtype
    return head.weight.shape[1], n_valid, head.weight.dtype


def _partials_layout(part: torch.Tensor) -> torch.Tensor:
    """Kernel layout ``[P, k, T]`` -> the merge layout ``[T, P, k]``."""
    return part.permute(2, 0, 1)


def logprob_partials(
    head: Head, labels: torch.Tensor, *, inv_temp: float, n_valid: int, config: KernelConfig
) -> torch.Tensor:
    """Partials ``[T, P, 4]`` ``(m, s, u, t)``; see ``torch_impl.logprob_partials``."""
    num_tokens = head.num_tokens
    device = labels.device
    splits, cols_per_split = _splits(num_tokens, n_valid, device, config)
    part = torch.empty((splits, 4, num_tokens), dtype=torch.float32, device=device)
    part[:, 0] = float("-inf")
    part[:, 1:] = 0.0
    if num_tokens and n_valid:
        args = _head_args(head)
        _launch(
            "logprob_forward", _logprob_fwd_kernel, lambda meta: (triton.cdiv(num_tokens, meta["BT"]), splits),
            (*args[:3], labels, part, num_tokens, args[3], n_valid, cols_per_split, *args[4:], inv_temp),
            {"FROM_LOGITS": head.from_logits, "DOT_IEEE": _dot_ieee(head)}, config, _head_key(head, n_valid),
        )  # fmt: skip
    return _partials_layout(part)


def _fold_chunk(head: Head, dz: torch.Tensor, c0: int, c1: int, d_hidden, d_weight) -> None:
    """``d_hidden += dz @ W[c0:c1]`` (fp32) and ``d_weight[c0:c1] = dz.T @ hidden`` (complete over T)."""
    w = head.weight[c0:c1]
    if d_hidden is not None:
        if dz.dtype == torch.float32:
            d_hidden.addmm_(dz, w)
        else:
            d_hidden += torch.mm(dz, w).float()
    if d_weight is not None:
        torch.mm(dz.t(), head.hidden, out=d_weight[c0:c1])


def _chunked_backward(head: Head, n_valid: int, need_hidden: bool, need_weight: bool, config: KernelConfig, launch):
    """Run ``launch(c0, n_cols, dz)`` per vocabulary chunk and fold each ``dz`` into the head's gradients.

    For logits heads there is one "chunk", all columns, and ``dz`` is the logits' gradient itself.
    """
    if head.from_logits:
        d_logits = torch.empty_like(head.logits, memory_format=torch.contiguous_format) if need_hidden else None
        if d_logits is not None:
            launch(0, head.local_vocab, d_logits)
        return None, None, d_logits
    num_tokens, device = head.num_tokens, head.hidden.device
    d_hidden = torch.zeros(head.hidden.shape, dtype=torch.float32, device=device) if need_hidden else None
    d_weight = torch.zeros(head.weight.shape, dtype=head.weight.dtype, device=device) if need_weight else None
    chunk = min(config.vocab_chunk_size, n_valid)
    if chunk and num_tokens and (need_hidden or need_weight):
        buffer = torch.empty((num_tokens, chunk), dtype=head.weight.dtype, device=device)
        for c0 in range(0, n_valid, chunk):
            c1 = min(c0 + chunk, n_valid)
            dz = buffer[:, : c1 - c0]
            launch(c0, c1 - c0, dz)
            _fold_chunk(head, dz, c0, c1, d_hidden, d_weight)
    return d_hidden, d_weight, None


def logprob_backward(
    head: Head,
    labels: torch.Tensor,
    log_z: torch.Tensor,
    entropy: torch.Tensor,
    g_logp: torch.Tensor | None,
    g_entropy: torch.Tensor | None,
    *,
    inv_temp: float,
    n_valid: int,
    need_hidden: bool,
    need_weight: bool,
    config: KernelConfig,
) -> HeadGrads:
    """Gradients of ``sum(g_logp * logp + g_entropy * entropy)``; see ``torch_impl.logprob_backward``."""
    num_tokens = head.num_tokens
    args = _head_args(head)

    def launch(c0: int, n_cols: int, dz: torch.Tensor) -> None:
        if not num_tokens:
            return
        _launch(
            "logprob_backward", _logprob_bwd_kernel,
            lambda meta: (triton.cdiv(num_tokens, meta["BT"]), triton.cdiv(n_cols, meta["BV"])),
            (*args[:3], labels, log_z, entropy,
             log_z if g_logp is None else g_logp, log_z if g_entropy is None else g_entropy, dz,
             num_tokens, args[3], n_valid, c0, n_cols, *args[4:], dz.stride(0), dz.stride(1), inv_temp),
            {"HAS_GL": g_logp is not None, "HAS_GH": g_entropy is not None,
             "FROM_LOGITS": head.from_logits, "DOT_IEEE": _dot_ieee(head)},
            config, _head_key(head, n_valid),
        )  # fmt: skip

    return _chunked_backward(head, n_valid, need_hidden, need_weight, config, launch)


def _pair_args(student: Head, teacher: Head) -> tuple[tuple, tuple, tuple]:
    """``(pointers, (Hs, Ht), strides)`` of the two heads in the order the KL kernels take them."""
    s, t = _head_args(student), _head_args(teacher)
    return s[:3] + t[:3], (s[3], t[3]), s[4:] + t[4:]


def kl_partials(
    student: Head, teacher: Head, *, kind: str, inv_temp: float, n_valid: int, config: KernelConfig
) -> torch.Tensor:
    """Partials ``[T, P, 5]`` ``(m_s, s_s, m_t, s_t, a)``; see ``torch_impl.kl_partials``."""
    num_tokens = student.num_tokens
    device = (student.logits if student.from_logits else student.hidden).device
    splits, cols_per_split = _splits(num_tokens, n_valid, device, config)
    part = torch.zeros((splits, 5, num_tokens), dtype=torch.float32, device=device)
    part[:, 0] = part[:, 2] = float("-inf")
    if num_tokens and n_valid:
        ptrs, dims, strides = _pair_args(student, teacher)
        _launch(
            "kl_forward", _kl_fwd_kernel, lambda meta: (triton.cdiv(num_tokens, meta["BT"]), splits),
            (*ptrs, part, num_tokens, *dims, n_valid, cols_per_split, *strides, inv_temp),
            {"MODE": KL_MODES[kind], "FROM_LOGITS": student.from_logits, "DOT_IEEE": _dot_ieee(student)},
            config, _head_key(student, n_valid),
        )  # fmt: skip
    return _partials_layout(part)


def jsd_sums(
    student: Head,
    teacher: Head,
    log_z_s: torch.Tensor,
    log_z_t: torch.Tensor,
    *,
    beta: float,
    inv_temp: float,
    n_valid: int,
    config: KernelConfig,
) -> torch.Tensor:
    """This shard's ``[T, 2]`` ``(sum p log(p/m), sum q log(q/m))``; see ``torch_impl.jsd_sums``."""
    num_tokens = student.num_tokens
    splits, cols_per_split = _splits(num_tokens, n_valid, log_z_s.device, config)
    part = torch.zeros((splits, 2, num_tokens), dtype=torch.float32, device=log_z_s.device)
    if num_tokens and n_valid:
        ptrs, dims, strides = _pair_args(student, teacher)
        _launch(
            "jsd_forward", _jsd_fwd_kernel, lambda meta: (triton.cdiv(num_tokens, meta["BT"]), splits),
            (*ptrs, log_z_s, log_z_t, part, num_tokens, *dims, n_valid, cols_per_split, *strides, inv_temp, beta),
            {"FROM_LOGITS": student.from_logits, "DOT_IEEE": _dot_ieee(student)}, config,
            _head_key(student, n_valid),
        )  # fmt: skip
    return part.sum(dim=0).t()


def kl_backward(
    student: Head,
    teacher: Head,
    log_z_s: torch.Tensor,
    log_z_t: torch.Tensor,
    stats: torch.Tensor,
    g: torch.Tensor,
    *,
    kind: str,
    beta: float,
    inv_temp: float,
    n_valid: int,
    needs: tuple[bool, bool, bool, bool],
    config: KernelConfig,
) -> tuple[HeadGrads, HeadGrads]:
    """Gradients of ``sum(g * kl)`` for ``(student, teacher)``; see ``torch_impl.kl_backward``.

    When both heads need gradients, one kernel launch per chunk writes both ``dz`` buffers.
    """
    num_tokens = student.num_tokens
    ptrs, dims, strides = _pair_args(student, teacher)
    stats = stats.contiguous()

    def launch_pair(c0: int, n_cols: int, dz_s: torch.Tensor | None, dz_t: torch.Tensor | None) -> None:
        if not num_tokens:
            return
        ref_s = dz_s if dz_s is not None else dz_t
        ref_t = dz_t if dz_t is not None else dz_s
        _launch(
            "kl_backward", _kl_bwd_kernel,
            lambda meta: (triton.cdiv(num_tokens, meta["BT"]), triton.cdiv(n_cols, meta["BV"])),
            (*ptrs, log_z_s, log_z_t, stats, g, ref_s, ref_t, num_tokens, *dims, n_valid, c0, n_cols,
             *strides, ref_s.stride(0), ref_s.stride(1), ref_t.stride(0), ref_t.stride(1), inv_temp, beta),
            {"MODE": KL_MODES[kind], "NEED_S": dz_s is not None, "NEED_T": dz_t is not None,
             "FROM_LOGITS": student.from_logits, "DOT_IEEE": _dot_ieee(student)},
            config, _head_key(student, n_valid),
        )  # fmt: skip

    need_s, need_t = needs[0] or needs[1], needs[2] or needs[3]
    if student.from_logits or not (need_s and need_t):
        grads_s = (
            _chunked_backward(
                student, n_valid, needs[0], needs[1], config, lambda c0, n, dz: launch_pair(c0, n, dz, None)
            )
            if need_s
            else (None,) * 3
        )
        grads_t = (
            _chunked_backward(
                teacher, n_valid, needs[2], needs[3], config, lambda c0, n, dz: launch_pair(c0, n, None, dz)
            )
            if need_t
            else (None,) * 3
        )
        return grads_s, grads_t
    return _paired_hidden_backward(student, teacher, n_valid, needs, config, launch_pair)


def _paired_hidden_backward(student: Head, teacher: Head, n_valid: int, needs, config: KernelConfig, launch_pair):
    """Both hidden-state heads need gradients: one launch per chunk, both ``dz`` buffers folded."""
    num_tokens, device = student.num_tokens, student.hidden.device

    def zeros_like_f32(tensor: torch.Tensor, need: bool):
        return torch.zeros(tensor.shape, dtype=torch.float32, device=device) if need else None

    def zeros_like_same(tensor: torch.Tensor, need: bool):
        return torch.zeros(tensor.shape, dtype=tensor.dtype, device=device) if need else None

    d_hs, d_ht = zeros_like_f32(student.hidden, needs[0]), zeros_like_f32(teacher.hidden, needs[2])
    d_ws, d_wt = zeros_like_same(student.weight, needs[1]), zeros_like_same(teacher.weight, needs[3])
    chunk = min(config.vocab_chunk_size, n_valid)
    if chunk and num_tokens:
        buf_s = torch.empty((num_tokens, chunk), dtype=student.weight.dtype, device=device)
        buf_t = torch.empty((num_tokens, chunk), dtype=teacher.weight.dtype, device=device)
        for c0 in range(0, n_valid, chunk):
            c1 = min(c0 + chunk, n_valid)
            dz_s, dz_t = buf_s[:, : c1 - c0], buf_t[:, : c1 - c0]
            launch_pair(c0, c1 - c0, dz_s, dz_t)
            _fold_chunk(student, dz_s, c0, c1, d_hs, d_ws)
            _fold_chunk(teacher, dz_t, c0, c1, d_ht, d_wt)
    return (d_hs, d_ws, None), (d_ht, d_wt, None)
