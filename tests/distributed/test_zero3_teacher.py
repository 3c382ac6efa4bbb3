"""The EMA teacher under ZeRO-3 on 2 gloo ranks: partitioned like the student, updated shard by shard.

Each rank builds the same tiny R2D2Pretraining, wraps it in a DeepSpeed engine (ZeRO-1 or ZeRO-3, fp32, AdamW),
places an EMATeacher and trains a few steps on rank-specific batches; the teacher's forward feeds TgD and FgD.
Under ZeRO-3 the teacher must hold only its partition, its EMA weights must equal ZeRO-1's (whole teacher, no
partitioning) to fp32 round-off, its checkpoint must restore it bit for bit, and the per-module state dict
(the export path) must equal ZeRO-1's whole parameters.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_ranks
from tests.models.tiny import MASK, PAD, SPECIALS, VOCAB, no_dropout, tiny_batch, tiny_loss_config, tiny_model_config

STEPS = 3
pytestmark = pytest.mark.slow  # three 2-rank DeepSpeed runs


def _ds_config(stage: int, world: int, persistence: int | None) -> dict:
    zero = {"stage": stage}
    if stage == 3 and persistence is not None:
        zero["stage3_param_persistence_threshold"] = persistence
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2 * world,
            "zero_optimization": zero, "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0,
            "steps_per_print": 10**9}


def _train(rank: int, world: int, stage: int, persistence: int | None) -> dict:
    import deepspeed

    from r2d2ds.distributed.zero import is_partitioned, state_dict_by_module
    from r2d2ds.losses.objective import R2D2Pretraining
    from r2d2ds.models.ema import ema_update_, make_teacher
    from r2d2ds.teacher import EMATeacher

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    module = R2D2Pretraining(no_dropout(tiny_model_config()), tiny_loss_config(tgd_alpha=0.4), VOCAB, PAD, MASK,
                             SPECIALS)
    teacher = EMATeacher(module.model, momentum=0.8)
    reference = make_teacher(module.model)  # a whole teacher updated from the gathered student, by hand
    # SGD, not Adam: Adam turns the fp32 round-off between the stages' gradient reductions into lr-sized steps
    # for parameters whose gradient is ~0 (attention key biases), which would hide the EMA under that noise.
    sgd = torch.optim.SGD(module.parameters(), lr=0.05)
    engine, *_ = deepspeed.initialize(model=module, optimizer=sgd, config=_ds_config(stage, world, persistence))
    teacher.place(engine)
    losses = []
    for step in range(STEPS):
        batch = tiny_batch(b=2, seed=100 * step + rank)
        out = engine(batch, teacher.module, 1000 * step + rank)
        engine.backward(out["loss"])
        engine.step()
        teacher.update(engine.module.model)
        student = state_dict_by_module(engine.module.model, to_cpu_rank=None)
        ema_update_(reference, [student[n] for n, _ in reference.named_parameters()], 0.8)
        losses.append({k: float(v) for k, v in out.items() if k.startswith("loss/")})
    res = {"losses": losses, "numel": teacher.numel(), "partitioned": teacher.partitioned,
           "n_params": len(list(teacher.module.parameters()))}
    res["teacher"] = state_dict_by_module(teacher.module, to_cpu_rank=None)
    res["reference"] = {n: p.detach().clone() for n, p in reference.named_parameters()}
    res["student"] = state_dict_by_module(engine.module.model, to_cpu_rank=0)
    if stage == 3:
        res["all_partitioned"] = all(is_partitioned(p) and p.data.numel() == 0 for p in teacher.module.parameters())
        # Checkpoint round trip: save, move on one more EMA step, restore; the teacher must be back bit for bit.
        shared, mine = teacher.state_dict(), teacher.rank_state_dict()
        batch = tiny_batch(b=2, seed=999 + rank)
        engine.backward(engine(batch, teacher.module, 7)["loss"])
        engine.step()
        teacher.update(engine.module.model)
        moved = state_dict_by_module(teacher.module, to_cpu_rank=None)
        teacher.load_state_dict(shared, mine)
        res["moved"] = moved
        res["restored"] = state_dict_by_module(teacher.module, to_cpu_rank=None)
        # A checkpoint of another world size is refused with a clear error.
        try:
            teacher.load_state_dict(dict(shared, world_size=world + 1), mine)
            res["world_check"] = "accepted"
        except ValueError as e:
            res["world_check"] = str(e)
    return res


@pytest.fixture(scope="module")
def runs():
    return {1: run_ranks(_train, 2, 1, None), 3: run_ranks(_train, 2, 3, None),
            "3p0": run_ranks(_train, 2, 3, 0)}


@pytest.mark.parametrize("which", [1, 3, "3p0"])
def test_teacher_equals_the_ema_of_the_gathered_student(runs, which):
    """Shard-by-shard lerp == the whole-tensor EMA of the same student trajectory, on every rank."""
    for res in runs[which]:
        for name, want in res["reference"].items():
            torch.testing.assert_close(res["teacher"][name], want, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("which", [3, "3p0"])
def test_zero3_teacher_matches_zero1(runs, which):
    """Same EMA teacher (and losses, which the teacher feeds through TgD/FgD) as the whole teacher of ZeRO-1.
    "3p0": the student's small parameters partitioned too (persistence threshold 0); 3: DeepSpeed's default
    keeps them whole on every rank, the teacher still partitions them."""
    ref, got = runs[1][0], runs[which][0]
    assert not ref["partitioned"] and got["partitioned"]
    assert sorted(got["teacher"]) == sorted(ref["teacher"])
    for name, want in ref["teacher"].items():
        torch.testing.assert_close(got["teacher"][name], want, rtol=1e-5, atol=1e-6, msg=name)
    for a, b in zip(ref["losses"], got["losses"]):
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
    # The teacher did move away from its initial copy and differs from the student.
    s = ref["student"]
    assert any(not torch.allclose(s[n], ref["teacher"][n]) for n in s if n in ref["teacher"])


def test_zero3_teacher_holds_only_its_partition(runs):
    for r, res in enumerate(runs[3]):
        held, total = res["numel"]
        assert res["all_partitioned"], f"rank {r}: a teacher parameter is whole on the rank"
        # ceil(numel / 2) per parameter: at most one padding element per parameter beyond half.
        assert total / 2 <= held <= total / 2 + res["n_params"], (r, held, total)
    held1, total1 = runs[1][0]["numel"]
    assert held1 == total1  # ZeRO-1 keeps the whole teacher


def test_zero3_teacher_checkpoint_restores_exactly(runs):
    for res in runs[3]:
        assert any(not torch.equal(res["moved"][n], res["teacher"][n]) for n in res["teacher"])
        for name, want in res["teacher"].items():
            assert torch.equal(res["restored"][name], want), name
        assert "world size" in res["world_check"]


def test_state_dict_by_module_is_the_whole_state_dict(runs):
    """The export path under ZeRO-3 (one module gathered at a time) gives ZeRO-1's whole parameters."""
    ref, got = runs[1][0]["student"], runs[3][0]["student"]
    assert sorted(got) == sorted(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    assert runs[3][1]["student"] == {}  # only rank 0 keeps host copies
