"""cross_attention: the Triton kernels and the SDPA path against a float64 reference (DESIGN.md section 4).

On CPU the Triton kernels run in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1); on a CUDA
machine the same tests run natively, with fp16 added.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from r2d2ds.kernels import cross_attention
from r2d2ds.kernels.cross_attention import (
    _cross_attention_bwd,
    _cross_attention_fwd,
    _pruner,
    cross_attention_reference,
)

# The package re-exports the function under the module's name, so fetch the module itself.
ca_module = importlib.import_module("r2d2ds.kernels.cross_attention")

pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
# bf16 in the interpreter is correct because the kernels upcast tiles before tl.dot there; fp16 adds nothing
# on CPU that bf16 does not, so it runs on CUDA only.
DTYPES = [torch.float32, torch.bfloat16] + ([torch.float16] if ON_CUDA else [])
# Unit roundoff of each dtype: the tolerances are derived from it (_rounding_bounds), not flat fractions.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
TOL_NAMES = ("out", "dq", "dk", "dv")

# (B, H, Lq, Lk, Dh): the shapes (text-query over 257 image tokens, image-query over 33 text tokens,
# tiny odd lengths at Dh 128) plus a head dim that is not a power of two (padded inside the kernel).
SHAPES = [(2, 3, 64, 257, 64), (1, 2, 257, 33, 32), (3, 1, 5, 7, 128), (2, 2, 17, 40, 24)]
MASKS = ["none", "padding", "holes_and_empty"]


def _make_mask(kind: str, B: int, Lk: int, gen: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "padding":  # text padding: a random valid prefix per batch element, at least one key
        lengths = torch.randint(1, Lk + 1, (B,), generator=gen)
        return torch.arange(Lk)[None, :] < lengths[:, None]  # (B, Lk)
    if kind == "holes_and_empty":  # random holes anywhere; batch element 0 has no valid key at all
        mask = torch.rand(B, Lk, generator=gen) > 0.4
        mask[:, -1] = True
        mask[0] = False
        return mask
    raise ValueError(kind)


def _inputs(shape, dtype, mask_kind, seed=0):
    B, H, Lq, Lk, Dh = shape
    gen = torch.Generator().manual_seed(seed)
    # q scaled up so rows are peaky and the online softmax's rescaling matters.
    q = 1.5 * torch.randn(B, H, Lq, Dh, generator=gen, dtype=torch.float64)
    k = torch.randn(B, H, Lk, Dh, generator=gen, dtype=torch.float64)
    v = torch.randn(B, H, Lk, Dh, generator=gen, dtype=torch.float64)
    do = torch.randn(B, H, Lq, Dh, generator=gen, dtype=torch.float64)
    mask = _make_mask(mask_kind, B, Lk, gen)
    # Round once to the test dtype so the reference sees exactly the kernel's inputs.
    q, k, v, do = (t.to(dtype).to(DEVICE) for t in (q, k, v, do))
    return q, k, v, do, (mask.to(DEVICE) if mask is not None else None)


def _run(impl, q, k, v, do, mask, scale=None):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = cross_attention(*leaves, key_mask=mask, scale=scale, impl=impl)
    grads = torch.autograd.grad(out, leaves, do.to(out.dtype))
    return (out, *grads)


def _reference(q, k, v, do, mask, scale=None):
    leaves = [t.detach().to(torch.float64).requires_grad_() for t in (q, k, v)]
    out = cross_attention_reference(*leaves, key_mask=mask, scale=scale)
    grads = torch.autograd.grad(out, leaves, do.to(torch.float64))
    return (out, *grads)


def _err(x, ref):
    return (x.to(torch.float64) - ref).abs().max().item()


def _rounding_bounds(q, k, v, do, mask, scale=None):
    """Per-element error bounds of (out, dq, dk, dv) from the kernel's roundings to q's dtype, in float64.

    The inputs are already in the dtype (the reference runs on exactly those values), so what remains is what
    a GPU kernel rounds: P cast to the dtype before P V and P^T dO (relative u per entry: u P |V|, u P^T |dO|),
    dS cast before dS K and dS^T Q (u |dS| |K|, u |dS|^T |Q|), the output O rounded to the dtype, which feeds
    delta = rowsum(dO O) (error Delta <= rowsum(|dO| (u |O| + out bound)), reaching dS as P Delta), and each
    result rounded once (u |result|). fp32 accumulation adds a few u_fp32 per term (a sum over Lk or Dh is
    within (L u_fp32) |terms|). Sum of these (first-order) terms, x2.
    """
    dtype = q.dtype
    u, u32 = UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF[torch.float32]
    q, k, v, do = (t.to(torch.float64) for t in (q, k, v, do))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # (B, H, Lq, Lk); 0 on rows without a key
    out = p @ v
    dp = do @ v.transpose(-1, -2)
    ds = p * (dp - (do * out).sum(-1, keepdim=True))
    acc = u + max(k.shape[2], q.shape[3]) * u32  # per-term relative error of a cast plus an fp32 sum
    out_b = acc * (p @ v.abs()) + u * out.abs()
    delta_b = (do.abs() * (u * out.abs() + out_b)).sum(-1, keepdim=True)  # (B, H, Lq, 1)
    dsb = acc * ds.abs() + p * delta_b
    dq = scale * ds @ k
    dk = scale * ds.transpose(-1, -2) @ q
    dv = p.transpose(-1, -2) @ do
    dq_b = scale * dsb @ k.abs() + u * dq.abs()
    dk_b = scale * dsb.transpose(-1, -2) @ q.abs() + u * dk.abs()
    dv_b = acc * (p.transpose(-1, -2) @ do.abs()) + u * dv.abs()
    return [2 * b.cpu() for b in (out_b, dq_b, dk_b, dv_b)]


def _assert_close_as_torch(got, torch_got, ref, bounds, what):
    """Every element within 2x the same-dtype PyTorch (max) error plus its rounding bound."""
    for name, g, t, r, b in zip(TOL_NAMES, got, torch_got, ref, bounds):
        assert torch.isfinite(g).all(), f"{what}: {name} has non-finite values"
        assert g.dtype == t.dtype, f"{what}: {name} dtype {g.dtype}"
        err = (g.detach().to(torch.float64) - r).abs().cpu()
        torch_err = _err(t, r)
        excess = float((err - 2 * torch_err - b).max())
        assert excess <= 0, (f"{what}: {name} error {err.max():.3g} exceeds 2 x torch error {torch_err:.3g} + "
                             f"rounding bound by {excess:.3g}")


BWD_PATHS = ["fused_bwd", "fused_keys_bwd", "split_bwd"]


@pytest.fixture(params=BWD_PATHS)
def bwd_path(request, monkeypatch):
    """The three backward paths: fused over all query rows, fused over all keys, the split dK/dV + dQ pair."""
    if request.param == "split_bwd":
        monkeypatch.setattr(ca_module, "_FUSED_BWD_MAX_TILE", 0)
    if request.param == "fused_keys_bwd":
        monkeypatch.setattr(ca_module, "_bwd_path", lambda lq, lk, dh: "fused_keys")
    return request.param


def _path_fits(path: str, shape) -> bool:
    _, _, lq, lk, dh = shape
    fits_q, fits_k = ca_module._fused_bwd_fits(lq, dh), ca_module._fused_bwd_fits(lk, dh)
    return {"fused_bwd": fits_q, "fused_keys_bwd": fits_k, "split_bwd": True}[path]


def _triton_cases():
    """(shape, dtype, bwd_path) for every shape, dtype and backward path, less the cases that repeat others."""
    cases = []
    for shape in SHAPES:
        default = "fused_bwd" if _path_fits("fused_bwd", shape) else (
            "fused_keys_bwd" if _path_fits("fused_keys_bwd", shape) else "split_bwd")
        for dtype in DTYPES:
            for path in BWD_PATHS:
                if not _path_fits(path, shape):
                    continue  # that fused kernel cannot hold this shape: it would run another path again
                if path != default and ON_CUDA and dtype != torch.bfloat16:
                    # Every variant is a compile on CUDA: paths forced off the default are checked at bf16 there
                    # (every tile runs each path in test_every_tile_shape_is_correct).
                    continue
                case_id = f"{path}-{'x'.join(map(str, shape))}-{str(dtype).removeprefix('torch.')}"
                cases.append(pytest.param(shape, dtype, path, id=case_id))
    return cases


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize(("shape", "dtype", "bwd_path"), _triton_cases(), indirect=["bwd_path"])
def test_triton_matches_reference_within_torch_error(shape, mask_kind, dtype, bwd_path):
    q, k, v, do, mask = _inputs(shape, dtype, mask_kind)
    ref = _reference(q, k, v, do, mask)
    torch_got = _run("torch", q, k, v, do, mask)
    got = _run("triton", q, k, v, do, mask)
    _assert_close_as_torch(got, torch_got, ref, _rounding_bounds(q, k, v, do, mask), f"triton {shape} {mask_kind}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("mask_kind", MASKS)
def test_torch_path_matches_reference(mask_kind, dtype):
    shape = (2, 3, 33, 70, 32)
    q, k, v, do, mask = _inputs(shape, dtype, mask_kind, seed=1)
    ref = _reference(q, k, v, do, mask)
    got = _run("torch", q, k, v, do, mask)
    # The torch path is the baseline itself: hold it to the rounding bound alone, element by element.
    for name, g, r, b in zip(TOL_NAMES, got, ref, _rounding_bounds(q, k, v, do, mask)):
        assert torch.isfinite(g).all(), name
        excess = float(((g.to(torch.float64) - r).abs().cpu() - b).max())
        assert excess <= 0, f"torch {name}: error {_err(g, r):.3g} exceeds the rounding bound by {excess:.3g}"


@pytest.mark.parametrize("impl", ["triton", "torch", "reference"])
def test_fully_masked_rows_give_zero_output_and_zero_gradient(impl):
    q, k, v, do, mask = _inputs((3, 2, 9, 20, 32), torch.float32, "holes_and_empty", seed=2)
    mask[2] = False  # two batch elements with no valid key
    out, dq, dk, dv = _run(impl, q, k, v, do, mask)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    empty = ~mask.any(dim=1)  # (B,)
    assert empty.tolist() == [True, False, True]
    assert (out[empty] == 0).all() and (dq[empty] == 0).all()
    assert (dk[empty] == 0).all() and (dv[empty] == 0).all()
    # Masked keys of the other elements get exactly zero gradient too; the valid ones do not.
    masked_keys = ~mask[~empty]  # (B', Lk)
    assert (dk[~empty].permute(0, 2, 1, 3)[masked_keys] == 0).all()
    assert (dv[~empty].permute(0, 2, 1, 3)[masked_keys] == 0).all()
    assert dv[~empty].abs().sum() > 0 and out[~empty].abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------
# Strided operands: read in place, written in the inputs' layouts
# ----------------------------------------------------------------------------------------------------------
LAYOUTS = ["bhld", "blhd", "odd"]


def _as_layout(t: torch.Tensor, layout: str, role: str) -> torch.Tensor:
    """The values of the (B, H, L, Dh) tensor `t` stored in `layout` (a view, not a copy, of its buffer):
    "bhld" contiguous (B, H, L, Dh); "blhd" a (B, L, H*Dh) projection output viewed as (B, L, H, Dh) and
    transposed, as the cross encoder splits its heads; "odd" an awkward view per role (q: one head slice of a
    packed qkv buffer padded in Dh; k: head dim outermost, so its stride is B*H*Lk and the sequence stride 1;
    v: every other row of a buffer twice as long; dO: sequence-major with the head dim strided). Whatever the
    view does not cover is NaN, so reading outside it (a wrong stride) poisons the result."""
    B, H, L, Dh = t.shape
    if layout == "bhld":
        return t.contiguous()
    if layout == "blhd":
        return t.transpose(1, 2).reshape(B, L, H * Dh).view(B, L, H, Dh).transpose(1, 2)
    full = lambda *size: torch.full(size, float("nan"), dtype=t.dtype, device=t.device)
    view = {"q": lambda: full(B, L, 3, H, Dh + 3)[:, :, 1, :, :Dh].transpose(1, 2),
            "k": lambda: full(Dh, B, H, L).permute(1, 2, 3, 0),
            "v": lambda: full(B, H, 2 * L, Dh)[:, :, ::2],
            "do": lambda: full(L, Dh, B, H).permute(2, 3, 0, 1)}[role]()
    view.copy_(t)
    return view


def _run_in_place(impl, q, k, v, do, mask, scale=None):
    """_run without the clone: the leaves keep their layouts (detach() is a view)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = cross_attention(*leaves, key_mask=mask, scale=scale, impl=impl)
    return (out, *torch.autograd.grad(out, leaves, do))


# On CUDA every stride pattern is a compile per kernel (Triton specialises strides equal to 1 and divisible by
# 16): there the strided layouts run at bf16 only (the contiguous one is every other test's).
STRIDED_CASES = [pytest.param(layout, dtype, id=f"{layout}-{str(dtype).removeprefix('torch.')}")
                 for layout in LAYOUTS for dtype in (torch.float32, torch.bfloat16)
                 if not ON_CUDA or (layout != "bhld" and dtype == torch.bfloat16)]


@pytest.mark.parametrize(("layout", "dtype"), STRIDED_CASES)
def test_strided_layouts_match_reference_and_keep_their_layout(layout, dtype, bwd_path, monkeypatch):
    """Every backward path on (B, H, L, Dh) views in three layouts (head dim 24: padded inside the kernel):
    within the torch-path error of the float64 reference, the operands reach the kernels as the caller's views
    (same memory, same strides), and out / dq / dk / dv come back in q's / k's / v's layouts."""
    shape = (2, 3, 20, 37, 24)
    q0, k0, v0, do0, _ = _inputs(shape, dtype, "none", seed=8)
    gen = torch.Generator().manual_seed(9)
    # A key mask that is itself a strided view: column b of a (Lk, B) table.
    mask = (torch.rand(shape[3], shape[0], generator=gen) > 0.3).to(DEVICE).t()
    q, k, v, do = (_as_layout(t, layout, role) for t, role in ((q0, "q"), (k0, "k"), (v0, "v"), (do0, "do")))
    seen = []
    real_fwd, real_bwd = ca_module._cross_attention_fwd, ca_module._cross_attention_bwd

    def spy_fwd(q_, k_, v_, *rest, **kw):
        seen.append([(t.data_ptr(), t.stride()) for t in (q_, k_, v_)])
        return real_fwd(q_, k_, v_, *rest, **kw)

    def spy_bwd(do_, *rest, **kw):
        seen.append([(do_.data_ptr(), do_.stride())])
        return real_bwd(do_, *rest, **kw)

    monkeypatch.setattr(ca_module, "_cross_attention_fwd", spy_fwd)
    monkeypatch.setattr(ca_module, "_cross_attention_bwd", spy_bwd)
    got = _run_in_place("triton", q, k, v, do, mask)
    assert seen == [[(t.data_ptr(), t.stride()) for t in (q, k, v)], [(do.data_ptr(), do.stride())]], (
        "an operand was copied on its way to the kernels")
    for name, g, like in zip(TOL_NAMES, got, (q, q, k, v)):
        assert g.stride() == torch.empty_like(like).stride(), f"{layout}: {name} strides {g.stride()}"
    ref = _reference(q0, k0, v0, do0, mask)
    torch_got = _run("torch", q0, k0, v0, do0, mask)
    _assert_close_as_torch(got, torch_got, ref, _rounding_bounds(q0, k0, v0, do0, mask), f"{layout} {bwd_path}")


def test_broadcast_grad_and_custom_scale():
    """out.sum().backward() hands the backward a dO of stride 0 everywhere (an expanded scalar): read in place."""
    q, k, v, _, mask = _inputs((2, 3, 12, 30, 32), torch.float32, "padding", seed=4)
    q, k, v = (_as_layout(t, "blhd", "q") for t in (q, k, v))
    ones = torch.ones(1, device=DEVICE).expand(q.shape)
    assert ones.stride() == (0, 0, 0, 0)
    got = _run_in_place("triton", q, k, v, ones, mask, scale=0.3)
    ref = _reference(q, k, v, ones, mask, scale=0.3)
    torch_got = _run("torch", q, k, v, ones, mask, scale=0.3)
    _assert_close_as_torch(got, torch_got, ref, _rounding_bounds(q, k, v, ones, mask, scale=0.3), "dO stride 0")


def test_previous_contiguous_layout_gives_the_same_numbers(monkeypatch):
    """R2D2DS_CROSS_ATTENTION_LAYOUT=contiguous (the copy path, kept until a GPU has timed both) runs the same
    kernels on copies: identical numbers, out / grads in the contiguous layout. A bad value is refused."""
    q, k, v, do, mask = (_as_layout(t, "blhd", "q") if t is not None and t.dim() == 4 else t
                         for t in _inputs((2, 2, 9, 40, 32), torch.float32, "padding", seed=10))
    strided = _run_in_place("triton", q, k, v, do, mask)
    monkeypatch.setenv("R2D2DS_CROSS_ATTENTION_LAYOUT", "contiguous")
    copied = _run_in_place("triton", q, k, v, do, mask)
    for name, a, b in zip(TOL_NAMES, strided, copied):
        assert torch.equal(a, b), name
        assert b.is_contiguous() and not a.is_contiguous(), name
    monkeypatch.setenv("R2D2DS_CROSS_ATTENTION_LAYOUT", "packed")
    with pytest.raises(ValueError, match="R2D2DS_CROSS_ATTENTION_LAYOUT"):
        cross_attention(q, k, v, impl="triton")
    assert cross_attention(q, k, v, impl="torch").shape == q.shape  # the fallback paths never read it


@pytest.mark.parametrize("layout", ["bhld", "padded_blhd"])
def test_every_output_element_is_written(bwd_path, layout):
    """Launch into NaN-filled buffers: any element a kernel forgets to store stays NaN. In the padded layout
    every operand is a (B, L, H, Dh) view of a buffer 5 wider in Dh: a store through a wrong stride either
    leaves NaN in the view or writes into the padding, which must stay NaN."""
    shape = (2, 2, 37, 70, 64)
    q, k, v, do, mask = _inputs(shape, torch.float32, "holes_and_empty", seed=3)
    B, H, Lq, Lk, Dh = shape
    scale = Dh**-0.5
    nan = float("nan")

    def buffer(like: torch.Tensor, fill: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if layout == "bhld":
            view = torch.full_like(like, nan)
            base = view
        else:
            base = torch.full((B, like.shape[2], H, Dh + 5), nan, device=DEVICE)
            view = base[..., :Dh].transpose(1, 2)
        if fill is not None:
            view.copy_(fill)
        return view, base

    q, k, v, do = (buffer(t, t)[0] for t in (q, k, v, do))
    (out, out_base), (dq, dq_base), (dk, dk_base), (dv, dv_base) = (buffer(t) for t in (q, q, k, v))
    lse = torch.full((B, H, Lq), nan, device=DEVICE)
    _cross_attention_fwd(q, k, v, mask, scale, out=out, lse=lse)
    _cross_attention_bwd(do, q, k, v, out, lse, mask, scale, dq=dq, dk=dk, dv=dv)
    ref = _reference(q, k, v, do, mask)
    for name, got, r in zip(TOL_NAMES, (out, dq, dk, dv), ref):
        assert not torch.isnan(got).any(), f"{name} has unwritten (NaN) elements"
        assert _err(got, r) < 1e-4, name
    if layout == "padded_blhd":
        for name, base in zip(TOL_NAMES, (out_base, dq_base, dk_base, dv_base)):
            assert torch.isnan(base[..., Dh:]).all(), f"{name}: a store landed outside its view"
    # The saved LSE is the base-2 log-sum-exp of the scaled scores; +inf marks rows with no valid key.
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    lse_ref = torch.logsumexp(s, dim=-1) / torch.log(torch.tensor(2.0, dtype=torch.float64))
    empty = ~mask.any(dim=1)
    assert torch.isinf(lse[empty]).all() and (lse[empty] > 0).all()
    torch.testing.assert_close(lse[~empty].double(), lse_ref[~empty], rtol=0, atol=1e-5)


def test_overlapping_output_buffers_are_refused():
    q, k, v, _, mask = _inputs((2, 2, 8, 16, 32), torch.float32, "padding", seed=6)
    overlapping = torch.empty(2, 2, 1, 32, device=DEVICE).expand(q.shape)  # 8 rows on one address
    with pytest.raises(AssertionError, match="overlap"):
        _cross_attention_fwd(q, k, v, mask, 0.2, out=overlapping)


def _offsets_probe():
    """A one-program kernel that stores _offsets(b, h, rows, cols, strides) for 16 x 16 (row, col) pairs."""
    global _ca_offsets
    import triton
    import triton.language as tl

    ca_module._triton_kernels()
    _ca_offsets = ca_module._offsets

    @triton.jit
    def probe(Out, b, h, row0, stride_b, stride_h, stride_l, stride_d, R: tl.constexpr, C: tl.constexpr):
        rows = row0 + tl.arange(0, R)
        cols = tl.arange(0, C)
        off = _ca_offsets(b, h, rows, cols, stride_b, stride_h, stride_l, stride_d)
        tl.store(Out + tl.arange(0, R)[:, None] * C + cols[None, :], off)

    return probe


def test_element_offsets_are_int64_past_2_to_the_31():
    """Every load and store address comes from _offsets; each of its four products here passes 2^31 while every
    argument fits int32 (as a program id and a view's strides do), so an int32 product anywhere would wrap
    (the interpreter wraps int32 like a GPU) and miss the exact value."""
    b, h, row0 = 3, 2, 2000
    strides = (2**30 + 3, 2**30, 2**21 + 1, 2**28)  # batch, head, sequence, head dim: all < 2^31
    out = torch.zeros(16, 16, dtype=torch.int64, device=DEVICE)
    _offsets_probe()[(1,)](out, b, h, row0, *strides, R=16, C=16)
    rows, cols = torch.arange(row0, row0 + 16)[:, None], torch.arange(16)[None, :]
    expected = b * strides[0] + h * strides[1] + rows * strides[2] + cols * strides[3]
    assert expected.min() > 2**32
    assert torch.equal(out.cpu(), expected)


def test_launch_refuses_more_batch_heads_than_grid_axis_0():
    q = torch.empty(1, 1, 1, 16, device=DEVICE).expand(2**16, 2**15 + 1, 1, 16)  # stride 0: no memory
    with pytest.raises(AssertionError, match="grid axis 0"):
        ca_module._check_launch(q, q, q, None)


def test_auto_picks_triton_on_cuda_only(monkeypatch):
    mod = ca_module

    calls = []
    real_apply = mod._CrossAttentionTriton.apply

    def spy(*args):
        calls.append(1)
        return real_apply(*args)

    monkeypatch.setattr(mod._CrossAttentionTriton, "apply", spy)
    q, k, v, _, mask = _inputs((1, 2, 8, 16, 32), torch.float32, "padding", seed=5)
    out = cross_attention(q, k, v, key_mask=mask)
    assert len(calls) == (1 if ON_CUDA else 0)
    torch.testing.assert_close(out, cross_attention(q, k, v, key_mask=mask, impl="torch"), rtol=0, atol=1e-5)


def test_bad_arguments_are_refused():
    q, k, v, _, mask = _inputs((2, 2, 8, 16, 32), torch.float32, "padding", seed=6)
    with pytest.raises(ValueError, match="impl"):
        cross_attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="key_mask"):
        cross_attention(q, k, v, key_mask=mask.float())
    with pytest.raises(ValueError, match="key_mask"):
        cross_attention(q, k, v, key_mask=mask[:, :-1])
    with pytest.raises(ValueError, match="k, v"):
        cross_attention(q, k[..., :16], v[..., :16])
    with pytest.raises(ValueError, match="dtype"):
        cross_attention(q, k.double(), v)
    with pytest.raises(AssertionError, match="fp32 / bf16 / fp16"):
        cross_attention(q.double(), k.double(), v.double(), impl="triton")


# Every (BLOCK_M, BLOCK_N) an autotune list holds, plus the smallest; the fused backward fixes BLOCK_M = Lq,
# so only its BLOCK_N values are new there.
_SPLIT_LISTS = ca_module._FWD_TILES + ca_module._DKDV_TILES + ca_module._DQ_TILES
SPLIT_TILES = sorted({(m, n) for m, n, _, _ in _SPLIT_LISTS} | {(16, 16)})
FUSED_TILES = sorted({(64, n) for n, _, _ in ca_module._FUSED_BWD_TILES} | {(16, 16)})
FUSED_KEY_TILES = sorted({(m, 64) for m, _, _ in ca_module._FUSED_KEYS_BWD_TILES} | {(16, 16)})
TILE_CASES = ([("split_bwd", t) for t in SPLIT_TILES] + [("fused_bwd", t) for t in FUSED_TILES]
              + [("fused_keys_bwd", t) for t in FUSED_KEY_TILES])
# On CUDA the tensor-core path is the one worth checking per tile; the interpreter is exact either way.
TILE_DTYPE = torch.bfloat16 if ON_CUDA else torch.float32


@pytest.mark.parametrize("path,tile", TILE_CASES, ids=lambda x: x if isinstance(x, str) else f"{x[0]}x{x[1]}")
def test_every_tile_shape_is_correct(path, tile, monkeypatch):
    """Each (BLOCK_M, BLOCK_N) the autotuner may pick gives the same numbers: rebuild the kernels with only
    that tile (the interpreter, and the default test mode, otherwise use a single one)."""
    import triton

    if path == "split_bwd":
        monkeypatch.setattr(ca_module, "_FUSED_BWD_MAX_TILE", 0)
    block_m, block_n = tile
    sizes = {"BLOCK_M": block_m, "BLOCK_N": block_n}
    monkeypatch.setattr(
        ca_module, "_configs",
        lambda tiles, names=("BLOCK_M", "BLOCK_N"): [
            triton.Config({n: sizes[n] for n in names}, num_warps=4, num_stages=2)
        ],
    )
    ca_module._triton_kernels.cache_clear()
    try:
        # 40 queries over 150 keys (the query-fused kernel's case); 150 queries over 40 keys for the key-fused one
        shape = (2, 2, 150, 40, 32) if path == "fused_keys_bwd" else (2, 2, 40, 150, 32)
        assert ca_module._bwd_path(shape[2], shape[3], shape[4]) == {
            "fused_keys_bwd": "fused_keys", "fused_bwd": "fused_queries", "split_bwd": "split"}[path]
        q, k, v, do, mask = _inputs(shape, TILE_DTYPE, "holes_and_empty", seed=7)
        got = _run("triton", q, k, v, do, mask)
    finally:
        ca_module._triton_kernels.cache_clear()  # the next test rebuilds with the real configs
    ref = _reference(q, k, v, do, mask)
    torch_got = _run("torch", q, k, v, do, mask)
    _assert_close_as_torch(got, torch_got, ref, _rounding_bounds(q, k, v, do, mask), f"{path} tile {tile}")


def test_pruner_respects_lengths_and_shared_memory(monkeypatch):
    import triton

    monkeypatch.setattr(ca_module, "_max_shared_mem", lambda device: 64 * 1024)

    tiles = [(16, 16), (32, 64), (64, 64), (64, 128), (128, 32), (128, 256)]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=4, num_stages=2) for m, n in tiles]
    q = torch.empty(1, 1, 1, 64, dtype=torch.bfloat16)
    prune = _pruner(lambda m, n, stages: m + 2 * n * stages)
    kept = prune(configs, {"Q": q, "Lq": 64, "Lk": 33}, BLOCK_D=64)
    kept_tiles = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept]
    assert kept_tiles == [(16, 16), (32, 64), (64, 64)]  # BLOCK_M <= 64 = Lq, BLOCK_N <= 64 = next_pow2(33)
    kept = prune(configs, {"Q": q, "Lq": 257, "Lk": 257}, BLOCK_D=64)
    # (BLOCK_M + 4 BLOCK_N) * 64 * 2 bytes <= 64 KiB drops 64 x 128 and 128 x 256.
    kept_tiles = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept]
    assert kept_tiles == [(16, 16), (32, 64), (64, 64), (128, 32)]
    # Nothing fits a huge head dim: the smallest tile is kept so the launch still has a config.
    kept = prune(configs, {"Q": q, "Lq": 257, "Lk": 257}, BLOCK_D=1 << 20)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept] == [(16, 16)]
