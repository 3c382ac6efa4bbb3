"""Every collective the trainer, eval and the losses issue is legal under NCCL (its tensors on CUDA).

Two gloo ranks run the training objective (every loss term, the torch and the Triton contrastive paths), the
hard-negative sampler over both ranks, the metric logger's flush, the retrieval eval and the cross-rank helpers
directly, with the backend reported as NCCL and CUDA simulated (tests/distributed/fake_nccl.py): a CPU tensor
handed to a collective there is exactly what raises at the first log step of a multi-GPU run. A static scan then
checks that no module issues a torch.distributed collective outside `r2d2ds/distributed/` and that every
collective call there was exercised.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import r2d2ds  # noqa: F401  (torchvision shim first)
from tests.dist_utils import run_ranks
from tests.distributed.fake_nccl import COLLECTIVES, FakeNccl

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
LOSS = dict(gcpr_weight=1.0, tgd_weight=1.0, tgd_alpha=0.4, fgr_weight=1.0, fgd_weight=1.0, mlm_weight=1.0)


def _objective(impl: str):
    from r2d2ds.losses import R2D2Pretraining
    from r2d2ds.models import make_teacher
    from tests.models.tiny import MASK, PAD, SPECIALS, VOCAB, no_dropout, tiny_loss_config, tiny_model_config

    torch.manual_seed(0)
    mc = no_dropout(tiny_model_config())
    mc.contrastive_impl = impl
    obj = R2D2Pretraining(mc, tiny_loss_config(**LOSS), VOCAB, PAD, MASK, SPECIALS)
    return obj, make_teacher(obj.model)


def _train_log_eval(rank: int, world: int) -> None:
    """What one training step, one log step and one eval issue, plus the helpers at uneven sizes."""
    from r2d2ds.kernels import sample_hard_negatives

    from r2d2ds import distributed as rd
    from r2d2ds.config import EvalConfig
    from r2d2ds.distributed import collectives as rc
    from r2d2ds.eval import evaluate
    from r2d2ds.metrics import MetricLogger
    from tests.models.tiny import tiny_batch
    from tests.test_eval import tiny_model, tiny_split

    with tempfile.TemporaryDirectory() as run_dir:
        logger = MetricLogger(run_dir)
        for impl in ("torch", "triton"):
            obj, teacher = _objective(impl)
            out = obj(tiny_batch(b=3 + rank, seed=rank), teacher, seed=rank)  # uneven rows per rank
            out["loss"].backward()
            logger.accumulate(out, samples=3 + rank, skipped=rank)
            # The sampler over the whole group (FGR's negatives are local today; the global exchange is next).
            emb = torch.nn.functional.normalize(torch.randn(2, 3 + rank, 16), dim=-1)
            sample_hard_negatives(emb[0], emb[1], 10.0, torch.arange(3 + rank) // 2, impl=impl, seed=rank)
        logger.flush(step=1, lr=1e-4)
    evaluate(tiny_model(), tiny_split(n_img=3, caps=2), EvalConfig(topk=2, batch_size=2))

    # ZeRO-0's overlapped gradient average (r2d2ds/distributed/overlap.py), one backward at a boundary
    from r2d2ds.distributed.overlap import OverlappedGradAverage

    # (its hooks run inside autograd's backward, where this checker's TorchFunctionMode is not active, so its
    # launch/finish are driven directly here: the same calls the hooks make)
    lin = torch.nn.Linear(4, 3)
    reducer = OverlappedGradAverage(list(lin.parameters()), lambda: True, bucket_elems=8)
    for p in lin.parameters():
        p.grad = torch.randn_like(p)
    reducer._active = True
    while reducer._next < len(reducer.buckets):
        reducer._launch()
    reducer._finish()
    assert lin.weight.grad.device == lin.weight.device
    reducer.remove()

    x = torch.randn(3, 4)
    rd.all_reduce_mean(x)
    rd.all_reduce_sum(x)
    rd.all_reduce_max(x)
    rows = 2 + rank  # uneven rows per rank
    x = torch.randn(rows, 4)
    rd.all_gather_variable(x)
    sizes = rc.gather_sizes(rows)
    rc.all_gather_rows(x, sizes)
    rc.reduce_scatter_rows(torch.randn(sum(sizes), 4), sizes)


def _checked(rank: int, world: int):
    torch.set_num_threads(1)
    with FakeNccl() as fake:  # the checker's own guarantee: it flags a CPU tensor and accepts a "CUDA" one
        dist.all_reduce(torch.ones(1))
        dist.all_reduce(torch.ones(1, device="cuda"))
    selftest = fake.violations
    with FakeNccl() as fake:
        _train_log_eval(rank, world)
    return selftest, fake.violations, fake.sites


@pytest.mark.parametrize("backend, device", [("nccl", "cuda:0"), ("cpu:gloo,cuda:nccl", "cuda:0"), ("gloo", "cpu"),
                                             ("mpi", "cpu")])
def test_comm_device_follows_the_backend(monkeypatch, backend, device):
    from r2d2ds import distributed as rd

    monkeypatch.setattr(rd, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert rd.comm_device() == torch.device(device)


def test_comm_device_refuses_an_unknown_backend(monkeypatch):
    from r2d2ds import distributed as rd

    monkeypatch.setattr(rd, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "ucc")
    with pytest.raises(ValueError, match="'ucc'"):
        rd.comm_device()


def test_single_process_helpers_copy_and_stay_on_the_callers_device():
    from r2d2ds import distributed as rd

    t = torch.ones(3)
    out = rd.all_reduce_sum(t)
    out += 1  # a copy: the caller's tensor is untouched
    assert torch.equal(t, torch.ones(3)) and rd.comm_device() == torch.device("cpu")


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_checked, WORLD)


@pytest.mark.slow  # two spawned ranks, the objective twice (torch + interpreted Triton): ~1 min
def test_checker_flags_cpu_tensors(ranks):
    for selftest, _, _ in ranks:
        assert len(selftest) == 1 and selftest[0][0] == "all_reduce" and selftest[0][2] == "cpu", selftest


@pytest.mark.slow  # two spawned ranks, the objective twice (torch + interpreted Triton): ~1 min
def test_no_collective_is_illegal_under_nccl(ranks):
    for rank, (_, violations, _) in enumerate(ranks):
        shown = "\n".join(f"  {name} at {site} (for {origin}): a {dev} tensor"
                           for name, site, dev, origin in dict.fromkeys(violations))
        assert not violations, f"rank {rank}: collectives NCCL would refuse (it needs CUDA tensors):\n{shown}"


_CALL = re.compile(r"\bdist\.(" + "|".join(COLLECTIVES) + r")\(")


def _static_call_sites() -> dict[str, str]:
    """{path:line: collective} of every torch.distributed collective call in the package and the kernels."""
    found = {}
    for folder in ("r2d2ds", "kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                m = _CALL.search(line.split("#")[0])
                if m:
                    found[f"{path.relative_to(ROOT)}:{i}"] = m.group(1)
    return found


@pytest.mark.slow  # two spawned ranks, the objective twice (torch + interpreted Triton): ~1 min
def test_collectives_live_in_distributed_and_are_all_exercised(ranks):
    calls = _static_call_sites()
    outside = [site for site in calls if not site.startswith("r2d2ds/distributed/")]
    assert not outside, f"collectives issued outside r2d2ds/distributed (use its helpers and comm_device): {outside}"
    seen = {str(Path(site.rsplit(":", 1)[0]).resolve().relative_to(ROOT)) + ":" + site.rsplit(":", 1)[1]
            for _, _, sites in ranks for site in sites if site.startswith(str(ROOT))}
    missed = sorted(set(calls) - seen)
    assert not missed, f"collective calls this test never ran (extend _train_log_eval to reach them): {missed}"
