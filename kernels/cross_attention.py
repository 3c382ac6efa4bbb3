"""Masked cross-attention for the two R2D2 cross encoders (contract: DESIGN.md section 3).

    out = cross_attention(q, k, v, key_mask=None, scale=None, impl="auto")

q (B, H, Lq, Dh), k and v (B, H, Lk, Dh), Lq != Lk allowed; key_mask bool (B, Lk), True = attend. A query row
whose keys are all masked returns zeros and passes zero gradient (never NaN).

impl:
  "reference"  naive softmax(q k^T) v in the input dtype (holds Lq x Lk); the test oracle in float64.
  "torch"      F.scaled_dot_product_attention with the contract's mask handling; the CPU default.
  "triton"     fused FlashAttention-2 style kernels (forward: online softmax, per-row LSE saved; backward:
               tiles recomputed from the LSE, one fused kernel when all query rows fit one program, as
               R2D2's 64 text tokens do, or else all keys, as over those 64 tokens, otherwise a dK/dV + dQ
               pair); CUDA, or the Triton interpreter on CPU (TRITON_INTERPRET=1).
  "auto"       "triton" on CUDA for fp32 / bf16 / fp16 and Dh <= 256 when triton is importable, else "torch".
The triton path is autotuned on CUDA; R2D2DS_AUTOTUNE=0 keeps one config per kernel (quick runs, tests).
"""

from __future__ import annotations

import functools
import math
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F

_IMPLS = ("auto", "triton", "torch", "reference")
_LOG2E = 1.4426950408889634  # the kernels run the softmax in base 2: exp(x) = exp2(x * log2(e))


# ----------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------


def cross_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Naive masked attention computed in the inputs' dtype (call it on float64 copies for an oracle).

    Written with an explicit max-subtracted softmax so a fully masked row is 0 / 1 = 0 with finite, zero
    gradients (softmax over an all -inf row would be NaN).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    if key_mask is not None:
        valid = key_mask[:, None, None, :]  # (B, 1, 1, Lk)
        s = s.masked_fill(~valid, float("-inf"))
    m = s.amax(dim=-1, keepdim=True).detach()  # (B, H, Lq, 1); -inf on fully masked rows
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)  # exp(-inf) = 0 with a zero derivative on masked keys
    denom = p.sum(dim=-1, keepdim=True)  # (B, H, Lq, 1); 0 on fully masked rows
    out = torch.matmul(p, v) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return out.to(q.dtype)


# ----------------------------------------------------------------------------------------------------------
# PyTorch path (SDPA)
# ----------------------------------------------------------------------------------------------------------


def _cross_attention_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """SDPA with the contract's empty-row rule.

    SDPA returns NaN for a query row whose boolean mask is all False. The key mask is per (batch, key), so a
    row is empty exactly when its whole batch element is: give those elements an all-True mask (finite
    numbers) and multiply their output by 0, which also makes every gradient through them exactly 0.
    """
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    has_key = key_mask.any(dim=-1)  # (B,)
    safe_mask = key_mask | ~has_key[:, None]  # (B, Lk)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe_mask[:, None, None, :], scale=scale)
    # Always multiply: testing has_key.all() first would cost a host-device sync on every call.
    return out * has_key[:, None, None, None].to(out.dtype)


# ----------------------------------------------------------------------------------------------------------
# Autotune configs
# ----------------------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M tiles queries, BLOCK_N tiles keys. R2D2's lengths are
# 64 text tokens and 197 / 257 image tokens, so small and medium tiles matter more than 128 x 128.
_FWD_TILES = [
    (64, 64, 4, 2), (64, 32, 4, 3), (32, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 128, 8, 2),
]
_DKDV_TILES = [  # per key block, looping over query blocks
    (32, 64, 4, 2), (64, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2), (64, 32, 4, 2),
]
_DQ_TILES = [  # per query block, looping over key blocks
    (64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2), (32, 64, 4, 2),
]
_FUSED_BWD_TILES = [  # (BLOCK_N, warps, stages): BLOCK_M is fixed to cover every query row
    (32, 4, 2), (64, 4, 2), (64, 8, 2), (128, 8, 2), (32, 4, 3),
]
_FUSED_KEYS_BWD_TILES = [  # (BLOCK_M, warps, stages): BLOCK_N is fixed to cover every key
    (32, 4, 2), (64, 4, 2), (64, 8, 2), (128, 8, 2), (32, 4, 3),
]
# Short lists on purpose: every config is a compile per (dtype, head dim, mask) variant, and the GPU check has
# minutes, not hours. The pruner drops the ones the lengths or the shared memory rule out.

# The interpreter runs one program at a time in numpy: one mid-sized config, no tuning.
_INTERPRET_TILE = {"BLOCK_M": 32, "BLOCK_N": 64}
# The backward holds all of a (batch, head)'s query rows in one program while BLOCK_M <= 128 and
# BLOCK_M * BLOCK_D stays within this many elements (Lq <= 64 at Dh 128, <= 128 at Dh 64), so the register
# tiles do not spill; longer queries take the split dK/dV + dQ kernels.
_FUSED_BWD_MAX_TILE = 64 * 128


def _configs(tiles: list[tuple[int, ...]], names: tuple[str, ...] = ("BLOCK_M", "BLOCK_N")) -> list:
    """The autotune list; R2D2DS_AUTOTUNE=0 keeps only the first tile (tests: one compile per variant).

    Each tile is (*sizes named by `names`, num_warps, num_stages)."""
    import triton

    if _interpreting():
        return [triton.Config({n: _INTERPRET_TILE[n] for n in names}, num_warps=4, num_stages=1)]
    if os.environ.get("R2D2DS_AUTOTUNE", "1") == "0":
        tiles = tiles[:1]
    return [triton.Config(dict(zip(names, t[:-2])), num_warps=t[-2], num_stages=t[-1]) for t in tiles]


def _max_shared_mem(device: torch.device) -> int:
    try:
        import triton

        return int(triton.runtime.driver.active.utils.get_device_properties(device.index)["max_shared_mem"])
    except Exception:  # older drivers / API drift: the A100 / H100 opt-in floor
        return 160 * 1024


def _pruner(smem_tiles):
    """Early prune: tiles no larger than the next power of two of each length, and within shared memory.

    `smem_tiles(BLOCK_M, BLOCK_N, stages)` counts the (rows, head_dim) tiles a config keeps in shared memory.
    """

    def prune(configs: list, named_args: dict, **kwargs) -> list:
        import triton

        args = {**named_args, **kwargs}
        lq, lk, block_d = args["Lq"], args["Lk"], args["BLOCK_D"]
        elt = args["Q"].element_size()
        limit = _max_shared_mem(args["Q"].device)
        m_cap = max(16, triton.next_power_of_2(lq))
        n_cap = max(16, triton.next_power_of_2(lk))
        # BLOCK_M (BLOCK_N) is a launch argument, not a config entry, for the query- (key-) fused backward.
        size = lambda c: (c.kwargs.get("BLOCK_M", args.get("BLOCK_M")), c.kwargs.get("BLOCK_N", args.get("BLOCK_N")))
        kept = [
            c for c in configs
            if size(c)[0] <= m_cap and size(c)[1] <= n_cap
            and smem_tiles(*size(c), c.num_stages) * block_d * elt <= limit
        ]
        # Never empty: the smallest tile always fits.
        return kept or [min(configs, key=lambda c: size(c)[0] * size(c)[1])]

    return prune


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------
# Layout: q, o, do, dq contiguous (B*H, Lq, Dh); k, v, dk, dv contiguous (B*H, Lk, Dh); lse and delta fp32
# (B*H, Lq); key mask uint8 (B, Lk). Dh is padded to BLOCK_D = next power of two >= 16 by masked loads (zeros
# do not change a dot product). Scores live in base 2: s2 = (q . k) * scale * log2(e), so softmax uses exp2,
# and LSE2 = m2 + log2(l) per row; a row with no valid key stores LSE2 = +inf so exp2(s2 - LSE2) = 0 later.
# DOT_FP32 (interpreter, bf16 only) upcasts tiles before tl.dot: the interpreter multiplies bf16 bits wrongly.
# INPUT_PRECISION is "ieee" for fp32 inputs so the kernel matches fp32 PyTorch instead of rounding to tf32.


@functools.cache
def _triton_kernels() -> SimpleNamespace:
    """Defines the kernels on first use, so importing this module never imports triton (the torch path works
    without it) and TRITON_INTERPRET is read when the triton impl is first called."""
    global triton, tl, _head_bases, _key_tile, _query_tile, _query_block, _p_and_ds
    import triton
    import triton.language as tl

    # Helpers shared by the kernels (Triton inlines them). Module globals, as the kernels look names up there.
    @triton.jit
    def _head_bases(pid_bh, H, Lq, Lk, HEAD_DIM: tl.constexpr):
        # Program pid_bh's batch index and the start offsets of its (batch, head): q / o / dO rows, k / v rows,
        # LSE / delta entries. int64: B*H*L*Dh passes 2^31 at large batch.
        bh = pid_bh.to(tl.int64)
        return pid_bh // H, bh * Lq * HEAD_DIM, bh * Lk * HEAD_DIM, bh * Lq

    @triton.jit
    def _key_tile(K, V, KeyMask, b, kv_base, offs_n, offs_d, Lk,
                  HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, DOT_FP32: tl.constexpr):
        # Keys offs_n of one (batch, head): k, v (BLOCK_N, BLOCK_D), zero past Lk and HEAD_DIM; key_ok = in
        # range and attended; kv_off / kv_in address the tile (dK / dV stores).
        key_in = offs_n < Lk
        key_ok = key_in
        if HAS_MASK:
            key_ok = key_ok & (tl.load(KeyMask + b * Lk + offs_n, mask=key_in, other=0) != 0)
        kv_off = kv_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        kv_in = key_in[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(K + kv_off, mask=kv_in, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V + kv_off, mask=kv_in, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        return k, v, key_ok, kv_off, kv_in

    @triton.jit
    def _query_tile(Q, DOut, q_base, offs_m, row_in, offs_d, HEAD_DIM: tl.constexpr, DOT_FP32: tl.constexpr):
        # Query rows offs_m (valid where row_in) of one (batch, head): q, dO (BLOCK_M, BLOCK_D), zero past Lq
        # and HEAD_DIM; q_off / q_in address the tile (dQ stores).
        q_off = q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        q_in = row_in[:, None] & (offs_d < HEAD_DIM)[None, :]
        q = tl.load(Q + q_off, mask=q_in, other=0.0)  # (BLOCK_M, BLOCK_D)
        do = tl.load(DOut + q_off, mask=q_in, other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        return q, do, q_off, q_in

    @triton.jit
    def _query_block(Q, DOut, Out, Lse, q_base, row_base, offs_m, row_in, offs_d,
                     HEAD_DIM: tl.constexpr, DOT_FP32: tl.constexpr):
        # A fused backward's query block: q, dO tiles, delta = rowsum(dO * O) (fp32) and the LSE (+inf past Lq,
        # so P = 0 there).
        q, do, q_off, q_in = _query_tile(Q, DOut, q_base, offs_m, row_in, offs_d, HEAD_DIM, DOT_FP32)
        o = tl.load(Out + q_off, mask=q_in, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,)
        lse = tl.load(Lse + row_base + offs_m, mask=row_in, other=float("inf"))  # (BLOCK_M,)
        return q, do, q_off, q_in, delta, lse

    @triton.jit
    def _p_and_ds(q, do, k, v, key_ok, lse, delta, qk_scale, INPUT_PRECISION: tl.constexpr):
        # P = exp2(s2 - LSE2) (0 on masked keys) and dS = P (dP - delta), dP = dO V^T: (BLOCK_M, BLOCK_N) fp32.
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        p = tl.where(key_ok[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        return p, p * (dp - delta[:, None])

    @triton.autotune(
        configs=_configs(_FWD_TILES), key=["Lq", "Lk", "BLOCK_D", "HAS_MASK"],
        prune_configs_by={"early_config_prune": _pruner(lambda m, n, st: m + 2 * n * st)},
    )
    @triton.jit(do_not_specialize=["Lq", "Lk"])  # lengths vary per batch: no recompiles
    def _cross_attention_fwd_kernel(
        Q, K, V, KeyMask, Out, Lse, qk_scale, H, Lq, Lk,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, DOT_FP32: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)  # B*H on axis 0 (CUDA caps axes 1 and 2 at 65,535; axis 0 at 2^31 - 1)
        pid_m = tl.program_id(1)
        b, q_base, kv_base, row_base = _head_bases(pid_bh, H, Lq, Lk, HEAD_DIM)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_in = offs_m < Lq
        d_in = offs_d < HEAD_DIM
        q_off = q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        q = tl.load(Q + q_off, mask=row_in[:, None] & d_in[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        if DOT_FP32:
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of s2
        l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s2 - m_i)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running sum of exp2(s2 - m_i) v
        for start_n in range(0, Lk, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k, v, key_ok, _, _ = _key_tile(K, V, KeyMask, b, kv_base, offs_n, offs_d, Lk,
                                           HEAD_DIM, HAS_MASK, DOT_FP32)
            s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N) fp32
            s = tl.where(key_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with no valid key so far has m_new = -inf; shift by 0 instead so exp2 gives 0, not NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_safe)  # rescales the old sums to the new max
            p = tl.math.exp2(s - m_safe[:, None])  # (BLOCK_M, BLOCK_N)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
            m_i = m_new

        has_key = l_i > 0.0
        l_safe = tl.where(has_key, l_i, 1.0)
        out = acc / l_safe[:, None]  # rows with no valid key: acc = 0, so 0
        lse = tl.where(has_key, m_i + tl.math.log2(l_safe), float("inf"))
        tl.store(Lse + row_base + offs_m, lse, mask=row_in)
        tl.store(Out + q_off, out.to(Out.dtype.element_ty), mask=row_in[:, None] & d_in[None, :])

    @triton.jit(do_not_specialize=["Lq"])
    def _cross_attention_bwd_preprocess(
        Out, DOut, Delta, Lq, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        # delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij, the softmax-backward term shared by dq and dk.
        pid_bh = tl.program_id(0)  # B*H on axis 0 (CUDA caps axes 1 and 2 at 65,535; axis 0 at 2^31 - 1)
        pid_m = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_in = offs_m < Lq
        off = pid_bh.to(tl.int64) * Lq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        io_mask = row_in[:, None] & (offs_d < HEAD_DIM)[None, :]
        o = tl.load(Out + off, mask=io_mask, other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_D)
        do = tl.load(DOut + off, mask=io_mask, other=0.0).to(tl.float32)
        tl.store(Delta + pid_bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=row_in)

    @triton.autotune(
        configs=_configs(_DKDV_TILES), key=["Lq", "Lk", "BLOCK_D", "HAS_MASK"],
        prune_configs_by={"early_config_prune": _pruner(lambda m, n, st: 2 * n + 2 * m * st)},
    )
    @triton.jit(do_not_specialize=["Lq", "Lk"])
    def _cross_attention_bwd_dkdv_kernel(
        Q, K, V, KeyMask, DOut, Lse, Delta, DK, DV, sm_scale, qk_scale, H, Lq, Lk,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, DOT_FP32: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # One program per key block: dV_j = sum_i P_ij dO_i, dK_j = scale * sum_i dS_ij q_i, with
        # P^T recomputed from the saved LSE and dS = P * (dP - delta). Transposed (keys x queries) tiles.
        pid_bh = tl.program_id(0)
        pid_n = tl.program_id(1)
        b, q_base, kv_base, row_base = _head_bases(pid_bh, H, Lq, Lk, HEAD_DIM)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        k, v, key_ok, kv_off, kv_in = _key_tile(K, V, KeyMask, b, kv_base, offs_n, offs_d, Lk,
                                                HEAD_DIM, HAS_MASK, DOT_FP32)

        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start_m in range(0, Lq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_in = offs_m < Lq
            q, do, _, _ = _query_tile(Q, DOut, q_base, offs_m, row_in, offs_d, HEAD_DIM, DOT_FP32)
            # Rows past Lq load LSE = +inf, so their P is exactly 0.
            lse = tl.load(Lse + row_base + offs_m, mask=row_in, other=float("inf"))  # (BLOCK_M,)
            delta = tl.load(Delta + row_base + offs_m, mask=row_in, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
            # Masked keys may score above LSE (exp2 -> inf): select 0 rather than multiply, so no NaN.
            p_t = tl.where(key_ok[:, None], tl.math.exp2(s_t - lse[None, :]), 0.0)
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_M)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)

        # Masked and padded keys never entered a softmax: p_t = 0 gives them exact zero gradients.
        tl.store(DK + kv_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_in)
        tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_in)

    @triton.autotune(
        configs=_configs(_DQ_TILES), key=["Lq", "Lk", "BLOCK_D", "HAS_MASK"],
        prune_configs_by={"early_config_prune": _pruner(lambda m, n, st: 2 * m + 2 * n * st)},
    )
    @triton.jit(do_not_specialize=["Lq", "Lk"])
    def _cross_attention_bwd_dq_kernel(
        Q, K, V, KeyMask, DOut, Lse, Delta, DQ, sm_scale, qk_scale, H, Lq, Lk,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, DOT_FP32: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # One program per query block: dQ_i = scale * sum_j dS_ij k_j. A separate kernel from dK/dV so neither
        # needs atomics, and each side gets its own tile shape (Lq and Lk differ).
        pid_bh = tl.program_id(0)  # B*H on axis 0 (CUDA caps axes 1 and 2 at 65,535; axis 0 at 2^31 - 1)
        pid_m = tl.program_id(1)
        b, q_base, kv_base, row_base = _head_bases(pid_bh, H, Lq, Lk, HEAD_DIM)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_in = offs_m < Lq
        q, do, q_off, q_in = _query_tile(Q, DOut, q_base, offs_m, row_in, offs_d, HEAD_DIM, DOT_FP32)
        lse = tl.load(Lse + row_base + offs_m, mask=row_in, other=float("inf"))  # (BLOCK_M,)
        delta = tl.load(Delta + row_base + offs_m, mask=row_in, other=0.0)

        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, Lk, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k, v, key_ok, _, _ = _key_tile(K, V, KeyMask, b, kv_base, offs_n, offs_d, Lk,
                                           HEAD_DIM, HAS_MASK, DOT_FP32)
            s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
            p = tl.where(key_ok[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)

        tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_in)

    @triton.autotune(
        configs=_configs(_FUSED_BWD_TILES, names=("BLOCK_N",)),
        key=["Lq", "Lk", "BLOCK_D", "BLOCK_M", "HAS_MASK"],
        prune_configs_by={"early_config_prune": _pruner(lambda m, n, st: 4 * m + 2 * n * st)},
    )
    @triton.jit(do_not_specialize=["Lq", "Lk"])
    def _cross_attention_bwd_fused_kernel(
        Q, K, V, KeyMask, Out, DOut, Lse, DQ, DK, DV, sm_scale, qk_scale, H, Lq, Lk,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, DOT_FP32: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # Short queries (Lq <= BLOCK_M, e.g. R2D2's 64 text tokens): one program per (batch, head) holds every
        # query row, so it computes delta itself, writes each key block's dK/dV once and keeps dQ in
        # registers: 5 matmuls per tile instead of the split path's 7, one launch instead of three.
        pid_bh = tl.program_id(0)
        b, q_base, kv_base, row_base = _head_bases(pid_bh, H, Lq, Lk, HEAD_DIM)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_in = offs_m < Lq
        q, do, q_off, q_in, delta, lse = _query_block(Q, DOut, Out, Lse, q_base, row_base, offs_m, row_in, offs_d,
                                                      HEAD_DIM, DOT_FP32)

        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, Lk, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k, v, key_ok, kv_off, kv_in = _key_tile(K, V, KeyMask, b, kv_base, offs_n, offs_d, Lk,
                                                    HEAD_DIM, HAS_MASK, DOT_FP32)
            p, ds = _p_and_ds(q, do, k, v, key_ok, lse, delta, qk_scale, INPUT_PRECISION)  # (BLOCK_M, BLOCK_N)
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_D)
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_D)
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
            tl.store(DK + kv_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_in)
            tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_in)

        tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_in)

    @triton.autotune(
        configs=_configs(_FUSED_KEYS_BWD_TILES, names=("BLOCK_M",)),
        key=["Lq", "Lk", "BLOCK_D", "BLOCK_N", "HAS_MASK"],
        prune_configs_by={"early_config_prune": _pruner(lambda m, n, st: 4 * n + 2 * m * st)},
    )
    @triton.jit(do_not_specialize=["Lq", "Lk"])
    def _cross_attention_bwd_fused_keys_kernel(
        Q, K, V, KeyMask, Out, DOut, Lse, DQ, DK, DV, sm_scale, qk_scale, H, Lq, Lk,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, DOT_FP32: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # Short keys (Lk <= BLOCK_N <= 128, e.g. R2D2's image queries over 64 text tokens): the mirror of the
        # query-fused kernel. One program per (batch, head) holds every key: dK / dV accumulate in registers
        # over the query blocks, and each query block's dQ is complete (all keys are here), so it is stored at
        # once; delta = rowsum(dO O) per block in-kernel. 5 products per tile, one launch, no atomics.
        pid_bh = tl.program_id(0)
        b, q_base, kv_base, row_base = _head_bases(pid_bh, H, Lq, Lk, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        k, v, key_ok, kv_off, kv_in = _key_tile(K, V, KeyMask, b, kv_base, offs_n, offs_d, Lk,
                                                HEAD_DIM, HAS_MASK, DOT_FP32)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start_m in range(0, Lq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_in = offs_m < Lq
            q, do, q_off, q_in, delta, lse = _query_block(Q, DOut, Out, Lse, q_base, row_base, offs_m, row_in,
                                                          offs_d, HEAD_DIM, DOT_FP32)
            p, ds = _p_and_ds(q, do, k, v, key_ok, lse, delta, qk_scale, INPUT_PRECISION)  # (BLOCK_M, BLOCK_N)
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=INPUT_PRECISION)
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=INPUT_PRECISION)
            dq = tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_D), complete
            tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_in)

        tl.store(DK + kv_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_in)
        tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_in)

    return SimpleNamespace(
        fwd=_cross_attention_fwd_kernel, preprocess=_cross_attention_bwd_preprocess,
        dkdv=_cross_attention_bwd_dkdv_kernel, dq=_cross_attention_bwd_dq_kernel,
        fused_bwd=_cross_attention_bwd_fused_kernel, fused_keys_bwd=_cross_attention_bwd_fused_keys_kernel,
    )


# ----------------------------------------------------------------------------------------------------------
# Launch grids (pure functions of the sizes, so a CPU test can check them against CUDA's limits)
# ----------------------------------------------------------------------------------------------------------
# B*H is the large axis (the ITM batch is 3x the local batch, times 12 heads): it goes on axis 0, which CUDA
# allows up to 2^31 - 1 programs; the query / key block count (a few blocks) goes on axis 1 (cap 65,535).


# Axis 1 holds at most 65,535 blocks of at least 16 rows (the smallest tile any config or pre-pass uses).
MAX_LENGTH = 65_535 * 16


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def fwd_grid(B: int, H: int, Lq: int, block_m: int) -> tuple[int, int]:
    """Forward, delta pre-pass and dQ kernels: one program per (batch * head, query block)."""
    return (B * H, _cdiv(Lq, block_m))


def dkdv_grid(B: int, H: int, Lk: int, block_n: int) -> tuple[int, int]:
    """dK/dV kernel: one program per (batch * head, key block)."""
    return (B * H, _cdiv(Lk, block_n))


def fused_bwd_grid(B: int, H: int) -> tuple[int]:
    """Fused backward: one program per (batch, head)."""
    return (B * H,)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PREPROCESS_BLOCK_M = 64


def _check_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> int:
    """Asserts the kernels' preconditions; returns BLOCK_D."""
    _check_inputs(q, k, v, key_mask)
    assert q.dtype in _KERNEL_DTYPES, f"triton cross_attention takes fp32 / bf16 / fp16, got {q.dtype}"
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous(), "q, k, v must be contiguous"
    assert q.device == k.device == v.device, f"q, k, v on different devices: {q.device} {k.device} {v.device}"
    if key_mask is not None:
        assert key_mask.is_contiguous() and key_mask.device == q.device, "key_mask: contiguous, on q's device"
    assert q.is_cuda or _interpreting(), (
        "impl='triton' on CPU needs the Triton interpreter: set TRITON_INTERPRET=1 before triton is imported"
    )
    longest = max(q.shape[2], k.shape[2])
    assert longest <= MAX_LENGTH, f"sequence length {longest} > {MAX_LENGTH}: query / key blocks on grid axis 1"
    head_dim = q.shape[-1]
    assert 1 <= head_dim <= 256, f"head dim {head_dim} unsupported by the triton kernel (1..256)"
    return _pow2_at_least_16(head_dim)


def _dot_fp32(q: torch.Tensor) -> bool:
    # Only bf16 needs fp32 tiles in the interpreter (its tl.dot multiplies bf16 bit patterns wrongly); fp16 and
    # fp32 take the GPU's path there, so the interpreter sees the casts a GPU does.
    return _interpreting() and q.dtype == torch.bfloat16


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())  # tl.dot tiles: powers of two, at least 16


def _fused_bwd_fits(length: int, head_dim: int) -> bool:
    """Whether all `length` query (or key) rows of a (batch, head) fit one program's registers."""
    block = _pow2_at_least_16(length)
    return block <= 128 and block * _pow2_at_least_16(head_dim) <= _FUSED_BWD_MAX_TILE


def _bwd_path(lq: int, lk: int, head_dim: int) -> str:
    """The backward kernel(s): "fused_queries" (all query rows in one program: R2D2's text queries), else
    "fused_keys" (all keys in one program: the image queries over 64 text tokens), else the "split" trio."""
    if _fused_bwd_fits(lq, head_dim):
        return "fused_queries"
    return "fused_keys" if _fused_bwd_fits(lk, head_dim) else "split"


def _cross_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, scale: float,
    out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward kernel: returns out (B, H, Lq, Dh) in q's dtype and the base-2 row LSE (B, H, Lq) fp32.

    `out` / `lse` may be given (tests pass NaN-filled buffers to prove every element is written)."""
    block_d = _check_launch(q, k, v, key_mask)
    B, H, Lq, Dh = q.shape
    Lk = k.shape[2]
    out = torch.empty_like(q) if out is None else out  # (B, H, Lq, Dh)
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32) if lse is None else lse
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (B, H, Lq) and lse.dtype == torch.float32 and lse.is_contiguous()
    kern = _triton_kernels()
    mask_arg = key_mask.view(torch.uint8) if key_mask is not None else q  # unread when HAS_MASK is False
    kern.fwd[lambda meta: fwd_grid(B, H, Lq, meta["BLOCK_M"])](
        q, k, v, mask_arg, out, lse, scale * _LOG2E, H, Lq, Lk,
        HEAD_DIM=Dh, BLOCK_D=block_d, HAS_MASK=key_mask is not None, DOT_FP32=_dot_fp32(q),
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out, lse


def _cross_attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    key_mask: torch.Tensor | None, scale: float,
    dq: torch.Tensor | None = None, dk: torch.Tensor | None = None, dv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward (FlashAttention-2): for short queries (or short keys) one fused kernel per (batch, head);
    otherwise the delta pre-pass, then dK/dV per key block and dQ per query block."""
    block_d = _check_launch(q, k, v, key_mask)
    B, H, Lq, Dh = q.shape
    Lk = k.shape[2]
    assert do.shape == q.shape and do.dtype == q.dtype and do.is_contiguous(), "dO must match q, contiguous"
    assert out.shape == q.shape and lse.shape == (B, H, Lq) and lse.dtype == torch.float32
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    for g, ref in ((dq, q), (dk, k), (dv, v)):
        assert g.shape == ref.shape and g.dtype == ref.dtype and g.is_contiguous()
    kern = _triton_kernels()
    common = dict(
        HEAD_DIM=Dh, BLOCK_D=block_d, HAS_MASK=key_mask is not None, DOT_FP32=_dot_fp32(q),
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    mask_arg = key_mask.view(torch.uint8) if key_mask is not None else q
    path = _bwd_path(Lq, Lk, Dh)
    if path == "fused_queries":  # every query row fits one program: single fused kernel
        kern.fused_bwd[fused_bwd_grid(B, H)](
            q, k, v, mask_arg, out, do, lse, dq, dk, dv, scale, scale * _LOG2E, H, Lq, Lk,
            BLOCK_M=_pow2_at_least_16(Lq), **common,
        )
        return dq, dk, dv
    if path == "fused_keys":  # every key fits one program: single fused kernel over the query blocks
        kern.fused_keys_bwd[fused_bwd_grid(B, H)](
            q, k, v, mask_arg, out, do, lse, dq, dk, dv, scale, scale * _LOG2E, H, Lq, Lk,
            BLOCK_N=_pow2_at_least_16(Lk), **common,
        )
        return dq, dk, dv
    delta = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)  # (B, H, Lq)
    kern.preprocess[fwd_grid(B, H, Lq, _PREPROCESS_BLOCK_M)](
        out, do, delta, Lq, HEAD_DIM=Dh, BLOCK_D=block_d, BLOCK_M=_PREPROCESS_BLOCK_M,
    )
    kern.dkdv[lambda meta: dkdv_grid(B, H, Lk, meta["BLOCK_N"])](
        q, k, v, mask_arg, do, lse, delta, dk, dv, scale, scale * _LOG2E, H, Lq, Lk, **common,
    )
    kern.dq[lambda meta: fwd_grid(B, H, Lq, meta["BLOCK_M"])](
        q, k, v, mask_arg, do, lse, delta, dq, scale, scale * _LOG2E, H, Lq, Lk, **common,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------


class _CrossAttentionTriton(torch.autograd.Function):
    """Saves q, k, v, out and the fp32 row LSE (B, H, Lq); never the Lq x Lk probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        key_mask = key_mask.contiguous() if key_mask is not None else None
        out, lse = _cross_attention_fwd(q, k, v, key_mask, scale)
        ctx.save_for_backward(q, k, v, out, lse, key_mask)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, out, lse, key_mask = ctx.saved_tensors
        dq, dk, dv = _cross_attention_bwd(do.contiguous(), q, k, v, out, lse, key_mask, ctx.scale)
        return dq, dk, dv, None, None


# ----------------------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------------------


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        shapes = (tuple(q.shape), tuple(k.shape), tuple(v.shape))
        raise ValueError(f"q, k, v must be (B, H, L, Dh); got {shapes}")
    B, H, _, Dh = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != H or k.shape[3] != Dh:
        raise ValueError(f"k, v must be (B={B}, H={H}, Lk, Dh={Dh}); got {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_mask is not None:
        if key_mask.dtype != torch.bool or key_mask.shape != (B, k.shape[2]):
            raise ValueError(
                f"key_mask must be bool (B, Lk) = ({B}, {k.shape[2]}); "
                f"got {key_mask.dtype} {tuple(key_mask.shape)}"
            )


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Masked multi-head attention of q over (k, v); returns (B, H, Lq, Dh) in q's dtype.

    q (B, H, Lq, Dh); k, v (B, H, Lk, Dh); key_mask bool (B, Lk), True = attend; scale defaults to 1/sqrt(Dh).
    Differentiable in q, k, v. Rows with no valid key return zeros and pass zero gradient.
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}; got {impl!r}")
    _check_inputs(q, k, v, key_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if impl == "auto":
        kernel_ok = q.is_cuda and q.dtype in _KERNEL_DTYPES and q.shape[-1] <= 256
        impl = "triton" if kernel_ok and _triton_importable() else "torch"
    if impl == "reference":
        return cross_attention_reference(q, k, v, key_mask, scale)
    if impl == "torch":
        return _cross_attention_torch(q, k, v, key_mask, scale)
    return _CrossAttentionTriton.apply(q, k, v, key_mask, scale)
