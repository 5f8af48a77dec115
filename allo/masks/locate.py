"""`allo locate` offline (docs/method.md §1): masks from two checkpoints on disk, streamed, in bounded memory.

The selection itself is `allo.masks.select.select_masks`; this module is its source and sink for two Hugging
Face safetensors checkpoints. Tensors are memory-mapped and cut into chunks of CHUNK elements, which the
selection scores on one thread per core; a read-ahead thread pages both checkpoints in from storage ahead of
the scoring (and hashes the weights in pass 1), so a cold pass costs about the disk's time, not the disk's plus
the CPU's. Each mask tensor is written bit-packed straight into its file as its chunks come in, and the
collected threshold bins are patched in at the end. Peak memory is the chunks in flight, the mapped pages of the
tensors being read and the histograms, never the model.
"""
from __future__ import annotations

import itertools
import json
import threading
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from safetensors import safe_open

from allo.io import safetensors_header
from allo.masks.io import MaskWriter
from allo.masks.select import Chunk, LocateError, check_ratios, scoring_threads, select_masks, write_sidecar

__all__ = ["CHUNK", "LocateError", "LocateResult", "Reader", "checkpoint_files", "locate", "scoring_threads"]


# ------------------------------------------------------------------------------------------- checkpoints
def checkpoint_files(directory: str | Path) -> dict[str, Path]:
    """tensor name -> safetensors file, for a single-file or sharded (index.json) HF checkpoint."""
    d = Path(directory)
    index = d / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: d / f for name, f in weight_map.items()}
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise LocateError(f"{d}: no *.safetensors checkpoint found")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            out.update({k: f for k in h.keys()})
    return out


CHUNK = 1 << 23  # elements scored at a time: bounds the temporaries, whatever the tensor size; a multiple of 8


class Reader:
    """Reads tensors by name from a checkpoint. Each read opens its shard and closes it again, so the pages of
    the memory-mapped file are released instead of accumulating in the process's resident set."""

    def __init__(self, directory: str | Path):
        self.files = checkpoint_files(directory)
        self._headers: dict[Path, dict[str, dict]] = {}

    def _entry(self, name: str) -> dict:
        """Tensor `name`'s safetensors header entry, each shard's header parsed once: 8 bytes of header length, the
        JSON header (dtype, shape, data offsets relative to its end), then the data."""
        path = self.files[name]
        if path not in self._headers:
            header, start = safetensors_header(path)
            self._headers[path] = {k: {**v, "start": start + v["data_offsets"][0], "end": start + v["data_offsets"][1]}
                                   for k, v in header.items() if k != "__metadata__"}
        return self._headers[path][name]

    def span(self, name: str) -> tuple[Path, int, int]:
        """(file, first byte, end byte) of tensor `name`'s data."""
        e = self._entry(name)
        return self.files[name], e["start"], e["end"]

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype code such as "F32"), from the cached header: no file is opened per tensor."""
        e = self._entry(name)
        return tuple(e["shape"]), e["dtype"]

    def range(self, name: str, start: int, numel: int) -> torch.Tensor:
        """Flat elements [start, start+numel) of tensor `name` (what one ZeRO partition holds of it)."""
        from allo.masks.io import flat_range

        with safe_open(str(self.files[name]), framework="pt") as h:
            return flat_range(h, name, start, numel)

    @contextmanager
    def mapped(self, name: str) -> Iterator[torch.Tensor]:
        """Tensor `name`, flattened and memory-mapped from its shard instead of copied; its pages leave the resident
        set once the block has exited and no view of it is left."""
        with safe_open(str(self.files[name]), framework="pt") as h:
            yield h.get_tensor(name).reshape(-1)


READ_AHEAD = 1 << 30  # bytes of both checkpoints paged in ahead of the tensor being scored


class ReadAhead:
    """A background thread that pages both checkpoints in from storage, tensor by tensor, up to READ_AHEAD bytes
    ahead of the tensor being scored, so a cold pass waits on the disk or on the CPU, not on both in turn; given
    `hashers` (one per reader), it hashes each tensor's bytes on the way, off the scoring thread. Otherwise it
    touches one byte per page in numpy, which releases the GIL and starts no OpenMP threads of its own
    (bench/RESULTS.md, profiling note 7, has what was measured against the alternatives)."""

    def __init__(self, readers: Sequence[Reader], names: Sequence[str], hashers: Sequence | None = None):
        self.readers, self.names, self.hashers = readers, list(names), hashers
        sizes = [sum(end - start for _, start, end in (r.span(n) for r in readers)) for n in self.names]
        self.starts = [0] + list(itertools.accumulate(sizes))
        self.consumed, self.stopped, self.error = 0, False, None
        self.cv = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="locate-read-ahead", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for i, name in enumerate(self.names):
                with self.cv:
                    self.cv.wait_for(lambda: self.stopped or self.starts[i] - self.consumed < READ_AHEAD)
                    if self.stopped:
                        return
                for j, r in enumerate(self.readers):
                    with r.mapped(name) as t:
                        raw = t.view(torch.uint8).numpy()
                        if self.hashers is not None:
                            self.hashers[j].update(raw.data)
                        else:
                            raw[::4096].sum()
        except BaseException as e:  # surfaced on the scoring thread by __exit__
            self.error = e

    def at(self, i: int) -> None:
        """The consumer has reached tensor i."""
        with self.cv:
            self.consumed = self.starts[i]
            self.cv.notify()

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        """After a complete pass, waits for the thread to finish (the hashes need every tensor); after an error,
        stops it."""
        with self.cv:
            self.stopped = exc_type is not None
            self.consumed = self.starts[-1]
            self.cv.notify()
        self.thread.join()
        if self.error is not None and exc_type is None:
            raise self.error


def chunks(base: Reader, tuned: Reader, names: Sequence[str], ahead: "ReadAhead | None" = None) -> Iterator[Chunk]:
    """Both checkpoints' tensors in chunks of CHUNK elements, as views of their memory maps; a map is released
    once no view of it is left. Tells `ahead` where the scoring has got to."""
    for order, name in enumerate(names):
        if ahead is not None:
            ahead.at(order)
        with base.mapped(name) as b, tuned.mapped(name) as t:
            for off in range(0, b.numel(), CHUNK):
                yield order, name, off, b[off:off + CHUNK], t[off:off + CHUNK]


def paired_names(base: Reader, tuned: Reader) -> list[str]:
    """Sorted tensor names; raises LocateError listing names or shapes that differ. Dtypes may differ (a bf16
    starting checkpoint against fp32 master weights): scores are computed in float32 either way."""
    problems = []
    only_base, only_tuned = sorted(set(base.files) - set(tuned.files)), sorted(set(tuned.files) - set(base.files))
    if only_base:
        problems.append(f"only in base: {', '.join(only_base[:10])}")
    if only_tuned:
        problems.append(f"only in tuned: {', '.join(only_tuned[:10])}")
    names = sorted(set(base.files) & set(tuned.files))
    for n in names:
        (sb, db), (st, dt) = base.meta(n), tuned.meta(n)
        if sb != st:
            problems.append(f"{n}: base {list(sb)} {db} vs tuned {list(st)} {dt}")
    if problems:
        raise LocateError("checkpoints differ: " + "; ".join(problems[:20]))
    return names




# ------------------------------------------------------------------------------------------- source and sink
class CheckpointSource:
    """Both checkpoints' tensors in chunks, in sorted-name order, with the read-ahead thread: it hashes the weights
    during the histogram pass and pages them in during the mask pass."""

    def __init__(self, base: Reader, tuned: Reader):
        self.base, self.tuned = base, tuned
        self.names = paired_names(base, tuned)
        self.shapes = {n: base.meta(n)[0] for n in self.names}
        import xxhash

        self.hashes = {"base": xxhash.xxh3_128(), "tuned": xxhash.xxh3_128()}

    def chunks(self, stage: str, names: Sequence[str]) -> Iterator[Chunk]:
        ahead = (ReadAhead([self.base, self.tuned], names, [self.hashes["base"], self.hashes["tuned"]])
                 if stage == "histograms" else ReadAhead([self.base, self.tuned], names) if stage == "masks"
                 else nullcontext())
        with ahead:
            yield from chunks(self.base, self.tuned, names, ahead if isinstance(ahead, ReadAhead) else None)


class RandomSource:
    """Uniform random "weight changes" in [0, 1) per element, from a generator seeded by (seed, tensor, offset), with
    the starting weights all zero: the one top-k routine then picks a uniformly random mask of exactly the asked
    size (the paper's ALLO-without-locate control). The same mask whoever asks; no checkpoint is read."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int):
        self.names, self.shapes, self.seed = sorted(shapes), dict(shapes), seed

    def chunks(self, stage: str, names: Sequence[str]) -> Iterator[Chunk]:
        import xxhash

        for order, name in enumerate(names):
            numel = math.prod(self.shapes[name])
            for off in range(0, numel, CHUNK):
                n = min(CHUNK, numel - off)
                g = torch.Generator().manual_seed(xxhash.xxh64_intdigest(f"{self.seed}:{name}:{off}".encode()) >> 1)
                yield order, name, off, torch.zeros(n), torch.rand(n, generator=g)


class StreamSink:
    """One mask file per label, written chunk by chunk in order and patched in place; counts per tensor."""

    def __init__(self, out_dir: Path, labels: Sequence[str], shapes: dict[str, tuple[int, ...]]):
        self.writers = {label: MaskWriter(out_dir / f"{label}.safetensors", list(shapes.items())) for label in labels}
        self.counts: dict[str, dict[str, int]] = {label: {} for label in labels}

    def write(self, label: str, name: str, offset: int, packed: np.ndarray) -> None:
        self.writers[label].write_packed(name, packed, offset)
        c = self.counts[label]
        c[name] = c.get(name, 0) + int(np.bitwise_count(packed).sum())

    def patch(self, label: str, name: str, flat_idx: torch.Tensor, value: bool) -> None:
        self.writers[label].patch(name, flat_idx, value)
        self.counts[label][name] += len(flat_idx) if value else -len(flat_idx)

    def finish(self, label: str) -> dict[str, int]:
        self.writers[label].close()
        return self.counts[label]


@dataclass
class LocateResult:
    paths: dict[str, Path]
    summary: dict


def locate(base_dir: str | Path, tuned_dir: str | Path, lr: float, ratios: dict[str, float], out_dir: str | Path,
           scope: str = "global", band_start: float = 0.0, bottom: bool = False, bin_bits: int = 20,
           collect_cap: Optional[int] = None, threads: int = 0, random_seed: Optional[int] = None) -> LocateResult:
    """Write one mask file per named ratio (e.g. {"n1": 5, "n2": 10}) from two reads of the checkpoints; with
    `random_seed`, uniformly random masks of the same sizes (only the starting checkpoint's shapes are read)."""
    check_ratios(ratios, band_start, lr)
    t0 = time.perf_counter()
    base = Reader(base_dir)
    source = (RandomSource({n: base.meta(n)[0] for n in base.files}, random_seed) if random_seed is not None
              else CheckpointSource(base, Reader(tuned_dir)))
    out_dir = Path(out_dir)
    sink = StreamSink(out_dir, list(ratios), source.shapes)
    sel = select_masks(source, sink, ratios, scope=scope, band_start=band_start, bottom=bottom, bin_bits=bin_bits,
                       collect_cap=collect_cap, threads=threads)
    elapsed = time.perf_counter() - t0
    meta = {"band_start": band_start, "scope": scope, "bottom": bottom, "lr": lr, "base": str(base_dir),
            "seconds": round(elapsed, 3)}
    if random_seed is not None:
        meta.update(selection="random", random_seed=random_seed)
    else:
        meta.update(selection="bottom" if bottom else "top", tuned=str(tuned_dir),
                    base_hash=source.hashes["base"].hexdigest(), tuned_hash=source.hashes["tuned"].hexdigest(),
                    hash="xxh3-128 of every tensor's bytes, tensors in sorted-name order")
    paths = {}
    for label, r in ratios.items():
        write_sidecar(out_dir, label, r, sel.counts[label], sel.total, sel.ties[label], meta)
        paths[label] = sink.writers[label].path
    return LocateResult(paths, {"elements": sel.total, "seconds": elapsed, "threshold_ties": sel.ties,
                                "achieved": {lb: 100 * sum(c.values()) / sel.total for lb, c in sel.counts.items()}})
