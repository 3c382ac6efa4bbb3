"""Stop requests (SIGTERM, SIGUSR1) and time-based checkpoints, agreed by every rank at step boundaries.

Slurm delivers the warning signal (`#SBATCH --signal=B:USR1@N`, forwarded to the tasks by slurm/*.sbatch) or
SIGTERM (time limit, preemption) to each rank at a slightly different moment, usually in the middle of a step.
A rank must not stop on its own: the others would wait for it in the next collective. So the handler only
records the request, and after every optimizer step all ranks all-reduce (MAX) one small tensor
[stop requested, checkpoint due]: if any rank saw a signal, every rank finishes the same step, saves one
checkpoint together and leaves with REQUEUE_EXIT_CODE, which the sbatch script turns into `scontrol requeue`.
The wall-clock checkpoint timer is rank 0's, shared by the same all-reduce so every rank saves at the same step.
"""

from __future__ import annotations

import logging
import signal
import time

import torch

from r2d2ds import distributed as rd

log = logging.getLogger("r2d2ds")

# sysexits' EX_TEMPFAIL ("temporary failure, the user is invited to retry"): checkpoint written, requeue me.
REQUEUE_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised by the training loop after the stop checkpoint; train.py exits with REQUEUE_EXIT_CODE."""

    def __init__(self, step: int, signum: int) -> None:
        super().__init__(f"stopped at step {step} by {signal.Signals(signum).name}; checkpoint written")
        self.step, self.signum = step, signum


class StopControl:
    """Installs the stop-signal handlers on construction (main thread) and answers `poll()` collectively."""

    def __init__(self, ckpt_every_minutes: float, device: torch.device) -> None:
        self.device = device
        self.interval_s = ckpt_every_minutes * 60.0
        self.signum = 0
        self._last_save = time.monotonic()
        self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}

    def _on_signal(self, signum: int, frame) -> None:
        # Only record it: the step in flight finishes, then every rank agrees in poll(). DataLoader workers
        # forked after this inherit the handler, so a signal sent to the whole process tree is harmless there.
        if not self.signum:
            self.signum = signum

    def poll(self) -> tuple[bool, bool]:
        """(stop, checkpoint due) agreed by all ranks. Collective: every rank calls it after every step."""
        due = self.interval_s > 0 and rd.is_main_process() and time.monotonic() - self._last_save >= self.interval_s
        flags = rd.all_reduce_max(torch.tensor([float(self.signum), float(due)], device=self.device))
        stop_sig, due = flags.tolist()  # host sync: one 2-element all-reduce per optimizer step
        if stop_sig and not self.signum:
            self.signum = int(stop_sig)
        return bool(stop_sig), bool(due)

    def saved(self) -> None:
        self._last_save = time.monotonic()

    def close(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
