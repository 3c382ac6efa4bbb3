"""Launchers of the Triton kernels (grids, argument checks, output buffers) and the backend object the autograd
Function calls (`_triton()`), mirroring blockwise_torch's `_TorchBackend`."""

from __future__ import annotations

import math
import os

import torch
from r2d2ds.kernels.contrastive_loss import triton_kernels as tk
from r2d2ds.kernels.contrastive_loss.triton_kernels import _interpreting


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------------------
# Launch grids (pure functions of the sizes: a CPU test checks them against CUDA's per-axis limits)
# ----------------------------------------------------------------------------------------------------------


def row_grid(b: int, block_m: int) -> tuple[int]:
    """Forward, sampler and dx kernels: one program per BLOCK_M rows, on axis 0 (CUDA: up to 2^31 - 1)."""
    return (-(-b // block_m),)


def col_grid(n: int, block_n: int) -> tuple[int]:
    """dy kernel: one program per BLOCK_N gathered columns, on axis 0."""
    return (-(-n // block_n),)


def panel_grid(n: int, r: int, block_n: int, block_m: int) -> tuple[int]:
    """Gradient-panel kernel: one program per (row tile, column tile) of the R x N panel, flattened on axis 0
    (panel_rows keeps R N <= 2^38, so within 2^31 - 1 programs at any tile of at least 16 x 16)."""
    return ((-(-n // block_n)) * (-(-r // block_m)),)


def gemm_grid(m: int, n: int, block_m: int, block_n: int) -> tuple[int, int]:
    """Panel GEMMs: output rows (B or N, long) on axis 0, the embedding width D on axis 1."""
    return (-(-m // block_m), -(-n // block_n))


# ----------------------------------------------------------------------------------------------------------
# Triton launchers
# ----------------------------------------------------------------------------------------------------------

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(x: torch.Tensor, y: torch.Tensor, xt, yt, ids_r, ids_c) -> None:
    assert x.dim() == 2 and y.dim() == 2 and x.shape[1] == y.shape[1], f"x {x.shape} vs y {y.shape}"
    assert x.dtype in _KERNEL_DTYPES and y.dtype == x.dtype, f"fp32/bf16/fp16, one dtype: {x.dtype}/{y.dtype}"
    assert x.is_contiguous() and y.is_contiguous(), "x and y must be contiguous"
    assert x.device == y.device == ids_r.device == ids_c.device, "all inputs on one device"
    assert x.is_cuda or _interpreting(), "triton on CPU needs TRITON_INTERPRET=1 before importing triton"
    assert ids_r.shape == (x.shape[0],) and ids_c.shape == (y.shape[0],) and ids_r.dtype == torch.long
    if xt is not None:
        assert xt.shape == x.shape and yt.shape == y.shape and xt.dtype == x.dtype and yt.dtype == y.dtype
        assert xt.is_contiguous() and yt.is_contiguous(), "teacher embeddings must be contiguous"


def _flags(x: torch.Tensor) -> dict:
    # fp32 on CUDA: IEEE products unless torch itself allows tf32 matmuls; bf16 / fp16: Triton's default
    # (the precision flag only changes fp32 operands); the interpreter computes exactly anyway.
    # DOT_FP32 only for bf16 in the interpreter (its tl.dot multiplies bf16 bit patterns as integers): fp16 and
    # fp32 tiles take the GPU's path there, so the interpreter sees what a GPU's casts do (fp16 underflow).
    interp = _interpreting()
    ieee = interp or (x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32)
    return {"DOT_FP32": interp and x.dtype == torch.bfloat16, "PREC": "ieee" if ieee else "tf32"}


# fp16 backward tiles hold G * 2^14 (|G| <= 2, so <= 32768 < 65504): entries p ~ 1/N stay normal fp16 numbers
# (smallest normal 2^-14 ~ 6.1e-5) up to N ~ 2^28 instead of subnormal from N ~ 16k. bf16 has fp32's exponent.
_FP16_G_PRESCALE = 2.0**14


def _bwd_flags(x: torch.Tensor) -> dict:
    return {**_flags(x), "G_PRESCALE": _FP16_G_PRESCALE if x.dtype == torch.float16 else 1.0}


def _triton_fwd(x, y, scale, ids_r, ids_c, cnt_r, xt, yt, alpha, tlse, seed, row_off, compute_tgt=True):
    """(lse, tgt, neg) for rows x over columns y; tgt / neg are None when not asked for."""
    _check(x, y, xt, yt, ids_r, ids_c)
    b, d = x.shape
    n = y.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    lse = torch.full((b,), float("nan"), **f32)  # poisoned: an unwritten row fails the tests
    tgt = torch.full((b,), float("nan"), **f32) if compute_tgt else lse
    sample = seed is not None
    neg = torch.full((b,), -7, dtype=torch.long, device=x.device) if sample else lse
    teacher = xt is not None
    tk._fwd_kernel[lambda meta: row_grid(b, meta["BLOCK_M"])](
        x, y, xt if teacher else x, yt if teacher else y, ids_r, ids_c, cnt_r, tlse if teacher else lse,
        scale, lse, tgt, neg, b, n, d, x.stride(0), y.stride(0), float(alpha), int(seed or 0), int(row_off),
        HAS_TEACHER=teacher, COMPUTE_TGT=compute_tgt, SAMPLE=sample, **_flags(x))
    return lse, (tgt if compute_tgt else None), (neg if sample else None)


# Split forward: about this many programs (per launch) on CUDA, from the SM count; in the interpreter a few, so the
# tests run several chunks and splits.
_PROGRAMS_PER_SM = 2
_INTERPRET_PROGRAMS = 6
FORWARDS = ("split", "rows")


def forward_impl() -> str:
    """R2D2DS_CONTRASTIVE_FWD: "split" (default: CHUNKS x SPLITS grid, both directions in one pass when single
    process) or "rows" (the previous one-program-per-row-block kernel, one pass per direction)."""
    impl = os.environ.get("R2D2DS_CONTRASTIVE_FWD", "split")
    if impl not in FORWARDS:
        raise ValueError(f"R2D2DS_CONTRASTIVE_FWD must be one of {FORWARDS}, got {impl!r}")
    return impl


def split_shape(b: int, n: int, programs: int) -> tuple[int, int]:
    """(CHUNKS, SPLITS) of the split forward: about `programs` programs, chunks ~ sqrt(programs) when there are
    enough row blocks (the column partials take CHUNKS x N x 12 bytes, the row partials SPLITS x B x 20)."""
    chunks = max(1, min(_cdiv(b, 128), math.isqrt(programs - 1) + 1))
    splits = max(1, min(_cdiv(programs, chunks), _cdiv(n, 128)))
    return chunks, splits


def split_grid(chunks: int, splits: int) -> tuple[int]:
    """Split forward: CHUNKS x SPLITS programs on axis 0 (a few hundred)."""
    return (chunks * splits,)


def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRET_PROGRAMS
    return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def _merge_lse(m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """logsumexp over dim 0 of partials (max m, sum l of exp(s - m)): m_max + log(sum l exp(m - m_max))."""
    mx = m.amax(0)
    return mx + (l * torch.exp(m - mx)).sum(0).log()


def _triton_fwd_split(x, y, scale, ids_r, ids_c, cnt_r, xt, yt, alpha, tlse, seed, row_off, compute_tgt=True,
                      cnt_c=None, tlse_c=None, col_stats=False):
    """_triton_fwd's contract on the split grid; col_stats (single process, y's rows are the t2i rows) adds the
    column direction: returns (lse, tgt, neg, lse_c, tgt_c)."""
    _check(x, y, xt, yt, ids_r, ids_c)
    b, d = x.shape
    n = y.shape[0]
    chunks, splits = split_shape(b, n, _target_programs(x.device))
    f32 = dict(dtype=torch.float32, device=x.device)
    nan = float("nan")
    row_m, row_l = torch.full((splits, b), nan, **f32), torch.full((splits, b), nan, **f32)  # poisoned
    row_t = torch.full((splits, b), nan, **f32) if compute_tgt else row_m
    sample = seed is not None
    row_best = torch.full((splits, b), nan, **f32) if sample else row_m
    row_arg = torch.full((splits, b), -7, dtype=torch.long, device=x.device) if sample else row_m
    cols = (chunks, n) if col_stats else (1, 1)
    col_m = torch.full(cols, float("-inf"), **f32)  # merged into: start from the empty sum
    col_l, col_t = torch.zeros(cols, **f32), torch.zeros(cols, **f32)
    teacher = xt is not None
    tk._fwd_split_kernel[split_grid(chunks, splits)](
        x, y, xt if teacher else x, yt if teacher else y, ids_r, ids_c, cnt_r, cnt_r if cnt_c is None else cnt_c,
        tlse if teacher else cnt_r, tlse_c if (teacher and col_stats) else cnt_r, scale,
        row_m, row_l, row_t, row_best, row_arg, col_m, col_l, col_t,
        b, n, d, x.stride(0), y.stride(0), float(alpha), int(seed or 0), int(row_off), chunks, splits,
        HAS_TEACHER=teacher, COMPUTE_TGT=compute_tgt, SAMPLE=sample, COL_STATS=col_stats, **_flags(x))
    lse = _merge_lse(row_m, row_l)
    tgt = row_t.sum(0) if compute_tgt else None
    neg = None
    if sample:  # the Gumbel-max over all columns is the max over the splits' maxima
        neg = row_arg.gather(0, row_best.argmax(0, keepdim=True)).squeeze(0)
    if not col_stats:
        return lse, tgt, neg
    return lse, tgt, neg, _merge_lse(col_m, col_l), (col_t.sum(0) if compute_tgt else None)


def _bwd_args(x, y, scale, ids_r, ids_c, cnt_r, xt, yt, lse_r, tlse_r, w, cnt_c, lse_c, tlse_c) -> tuple:
    """Checks the inputs; returns the backward kernels' leading arguments (X .. SCALE; absent inputs stand in
    with unread tensors) and the row weight as a 0-dim fp32 device tensor (read in-kernel: no host sync)."""
    _check(x, y, xt, yt, ids_r, ids_c)
    teacher, fuse = xt is not None, lse_c is not None
    cnt_c = cnt_r if cnt_c is None else cnt_c
    if not fuse:  # column counts are only read under FUSE_T; any (N,) fp32 buffer will do
        n = y.shape[0]
        cnt_c = torch.ones(n, dtype=torch.float32, device=x.device) if cnt_c.shape[0] != n else cnt_c
    args = (x, y, xt if teacher else x, yt if teacher else y, ids_r, ids_c, cnt_r, cnt_c, lse_r,
            lse_c if fuse else lse_r, tlse_r if teacher else lse_r, tlse_c if (teacher and fuse) else lse_r, scale)
    return args, w.to(device=x.device, dtype=torch.float32).reshape(())


def _triton_bwd(x, y, scale, ids_r, ids_c, cnt_r, xt, yt, alpha, lse_r, tlse_r, w,
                cnt_c=None, lse_c=None, tlse_c=None, out_dtype=None):
    """dx (B, D), dy (N, D) and dscale's dot part; lse_c given = FUSE_T (rows and columns one batch).

    dx and dy are accumulated in fp32 buffers; out_dtype casts each one when its kernel is done, so at most
    one fp32 buffer is alive (peak: the grads plus one fp32 (B, D) buffer = 2x the bf16 embeddings).
    """
    args, w = _bwd_args(x, y, scale, ids_r, ids_c, cnt_r, xt, yt, lse_r, tlse_r, w, cnt_c, lse_c, tlse_c)
    (b, d), n = x.shape, y.shape[0]
    teacher, fuse = xt is not None, lse_c is not None
    dx = torch.full((b, d), float("nan"), dtype=torch.float32, device=x.device)
    ds = torch.full((_cdiv(b, 16),), float("nan"), dtype=torch.float32, device=x.device)
    flags = dict(HAS_TEACHER=teacher, FUSE_T=fuse, **_bwd_flags(x))
    used = {}

    def grid_dx(meta):
        used["m"] = meta["BLOCK_M"]
        return row_grid(b, meta["BLOCK_M"])

    tk._bwd_dx_kernel[grid_dx](*args, dx, ds, b, n, d, x.stride(0), y.stride(0), w, float(alpha), **flags)
    if out_dtype is not None:
        dx = dx.to(out_dtype)
    dy = torch.full((n, d), float("nan"), dtype=torch.float32, device=x.device)
    tk._bwd_dy_kernel[lambda meta: col_grid(n, meta["BLOCK_N"])](
        *args, dy, b, n, d, x.stride(0), y.stride(0), w, float(alpha), **flags)
    if out_dtype is not None:
        dy = dy.to(out_dtype)
    return dx, dy, ds[: _cdiv(b, used["m"])].sum()


# Panel backward: R rows per panel, R = 1 GiB of G in the input dtype (8192 rows at N = 64k in bf16), but at least
# _MIN_PANEL_ROWS: dY's fp32 read-modify-write (N D 8 bytes per panel) stays below G's own traffic (R N e) when
# R >= 4D / e, and the dX GEMM's grid (R / 128 x D / 128 programs) fills 132 SMs at D >= 512
# (benchmarks/roofline.py). G then takes 4096 N e bytes at most: 2 GiB at N = 256k in bf16.
_PANEL_BYTES = 1 << 30
_MIN_PANEL_ROWS = 4096
_MAX_PANEL_ROWS = 1 << 20
BACKWARDS = ("panel", "tiles")


def backward_impl() -> str:
    """R2D2DS_CONTRASTIVE_BWD: "panel" (default: G panels + two GEMMs) or "tiles" (the two recompute kernels with
    per-tile fp32 read-modify-write), kept selectable until a GPU has timed both (benchmarks/roofline.py)."""
    impl = os.environ.get("R2D2DS_CONTRASTIVE_BWD", "panel")
    if impl not in BACKWARDS:
        raise ValueError(f"R2D2DS_CONTRASTIVE_BWD must be one of {BACKWARDS}, got {impl!r}")
    return impl


def panel_rows(b: int, n: int, elt: int) -> int:
    """Rows per panel of the panel backward (a multiple of 128 unless it is all of b)."""
    rows = max(_MIN_PANEL_ROWS, _PANEL_BYTES // max(1, n * elt) // 128 * 128)
    # panel_grid has R N / (BLOCK_M BLOCK_N) programs on axis 0: R N <= 2^38 keeps it <= 2^30 at 16 x 16 tiles
    rows = min(rows, max(128, (1 << 38) // max(1, n) // 128 * 128))
    return min(b, rows, _MAX_PANEL_ROWS)


def _triton_bwd_panel(x, y, scale, ids_r, ids_c, cnt_r, xt, yt, alpha, lse_r, tlse_r, w,
                      cnt_c=None, lse_c=None, tlse_c=None, out_dtype=None):
    """The panel backward (same contract as _triton_bwd): per panel of R rows, one kernel writes G = p - q (in
    the input dtype, fp16 prescaled) and two GEMMs with fp32 accumulation give dx[panel] = w scale G y (written
    once, in out_dtype when given) and dy (+)= w scale G^T x[panel] (fp32 across panels; one panel: written once).
    """
    args, w = _bwd_args(x, y, scale, ids_r, ids_c, cnt_r, xt, yt, lse_r, tlse_r, w, cnt_c, lse_c, tlse_c)
    (b, d), n = x.shape, y.shape[0]
    teacher, fuse = xt is not None, lse_c is not None
    flags = _bwd_flags(x)
    gemm_flags = {k: flags[k] for k in ("DOT_FP32", "PREC", "G_PRESCALE")}
    r = panel_rows(b, n, x.element_size())
    one_panel = r >= b
    dx_dtype = out_dtype or torch.float32
    dx = torch.full((b, d), float("nan"), dtype=dx_dtype, device=x.device)  # poisoned: unwritten rows fail
    dy = torch.full((n, d), float("nan"), dtype=dx_dtype if one_panel else torch.float32, device=x.device)
    g = torch.empty((r, n), dtype=x.dtype, device=x.device)  # (R, N), reused by every panel
    ds = torch.zeros((), dtype=torch.float32, device=x.device)
    for r0 in range(0, b, r):
        rows = min(r, b - r0)
        parts = {}

        def grid(meta, rows=rows, parts=parts):
            parts["grid"] = panel_grid(n, rows, meta["BLOCK_N"], meta["BLOCK_M"])
            return parts["grid"]

        ds_part = torch.full((_cdiv(n, 16) * _cdiv(rows, 16),), float("nan"), dtype=torch.float32,
                             device=x.device)
        tk._grad_panel_kernel[grid](*args, g, ds_part, r0, rows, n, d, x.stride(0), y.stride(0), float(alpha),
                                    HAS_TEACHER=teacher, FUSE_T=fuse, **flags)
        ds += ds_part[: parts["grid"][0]].sum()
        # dx[panel] = c G y: (rows, N) @ (N, D)
        tk._panel_matmul_kernel[lambda meta, rows=rows: gemm_grid(rows, d, meta["BLOCK_M"], meta["BLOCK_N"])](
            g, y, dx[r0:r0 + rows], w, scale, rows, d, n, n, 1, y.stride(0), 1, ACCUMULATE=False, **gemm_flags)
        # dy (+)= c G^T x[panel]: (N, rows) @ (rows, D), G^T read through strides
        tk._panel_matmul_kernel[lambda meta, rows=rows: gemm_grid(n, d, meta["BLOCK_M"], meta["BLOCK_N"])](
            g, x[r0:r0 + rows], dy, w, scale, n, d, rows, 1, n, x.stride(0), 1, ACCUMULATE=r0 > 0, **gemm_flags)
    if out_dtype is not None and dy.dtype != out_dtype:
        dy = dy.to(out_dtype)
    return dx, dy, ds * w


class _TritonBackend:
    """Kernels chosen by R2D2DS_CONTRASTIVE_FWD / _BWD at the forward (so a step's forward and backward agree)."""

    def __init__(self, forward: str, backward: str):
        self.fwd = _triton_fwd_split if forward == "split" else _triton_fwd
        self.bwd = _triton_bwd_panel if backward == "panel" else _triton_bwd
        # single process, both directions from one pass (autograd uses it when present)
        self.fwd_both = self._fwd_both if forward == "split" else None

    def teacher_lse(self, xt, yt, scale):
        n = yt.shape[0]
        ids = torch.zeros(xt.shape[0], dtype=torch.long, device=xt.device)
        ones = torch.ones(xt.shape[0], dtype=torch.float32, device=xt.device)
        return self.fwd(xt, yt, scale, ids, torch.zeros(n, dtype=torch.long, device=xt.device), ones, None, None,
                        0.0, None, None, 0, compute_tgt=False)[0]

    def sample(self, x, y, scale, ids_r, ids_c, seed, row_off):
        ones = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
        return self.fwd(x, y, scale, ids_r, ids_c, ones, None, None, 0.0, None, seed, row_off,
                        compute_tgt=False)[2]

    @staticmethod
    def _fwd_both(x, y, scale, ids, cnt, xt, yt, alpha, tlse_r, tlse_c):
        """The blockwise torch path's fwd_both contract: lse_r, tgt_r, lse_c, tgt_c from one pass."""
        lse_r, tgt_r, _, lse_c, tgt_c = _triton_fwd_split(x, y, scale, ids, ids, cnt, xt, yt, alpha, tlse_r, None,
                                                          0, cnt_c=cnt, tlse_c=tlse_c, col_stats=True)
        return lse_r, tgt_r, lse_c, tgt_c

    @staticmethod
    def lse_both(xt, yt, scale):
        """The teacher's row and column LSEs from one pass."""
        b = xt.shape[0]
        ids = torch.zeros(b, dtype=torch.long, device=xt.device)
        ones = torch.ones(b, dtype=torch.float32, device=xt.device)
        out = _triton_fwd_split(xt, yt, scale, ids, ids, ones, None, None, 0.0, None, None, 0, compute_tgt=False,
                                col_stats=True)
        return out[0], out[3]


def _triton(backward: str | None = None, forward: str | None = None) -> _TritonBackend:
    """Import Triton and define the kernels once (lazily: TRITON_INTERPRET must be set before the import); the
    backend with the kernels named by `forward` / `backward`, default R2D2DS_CONTRASTIVE_FWD / _BWD."""
    if tk.triton is None:
        tk.define_kernels()
    backward = backward or backward_impl()
    forward = forward or forward_impl()
    if backward not in BACKWARDS or forward not in FORWARDS:
        raise ValueError(f"forward / backward must be in {FORWARDS} / {BACKWARDS}, got {forward!r} / {backward!r}")
    return _TritonBackend(forward, backward)
