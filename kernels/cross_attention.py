"""Masked cross-attention for the two R2D2 cross encoders (contract: DESIGN.md section 3).

    out = cross_attention(q, k, v, key_mask=None, scale=None, impl="auto")

q (B, H, Lq, Dh), k and v (B, H, Lk, Dh), Lq != Lk allowed; key_mask bool (B, Lk), True = attend. A query row
whose keys are all masked returns zeros and passes zero gradient (never NaN).

Any strides: the triton path reads q, k, v (and dO) in place, so heads split from a (B, L, H*Dh) projection as
`x.view(B, L, H, Dh).transpose(1, 2)` cost no copy, and writes out / dq / dk / dv in their inputs' layouts (out
in q's), so merging the heads back is a view too. R2D2DS_CROSS_ATTENTION_LAYOUT=contiguous selects the previous
path (copies to contiguous (B, H, L, Dh) first) until a GPU has timed both.

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
# Layout: every (B, H, L, Dh) operand (q, k, v, o, dO, dq, dk, dv) arrives with its own four strides
# (batch, head, sequence, head dim), so the cross encoder's projections viewed as (B, L, H, Dh) are read in
# place and o / dq / dk / dv are written in their input's layout (no permute copies); the key mask (B, Lk)
# has two. lse and delta are ours: fp32, contiguous (B*H, Lq). Element offsets are int64 (_offsets): one
# ITM batch of 3 x 4k pairs x 257 tokens x 768 wide already passes 2^31 elements. A head-dim stride of 1 is
# specialised to a constant by Triton (integer arguments equal to 1 are), so the common layouts load whole
# Dh rows as vectors; a sequence stride divisible by 16 is specialised too (aligned rows).
# Dh is padded to BLOCK_D = next power of two >= 16 by masked loads (zeros do not change a dot product).
# Scores live in base 2: s2 = (q . k) * scale * log2(e), so softmax uses exp2, and LSE2 = m2 + log2(l) per
# row; a row with no valid key stores LSE2 = +inf so exp2(s2 - LSE2) = 0 later.
# DOT_FP32 (interpreter, bf16 only) upcasts tiles before tl.dot: the interpreter multiplies bf16 bits wrongly.
# INPUT_PRECISION is "ieee" for fp32 inputs so the kernel matches fp32 PyTorch instead of rounding to tf32.
# Stride arguments are named stride_<tensor><axis>: axes b, h, l, d; tensors q, k, v, o (out), do, dq, dk,
# dv, and m (key mask: b, l).


@functools.cache
def _triton_kernels() -> SimpleNamespace:
    """Defines the kernels on first use, so importing this module never imports triton (the torch path works
    without it) and TRITON_INTERPRET is read when the triton impl is first called."""
    global triton, tl, _offsets, _rows, _store_rows, _key_tile, _query_block
    import triton
    import triton.language as tl

    # Helpers shared by the kernels (Triton inlines them). Module globals, as the kernels look names up there.
    @triton.jit
    def _offsets(b, h, rows, cols, stride_b, stride_h, stride_l, stride_d):
        # Element offsets (len(rows), len(cols)) of a tile of batch b, head h: int64 throughout, since b *
        # stride_b alone passes 2^31 in a large batch and a view's strides may be large (every product is
        # taken after the cast: an int32 product would wrap before an int64 sum could help).
        base = b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
        return base + rows.to(tl.int64)[:, None] * stride_l + cols.to(tl.int64)[None, :] * stride_d

    @triton.jit
    def _rows(Ptr, b, h, offs, offs_in, offs_d, stride_b, stride_h, stride_l, stride_d,
              HEAD_DIM: tl.constexpr, DOT_FP32: tl.constexpr):
        # Rows offs (valid where offs_in) of one (batch, head) of a (B, H, L, Dh) operand: (len, BLOCK_D), zero
        # past L and HEAD_DIM.
        io = offs_in[:, None] & (offs_d < HEAD_DIM)[None, :]
        x = tl.load(Ptr + _offsets(b, h, offs, offs_d, stride_b, stride_h, stride_l, stride_d), mask=io, other=0.0)
        if DOT_FP32:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _store_rows(Ptr, x, b, h, offs, offs_in, offs_d, stride_b, stride_h, stride_l, stride_d,
                    HEAD_DIM: tl.constexpr):
        # Stores x (len, BLOCK_D), cast to Ptr's dtype, into rows offs (where offs_in) of one (batch, head).
        io = offs_in[:, None] & (offs_d < HEAD_DIM)[None, :]
        off = _offsets(b, h, offs, offs_d, stride_b, stride_h, stride_l, stride_d)
        tl.store(Ptr + off, x.to(Ptr.dtype.element_ty), mask=io)

    @triton.jit
    def _key_tile(K, V, KeyMask, b, h, offs_n, offs_d, Lk,
                  stride_kb, stride_kh, stride_kl, stride_kd, stride_vb, stride_vh, stride_vl, stride_vd,
                  stride_mb, stride_ml, HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, DOT_FP32: tl.constexpr):
        # Keys offs_n of one (batch, head): k, v (BLOCK_N, BLOCK_D), zero past Lk and HEAD_DIM; key_ok = in
        # range and attended.
        key_in = offs_n < Lk
        key_ok = key_in
        if HAS_MASK:
            m_off = b.to(tl.int64) * stride_mb + offs_n.to(tl.int64) * stride_ml
            key_ok = key_ok & (tl.load(KeyMask + m_off, mask=key_in, other=0) != 0)
        k = _rows(K, b, h, offs_n, key_in, offs_d, stride_kb, stride_kh, stride_kl, stride_kd, HEAD_DIM, DOT_FP32)
        v = _rows(V, b, h, offs_n, key_in, offs_d, stride_vb, stride_vh, stride_vl, stride_vd, HEAD_DIM, DOT_FP32)
        return k, v, key_ok

    @triton.jit
    def _query_block(Q, DOut, Out, Lse, Delta, b, h, row_base, offs_m, row_in, offs_d,
                     stride_qb, stride_qh, stride_ql, stride_qd, stride_ob, stride_oh, stride_ol, stride_od,
                     stride_dob, stride_doh, stride_dol, stride_dod,
                     HEAD_DIM: tl.constexpr, DOT_FP32: tl.constexpr, FUSED: tl.constexpr):
        # A backward query block: q, dO (BLOCK_M, BLOCK_D), the LSE (+inf past Lq, so P = 0 there) and delta =
        # rowsum(dO O) fp32, from O when FUSED (no pre-pass ran) or else the pre-pass's.
        q = _rows(Q, b, h, offs_m, row_in, offs_d, stride_qb, stride_qh, stride_ql, stride_qd, HEAD_DIM, DOT_FP32)
        do = _rows(DOut, b, h, offs_m, row_in, offs_d, stride_dob, stride_doh, stride_dol, stride_dod, HEAD_DIM,
                   DOT_FP32)
        lse = tl.load(Lse + row_base + offs_m, mask=row_in, other=float("inf"))  # (BLOCK_M,)
        if FUSED:
            o = _rows(Out, b, h, offs_m, row_in, offs_d, stride_ob, stride_oh, stride_ol, stride_od, HEAD_DIM, True)
            delta = tl.sum(o * do.to(tl.float32), 1)  # (BLOCK_M,)
        else:
            delta = tl.load(Delta + row_base + offs_m, mask=row_in, other=0.0)
        return q, do, lse, delta

    @triton.autotune(
        configs=_configs(_FWD_TILES), key=["Lq", "Lk", "BLOCK_D", "HAS_MASK"],
        prune_configs_by={"early_config_prune": _pruner(lambda m, n, st: m + 2 * n * st)},
    )
    @triton.jit(do_not_specialize=["Lq", "Lk"])  # lengths vary per batch: no recompiles
    def _cross_attention_fwd_kernel(
        Q, K, V, KeyMask, Out, Lse, qk_scale, H, Lq, Lk,
        stride_qb, stride_qh, stride_ql, stride_qd, stride_kb, stride_kh, stride_kl, stride_kd,
        stride_vb, stride_vh, stride_vl, stride_vd, stride_mb, stride_ml,
        stride_ob, stride_oh, stride_ol, stride_od,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, DOT_FP32: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)  # B*H on axis 0 (CUDA caps axes 1 and 2 at 65,535; axis 0 at 2^31 - 1)
        pid_m = tl.program_id(1)
        b, h = pid_bh // H, pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_in = offs_m < Lq
        q = _rows(Q, b, h, offs_m, row_in, offs_d, stride_qb, stride_qh, stride_ql, stride_qd, HEAD_DIM, DOT_FP32)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of s2
        l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s2 - m_i)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running sum of exp2(s2 - m_i) v
        for start_n in range(0, Lk, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k, v, key_ok = _key_tile(K, V, KeyMask, b, h, offs_n, offs_d, Lk,
                                     stride_kb, stride_kh, stride_kl, stride_kd, stride_vb, stride_vh, stride_vl,
                                     stride_vd, stride_mb, stride_ml, HEAD_DIM, HAS_MASK, DOT_FP32)
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
        tl.store(Lse + pid_bh.to(tl.int64) * Lq + offs_m, lse, mask=row_in)
        _store_rows(Out, out, b, h, offs_m, row_in, offs_d, stride_ob, stride_oh, stride_ol, stride_od, HEAD_DIM)

    @triton.jit(do_not_specialize=["Lq"])
    def _cross_attention_bwd_preprocess(
        Out, DOut, Delta, H, Lq,
        stride_ob, stride_oh, stride_ol, stride_od, stride_dob, stride_doh, stride_dol, stride_dod,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        # delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij, the softmax-backward term shared by dq and dk.
        pid_bh = tl.program_id(0)  # B*H on axis 0 (CUDA caps axes 1 and 2 at 65,535; axis 0 at 2^31 - 1)
        pid_m = tl.program_id(1)
        b, h = pid_bh // H, pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_in = offs_m < Lq
        o = _rows(Out, b, h, offs_m, row_in, offs_d, stride_ob, stride_oh, stride_ol, stride_od, HEAD_DIM, True)
        do = _rows(DOut, b, h, offs_m, row_in, offs_d, stride_dob, stride_doh, stride_dol, stride_dod, HEAD_DIM,
                   True)
        tl.store(Delta + pid_bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=row_in)

    # The backward is two kernels, each in two modes (FUSED, a constexpr):
    #   _bwd_keys: one program per key block, looping over the query blocks: dK / dV of its keys. FUSED (all
    #     keys in one block, Lk <= 128: R2D2's image queries over 64 text tokens) also computes delta per query
    #     block from O and stores each query block's dQ at once (complete: every key is here).
    #   _bwd_queries: one program per query block, looping over the key blocks: dQ of its rows. FUSED (all
    #     queries in one block: R2D2's 64 text tokens) also computes delta from O and stores each key block's
    #     dK / dV at once (complete: every query is here).
    # Unfused, the pair runs after the delta pre-pass (7 products per tile: logits and dP in both); fused, one
    # kernel does 5 products per tile in one launch. Neither needs atomics.
    @triton.jit(do_not_specialize=["Lq", "Lk"])
    def _cross_attention_bwd_keys_kernel(
        Q, K, V, KeyMask, Out, DOut, Lse, Delta, DQ, DK, DV, sm_scale, qk_scale, H, Lq, Lk,
        stride_qb, stride_qh, stride_ql, stride_qd, stride_kb, stride_kh, stride_kl, stride_kd,
        stride_vb, stride_vh, stride_vl, stride_vd, stride_mb, stride_ml,
        stride_ob, stride_oh, stride_ol, stride_od, stride_dob, stride_doh, stride_dol, stride_dod,
        stride_dqb, stride_dqh, stride_dql, stride_dqd, stride_dkb, stride_dkh, stride_dkl, stride_dkd,
        stride_dvb, stride_dvh, stride_dvl, stride_dvd,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, DOT_FP32: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, FUSED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # dV_j = sum_i P_ij dO_i, dK_j = scale * sum_i dS_ij q_i, with P recomputed from the saved LSE and
        # dS = P * (dP - delta); transposed (keys x queries) tiles, so dK and dV need no transpose.
        pid_bh = tl.program_id(0)
        pid_n = tl.program_id(1)  # 0 when FUSED (one key block)
        b, h = pid_bh // H, pid_bh % H
        row_base = pid_bh.to(tl.int64) * Lq  # LSE / delta entries of this (batch, head)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        k, v, key_ok = _key_tile(K, V, KeyMask, b, h, offs_n, offs_d, Lk,
                                 stride_kb, stride_kh, stride_kl, stride_kd, stride_vb, stride_vh, stride_vl,
                                 stride_vd, stride_mb, stride_ml, HEAD_DIM, HAS_MASK, DOT_FP32)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start_m in range(0, Lq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_in = offs_m < Lq
            q, do, lse, delta = _query_block(
                Q, DOut, Out, Lse, Delta, b, h, row_base, offs_m, row_in, offs_d,
                stride_qb, stride_qh, stride_ql, stride_qd, stride_ob, stride_oh, stride_ol, stride_od,
                stride_dob, stride_doh, stride_dol, stride_dod, HEAD_DIM, DOT_FP32, FUSED)
            s_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
            # Masked keys may score above LSE (exp2 -> inf): select 0 rather than multiply, so no NaN.
            p_t = tl.where(key_ok[:, None], tl.math.exp2(s_t - lse[None, :]), 0.0)
            dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_M)
            ds_t = p_t * (dp_t - delta[None, :])
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
            if FUSED:
                dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_D)
                _store_rows(DQ, dq * sm_scale, b, h, offs_m, row_in, offs_d,
                            stride_dqb, stride_dqh, stride_dql, stride_dqd, HEAD_DIM)

        # Masked and padded keys never entered a softmax: p_t = 0 gives them exact zero gradients.
        key_in = offs_n < Lk
        _store_rows(DK, dk * sm_scale, b, h, offs_n, key_in, offs_d, stride_dkb, stride_dkh, stride_dkl, stride_dkd,
                    HEAD_DIM)
        _store_rows(DV, dv, b, h, offs_n, key_in, offs_d, stride_dvb, stride_dvh, stride_dvl, stride_dvd, HEAD_DIM)

    @triton.jit(do_not_specialize=["Lq", "Lk"])
    def _cross_attention_bwd_queries_kernel(
        Q, K, V, KeyMask, Out, DOut, Lse, Delta, DQ, DK, DV, sm_scale, qk_scale, H, Lq, Lk,
        stride_qb, stride_qh, stride_ql, stride_qd, stride_kb, stride_kh, stride_kl, stride_kd,
        stride_vb, stride_vh, stride_vl, stride_vd, stride_mb, stride_ml,
        stride_ob, stride_oh, stride_ol, stride_od, stride_dob, stride_doh, stride_dol, stride_dod,
        stride_dqb, stride_dqh, stride_dql, stride_dqd, stride_dkb, stride_dkh, stride_dkl, stride_dkd,
        stride_dvb, stride_dvh, stride_dvl, stride_dvd,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, DOT_FP32: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, FUSED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # dQ_i = scale * sum_j dS_ij k_j; FUSED also dV_j = sum_i P_ij dO_i and dK_j = scale * sum_i dS_ij q_i.
        pid_bh = tl.program_id(0)  # B*H on axis 0 (CUDA caps axes 1 and 2 at 65,535; axis 0 at 2^31 - 1)
        pid_m = tl.program_id(1)  # 0 when FUSED (one query block)
        b, h = pid_bh // H, pid_bh % H
        row_base = pid_bh.to(tl.int64) * Lq
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_in = offs_m < Lq
        q, do, lse, delta = _query_block(
            Q, DOut, Out, Lse, Delta, b, h, row_base, offs_m, row_in, offs_d,
            stride_qb, stride_qh, stride_ql, stride_qd, stride_ob, stride_oh, stride_ol, stride_od,
            stride_dob, stride_doh, stride_dol, stride_dod, HEAD_DIM, DOT_FP32, FUSED)

        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, Lk, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k, v, key_ok = _key_tile(K, V, KeyMask, b, h, offs_n, offs_d, Lk,
                                     stride_kb, stride_kh, stride_kl, stride_kd, stride_vb, stride_vh, stride_vl,
                                     stride_vd, stride_mb, stride_ml, HEAD_DIM, HAS_MASK, DOT_FP32)
            s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
            p = tl.where(key_ok[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
            if FUSED:
                dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_D)
                dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=INPUT_PRECISION)
                key_in = offs_n < Lk
                _store_rows(DK, dk * sm_scale, b, h, offs_n, key_in, offs_d,
                            stride_dkb, stride_dkh, stride_dkl, stride_dkd, HEAD_DIM)
                _store_rows(DV, dv, b, h, offs_n, key_in, offs_d, stride_dvb, stride_dvh, stride_dvl, stride_dvd,
                            HEAD_DIM)

        _store_rows(DQ, dq * sm_scale, b, h, offs_m, row_in, offs_d, stride_dqb, stride_dqh, stride_dql, stride_dqd,
                    HEAD_DIM)

    # Each backward kernel is tuned twice: split (both tile sizes tuned) and fused (the block that covers every
    # query, or every key, is a launch argument; only the other is tuned). Same compiled code cache.
    def tuned(kernel, tiles, names, key, smem_tiles):
        prune = {"early_config_prune": _pruner(smem_tiles)}
        return triton.autotune(configs=_configs(tiles, names), key=key, prune_configs_by=prune)(kernel)

    split_key = ["Lq", "Lk", "BLOCK_D", "HAS_MASK"]
    return SimpleNamespace(
        fwd=_cross_attention_fwd_kernel, preprocess=_cross_attention_bwd_preprocess,
        dkdv=tuned(_cross_attention_bwd_keys_kernel, _DKDV_TILES, ("BLOCK_M", "BLOCK_N"), split_key,
                   lambda m, n, st: 2 * n + 2 * m * st),
        dq=tuned(_cross_attention_bwd_queries_kernel, _DQ_TILES, ("BLOCK_M", "BLOCK_N"), split_key,
                 lambda m, n, st: 2 * m + 2 * n * st),
        fused_bwd=tuned(_cross_attention_bwd_queries_kernel, _FUSED_BWD_TILES, ("BLOCK_N",),
                        ["Lq", "Lk", "BLOCK_D", "BLOCK_M", "HAS_MASK"], lambda m, n, st: 4 * m + 2 * n * st),
        fused_keys_bwd=tuned(_cross_attention_bwd_keys_kernel, _FUSED_KEYS_BWD_TILES, ("BLOCK_M",),
                             ["Lq", "Lk", "BLOCK_D", "BLOCK_N", "HAS_MASK"], lambda m, n, st: 4 * n + 2 * m * st),
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
MAX_HEADS_X_BATCH = 2**31 - 1  # grid axis 0


def _check_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> int:
    """Asserts the kernels' preconditions; returns BLOCK_D. Any strides are taken (see _strides)."""
    _check_inputs(q, k, v, key_mask)
    assert q.dtype in _KERNEL_DTYPES, f"triton cross_attention takes fp32 / bf16 / fp16, got {q.dtype}"
    assert q.device == k.device == v.device, f"q, k, v on different devices: {q.device} {k.device} {v.device}"
    if key_mask is not None:
        assert key_mask.device == q.device, f"key_mask on {key_mask.device}, q on {q.device}"
    assert q.is_cuda or _interpreting(), (
        "impl='triton' on CPU needs the Triton interpreter: set TRITON_INTERPRET=1 before triton is imported"
    )
    longest = max(q.shape[2], k.shape[2])
    assert longest <= MAX_LENGTH, f"sequence length {longest} > {MAX_LENGTH}: query / key blocks on grid axis 1"
    batch_heads = q.shape[0] * q.shape[1]
    assert batch_heads <= MAX_HEADS_X_BATCH, f"B*H = {batch_heads} > {MAX_HEADS_X_BATCH}: (batch, head) on grid axis 0"
    head_dim = q.shape[-1]
    assert 1 <= head_dim <= 256, f"head dim {head_dim} unsupported by the triton kernel (1..256)"
    return _pow2_at_least_16(head_dim)


def _no_internal_overlap(t: torch.Tensor) -> bool:
    """True when no two elements of `t` share memory (dims sorted by stride, each stride past the span of the
    smaller ones): a buffer the kernels write must pass, or two programs would race on one address."""
    span = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n > 1):
        if stride < span:
            return False
        span += (size - 1) * stride
    return True


def _check_written(buf: torch.Tensor, like: torch.Tensor, name: str) -> None:
    assert buf.shape == like.shape and buf.dtype == like.dtype and buf.device == like.device, (
        f"{name}: {tuple(buf.shape)} {buf.dtype} on {buf.device}, expected {tuple(like.shape)} {like.dtype} on "
        f"{like.device}")
    assert _no_internal_overlap(buf), f"{name}: strides {buf.stride()} make elements overlap; the kernel writes it"


def _strides(*tensors: torch.Tensor | None) -> list[int]:
    """Every stride of each tensor, in the kernels' argument order ((B, H, L, Dh): b, h, l, d; the key mask
    (B, Lk): b, l; None, an absent mask: zeros). Element strides, as Triton's pointer arithmetic counts."""
    out: list[int] = []
    for t in tensors:
        out.extend((0, 0) if t is None else t.stride())
    return out


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

    q, k, v are read in place with their strides. `out` is allocated in q's layout (torch.empty_like keeps the
    order of q's strides): for heads split from a (B, Lq, H*Dh) projection it is that layout, so merging the
    heads for the output projection is a view. `out` / `lse` may be given (tests pass NaN-filled buffers, in
    any non-overlapping layout, to prove every element is written)."""
    block_d = _check_launch(q, k, v, key_mask)
    B, H, Lq, Dh = q.shape
    Lk = k.shape[2]
    out = torch.empty_like(q) if out is None else out  # (B, H, Lq, Dh), q's layout
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32) if lse is None else lse
    _check_written(out, q, "out")
    assert lse.shape == (B, H, Lq) and lse.dtype == torch.float32 and lse.is_contiguous()
    kern = _triton_kernels()
    mask_arg = key_mask.view(torch.uint8) if key_mask is not None else q  # unread when HAS_MASK is False
    kern.fwd[lambda meta: fwd_grid(B, H, Lq, meta["BLOCK_M"])](
        q, k, v, mask_arg, out, lse, scale * _LOG2E, H, Lq, Lk, *_strides(q, k, v, key_mask, out),
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
    otherwise the delta pre-pass, then dK/dV per key block and dQ per query block.

    Every operand is read with its strides (dO as autograd hands it over: for the cross encoder, a strided view
    of the output projection's input gradient); dq, dk, dv are allocated in q's, k's, v's layouts, so the
    gradients flow back into the (B, L, H*Dh) projections without a copy."""
    block_d = _check_launch(q, k, v, key_mask)
    B, H, Lq, Dh = q.shape
    Lk = k.shape[2]
    assert do.shape == q.shape and do.dtype == q.dtype and do.device == q.device, "dO must match q"
    assert out.shape == q.shape and lse.shape == (B, H, Lq) and lse.dtype == torch.float32 and lse.is_contiguous()
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    for g, ref, name in ((dq, q, "dq"), (dk, k, "dk"), (dv, v, "dv")):
        _check_written(g, ref, name)
    kern = _triton_kernels()
    mask_arg = key_mask.view(torch.uint8) if key_mask is not None else q
    path = _bwd_path(Lq, Lk, Dh)
    delta = lse  # read only by the split path, which allocates its own below
    if path == "split":
        delta = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)  # (B, H, Lq)
        kern.preprocess[fwd_grid(B, H, Lq, _PREPROCESS_BLOCK_M)](
            out, do, delta, H, Lq, *_strides(out, do), HEAD_DIM=Dh, BLOCK_D=block_d, BLOCK_M=_PREPROCESS_BLOCK_M,
        )
    args = (q, k, v, mask_arg, out, do, lse, delta, dq, dk, dv, scale, scale * _LOG2E, H, Lq, Lk,
            *_strides(q, k, v, key_mask, out, do, dq, dk, dv))
    common = dict(
        HEAD_DIM=Dh, BLOCK_D=block_d, HAS_MASK=key_mask is not None, DOT_FP32=_dot_fp32(q),
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    if path == "fused_queries":  # every query row fits one program: single fused kernel over the key blocks
        kern.fused_bwd[fused_bwd_grid(B, H)](*args, FUSED=True, BLOCK_M=_pow2_at_least_16(Lq), **common)
    elif path == "fused_keys":  # every key fits one program: single fused kernel over the query blocks
        kern.fused_keys_bwd[fused_bwd_grid(B, H)](*args, FUSED=True, BLOCK_N=_pow2_at_least_16(Lk), **common)
    else:
        kern.dkdv[lambda meta: dkdv_grid(B, H, Lk, meta["BLOCK_N"])](*args, FUSED=False, **common)
        kern.dq[lambda meta: fwd_grid(B, H, Lq, meta["BLOCK_M"])](*args, FUSED=False, **common)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------

LAYOUTS = ("strided", "contiguous")


def _layout() -> str:
    """R2D2DS_CROSS_ATTENTION_LAYOUT: "strided" (default: q, k, v, dO read in place, out and gradients written
    in their inputs' layouts) or "contiguous" (the previous path: q, k, v and dO copied to contiguous
    (B, H, L, Dh) first; kept selectable until a GPU has timed both, see benchmarks/bench_cross_attention.py)."""
    layout = os.environ.get("R2D2DS_CROSS_ATTENTION_LAYOUT", "strided")
    if layout not in LAYOUTS:
        raise ValueError(f"R2D2DS_CROSS_ATTENTION_LAYOUT must be one of {LAYOUTS}, got {layout!r}")
    return layout


class _CrossAttentionTriton(torch.autograd.Function):
    """Saves q, k, v (the caller's views: no copy), out and the fp32 row LSE (B, H, Lq); never the Lq x Lk
    probabilities. The layout is chosen at the forward, so a step's forward and backward agree."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, scale, layout):
        if layout == "contiguous":
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            key_mask = key_mask.contiguous() if key_mask is not None else None
        out, lse = _cross_attention_fwd(q, k, v, key_mask, scale)
        ctx.save_for_backward(q, k, v, out, lse, key_mask)
        ctx.scale, ctx.layout = scale, layout
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, out, lse, key_mask = ctx.saved_tensors
        if ctx.layout == "contiguous":
            do = do.contiguous()
        dq, dk, dv = _cross_attention_bwd(do, q, k, v, out, lse, key_mask, ctx.scale)
        return dq, dk, dv, None, None, None


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
    Any strides (the triton path reads them in place; its output has q's layout). Differentiable in q, k, v.
    Rows with no valid key return zeros and pass zero gradient.
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
    return _CrossAttentionTriton.apply(q, k, v, key_mask, scale, _layout())
