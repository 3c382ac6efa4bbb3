"""contrastive_loss: triton (interpreter on CPU, native on CUDA) and torch paths vs a float64 naive reference.

Loss and every gradient (image, text, logit_scale), fp32 and half-precision inputs, B in {1, 7, 64, 300}, D in
{32, 96}, diagonal and multi-positive ids (groups of 2-5), with and without an EMA teacher (alpha 0 and 0.4);
open_clip ClipLoss parity; the O(B*D) memory contract is checked by benchmarks/bench_contrastive_memory.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from r2d2ds.kernels import contrastive_loss
from r2d2ds.kernels.contrastive_loss import contrastive_loss_reference

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
def test_half_inputs_within_twice_pytorch_error(impl, dtype):
    """Half inputs: error vs float64 within 2x the same-dtype naive PyTorch error plus a per-dtype atol."""
    if not CUDA and dtype == torch.float16:
        pytest.skip("fp16 matmul is a GPU case (CPU fp16 GEMM is slow); bf16 covers the CPU path")
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
    atol = {torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    names = ["loss", "d_image", "d_text", "d_scale"]
    for name, e, eb, r in zip(names, max_err(got, ref), max_err(base, ref), ref):
        scale_ref = float(r.abs().max())
        assert e <= 2 * eb + atol * max(scale_ref, 1e-3), f"{impl} {dtype} {name}: {e:.3g} vs torch {eb:.3g}"


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
