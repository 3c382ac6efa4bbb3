"""r2d2ds.distributed.overlap on 2 gloo ranks: the gradient average overlapped with the backward equals the
average of the ranks' local gradients (several buckets, gradient accumulation, a parameter no rank reaches, one
only rank 0 reaches: zeros stand in for the missing gradients, as in DeepSpeed's reduction), and inside a
ZeRO-0 fp32 DeepSpeed engine it trains the same parameters as DeepSpeed's own post-backward reduction."""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_ranks


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3))


def _loss(model: torch.nn.Module, rank: int, micro: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10 * rank + micro)
    x, y = torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)
    return ((model(x) - y) ** 2).mean()


def _reducer_vs_local(rank: int, world: int, accum: int) -> dict:
    import torch.distributed as dist

    from r2d2ds.distributed.overlap import OverlappedGradAverage

    model, local = _model(), _model()
    unused = torch.nn.Parameter(torch.ones(4))  # in the reducer, never in the graph: its bucket finishes late
    only0 = torch.nn.Parameter(torch.arange(3.0))  # reached by rank 0's step only: rank 1 must not hang
    params = [only0, *model.parameters(), unused]
    micro = {"n": 0}
    reducer = OverlappedGradAverage(params, lambda: (micro["n"] + 1) % accum == 0, bucket_elems=40)
    for m in range(accum):
        extra = (only0 ** 2).sum() if rank == 0 else 0.0
        (_loss(model, rank, m) + extra).backward()
        _loss(local, rank, m).backward()
        micro["n"] += 1
        if m < accum - 1:  # before the boundary the gradients stay this rank's own
            assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), local.parameters()))
    expected = []
    for q in local.parameters():  # the reference: all-reduce after the backward, then average
        g = q.grad.clone()
        dist.all_reduce(g)
        expected.append(g / world)
    got = [p.grad for p in model.parameters()]
    return {"buckets": len(reducer.buckets), "max_err": max(float((a - b).abs().max()) for a, b in zip(got, expected)),
            "differs_from_local": any(not torch.equal(a, q.grad) for a, q in zip(got, local.parameters())),
            "unused_grad": unused.grad, "only0_grad": only0.grad, "pending": len(reducer._pending)}


@pytest.mark.parametrize("accum", [1, 3])
def test_overlapped_average_equals_the_average_of_local_gradients(accum):
    for res in run_ranks(_reducer_vs_local, 2, accum):
        assert res["buckets"] >= 4  # 454 elements in buckets of <= 40 (a larger tensor gets its own)
        assert res["max_err"] < 1e-6, res
        assert res["differs_from_local"] and res["pending"] == 0
        assert torch.equal(res["unused_grad"], torch.zeros(4))
        # rank 0's d/dx sum(x^2) = 2x per micro step, rank 1's zeros: the average is accum x x on both ranks
        torch.testing.assert_close(res["only0_grad"], accum * torch.arange(3.0))


def _engine_steps(rank: int, world: int, overlap: bool) -> dict:
    import os

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.getcwd(), ".cache", "torch_extensions"))
    import deepspeed

    from r2d2ds.distributed.overlap import overlap_grad_average

    deepspeed.init_distributed(dist_backend="gloo")
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 5, "gradient_accumulation_steps": 2, "train_batch_size": 10 * world,
              "zero_optimization": {"stage": 0}, "gradient_clipping": 1.0, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    reducer = overlap_grad_average(engine) if overlap else None
    for micro in range(6):  # 3 optimizer steps of 2 micro steps
        loss = _loss(engine.module, rank, micro)
        engine.backward(loss)
        engine.step()
    return {"reducer": reducer is not None, "allreduce_by_engine": engine.enable_backward_allreduce,
            "params": [p.detach().clone() for p in engine.module.parameters()]}


@pytest.mark.slow
def test_zero0_engine_trains_the_same_with_the_overlapped_average():
    ours = run_ranks(_engine_steps, 2, True)
    theirs = run_ranks(_engine_steps, 2, False)
    assert ours[0]["reducer"] and not ours[0]["allreduce_by_engine"] and theirs[0]["allreduce_by_engine"]
    for a, b in zip(ours[0]["params"], theirs[0]["params"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours[0]["params"], ours[1]["params"]):  # the ranks stay in step
        assert torch.equal(a, b)
