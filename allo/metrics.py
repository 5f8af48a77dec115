"""Metric sinks (JSONL, CSV, the trackers of `train.report_to`) on rank 0, and per-step metric means that stay on the
device until a logging step reduces them all at once (one collective, one device-to-host copy per interval)."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable

import torch

from allo.tracking import Tracker


class RunningMeans:
    """Sum metrics over the micro-batches of one step, as device tensors: adding them never waits for the device."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, **values: torch.Tensor) -> None:
        for k, v in values.items():
            v = v.detach().float().mean()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1

    def take(self) -> dict[str, torch.Tensor]:
        """This step's means (device tensors), and a fresh start for the next step."""
        means = {k: v / self.counts[k] for k, v in self.sums.items()}
        self.sums, self.counts = {}, {}
        return means


def reduce_steps(strategy: Any, steps: list[dict[str, torch.Tensor]]) -> list[dict[str, float]]:
    """Collective: every pending step's means averaged over ranks, in one all-reduce on the device and one copy to
    the host (the one point of the training loop that waits for the device)."""
    keys = sorted(steps[0])
    table = torch.stack([torch.stack([s[k].to(torch.float64) for k in keys]) for s in steps])
    strategy.all_reduce(table, op="mean")  # collective
    return [dict(zip(keys, row)) for row in table.tolist()]


class MetricLogger:
    """metrics.jsonl (one record per logged step), metrics.csv and the `train.report_to` trackers; rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool = True, append: bool = False,
                 trackers: Callable[[], list[Tracker]] = list):
        """`append`: a resumed run continues the files; a fresh run replaces them. `trackers` opens the trackers
        (`allo.tracking.open_trackers`), on rank 0 only."""
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self._csv_fields: list[str] | None = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        mode = "a" if append else "w"
        self._jsonl = open(self.out_dir / "metrics.jsonl", mode)
        self._csv = open(self.out_dir / "metrics.csv", mode, newline="")
        self._trackers = trackers()

    def log(self, values: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._csv_fields is None:
            self._csv_fields = list(record)
            if self._csv.tell() == 0:
                csv.writer(self._csv).writerow(self._csv_fields)
        csv.writer(self._csv).writerow([record.get(k, "") for k in self._csv_fields])
        self._csv.flush()
        for t in self._trackers:
            t.log(values, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        self._csv.close()
        for t in self._trackers:
            t.finish()
        self.enabled = False


def peak_rss_mb() -> float:
    """This process's peak resident set (MiB) since it started or since `reset_peak_memory`: VmHWM. Not getrusage's
    ru_maxrss, which Linux carries over exec from the forking parent and which no reset lowers."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory (MiB) of the run's device since the last `reset_peak_memory`: CUDA's allocator peak on a GPU, the
    process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return peak_rss_mb()


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring the peak from now, so that each stage of one `allo run` process reports its own peak, not an
    earlier stage's. On the CPU, Linux resets VmHWM to the current resident set on `5` in /proc/self/clear_refs."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux: the peak then counts from the process start
        pass
