"""Steps that are not training, spread over every rank, and the file-based waits that keep ranks out of collectives.

A sharded step (sample, reward-data, reward-score, eval) cuts its records into units of a fixed size. Unit k goes
to rank k mod world; a rank appends what each finished unit produced to its own shard file
(`STEP/shards/FINGERPRINT/rankR-of-W.jsonl`, flushed and fsynced per unit), so a preempted or failed step resumes
at unit granularity, also with another world size (every shard file found counts), and only with the same inputs
and settings (the step's fingerprint names the folder). A unit's output depends only on the
unit (its records and its number, from which any seed is derived), never on the rank or the world size, so 1 and
16 ranks write the same bytes. Rank 0 merges the shards in record order.

No rank waits inside a collective for another rank's work: a rank that is done (or not needed, in a rank-0 step)
polls small marker files under `OUTPUT_DIR/.sync/ATTEMPT/` with its own generous timeout
(`distributed.wait_minutes`), while the process group's timeout (`distributed.timeout_minutes`) only has to cover
a training step's collectives. A failure or a stop signal on any rank is written there too, so every rank stops
with it instead of waiting out the timeout. OUTPUT_DIR must be on a file system every node shares (it already
holds the checkpoints every rank reads).
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from allo.io import atomic_write_text, drop_torn_tail
from allo.signals import EXIT_REQUEUE, stop_on_signal

log = logging.getLogger(__name__)


class StepAborted(RuntimeError):
    """Another rank failed in this step; the message is its own."""


@dataclass
class Sync:
    """Marker files of one pipeline attempt: who finished, who failed, who was told to stop."""
    root: Path
    rank: int = 0
    world: int = 1
    attempt: str = "local"
    timeout_s: float = 24 * 3600.0
    poll_s: float = 0.2
    stop_requested: bool = field(default=False, repr=False)

    @property
    def dir(self) -> Path:
        return self.root / ".sync" / self.attempt

    def mark(self, name: str, text: str = "") -> None:
        atomic_write_text(self.dir / name, text)

    def fail(self, step: str, message: str) -> bool:
        """Record this rank's failure of `step` unless another rank's is recorded already (the first one stays:
        the marker is linked into place, which fails when it exists). True when this rank's is the one recorded,
        the failure the terminal shows."""
        import os

        final = self.dir / f"{step}.failed"
        tmp = self.dir / f".{step}.failed.rank{self.rank}"
        atomic_write_text(tmp, f"rank {self.rank}: {message}")
        try:
            os.link(tmp, final)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def stop(self, step: str) -> None:
        self.mark(f"{step}.stopped", f"rank {self.rank}")

    def wait(self, step: str, ready: Callable[[], bool], what: str) -> None:
        """Poll until `ready()`; raise if another rank failed or stopped in `step`, or after the timeout."""
        t0 = time.monotonic()
        while not ready():
            failed, stopped = self.dir / f"{step}.failed", self.dir / f"{step}.stopped"
            if failed.exists():
                raise StepAborted(failed.read_text())
            if stopped.exists() or self.stop_requested:
                raise SystemExit(EXIT_REQUEUE)
            if time.monotonic() - t0 > self.timeout_s:
                raise TimeoutError(f"step {step}: waited {self.timeout_s / 60:.0f} min for {what} "
                                   "(distributed.wait_minutes)")
            time.sleep(self.poll_s)

    def check_stop(self, step: str) -> None:
        """Between units: a signal here, or a stop marker from another rank, ends the step for a requeue."""
        if self.stop_requested or (self.dir / f"{step}.stopped").exists():
            self.stop(step)
            raise SystemExit(EXIT_REQUEUE)

    def install_signal_handlers(self) -> None:
        stop_on_signal(self, "stopping after the current unit of work")


def new_attempt(comm: Any = None) -> str:
    """A token naming this pipeline attempt, the same on every rank (rank 0's, broadcast once at the start)."""
    token = [uuid.uuid4().hex[:12]]
    if comm is not None:
        comm.broadcast_object_list(token, src=0)
    return token[0]


def units_of(n_items: int, size: int, start: int = 0) -> list[range]:
    """Records [start, start + n_items) in consecutive units of `size`."""
    return [range(a, min(a + size, start + n_items)) for a in range(start, start + n_items, max(1, size))]


def run_sharded(sync: Sync, step: str, shards: Path, units: Sequence[range],
                work: Callable[[int, range], Sequence[list]]) -> Optional[list]:
    """Every rank calls this: `work(k, indices)` computes unit k (records `indices`) and returns one list of output
    rows per record. Returns every record's rows in record order, flattened, on rank 0 (None on the others).
    `shards`: this step's folder for this version of its inputs and settings (`Context.shards`), so an unfinished
    attempt is resumed only by a rerun with the same ones."""
    shards.mkdir(parents=True, exist_ok=True)
    done = _read_shards(shards)
    n_items = sum(len(u) for u in units)
    todo = [(k, u) for k, u in enumerate(units) if k % sync.world == sync.rank and any(i not in done for i in u)]
    if done and sync.rank == 0:
        log.info("%s: %d of %d records already done (resumed); %d units left on rank 0", step, len(done), n_items,
                 len(todo))
    path = shards / f"rank{sync.rank}-of-{sync.world}.jsonl"
    drop_torn_tail(path)
    delay = _injected_delay(sync.rank)
    from tqdm import tqdm

    with open(path, "a", encoding="utf-8") as f:
        for k, u in tqdm(todo, desc=f"{step} (rank {sync.rank})", disable=sync.rank != 0, mininterval=2):
            sync.check_stop(step)
            if delay:
                time.sleep(delay)
            rows = work(k, u)
            for i, out in zip(u, rows, strict=True):
                if i not in done:
                    f.write(json.dumps({"i": i, "rows": out}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    sync.mark(f"{step}.rank{sync.rank}.done")
    if sync.rank != 0:
        return None
    sync.wait(step, lambda: all((sync.dir / f"{step}.rank{r}.done").exists() for r in range(sync.world)),
              "every rank's share")
    merged = _read_shards(shards)
    missing = [i for u in units for i in u if i not in merged]
    if missing:
        raise RuntimeError(f"{shards}: records {missing[:10]} are in no shard (is OUTPUT_DIR on a file system every "
                           "node shares?)")
    return [row for u in units for i in u for row in merged[i]]


def _read_shards(shards: Path) -> dict[int, list]:
    """Every finished record in the shard files, whatever world size wrote them; a torn last line is ignored."""
    done: dict[int, list] = {}
    for path in sorted(shards.glob("rank*-of-*.jsonl")):
        with open(path, "rb") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:  # a line cut by a crash (always the last one)
                    continue
                done[rec["i"]] = rec["rows"]
    return done


def _injected_delay(rank: int) -> float:
    """Fault injection for tests: ALLO_TEST_SLOW_RANK=R:SECONDS makes rank R sleep that long before each unit."""
    raw = os.environ.get("ALLO_TEST_SLOW_RANK", "")
    if not raw:
        return 0.0
    r, _, seconds = raw.partition(":")
    return float(seconds) if int(r) == rank else 0.0


def unit_seed(seed: int, unit: int) -> int:
    """The sampling seed of unit `unit`: a function of the recipe's seed and the unit alone."""
    return (seed * 1_000_003 + unit) % 2 ** 31
