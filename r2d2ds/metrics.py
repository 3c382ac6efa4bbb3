"""Metric logging: namespaced keys (loss/*, perf/*, memory/*, data/*, eval/*) to metrics.jsonl and TensorBoard.

Values are accumulated as detached tensors between log steps and reduced across ranks once per log step, so the
hot loop never forces a host-device sync.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

from r2d2ds import distributed as rd


def peak_memory_gib() -> float:
    """Peak accelerator memory of this process; on the CPU the peak RSS (ru_maxrss is KiB on Linux)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MetricLogger:
    def __init__(self, run_dir: str | Path, monitor=None, flops_per_sample: float | None = None,
                 peak_tflops: float | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.monitor = monitor  # DeepSpeed's MonitorMaster (TensorBoard); writes on rank 0 only
        # r2d2ds.flops: model FLOPs of one rank per sample it trains on; the matmul rate MFU is measured against.
        self.flops_per_sample, self.peak_tflops = flops_per_sample, peak_tflops
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._skipped = 0
        self.skipped_total = 0
        self._t0 = time.perf_counter()
        self._samples = 0

    def accumulate(self, out: dict[str, torch.Tensor], samples: int, skipped: int) -> None:
        for k, v in out.items():
            if k == "loss" or not torch.is_tensor(v):
                continue
            v = v.detach().float()
            self._sums[k] = self._sums[k] + v if k in self._sums else v.clone()
        self._count += 1
        self._samples += samples
        self._skipped += skipped

    @property
    def pending(self) -> bool:
        """Micro steps accumulated since the last flush (the same on every rank)."""
        return self._count > 0

    def flush(self, step: int, lr: float, extra: dict[str, float] | None = None) -> dict[str, float]:
        """Reduce across ranks and write one record. Collective: every rank must call it."""
        keys = sorted(self._sums)
        if keys:
            stacked = torch.stack([self._sums[k] for k in keys]) / max(1, self._count)
            stacked = rd.all_reduce_mean(stacked)
            values = stacked.tolist()  # host sync: once per log step
        else:
            values = []
        counts = rd.all_reduce_sum(torch.tensor([float(self._samples), float(self._skipped)]))
        elapsed = time.perf_counter() - self._t0
        self.skipped_total += int(counts[1].item())
        record: dict[str, Any] = {"step": step, "lr": lr}
        record.update({k: float(v) for k, v in zip(keys, values)})
        record["perf/samples_per_s"] = float(counts[0].item()) / max(elapsed, 1e-9)
        if self.flops_per_sample:  # model TFLOP/s per device: the global rate split over the ranks
            record["perf/tflops"] = self.flops_per_sample * record["perf/samples_per_s"] / rd.get_world_size() / 1e12
            if self.peak_tflops:
                record["perf/mfu"] = record["perf/tflops"] / self.peak_tflops
        record["memory/peak_gib"] = peak_memory_gib()
        record["data/skipped"] = self.skipped_total
        if extra:
            record.update(extra)
        self.write(record)
        self._sums, self._count, self._samples, self._skipped = {}, 0, 0, 0
        self._t0 = time.perf_counter()
        return record

    def write(self, record: dict[str, Any]) -> None:
        if not rd.is_main_process():
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.monitor is not None and getattr(self.monitor, "enabled", False):
            step = record["step"]
            events = [(k, v, step) for k, v in record.items() if k != "step" and isinstance(v, (int, float))]
            self.monitor.write_events(events)
