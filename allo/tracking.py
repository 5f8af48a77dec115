"""Experiment trackers (`train.report_to`): TensorBoard, Weights & Biases and Trackio behind one `log(values, step)`.

Each training stage is one tracker run named after the stage, grouped by the pipeline run (the recipe's
output_dir), so a run's stages sit together in wandb's and Trackio's group views; eval results are one more run
of the group. A resumed stage continues its tracker run (wandb's run id and Trackio's run name are kept in
STAGE_DIR/tracking.json) instead of starting a second one. Trackers run on rank 0 only; their own environment
settings apply (WANDB_MODE=offline, WANDB_API_KEY, TRACKIO_DIR, ...).
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import typing
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

from allo.config import Tracker
from allo.io import atomic_write_text

BACKENDS = typing.get_args(Tracker)  # each backend's name is also the package (and module) it needs


class Tracker(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...

    def finish(self) -> None: ...


def missing(report_to: Sequence[str]) -> list[str]:
    """The backends of `report_to` whose package is not installed."""
    return [b for b in report_to if importlib.util.find_spec(b) is None]


def check_installed(report_to: Sequence[str], knob: str = "train.report_to") -> None:
    absent = missing(report_to)
    if absent:
        unavailable = missing(BACKENDS)
        have = [b for b in BACKENDS if b not in unavailable]
        raise RuntimeError(f"{knob}: {', '.join(absent)} {'is' if len(absent) == 1 else 'are'} not installed "
                           f"(pip install {' '.join(absent)}), or drop "
                           f"{'it' if len(absent) == 1 else 'them'} from {knob}; installed: {', '.join(have) or 'none'}")


class _TensorBoard:
    def __init__(self, out_dir: Path, resume: bool):
        from torch.utils.tensorboard import SummaryWriter

        if not resume:  # a fresh run replaces the events of an earlier one
            shutil.rmtree(out_dir / "tb", ignore_errors=True)
        self.writer = SummaryWriter(str(out_dir / "tb"))

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def finish(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, out_dir: Path, project: str, group: str, name: str, config: dict, run_id: str, resume: bool):
        import wandb

        self.run = wandb.init(project=project, group=group, name=name, id=run_id, dir=str(out_dir), config=config,
                              resume="allow" if resume else "never", reinit="create_new")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def finish(self) -> None:
        self.run.finish()


class _Trackio:
    def __init__(self, project: str, group: str, name: str, config: dict, resume: bool):
        import trackio

        self.run = trackio.init(project=project, name=f"{group}/{name}", group=group, config=config,
                                resume="allow" if resume else "never", embed=False, auto_log_cpu=False,
                                auto_log_gpu=False)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def finish(self) -> None:
        self.run.finish()


def open_trackers(report_to: Sequence[str], out_dir: Path, project: str, group: str, name: str,
                  config: Optional[dict] = None, resume: bool = False) -> list[Tracker]:
    """One tracker run per backend for the stage (or eval) writing to `out_dir`; `resume` continues the one an
    earlier attempt started there."""
    check_installed(report_to)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids_file = out_dir / "tracking.json"
    ids = json.loads(ids_file.read_text()) if resume and ids_file.exists() else {}
    wandb_resume = "wandb" in ids  # a run id to continue; else a new run
    if "wandb" in report_to and not wandb_resume:
        import uuid

        ids["wandb"] = uuid.uuid4().hex[:12]
    atomic_write_text(ids_file, json.dumps(ids))
    config = config or {}
    made: list[Tracker] = []
    for backend in dict.fromkeys(report_to):
        if backend == "tensorboard":
            made.append(_TensorBoard(out_dir, resume))
        elif backend == "wandb":
            made.append(_Wandb(out_dir, project, group, name, config, ids["wandb"], wandb_resume))
        else:
            made.append(_Trackio(project, group, name, config, resume))
    return made


def flatten(results: Any, prefix: str = "") -> dict[str, float]:
    """Numbers of a nested result dict as {"a/b/c": value} (what an eval result logs); other values are left out."""
    out: dict[str, float] = {}
    if isinstance(results, dict):
        for k, v in results.items():
            if not str(k).startswith("_"):
                out.update(flatten(v, f"{prefix}{k}/"))
    elif isinstance(results, (int, float)) and not isinstance(results, bool):
        out[prefix.rstrip("/")] = float(results)
    return out


def log_results(report_to: Sequence[str], out_dir: Path, project: str, group: str, name: str,
                results: dict, config: Optional[dict] = None) -> None:
    """Eval results as one tracker run of the group (step 0)."""
    values = flatten(results)
    if not report_to or not values:
        return
    trackers = open_trackers(report_to, out_dir, project, group, name, config)
    for t in trackers:
        t.log(values, 0)
        t.finish()
