"""contrastive_loss: triton (interpreter on CPU, native on CUDA) and torch paths vs a float64 naive reference.

Loss and every gradient (image, text, logit_scale), fp32 and half-precision inputs, B in {1, 7, 64, 300}, D in
{32, 96}, diagonal and multi-positive ids (groups of 2-5), with and without an EMA teacher (alpha 0 and 0.4);
open_clip ClipLoss parity; the O(B*D) memory contract is checked by benchmarks/bench_contrastive_memory.py.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from r2d2ds.kernels import contrastive_loss
from r2d2ds.kernels.contrastive_loss import _soft_targets, contrastive_loss_reference

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
SCALE = 1 / 0.07  # the model's initial temperature: sharp enough that the softmax is far from uniform


def grouped_labels(b: int, gen: torch.Generator) -> torch.Tensor:
    """Ids in groups of 2-5 equal ids (plus singletons at the end), shuffled over the batch."""
    ids, nxt = [], 0
    while len(ids) < b:
        size = int(torch.randint(2, 6, (1,), generator=gen))
        ids += [nxt] * size
        nxt += 1
    ids = torch.tensor(ids[:b])
    return ids[torch.randperm(b, generator=gen)]


def make_inputs(b: int, d: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    emb = [F.normalize(torch.randn(b, d, generator=gen, dtype=torch.float64), dim=1) for _ in range(4)]
    labels = grouped_labels(b, gen)
    return emb, labels


def reference_grads(emb, labels, alpha, teacher, scale=SCALE):
    """float64 naive loss and d(loss)/d(image, text, scale)."""
    img, txt = (e.clone().requires_grad_() for e in emb[:2])
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    kw = dict(teacher_image_emb=emb[2], teacher_text_emb=emb[3], alpha=alpha) if teacher else {}
    loss = contrastive_loss_reference(img, txt, s, labels, **kw)
    return (loss.detach(), *torch.autograd.grad(loss, [img, txt, s]))


def run_impl(impl, emb, labels, alpha, teacher, dtype=torch.float32, scale=SCALE):
    img, txt = (e.to(DEV, dtype).requires_grad_() for e in emb[:2])
    s = torch.tensor(scale, device=DEV, requires_grad=True)
    kw = {}
    if teacher:
        kw = dict(teacher_image_emb=emb[2].to(DEV, dtype), teacher_text_emb=emb[3].to(DEV, dtype),
                  alpha=alpha)
    lab = None if labels is None else labels.to(DEV)
    loss = contrastive_loss(img, txt, s, lab, impl=impl, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    grads = torch.autograd.grad(loss, [img, txt, s])
    assert grads[0].dtype == dtype and grads[1].dtype == dtype
    return (loss.detach(), *grads)


def max_err(got, ref):
    return [float((g.double().cpu() - r).abs().max()) for g, r in zip(got, ref)]


def dense_grad_parts(emb, labels, alpha, teacher, scale=SCALE):
    """float64 (N, N) G = dCE/ds of both directions summed (unweighted) and the dot products <x_i, y_j>.

    G_ij = (p_ij - q_ij) + (p^T_ji - q^T_ji): the row (i2t) softmax minus its targets plus the column (t2i)
    one, the matrix the single-process backward multiplies into y and x.
    """
    x, y = emb[0], emb[1]
    n = x.shape[0]
    ids = torch.arange(n) if labels is None else labels
    dot = x @ y.T
    s = scale * dot
    t = scale * emb[2] @ emb[3].T if teacher else None
    a = alpha if teacher else 0.0
    q_r = _soft_targets(ids, ids, t, a, dim=1)
    q_c = _soft_targets(ids, ids, None if t is None else t.T, a, dim=1).T
    return torch.softmax(s, 1) - q_r + torch.softmax(s, 0) - q_c, dot


def rounding_bounds(emb, labels, alpha, teacher, u, scale=SCALE):
    """Per-element error bounds of (loss, d_image, d_text, d_scale) from rounding to a dtype of unit roundoff u.

    The inputs are already rounded to the dtype (the reference runs on the rounded values), so the kernel's
    own roundings remain: the logits, LSEs and targets are fp32 (products of bf16 / fp16 numbers are exact in
    fp32), the gradient tile G is cast to the input dtype once before the tensor-core product (relative error
    u per element, so |error of G y| <= u |G| |y|), and the result is rounded once to the dtype (u |grad|).
    Condition-number bound: 2 u (|G| |y| + |grad|), the 2 covering fp32 accumulation; d_scale is fp32 end to
    end (u_fp32 times sum |G| |s|), the loss fp32 (its LSE terms: u_fp32 times |loss| and the logits' size).
    """
    g, dot = dense_grad_parts(emb, labels, alpha, teacher, scale)
    n = g.shape[0]
    w = 1.0 / (2 * n)  # single process: d(loss)/ds = G / 2N
    _, d_img, d_txt, _ = reference_grads(emb, labels, alpha, teacher, scale)
    u32 = 2.0**-24
    cond_img = w * scale * g.abs() @ emb[1].abs()
    cond_txt = w * scale * g.abs().T @ emb[0].abs()
    loss_b = 64 * u32 * scale * float(dot.abs().max())
    ds_b = 64 * u32 * w * float((g.abs() * dot.abs()).sum())
    return [loss_b, 2 * u * (cond_img + d_img.abs()), 2 * u * (cond_txt + d_txt.abs()), ds_b]


# (labels, teacher, alpha): diagonal / multi-positive ids, with and without a teacher (alpha 0 must be exactly
# the no-teacher loss, alpha 0.4 mixes the teacher's softmax in).
CASES = [("diag", False, 0.0), ("groups", False, 0.0), ("diag", True, 0.4), ("groups", True, 0.4),
         ("groups", True, 0.0)]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("b", [1, 7, 64, 300])
@pytest.mark.parametrize("d", [32, 96])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-teacher{int(c[1])}-a{c[2]}")
def test_matches_float64_reference_fp32(impl, b, d, case):
    mode, teacher, alpha = case
    emb, labels = make_inputs(b, d, seed=1000 * b + d)
    labels = labels if mode == "groups" else None
    ref = reference_grads(emb, labels, alpha, teacher)
    got = run_impl(impl, emb, labels, alpha, teacher)
    errs = max_err(got, ref)
    # fp32 with fp32 accumulation over D <= 96 and B <= 300: ~1e-6 relative; gradients are O(1 / B).
    tol = [2e-5 * max(1.0, float(ref[0].abs())), 2e-6, 2e-6, 2e-5]
    for name, e, t in zip(["loss", "d_image", "d_text", "d_scale"], errs, tol):
        assert e <= t, f"{impl} {name}: max error {e:.3g} > {t:.3g}"


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_within_rounding_bound(impl, dtype):
    """Half inputs: error vs float64 on the same (rounded) inputs within 2x the same-dtype naive PyTorch error
    plus the bound that rounding to the dtype allows (rounding_bounds: unit roundoff x condition), per element.

    fp16 runs in the interpreter too: its tiles take the GPU's cast path there (only bf16 is upcast)."""
    b, d = (300, 96) if CUDA else (64, 96)
    emb, labels = make_inputs(b, d, seed=7)
    emb_h = [e.to(dtype).double() for e in emb]  # the rounding of the inputs is not the kernel's error
    ref = reference_grads(emb_h, labels, 0.4, True)
    got = run_impl(impl, emb_h, labels, 0.4, True, dtype=dtype)
    # the same-dtype PyTorch baseline: the naive loss computed in `dtype` end to end
    img, txt = (e.to(DEV, dtype).requires_grad_() for e in emb_h[:2])
    s = torch.tensor(SCALE, device=DEV, dtype=dtype, requires_grad=True)
    base_loss = contrastive_loss_reference(img, txt, s, labels.to(DEV), emb_h[2].to(DEV, dtype),
                                           emb_h[3].to(DEV, dtype), 0.4)
    base = (base_loss.detach(), *torch.autograd.grad(base_loss, [img, txt, s]))
    u = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    bounds = rounding_bounds(emb_h, labels, 0.4, True, u)
    names = ["loss", "d_image", "d_text", "d_scale"]
    for name, g, gb, r, bound in zip(names, got, base, ref, bounds):
        err = (g.double().cpu() - r).abs()
        base_err = float((gb.double().cpu() - r).abs().max())
        excess = err - (2 * base_err + bound)
        assert float(excess.max()) <= 0, f"{impl} {dtype} {name}: error {float(err.max()):.3g} exceeds " \
            f"2 x torch {base_err:.3g} + rounding bound by {float(excess.max()):.3g}"


@pytest.mark.parametrize("bwd", ["panel", "tiles"])
@pytest.mark.parametrize("fuse", [True, False], ids=["single-process", "one-direction"])
@pytest.mark.parametrize("w_log2", [-17, -24])
def test_fp16_backward_does_not_underflow_at_large_n(fuse, w_log2, bwd, monkeypatch):
    """fp16 gradient tiles at a large-N row weight: the accumulated dx, dy (fp32 buffers) match float64 within
    fp16 rounding of the tile, never flushed to zero.

    The row weight w = grad * W / 2N is ~2^-17 at N = 64k; at such N, p ~ 1 / N, so w * scale * (p - q) ~ 1e-9
    is below fp16's smallest subnormal (6e-8): a kernel that multiplies w and the scale into the tile before
    the fp16 cast loses the whole gradient. w is passed directly here, so the interpreter's small N shows it.
    """
    from r2d2ds.kernels.contrastive_loss import _global_ids, _torch_fwd_both, _triton

    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or the Triton interpreter")
    monkeypatch.setenv("R2D2DS_CONTRASTIVE_BWD", bwd)
    b, d = 128, 64
    emb, labels = make_inputs(b, d, seed=17)
    emb = [e.half().double() for e in emb]
    x, y = (e.to(DEV, torch.float16) for e in emb[:2])
    ids_r, ids_c, cnt = _global_ids(labels.to(DEV), b, [b], None, x.device)
    scale = torch.tensor(SCALE, device=DEV)
    w = torch.tensor(2.0**w_log2, device=DEV)
    backend = _triton()
    if fuse:
        lse_r, _, lse_c, _ = _torch_fwd_both(x, y, scale, ids_r, cnt, None, None, 0.0, None, None)
        dx, dy, _ = backend.bwd(x, y, scale, ids_r, ids_c, cnt, None, None, 0.0, lse_r, None, w, cnt_c=cnt,
                                lse_c=lse_c)
        g, _ = dense_grad_parts(emb, labels, 0.0, False)
    else:
        lse_r = backend.fwd(x, y, scale, ids_r, ids_c, cnt, None, None, 0.0, None, None, 0)[0]
        dx, dy, _ = backend.bwd(x, y, scale, ids_r, ids_c, cnt, None, None, 0.0, lse_r, None, w)
        q = _soft_targets(labels, labels, None, 0.0, dim=1)
        g = torch.softmax(SCALE * emb[0] @ emb[1].T, 1) - q
    assert dx.dtype == torch.float32 and dy.dtype == torch.float32
    c = 2.0**w_log2 * SCALE
    for name, got, ref, bound in (("dx", dx, c * g @ emb[1], c * g.abs() @ emb[1].abs()),
                                  ("dy", dy, c * g.T @ emb[0], c * g.abs().T @ emb[0].abs())):
        got = got.double().cpu()
        assert got.abs().max() > 0, f"{name}: all zeros (fp16 underflow)"
        # one fp16 rounding (u = 2^-11) of each tile entry, x2 for fp32 accumulation; plus an fp32 floor
        excess = (got - ref).abs() - (2 * 2.0**-11 * bound + 1e-6 * float(ref.abs().max()))
        assert float(excess.max()) <= 0, f"{name}: error beyond fp16 rounding by {float(excess.max()):.3g} " \
            f"(max |ref| {float(ref.abs().max()):.3g})"


def test_alpha_zero_ignores_teacher_and_float_scale():
    emb, labels = make_inputs(64, 32, seed=3)
    img, txt = (e.float().to(DEV) for e in emb[:2])
    a = contrastive_loss(img, txt, SCALE, labels.to(DEV), impl="torch")
    b = contrastive_loss(img, txt, SCALE, labels.to(DEV), emb[2].float().to(DEV), emb[3].float().to(DEV),
                         alpha=0.0, impl="torch")
    c = contrastive_loss(img, txt, SCALE, labels.to(DEV), emb[2].float().to(DEV), emb[3].float().to(DEV),
                         alpha=0.4, impl="torch")
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_open_clip_parity_single_process(impl):
    open_clip_loss = pytest.importorskip("open_clip.loss", reason="pip install open-clip-torch")
    emb, _ = make_inputs(48, 32, seed=11)
    img, txt = (e.float().to(DEV).requires_grad_() for e in emb[:2])
    s = torch.tensor(SCALE, device=DEV, requires_grad=True)
    ref = open_clip_loss.ClipLoss()(img, txt, s)
    ref_g = torch.autograd.grad(ref, [img, txt, s])
    got = contrastive_loss(img, txt, s, impl=impl)
    got_g = torch.autograd.grad(got, [img, txt, s])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(got_g, ref_g):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_auto_picks_torch_on_cpu_and_validates_inputs():
    x = F.normalize(torch.randn(8, 16), dim=1)
    torch.testing.assert_close(contrastive_loss(x, x, 10.0), contrastive_loss(x, x, 10.0, impl="torch"))
    with pytest.raises(ValueError, match="impl"):
        contrastive_loss(x, x, 10.0, impl="cuda")
    with pytest.raises(ValueError, match="labels"):
        contrastive_loss(x, x, 10.0, labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="both"):
        contrastive_loss(x, x, 10.0, teacher_image_emb=x)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_return_negatives_matches_sampler_and_keeps_loss(impl):
    from r2d2ds.kernels import sample_hard_negatives

    emb, labels = make_inputs(70, 32, seed=5)
    img, txt = (e.float().to(DEV) for e in emb[:2])
    lab = labels.to(DEV)
    loss, n_t, n_i = contrastive_loss(img, txt, SCALE, lab, impl=impl, return_negatives=True, seed=123)
    torch.testing.assert_close(loss, contrastive_loss(img, txt, SCALE, lab, impl=impl))
    s_t, s_i = sample_hard_negatives(img, txt, SCALE, lab, impl=impl, seed=123)
    assert torch.equal(n_t, s_t) and torch.equal(n_i, s_i)
    assert not (lab[n_t] == lab).any() and not (lab[n_i] == lab).any()


@pytest.mark.skipif(not CUDA, reason="large-B numerics are a GPU case (the interpreter is too slow)")
def test_large_batch_cuda_matches_torch_path():
    emb, labels = make_inputs(4099, 256, seed=2)
    got = run_impl("triton", emb, labels, 0.4, True)
    ref = run_impl("torch", emb, labels, 0.4, True)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


# (R2D2DS_CONTRASTIVE_FWD, R2D2DS_CONTRASTIVE_BWD): the new path, the previous one, and the two mixed.
PATHS = [("split", "panel"), ("rows", "tiles"), ("split", "tiles"), ("rows", "panel")]


# bf16 on the new and the previous path; the mixed pairs in fp32 only.
PATH_CASES = [pytest.param(f, b, dt, id=f"{f}-{b}-{name}") for f, b in PATHS
              for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
              if dt == torch.float32 or (f, b) in PATHS[:2]]


@pytest.mark.parametrize("fwd,bwd,dtype", PATH_CASES)
@pytest.mark.parametrize("case", [("groups", True, 0.4), ("diag", False, 0.0)], ids=["groups-teacher", "diag"])
def test_triton_paths_match_float64(fwd, bwd, dtype, case, monkeypatch):
    """Every Triton forward / backward pair at B = 300 against float64 on the same (rounded) inputs: five column
    tiles of 64; the split forward on 3 chunks x 2 splits (row blocks 0 and 3 share a chunk, so the column
    partials merge across row blocks, and the row partials across splits; one pass for both directions); the
    panel backward on panels of 128 rows (dy accumulates across three). bf16 within the rounding bound
    (rounding_bounds), fp32 as the fp32 test above."""
    import importlib

    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or the Triton interpreter")
    monkeypatch.setenv("R2D2DS_CONTRASTIVE_FWD", fwd)
    monkeypatch.setenv("R2D2DS_CONTRASTIVE_BWD", bwd)
    launchers = importlib.import_module("r2d2ds.kernels.contrastive_loss.launchers")
    monkeypatch.setattr(launchers, "_PANEL_BYTES", 1)  # panels of 128 rows
    monkeypatch.setattr(launchers, "_MIN_PANEL_ROWS", 128)
    mode, teacher, alpha = case
    emb, labels = make_inputs(300, 96, seed=31)
    emb = [e.to(dtype).double() for e in emb]
    labels = labels if mode == "groups" else None
    ref = reference_grads(emb, labels, alpha, teacher)
    got = run_impl("triton", emb, labels, alpha, teacher, dtype=dtype)
    if dtype == torch.float32:
        bounds = [2e-5 * max(1.0, float(ref[0].abs())), 2e-6, 2e-6, 2e-5]
    else:
        bounds = rounding_bounds(emb, labels, alpha, teacher, 2.0**-8)
    for name, g, r, bound in zip(["loss", "d_image", "d_text", "d_scale"], got, ref, bounds):
        excess = float(((g.double().cpu() - r).abs() - bound).max())
        assert excess <= 0, f"{fwd}/{bwd} {dtype} {name}: error beyond the bound by {excess:.3g}"


def test_path_choice_is_validated(monkeypatch):
    from r2d2ds.kernels.contrastive_loss.launchers import backward_impl, forward_impl

    monkeypatch.setenv("R2D2DS_CONTRASTIVE_BWD", "fast")
    with pytest.raises(ValueError, match="R2D2DS_CONTRASTIVE_BWD"):
        backward_impl()
    monkeypatch.setenv("R2D2DS_CONTRASTIVE_FWD", "fast")
    with pytest.raises(ValueError, match="R2D2DS_CONTRASTIVE_FWD"):
        forward_impl()


def test_split_shape_fills_the_gpu_and_bounds_the_partials():
    """8 GPUs x 8k local rows over N = 64k (64 row blocks of 128 on 132 SMs): the split forward launches ~264
    programs, not 64; a single 64k batch splits both ways (partials of a few MB, not B / BM x N)."""
    from r2d2ds.kernels.contrastive_loss.launchers import split_shape

    chunks, splits = split_shape(8192, 65536, 264)
    assert chunks * splits >= 264 and chunks <= 64
    chunks, splits = split_shape(65536, 65536, 264)
    assert chunks * splits >= 264 and chunks * 65536 * 12 < 2**24 and splits * 65536 * 20 < 2**25
    assert split_shape(7, 300, 264) == (1, 3)  # never more splits than column tiles of 128
