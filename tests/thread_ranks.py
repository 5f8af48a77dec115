"""Several ranks in one process, one thread each: the exchange every collective is built on, and the runner."""
from __future__ import annotations

import threading
from typing import Any, Callable


class Exchange:
    """Every rank hands in a value and gets back all ranks' values, in rank order (three barrier waits, so that no
    rank's next exchange overwrites a slot another rank has not read yet)."""

    def __init__(self, world: int):
        self.world = world
        self.slots: list = [None] * world
        self.barrier = threading.Barrier(world)

    def __call__(self, rank: int, value: Any) -> list:
        self.barrier.wait()
        self.slots[rank] = value
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out


def run_threads(world: int, body: Callable[[int], Any], exchange: Exchange, timeout: float = 120) -> list:
    """body(rank) on `world` threads; their results in rank order. The first error is raised here after breaking
    the other ranks' waits, and a rank still waiting after `timeout` seconds is a deadlock."""
    results: list = [None] * world
    errors: list = []

    def run(rank: int) -> None:
        try:
            results[rank] = body(rank)
        except BaseException as e:  # noqa: BLE001 - raised below
            errors.append(e)
            exchange.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), f"ranks still waiting after {timeout} s: a deadlock"
    return results
