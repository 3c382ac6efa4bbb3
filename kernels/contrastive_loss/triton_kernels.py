"""impl="triton": the Triton kernels of the contrastive loss (forward LSE / targets / Gumbel-max negatives, and
the tiled backward) with their autotune configs. Defined on first use by define_kernels(), so importing the
package never imports Triton; the launchers (launchers.py) call them."""

from __future__ import annotations

import os

# ----------------------------------------------------------------------------------------------------------
# Triton: autotune configs
# ----------------------------------------------------------------------------------------------------------

triton = None  # bound by define_kernels() on first use (lazy import: TRITON_INTERPRET is read then)
tl = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# (BLOCK_M rows, BLOCK_N columns, BLOCK_D, num_warps, num_stages). The reduction dim D (256..1024) is walked
# in BLOCK_D chunks, so any D works; rows and columns are both "long" (the global batch), so square-ish tiles.
_TILES = [
    (128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 128, 32, 8, 4),
    (64, 64, 64, 4, 3), (128, 256, 32, 8, 3),
]
# The interpreter runs programs one by one in numpy: one config, no tuning (tuning there only wastes time).
_INTERPRET_TILE = (64, 64, 64, 4, 1)


def _tile_configs(tiles: list, interpret_tile: tuple, names: tuple[str, ...]) -> list:
    """The autotune list; R2D2DS_AUTOTUNE=0 keeps only the first tile (tests: one compile per variant)."""
    tiles = [interpret_tile] if _interpreting() else tiles
    if os.environ.get("R2D2DS_AUTOTUNE", "1") == "0":
        tiles = tiles[:1]
    return [triton.Config(dict(zip(names, t[:-2])), num_warps=t[-2], num_stages=t[-1]) for t in tiles]


def _configs() -> list:
    return _tile_configs(_TILES, _INTERPRET_TILE, ("BLOCK_M", "BLOCK_N", "BLOCK_D"))


# The autotune keys hold every size _prune reads (B, N, D): the kept list depends on them, so a key without one
# would let the first call's tile serve every later size.
_PRUNE_SIZES = ("B", "N", "D")


def _prune(configs: list, named_args: dict, **kwargs) -> list:
    """Drop tiles wider than the problem (B = 7 needs no 128-row tile) and chunks wider than D."""
    args = {**named_args, **kwargs}
    m_cap = max(16, triton.next_power_of_2(args["B"]))
    n_cap = max(16, triton.next_power_of_2(args["N"]))
    d_cap = max(16, triton.next_power_of_2(args["D"]))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= m_cap and c.kwargs["BLOCK_N"] <= n_cap
            and c.kwargs["BLOCK_D"] <= d_cap]
    volume = lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_D"]
    return kept or [min(configs, key=volume)]


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the panel backward's GEMMs: M is the long side (B or
# N rows), N the embedding width D, K the panel's reduction (N columns or R rows); the usual Hopper tiles.
_GEMM_TILES = [
    (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4),
]
_INTERPRET_GEMM_TILE = (64, 64, 64, 4, 1)


def _gemm_configs() -> list:
    return _tile_configs(_GEMM_TILES, _INTERPRET_GEMM_TILE, ("BLOCK_M", "BLOCK_N", "BLOCK_K"))


def _gemm_prune(configs: list, named_args: dict, **kwargs) -> list:
    """Drop tiles wider than the problem; the key (M, N, K) holds every size read here."""
    args = {**named_args, **kwargs}
    caps = {name: max(16, triton.next_power_of_2(args[size])) for name, size in
            (("BLOCK_M", "M"), ("BLOCK_N", "N"), ("BLOCK_K", "K"))}
    kept = [c for c in configs if all(c.kwargs[name] <= cap for name, cap in caps.items())]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------
# Layout: X (B, D) rows, Y (N, D) gathered columns, row-major with unit last stride (any dtype of fp32/bf16/
# fp16); XT / YT the teacher's, same shapes. IDS_R (B,) / IDS_C (N,) int64 ids, CNT_R / CNT_C fp32 positive
# counts, LSE_* / TLSE_* fp32 row LSEs (student / teacher). SCALE is a 0-dim fp32 tensor read in-kernel (no
# host sync). All accumulation is fp32: tl.dot accumulates fp32, LSE is online (running max m, sum l).
# DOT_FP32 (interpreter only) upcasts tiles before tl.dot: the interpreter multiplies bf16 bits wrongly.
# PREC is "ieee" for fp32 inputs (match fp32 PyTorch, not tf32) unless torch allows tf32 matmuls.


def define_kernels():
    global triton, tl, _dot_tile, _grad_tile, _row_stats, _col_stats, _add_tile_matmul, _fwd_row_init, _gumbel_tile
    global _fwd_kernel, _bwd_dx_kernel, _bwd_dy_kernel, _grad_panel_kernel, _panel_matmul_kernel
    global _fwd_split_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _dot_tile(X, Y, rows, cols, rmask, cmask, D, stride_x, stride_y,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT_FP32: tl.constexpr, PREC: tl.constexpr):
        # (BLOCK_M, BLOCK_N) fp32 <x_r, y_c>, D walked in BLOCK_D chunks (masked: zeros add nothing).
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            km = ks < D
            x = tl.load(X + rows[:, None] * stride_x + ks[None, :], mask=rmask[:, None] & km[None, :],
                        other=0.0)
            y = tl.load(Y + cols[:, None] * stride_y + ks[None, :], mask=cmask[:, None] & km[None, :],
                        other=0.0)
            if DOT_FP32:
                x = x.to(tl.float32)
                y = y.to(tl.float32)
            acc = tl.dot(x, tl.trans(y), acc, input_precision=PREC)
        return acc

    @triton.jit
    def _grad_tile(X, Y, XT, YT, rows, cols, rmask, cmask, ids_r, ids_c, cnt_r, cnt_c, lse_r, lse_c,
                   tlse_r, tlse_c, scale, w, alpha, D, stride_x, stride_y,
                   HAS_TEACHER: tl.constexpr, FUSE_T: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, PREC: tl.constexpr):
        # G / w = dLoss/ds / w for one (BLOCK_M, BLOCK_N) tile: p - q of the row direction, plus (FUSE_T, single
        # process, rows and columns are the same batch) the column direction's p^T - q^T on the same s.
        dot = _dot_tile(X, Y, rows, cols, rmask, cmask, D, stride_x, stride_y, BLOCK_M, BLOCK_N, BLOCK_D,
                        DOT_FP32, PREC)
        s = dot * scale
        pos = ids_r[:, None] == ids_c[None, :]
        g = tl.exp(s - lse_r[:, None]) - tl.where(pos, (1.0 - alpha) / cnt_r[:, None], 0.0)
        if FUSE_T:
            g += tl.exp(s - lse_c[None, :]) - tl.where(pos, (1.0 - alpha) / cnt_c[None, :], 0.0)
        if HAS_TEACHER:
            t = _dot_tile(XT, YT, rows, cols, rmask, cmask, D, stride_x, stride_y, BLOCK_M, BLOCK_N, BLOCK_D,
                          DOT_FP32, PREC) * scale
            g -= alpha * tl.exp(t - tlse_r[:, None])
            if FUSE_T:
                g -= alpha * tl.exp(t - tlse_c[None, :])
        # Unweighted: w and scale are applied to the fp32 products (_add_tile_matmul's factor), not here, so
        # the tile cast to fp16 holds p - q ~ 1/N rather than w * scale * (p - q) ~ 1/N^2 (fp16 underflow).
        g = tl.where(rmask[:, None] & cmask[None, :], g, 0.0)
        return g, dot

    @triton.jit
    def _row_stats(IDS_R, CNT_R, LSE_R, TLSE_R, rows, rmask, HAS_TEACHER: tl.constexpr):
        # The backward's per-row inputs: ids, positive counts, student LSE, teacher LSE (lse_r stands in for an
        # absent teacher: _grad_tile does not read it then).
        ids_r = tl.load(IDS_R + rows, mask=rmask, other=0)
        cnt_r = tl.load(CNT_R + rows, mask=rmask, other=1.0)
        lse_r = tl.load(LSE_R + rows, mask=rmask, other=0.0)
        tlse_r = lse_r
        if HAS_TEACHER:
            tlse_r = tl.load(TLSE_R + rows, mask=rmask, other=0.0)
        return ids_r, cnt_r, lse_r, tlse_r

    @triton.jit
    def _col_stats(IDS_C, CNT_C, LSE_C, TLSE_C, cols, cmask, HAS_TEACHER: tl.constexpr, FUSE_T: tl.constexpr):
        # The backward's per-column inputs; the column LSEs are only read under FUSE_T (cnt_c stands in
        # otherwise, unread by _grad_tile).
        ids_c = tl.load(IDS_C + cols, mask=cmask, other=0)
        cnt_c = tl.load(CNT_C + cols, mask=cmask, other=1.0)
        lse_c = cnt_c
        tlse_c = cnt_c
        if FUSE_T:
            lse_c = tl.load(LSE_C + cols, mask=cmask, other=0.0)
            if HAS_TEACHER:
                tlse_c = tl.load(TLSE_C + cols, mask=cmask, other=0.0)
        return ids_c, cnt_c, lse_c, tlse_c

    @triton.jit
    def _fwd_row_init(IDS_R, CNT_R, TLSE_R, rows, rmask, HAS_TEACHER: tl.constexpr, BLOCK_M: tl.constexpr):
        # A forward row block's running state (max m, sum l, target term, Gumbel best value and column) and
        # its per-row inputs (ids, positive counts, teacher LSE).
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        tgt = tl.zeros((BLOCK_M,), tl.float32)
        best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        best_idx = tl.full((BLOCK_M,), -1, tl.int64)
        ids_r = tl.load(IDS_R + rows, mask=rmask, other=0)
        cnt_r = tl.load(CNT_R + rows, mask=rmask, other=1.0)
        tlse_r = tl.zeros((BLOCK_M,), tl.float32)
        if HAS_TEACHER:
            tlse_r = tl.load(TLSE_R + rows, mask=rmask, other=0.0)
        return m_i, l_i, tgt, best, best_idx, ids_r, cnt_r, tlse_r

    @triton.jit
    def _gumbel_tile(s, pos, cmask, rows64, n0, N, seed, row_off, best, best_idx, BLOCK_N: tl.constexpr):
        # Gumbel-max over one tile's non-positive columns, merged into the running (best, best_idx).
        # Philox4x32 keyed by (seed, global row * ceil(N / 4) + column // 4): one call gives the uniforms of 4
        # adjacent columns (all four outputs used; BLOCK_N and n0 are multiples of 4), so an entry's draw depends
        # only on (seed, row, column), not on the tiling or the launch: the loss pass and the standalone sampler
        # (and both forward kernels) draw the same numbers.
        groups = n0 // 4 + tl.arange(0, BLOCK_N // 4)
        offs = (row_off + rows64)[:, None] * ((N + 3) // 4) + groups[None, :]
        u0, u1, u2, u3 = tl.rand4x(seed, offs)  # (BLOCK_M, BLOCK_N // 4) each
        # columns 4k + j take u_j[k]: interleave(interleave(u0, u2), interleave(u1, u3))
        u = tl.maximum(tl.interleave(tl.interleave(u0, u2), tl.interleave(u1, u3)), 1e-20)
        z = tl.where(cmask[None, :] & (pos == 0), s - tl.log(-tl.log(u)), float("-inf"))
        tile_best = tl.max(z, 1)
        tile_arg = tl.argmax(z, 1).to(tl.int64) + n0
        better = tile_best > best
        return tl.where(better, tile_best, best), tl.where(better, tile_arg, best_idx)

    @triton.jit
    def _add_tile_matmul(G, factor, Src, src_idx, src_mask, stride_src, Dst, dst_idx, dst_mask, D, accumulate,
                         BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, PREC: tl.constexpr,
                         G_PRESCALE: tl.constexpr):
        # Dst[dst_idx] = factor * G @ Src[src_idx] (+ Dst[dst_idx] when accumulate), D walked in BLOCK_D chunks:
        # G (I, J) fp32 with |G| <= 2, Src rows (J, D) of the input dtype, Dst fp32 rows of length D (row stride
        # D). G is cast to the input dtype for the tensor cores; for fp16 it is first multiplied by G_PRESCALE (a
        # power of two, exact) so entries ~1/N stay normal fp16 numbers, and factor / G_PRESCALE is applied to
        # the fp32 product.
        if DOT_FP32:
            gq = G.to(tl.float32)
        else:
            gq = (G * G_PRESCALE).to(Src.dtype.element_ty)
        post = factor / G_PRESCALE
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            km = ks < D
            src = tl.load(Src + src_idx[:, None] * stride_src + ks[None, :],
                          mask=src_mask[:, None] & km[None, :], other=0.0)
            if DOT_FP32:
                src = src.to(tl.float32)
            contrib = tl.dot(gq, src, input_precision=PREC) * post  # (I, BLOCK_D) fp32
            ptrs = Dst + dst_idx[:, None] * D + ks[None, :]
            dmask = dst_mask[:, None] & km[None, :]
            if accumulate:
                contrib += tl.load(ptrs, mask=dmask, other=0.0)
            tl.store(ptrs, contrib, mask=dmask)

    @triton.autotune(configs=_configs(), key=["B", "N", "D", "HAS_TEACHER", "COMPUTE_TGT", "SAMPLE"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _fwd_kernel(X, Y, XT, YT, IDS_R, IDS_C, CNT_R, TLSE_R, SCALE, LSE, TGT, NEG,
                    B, N, D, stride_x, stride_y, alpha, seed, row_off,
                    HAS_TEACHER: tl.constexpr, COMPUTE_TGT: tl.constexpr, SAMPLE: tl.constexpr,
                    DOT_FP32: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program per BLOCK_M rows, walking all N columns: online LSE, target term sum_j q_ij s_ij and the
        # Gumbel-max negative, never more than one (BLOCK_M, BLOCK_N) tile of s alive.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < B
        rows64 = rows.to(tl.int64)
        scale = tl.load(SCALE)
        m_i, l_i, tgt, best, best_idx, ids_r, cnt_r, tlse_r = _fwd_row_init(IDS_R, CNT_R, TLSE_R, rows, rmask,
                                                                            HAS_TEACHER, BLOCK_M)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < N
            cols64 = cols.to(tl.int64)
            s = _dot_tile(X, Y, rows64, cols64, rmask, cmask, D, stride_x, stride_y, BLOCK_M, BLOCK_N,
                          BLOCK_D, DOT_FP32, PREC) * scale
            # (BLOCK_M, BLOCK_N); padded columns -inf for the LSE (every tile has at least one real column)
            s_lse = tl.where(cmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s_lse, 1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s_lse - m_new[:, None]), 1)
            m_i = m_new
            if COMPUTE_TGT or SAMPLE:
                ids_c = tl.load(IDS_C + cols, mask=cmask, other=0)
                pos = (ids_r[:, None] == ids_c[None, :]) & cmask[None, :]
                if COMPUTE_TGT:
                    q = tl.where(pos, (1.0 - alpha) / cnt_r[:, None], 0.0)
                    if HAS_TEACHER:
                        t = _dot_tile(XT, YT, rows64, cols64, rmask, cmask, D, stride_x, stride_y, BLOCK_M,
                                      BLOCK_N, BLOCK_D, DOT_FP32, PREC) * scale
                        q += alpha * tl.exp(t - tlse_r[:, None])
                    tgt += tl.sum(tl.where(cmask[None, :], q * s, 0.0), 1)
                if SAMPLE:
                    best, best_idx = _gumbel_tile(s, pos, cmask, rows64, n0, N, seed, row_off, best, best_idx,
                                                  BLOCK_N)
        tl.store(LSE + rows, m_i + tl.log(l_i), mask=rmask)
        if COMPUTE_TGT:
            tl.store(TGT + rows, tgt, mask=rmask)
        if SAMPLE:
            tl.store(NEG + rows, best_idx, mask=rmask)

    @triton.autotune(configs=_configs(), key=["B", "N", "D", "HAS_TEACHER", "FUSE_T"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _bwd_dx_kernel(X, Y, XT, YT, IDS_R, IDS_C, CNT_R, CNT_C, LSE_R, LSE_C, TLSE_R, TLSE_C, SCALE, DX, DS,
                       B, N, D, stride_x, stride_y, W, alpha,
                       HAS_TEACHER: tl.constexpr, FUSE_T: tl.constexpr, DOT_FP32: tl.constexpr,
                       PREC: tl.constexpr, G_PRESCALE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program per BLOCK_M rows: dx = scale * G y accumulated in DX (fp32, this program's rows only, so
        # no atomics; the first column tile stores, later ones add, so reruns by the autotuner are harmless),
        # and this program's part of dscale = sum G * <x, y> into DS[pid].
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < B
        rows64 = rows.to(tl.int64)
        scale = tl.load(SCALE)
        w = tl.load(W)  # the row weight (grad_out * W_ranks / 2N), read in-kernel: no host sync
        ids_r, cnt_r, lse_r, tlse_r = _row_stats(IDS_R, CNT_R, LSE_R, TLSE_R, rows, rmask, HAS_TEACHER)
        ds = tl.zeros((BLOCK_M,), tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < N
            cols64 = cols.to(tl.int64)
            ids_c, cnt_c, lse_c, tlse_c = _col_stats(IDS_C, CNT_C, LSE_C, TLSE_C, cols, cmask, HAS_TEACHER, FUSE_T)
            g, dot = _grad_tile(X, Y, XT, YT, rows64, cols64, rmask, cmask, ids_r, ids_c, cnt_r, cnt_c, lse_r,
                                lse_c, tlse_r, tlse_c, scale, w, alpha, D, stride_x, stride_y, HAS_TEACHER,
                                FUSE_T, BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, PREC)
            ds += tl.sum(g * dot, 1)
            # dLoss/d<x, y> = w * scale * g: the factor goes on the fp32 product
            _add_tile_matmul(g, w * scale, Y, cols64, cmask, stride_y, DX, rows64, rmask, D, n0 > 0, BLOCK_D,
                             DOT_FP32, PREC, G_PRESCALE)
        tl.store(DS + pid, tl.sum(ds, 0) * w)

    @triton.autotune(configs=_configs(), key=["B", "N", "D", "HAS_TEACHER", "FUSE_T"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _bwd_dy_kernel(X, Y, XT, YT, IDS_R, IDS_C, CNT_R, CNT_C, LSE_R, LSE_C, TLSE_R, TLSE_C, SCALE, DY,
                       B, N, D, stride_x, stride_y, W, alpha,
                       HAS_TEACHER: tl.constexpr, FUSE_T: tl.constexpr, DOT_FP32: tl.constexpr,
                       PREC: tl.constexpr, G_PRESCALE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program per BLOCK_N columns, walking all B rows: dy = scale * G^T x into DY (fp32, own columns).
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        cols64 = cols.to(tl.int64)
        scale = tl.load(SCALE)
        w = tl.load(W)
        ids_c, cnt_c, lse_c, tlse_c = _col_stats(IDS_C, CNT_C, LSE_C, TLSE_C, cols, cmask, HAS_TEACHER, FUSE_T)
        for m0 in range(0, B, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            rmask = rows < B
            rows64 = rows.to(tl.int64)
            ids_r, cnt_r, lse_r, tlse_r = _row_stats(IDS_R, CNT_R, LSE_R, TLSE_R, rows, rmask, HAS_TEACHER)
            g, dot = _grad_tile(X, Y, XT, YT, rows64, cols64, rmask, cmask, ids_r, ids_c, cnt_r, cnt_c, lse_r,
                                lse_c, tlse_r, tlse_c, scale, w, alpha, D, stride_x, stride_y, HAS_TEACHER,
                                FUSE_T, BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, PREC)
            _add_tile_matmul(tl.trans(g), w * scale, X, rows64, rmask, stride_x, DY, cols64, cmask, D, m0 > 0,
                             BLOCK_D, DOT_FP32, PREC, G_PRESCALE)

    # --- "panel" backward (the default; R2D2DS_CONTRASTIVE_BWD=tiles selects the two kernels above) ----------
    # Per panel of R rows: _grad_panel_kernel recomputes each (BLOCK_M, BLOCK_N) logit tile ONCE and writes the
    # gradient tile G (p - q, unweighted) to an (R, N) buffer in the input dtype; then two GEMMs with fp32
    # accumulation, dX[panel] = c G Y and dY (+)= c G^T X[panel] (c = w * scale), read it. No fp32 read-modify-
    # write per tile: dX is written once, dY once per panel. Every program is independent (one per tile of the
    # panel), so the grid fills the GPU even when B_local / BLOCK_M is below the SM count.

    @triton.autotune(configs=_configs(), key=["B", "N", "D", "HAS_TEACHER", "FUSE_T"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _grad_panel_kernel(X, Y, XT, YT, IDS_R, IDS_C, CNT_R, CNT_C, LSE_R, LSE_C, TLSE_R, TLSE_C, SCALE, G, DS,
                           row0, B, N, D, stride_x, stride_y, alpha,
                           HAS_TEACHER: tl.constexpr, FUSE_T: tl.constexpr, DOT_FP32: tl.constexpr,
                           PREC: tl.constexpr, G_PRESCALE: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # Program (column tile, row tile) of the panel of B rows starting at global row row0: G (B, N) row-major
        # in G's dtype holds G_PRESCALE * (p - q) (fp16: 2^14, so entries ~1/N stay normal), DS[program] the
        # tile's sum of (p - q) <x, y> (dscale's part before the weight w).
        # 1-D grid, row tile fastest: consecutive programs share a column tile (Y read from HBM once per panel;
        # the panel's X rows, R x D, stay in L2).
        num_m = tl.cdiv(B, BLOCK_M)
        pid_m = tl.program_id(0) % num_m
        pid_n = tl.program_id(0) // num_m
        local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = local < B
        rows64 = row0 + local.to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        cols64 = cols.to(tl.int64)
        scale = tl.load(SCALE)
        ids_r, cnt_r, lse_r, tlse_r = _row_stats(IDS_R, CNT_R, LSE_R, TLSE_R, rows64, rmask, HAS_TEACHER)
        ids_c, cnt_c, lse_c, tlse_c = _col_stats(IDS_C, CNT_C, LSE_C, TLSE_C, cols, cmask, HAS_TEACHER, FUSE_T)
        g, dot = _grad_tile(X, Y, XT, YT, rows64, cols64, rmask, cmask, ids_r, ids_c, cnt_r, cnt_c, lse_r,
                            lse_c, tlse_r, tlse_c, scale, 1.0, alpha, D, stride_x, stride_y, HAS_TEACHER,
                            FUSE_T, BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, PREC)
        tl.store(DS + tl.program_id(0), tl.sum(tl.sum(g * dot, 1), 0))
        g_ptrs = G + local.to(tl.int64)[:, None] * N + cols64[None, :]
        tl.store(g_ptrs, (g * G_PRESCALE).to(G.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])

    @triton.autotune(configs=_gemm_configs(), key=["M", "N", "K", "ACCUMULATE"],
                     prune_configs_by={"early_config_prune": _gemm_prune})
    @triton.jit
    def _panel_matmul_kernel(A, Bm, C, W, SCALE, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                             ACCUMULATE: tl.constexpr, DOT_FP32: tl.constexpr, PREC: tl.constexpr,
                             G_PRESCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
        # C (M, N) row-major (+)= (w * scale / G_PRESCALE) * A (M, K) @ Bm (K, N), fp32 accumulation, one store
        # in C's dtype. A is the G panel or its transpose (strides), Bm the rows it multiplies (unit last stride).
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm64 = rm.to(tl.int64)
        mmask = rm < M
        nmask = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            kmask = rk < K
            rk64 = rk.to(tl.int64)
            a = tl.load(A + rm64[:, None] * stride_am + rk64[None, :] * stride_ak,
                        mask=mmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(Bm + rk64[:, None] * stride_bk + rn[None, :] * stride_bn,
                        mask=kmask[:, None] & nmask[None, :], other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PREC)
        acc = acc * (tl.load(W) * tl.load(SCALE) / G_PRESCALE)
        c_ptrs = C + rm64[:, None] * N + rn[None, :]
        cmask = mmask[:, None] & nmask[None, :]
        if ACCUMULATE:
            acc += tl.load(c_ptrs, mask=cmask, other=0.0).to(tl.float32)
        tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=cmask)

    # --- "split" forward (the default; R2D2DS_CONTRASTIVE_FWD=rows selects _fwd_kernel above) ----------------
    @triton.autotune(configs=_configs(), key=["B", "N", "D", "HAS_TEACHER", "COMPUTE_TGT", "SAMPLE", "COL_STATS"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _fwd_split_kernel(X, Y, XT, YT, IDS_R, IDS_C, CNT_R, CNT_C, TLSE_R, TLSE_C, SCALE,
                          ROW_M, ROW_L, ROW_T, ROW_BEST, ROW_ARG, COL_M, COL_L, COL_T,
                          B, N, D, stride_x, stride_y, alpha, seed, row_off, CHUNKS, SPLITS,
                          HAS_TEACHER: tl.constexpr, COMPUTE_TGT: tl.constexpr, SAMPLE: tl.constexpr,
                          COL_STATS: tl.constexpr, DOT_FP32: tl.constexpr, PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # Program (chunk c, split sp) of a CHUNKS x SPLITS grid: row blocks c, c + CHUNKS, ... over column tiles
        # sp, sp + SPLITS, ... . Per row it keeps the online (max m, sum l) of exp(s), the target term and the
        # Gumbel-max (value, column) over its columns and stores them as split sp's partials (ROW_* (SPLITS, B));
        # COL_STATS (single process: the columns are the t2i rows) also merges the columns' (max, sum, target)
        # over its row blocks into COL_* (CHUNKS, N). The launcher merges the partials (logsumexp, sums, argmax),
        # so the grid has CHUNKS x SPLITS programs (~2 per SM) however small B / BLOCK_M is, and one pass over
        # the logits serves both directions.
        pid = tl.program_id(0)
        c = pid % CHUNKS
        sp = pid // CHUNKS
        scale = tl.load(SCALE)
        num_rb = tl.cdiv(B, BLOCK_M)
        num_ct = tl.cdiv(N, BLOCK_N)
        for rb in range(c, num_rb, CHUNKS):
            rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
            rmask = rows < B
            rows64 = rows.to(tl.int64)
            m_i, l_i, tgt, best, best_idx, ids_r, cnt_r, tlse_r = _fwd_row_init(IDS_R, CNT_R, TLSE_R, rows,
                                                                                rmask, HAS_TEACHER, BLOCK_M)
            for ct in range(sp, num_ct, SPLITS):
                n0 = ct * BLOCK_N
                cols = n0 + tl.arange(0, BLOCK_N)
                cmask = cols < N
                cols64 = cols.to(tl.int64)
                s = _dot_tile(X, Y, rows64, cols64, rmask, cmask, D, stride_x, stride_y, BLOCK_M, BLOCK_N,
                              BLOCK_D, DOT_FP32, PREC) * scale
                s_lse = tl.where(cmask[None, :], s, float("-inf"))  # every tile has a real column and row
                m_new = tl.maximum(m_i, tl.max(s_lse, 1))
                l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s_lse - m_new[:, None]), 1)
                m_i = m_new
                ids_c = tl.load(IDS_C + cols, mask=cmask, other=0)
                pos = (ids_r[:, None] == ids_c[None, :]) & cmask[None, :]
                t = s
                if HAS_TEACHER and COMPUTE_TGT:
                    t = _dot_tile(XT, YT, rows64, cols64, rmask, cmask, D, stride_x, stride_y, BLOCK_M,
                                  BLOCK_N, BLOCK_D, DOT_FP32, PREC) * scale
                if COMPUTE_TGT:
                    q = tl.where(pos, (1.0 - alpha) / cnt_r[:, None], 0.0)
                    if HAS_TEACHER:
                        q += alpha * tl.exp(t - tlse_r[:, None])
                    tgt += tl.sum(tl.where(cmask[None, :], q * s, 0.0), 1)
                if SAMPLE:
                    best, best_idx = _gumbel_tile(s, pos, cmask, rows64, n0, N, seed, row_off, best, best_idx,
                                                  BLOCK_N)
                if COL_STATS:
                    # this program is the only writer of COL_*[c, cols]; the barrier orders its store before
                    # its next load of the same columns (threads may own different elements of the two)
                    col_off = c * N + cols64
                    s_c = tl.where(rmask[:, None], s, float("-inf"))
                    cm_old = tl.load(COL_M + col_off, mask=cmask, other=0.0)
                    cl_old = tl.load(COL_L + col_off, mask=cmask, other=0.0)
                    cm_new = tl.maximum(cm_old, tl.max(s_c, 0))
                    cl_new = cl_old * tl.exp(cm_old - cm_new) + tl.sum(tl.exp(s_c - cm_new[None, :]), 0)
                    tl.store(COL_M + col_off, cm_new, mask=cmask)
                    tl.store(COL_L + col_off, cl_new, mask=cmask)
                    if COMPUTE_TGT:
                        cnt_c = tl.load(CNT_C + cols, mask=cmask, other=1.0)
                        qc = tl.where(pos, (1.0 - alpha) / cnt_c[None, :], 0.0)
                        if HAS_TEACHER:
                            tlse_c = tl.load(TLSE_C + cols, mask=cmask, other=0.0)
                            qc += alpha * tl.exp(t - tlse_c[None, :])
                        ct_old = tl.load(COL_T + col_off, mask=cmask, other=0.0)
                        tl.store(COL_T + col_off, ct_old + tl.sum(tl.where(rmask[:, None], qc * s, 0.0), 0),
                                 mask=cmask)
                    tl.debug_barrier()
            row_out = sp * B + rows64
            tl.store(ROW_M + row_out, m_i, mask=rmask)
            tl.store(ROW_L + row_out, l_i, mask=rmask)
            if COMPUTE_TGT:
                tl.store(ROW_T + row_out, tgt, mask=rmask)
            if SAMPLE:
                tl.store(ROW_BEST + row_out, best, mask=rmask)
                tl.store(ROW_ARG + row_out, best_idx, mask=rmask)
