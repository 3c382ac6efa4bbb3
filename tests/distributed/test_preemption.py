"""Stop signals and time-based checkpoints are agreed by every rank (the Slurm test covers the whole path)."""

from __future__ import annotations

import os
import signal
import time

import torch

from r2d2ds.preemption import STOP_SIGNALS, StopControl
from tests.dist_utils import run_ranks


def test_signal_is_recorded_not_fatal_and_handlers_are_restored():
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    stop = StopControl(ckpt_every_minutes=0, device=torch.device("cpu"))
    try:
        assert stop.poll() == (False, False)
        os.kill(os.getpid(), signal.SIGUSR1)  # would terminate the process without the handler
        time.sleep(0.05)
        assert stop.poll() == (True, False)
        assert stop.signum == signal.SIGUSR1
    finally:
        stop.close()
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before


def test_checkpoint_timer_fires_after_the_interval_and_restarts_on_save():
    stop = StopControl(ckpt_every_minutes=0.2 / 60, device=torch.device("cpu"))  # 0.2 s
    try:
        assert stop.poll() == (False, False)
        time.sleep(0.3)
        assert stop.poll() == (False, True)
        stop.saved()
        assert stop.poll() == (False, False)
    finally:
        stop.close()


def _agree(rank: int, world: int) -> list[tuple[bool, bool]]:
    # Rank 1 alone receives SIGTERM; only rank 0's clock says a checkpoint is due. Both must see both.
    stop = StopControl(ckpt_every_minutes=0.2 / 60 if rank == 0 else 1000.0, device=torch.device("cpu"))
    try:
        first = stop.poll()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.4)
        return [first, stop.poll()]
    finally:
        stop.close()


def test_every_rank_stops_and_checkpoints_at_the_same_step():
    results = run_ranks(_agree, 2)
    assert results[0] == results[1] == [(False, False), (True, True)]
