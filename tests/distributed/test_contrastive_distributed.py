"""contrastive_loss and sample_hard_negatives on gloo ranks against one process on the concatenated batch.

Gradient invariant (DESIGN.md section 3): each rank's gradient w.r.t. its local embeddings is world x the
single-process gradient of the global loss on those rows, and the rank-average of d(logit_scale) is the
single-process one, for equal and uneven local batches; open_clip ClipLoss(local_loss, gather_with_grad)
parity on 2 ranks; the sampler returns global indices whose owner is the rank holding the drawn row.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from r2d2ds.kernels import contrastive_loss, sample_hard_negatives
from r2d2ds.kernels.contrastive_loss import contrastive_loss_reference

from tests.dist_utils import run_ranks

SCALE = 1 / 0.07
# gloo ranks hold CPU tensors: the Triton impl runs there only in the interpreter (set by conftest on CPU-only
# machines; on a GPU machine the kernel tests cover Triton natively).
TRITON_CPU = os.environ.get("TRITON_INTERPRET") == "1"
IMPLS = ["reference", "torch"] + (["triton"] if TRITON_CPU else [])
# The Triton impl's previous path (R2D2DS_CONTRASTIVE_FWD=rows, _BWD=tiles), selectable until a GPU times both.
BWD_IMPLS = IMPLS + (["triton:rows:tiles"] if TRITON_CPU else [])
# (name, sizes per rank of a 2-rank run, labels?, teacher alpha)
CASES_2 = [("diag", [24, 24], False, 0.0), ("groups-teacher", [24, 24], True, 0.4),
           ("uneven", [13, 35], True, 0.4)]


def make_global(n: int, d: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    emb = [F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1) for _ in range(4)]
    labels = torch.randint(0, n // 3, (n,), generator=gen)
    return emb, labels


def single_process(emb, labels, alpha):
    """float64 global loss and its gradients on the concatenated batch."""
    img, txt = (e.clone().requires_grad_() for e in emb[:2])
    s = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    kw = dict(teacher_image_emb=emb[2], teacher_text_emb=emb[3], alpha=alpha) if alpha else {}
    loss = contrastive_loss_reference(img, txt, s, labels, **kw)
    return (loss.detach(), *torch.autograd.grad(loss, [img, txt, s]))


def _rank_cases(rank: int, world: int, impl: str, cases: list) -> list:
    """Every case on this rank: (loss, d_image, d_text, d_scale) of its local slice."""
    impl, *path = impl.split(":")
    if path:  # this rank process only
        os.environ["R2D2DS_CONTRASTIVE_FWD"], os.environ["R2D2DS_CONTRASTIVE_BWD"] = path
    out = []
    for emb, labels, sizes, use_labels, alpha in cases:
        off = sum(sizes[:rank])
        sl = slice(off, off + sizes[rank])
        img, txt = (e[sl].float().requires_grad_() for e in emb[:2])
        s = torch.tensor(SCALE, requires_grad=True)
        kw = dict(teacher_image_emb=emb[2][sl].float(), teacher_text_emb=emb[3][sl].float(), alpha=alpha)
        loss = contrastive_loss(img, txt, s, labels[sl] if use_labels else None, impl=impl,
                                **(kw if alpha else {}))
        loss.backward()
        out.append((loss.detach(), img.grad, txt.grad, s.grad))
    return out


def check_invariant(results, emb, labels, sizes, alpha, name):
    world = len(sizes)
    ref = single_process(emb, labels, alpha)
    d_scale = sum(r[3] for r in results) / world  # what data-parallel averaging gives the shared scale
    torch.testing.assert_close(d_scale.double(), ref[3], rtol=1e-5, atol=1e-6, msg=f"{name}: d_scale")
    for rank, (_, d_img, d_txt, _) in enumerate(results):
        off = sum(sizes[:rank])
        sl = slice(off, off + sizes[rank])
        torch.testing.assert_close(d_img.double(), world * ref[1][sl], rtol=1e-4, atol=1e-6,
                                   msg=f"{name}: d_image rank {rank}")
        torch.testing.assert_close(d_txt.double(), world * ref[2][sl], rtol=1e-4, atol=1e-6,
                                   msg=f"{name}: d_text rank {rank}")
    if min(sizes) == max(sizes):  # equal batches: the rank-mean of the local losses is the global loss
        mean = sum(r[0] for r in results) / world
        torch.testing.assert_close(mean.double(), ref[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", BWD_IMPLS)
def test_gradient_invariant_two_ranks(impl):
    cases, meta = [], []
    for i, (name, sizes, use_labels, alpha) in enumerate(CASES_2):
        emb, labels = make_global(sum(sizes), 32, seed=i)
        cases.append((emb, labels, sizes, use_labels, alpha))
        meta.append((name, emb, labels if use_labels else None, sizes, alpha))
    per_rank = run_ranks(_rank_cases, 2, impl, cases)
    for i, (name, emb, labels, sizes, alpha) in enumerate(meta):
        check_invariant([per_rank[r][i] for r in range(2)], emb, labels, sizes, alpha, f"{impl}/{name}")


def test_gradient_invariant_three_ranks_torch():
    sizes = [10, 17, 9]
    emb, labels = make_global(sum(sizes), 24, seed=9)
    per_rank = run_ranks(_rank_cases, 3, "torch", [(emb, labels, sizes, True, 0.4)])
    check_invariant([r[0] for r in per_rank], emb, labels, sizes, 0.4, "torch/3 ranks")


def _open_clip_vs_ours(rank: int, world: int, emb) -> list:
    from open_clip.loss import ClipLoss

    b = emb[0].shape[0] // world
    sl = slice(rank * b, (rank + 1) * b)
    grads = []
    for fn in ["open_clip", *IMPLS[1:]]:
        img, txt = (e[sl].float().requires_grad_() for e in emb[:2])
        s = torch.tensor(SCALE, requires_grad=True)
        if fn == "open_clip":
            loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(img, txt, s)
        else:
            loss = contrastive_loss(img, txt, s, impl=fn)
        loss.backward()
        grads.append((loss.detach(), img.grad, txt.grad, s.grad))
    return grads


def test_open_clip_parity_two_ranks():
    pytest.importorskip("open_clip.loss", reason="pip install open-clip-torch")
    emb, _ = make_global(40, 32, seed=21)
    for rank, (theirs, *ours) in enumerate(run_ranks(_open_clip_vs_ours, 2, emb)):
        for impl, mine in zip(IMPLS[1:], ours):
            for name, a, b in zip(["loss", "d_image", "d_text", "d_scale"], mine, theirs):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"{impl} rank {rank} {name}")


def _rank_sample(rank: int, world: int, impl: str, emb, labels, sizes, scale) -> tuple:
    off = sum(sizes[:rank])
    sl = slice(off, off + sizes[rank])
    img, txt = emb[0][sl].float(), emb[1][sl].float()
    draws = sample_hard_negatives(img, txt, scale, labels[sl], impl=impl, seed=5)
    if impl == "reference":  # the naive loss has no sampling pass
        return draws, draws
    loss_draws = contrastive_loss(img, txt, scale, labels[sl], impl=impl, return_negatives=True, seed=5)[1:]
    return draws, loss_draws


@pytest.mark.parametrize("impl", IMPLS)
def test_sampler_global_indices_two_ranks(impl):
    """At a huge scale the Gumbel noise cannot reorder rows, so the draw is the global arg-max over negatives:
    the returned index must be exactly that global (rank-major) index, which often lives on the other rank."""
    sizes = [21, 27]
    emb, labels = make_global(sum(sizes), 32, seed=3)
    scale = 1e5
    s = emb[0] @ emb[1].T  # (N, N) float64
    pos = labels[:, None] == labels[None, :]
    want_t = s.masked_fill(pos, float("-inf")).argmax(1)  # text for each image
    want_i = s.T.masked_fill(pos, float("-inf")).argmax(1)  # image for each text
    per_rank = run_ranks(_rank_sample, 2, impl, emb, labels, sizes, scale)
    got_t = torch.cat([r[0][0] for r in per_rank])
    got_i = torch.cat([r[0][1] for r in per_rank])
    assert torch.equal(got_t, want_t) and torch.equal(got_i, want_i)
    owner = (want_t >= sizes[0]).long()
    assert owner[: sizes[0]].any() and (1 - owner[sizes[0]:]).any()  # both ranks draw across the boundary
    if impl != "reference":  # the loss pass draws the same numbers as the standalone sampler
        for draws, loss_draws in per_rank:
            assert torch.equal(draws[0], loss_draws[0]) and torch.equal(draws[1], loss_draws[1])
