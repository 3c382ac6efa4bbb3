"""share_fp32_master (r2d2ds/engine.py): in fp32 training the ZeRO optimizer steps the parameters' own partition.

On 2 gloo ranks, ZeRO 1/2/3, fp32, DeepSpeed's AdamW (torch's fused CPU AdamW, as the trainer configures it) with
gradient clipping: an engine whose master partition is aliased to the parameters must train to the same parameters
bit for bit as DeepSpeed's cloning engine, hold no master copy, and resume from its own checkpoint exactly.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_ranks
from tests.models.tiny import MASK, PAD, SPECIALS, VOCAB, no_dropout, tiny_batch, tiny_loss_config, tiny_model_config

pytestmark = pytest.mark.slow  # 2-rank DeepSpeed runs


def _config(stage: int, world: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2 * world,
            "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0, "steps_per_print": 10**9,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01, "torch_adam": True,
                                                      "fused": True}}}


def _masters(engine) -> list[torch.Tensor]:
    opt = engine.optimizer
    return list(getattr(opt, "single_partition_of_fp32_groups", None) or opt.fp32_partitioned_groups_flat)


def _param_storages(engine) -> set[int]:
    out = set()
    for p in engine.module.parameters():
        for t in (p.data, getattr(p, "ds_tensor", None)):
            if t is not None and t.untyped_storage().nbytes() > 0:
                out.add(t.untyped_storage().data_ptr())
    return out


def _step(engine, i: int, rank: int) -> None:
    out = engine(tiny_batch(b=2, seed=100 * i + rank), None, 1000 * i + rank)
    engine.backward(out["loss"])
    engine.step()


def _train(rank: int, world: int, stage: int, ckpt: str) -> dict:
    import deepspeed

    from r2d2ds.distributed.zero import state_dict_by_module
    from r2d2ds.engine import share_fp32_master
    from r2d2ds.losses.objective import R2D2Pretraining

    deepspeed.init_distributed(dist_backend="gloo")
    res = {}
    for shared in (False, True):
        torch.manual_seed(0)
        module = R2D2Pretraining(no_dropout(tiny_model_config()), tiny_loss_config(), VOCAB, PAD, MASK, SPECIALS)
        engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(),
                                          config=_config(stage, world))
        freed = share_fp32_master(engine) if shared else 0
        params = _param_storages(engine)
        in_params = [m.untyped_storage().data_ptr() in params for m in _masters(engine)]
        # ZeRO-1/2's per-parameter lp -> hp views must follow the master (else they keep the clone alive, stale).
        fragments = [p._hp_mapping.hp_fragment for p in engine.module.parameters()
                     if getattr(p, "_hp_mapping", None) is not None]
        res[f"{'shared' if shared else 'cloned'}_fragments_in_params"] = [
            f.untyped_storage().data_ptr() in params for f in fragments]

        for i in range(3):
            _step(engine, i, rank)
        key = "shared" if shared else "cloned"
        res[key] = state_dict_by_module(engine.module.model, to_cpu_rank=None)
        res[f"{key}_freed"], res[f"{key}_in_params"] = freed, in_params
        res[f"{key}_numel"] = sum(m.numel() for m in _masters(engine))
        if shared:  # resume: save, step on, load, the same step again
            engine.save_checkpoint(ckpt, tag="t")
            _step(engine, 3, rank)
            res["after"] = state_dict_by_module(engine.module.model, to_cpu_rank=None)
            _step(engine, 4, rank)
            engine.load_checkpoint(ckpt, tag="t")
            res["restored"] = state_dict_by_module(engine.module.model, to_cpu_rank=None)
            res["restored_in_params"] = [m.untyped_storage().data_ptr() in _param_storages(engine)
                                         for m in _masters(engine)]
            _step(engine, 3, rank)
            res["again"] = state_dict_by_module(engine.module.model, to_cpu_rank=None)
        del engine, module
    return res


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_shared_master_trains_and_resumes_like_the_clone(stage, tmp_path):
    for rank, res in enumerate(run_ranks(_train, 2, stage, str(tmp_path / "ckpt"))):
        # The clones are gone: 4 bytes per element of this rank's partition, and the master IS the parameters.
        assert res["shared_freed"] == 4 * res["shared_numel"] > 0, (rank, res["shared_freed"])
        assert all(res["shared_in_params"]) and all(res["restored_in_params"])
        assert not any(res["cloned_in_params"])  # DeepSpeed's own engine clones (what we remove)
        assert all(res["shared_fragments_in_params"]) and not any(res["cloned_fragments_in_params"])
        assert len(res["shared_fragments_in_params"]) > 0 or stage == 3  # ZeRO-3 keeps no such views
        for name, want in res["cloned"].items():
            assert torch.equal(res["shared"][name], want), (rank, name)
        # The parameters moved in the step after the save, the load brought them back, and the step replays.
        assert any(not torch.equal(res["after"][n], res["shared"][n]) for n in res["shared"])
        for name, want in res["shared"].items():
            assert torch.equal(res["restored"][name], want), (rank, name)
        for name, want in res["after"].items():
            assert torch.equal(res["again"][name], want), (rank, name)
