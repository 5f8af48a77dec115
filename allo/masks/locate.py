"""Locating key neurons (spec §1): importance s_i = |θ'_i − θ_i| / α, exact top-k masks, two passes, streaming.

Scores are non-negative float32, whose bit patterns sort like their values, so an element's rank is decided
by an integer key (the bits; for `bottom` their complement). Pass 1 reads both checkpoints tensor by tensor
and builds, per selection group (the whole model, a layer, or a tensor), a histogram of the keys' top bits.
That gives, for every k wanted, the bin holding the k-th key and how many elements of that bin are needed.
Pass 2 reads the checkpoints again and streams each mask tensor, bit-packed, straight into its file: elements
above the bin are selected, and the bin itself is resolved exactly. A bin of at most COLLECT_CAP elements (the
usual case: 2^20 bins spread a continuous distribution thin) has its keys collected during pass 2 and the exact
cut patched into the file at the end; a larger one (massive ties, e.g. many unchanged weights under `bottom`)
first gets a histogram of its keys' low bits in an extra pass, which pins the exact threshold key, so pass 2
selects everything above it and the first `need` elements equal to it. Ties at the threshold go to the earlier
tensor (sorted names) and the lower flat index, so the selected count is exactly ⌊N·r/100⌋ and runs are
reproducible, whatever the number of threads.

Tensors are memory-mapped and cut into chunks, which one thread per core scores into its own reused buffers;
results are consumed in chunk order. A read-ahead thread pages the checkpoints in from storage ahead of the
scoring (and hashes the weights in pass 1), so a cold pass costs about the disk's time, not the disk's plus the
CPU's. Peak memory is the chunks in flight, the mapped pages of the tensors being read and the histograms,
never the model.

`locate_partitioned.py` runs the same selection on a ZeRO run's partitions, with collectives, so no node ever
holds the merged model.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from safetensors import safe_open

from allo.masks.io import MaskWriter, first_set_bits, pack_bits, unpack_bits

LAYER = re.compile(r"\.layers\.(\d+)\.")
KEY_BITS = 31  # non-negative float32 bit patterns fit in 31 bits


class LocateError(ValueError):
    """Checkpoints or settings that cannot give a meaningful mask."""


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
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            self._headers[path] = {k: {**v, "start": 8 + n + v["data_offsets"][0], "end": 8 + n + v["data_offsets"][1]}
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
    touches one byte per page in numpy, which releases the GIL and starts no OpenMP threads of its own (a torch
    toucher did: it competed with the scoring threads and gained nothing). posix_fadvise(WILLNEED) of whole
    tensors did not help either. At 1 B parameters from storage, locate took 24.5 and 25.9 s without this thread
    and 20.1 and 21.3 s with it, alternated."""

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


class Scratch:
    """Chunk-sized buffers reused for every chunk: a fresh 32 MiB temporary costs more in page faults than the
    arithmetic done in it (8 M-element subtraction: 30 ms into a new tensor, 10 ms into a reused one), so keys,
    bins and selections are computed in place. One per scoring thread. What `keys`, `bins_of` and `buf` return is
    valid until their next call."""

    def __init__(self, bottom: bool):
        self.bottom = bottom
        self.bufs: dict[str, torch.Tensor] = {}

    def _get(self, role: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        t = self.bufs.get(role)
        if t is None or t.numel() < n:
            t = self.bufs[role] = torch.empty(n, dtype=dtype)
        return t[:n]

    def keys(self, base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
        """Integer rank keys of |θ' − θ| (the 1/α factor does not change the order): the float32 bits, which sort
        like the values; for `bottom` their complement. A NaN or Inf in either weight gives a key >= NONFINITE."""
        d = self._get("diff", base.numel(), torch.float32)
        if base.dtype == tuned.dtype == torch.float32:
            torch.sub(tuned.reshape(-1), base.reshape(-1), out=d)
        else:  # bf16/fp16 weights: subtract in float32, where the difference of two of them is exact
            d.copy_(tuned.reshape(-1)).sub_(base.reshape(-1))
        key = d.abs_().view(torch.int32)
        return key.bitwise_xor_(2 ** KEY_BITS - 1) if self.bottom else key  # = 2^31 − 1 − key, in place

    def bins_of(self, key: torch.Tensor, shift: int) -> torch.Tensor:
        return torch.bitwise_right_shift(key, shift, out=self._get("bins", key.numel(), torch.int32))

    def buf(self, role: str, n: int) -> torch.Tensor:
        return self._get(role, n, torch.bool)


Chunk = tuple[int, str, int, torch.Tensor, torch.Tensor]  # tensor order, name, flat offset, base and tuned views


def chunks(base: Reader, tuned: Reader, names: Sequence[str], ahead: "ReadAhead | None" = None) -> Iterator[Chunk]:
    """Both checkpoints' tensors in chunks of CHUNK elements, as views of their memory maps; a map is released
    once no view of it is left. Tells `ahead` where the scoring has got to."""
    for order, name in enumerate(names):
        if ahead is not None:
            ahead.at(order)
        with base.mapped(name) as b, tuned.mapped(name) as t:
            for off in range(0, b.numel(), CHUNK):
                yield order, name, off, b[off:off + CHUNK], t[off:off + CHUNK]


def scoring_threads() -> int:
    """Threads that score chunks side by side: every core this process may use (ALLO_LOCATE_THREADS overrides), at
    most 8, as each holds ~40 MB of chunk buffers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # not macOS
    raw = os.environ.get("ALLO_LOCATE_THREADS", "")
    if not raw:
        return min(8, cores)
    if not raw.isdigit() or int(raw) < 1:
        raise LocateError(f"ALLO_LOCATE_THREADS={raw!r}: expected a whole number >= 1")
    return int(raw)


def in_order(jobs: Iterator, work, threads: int, bottom: bool) -> Iterator:
    """work(job, scratch) over `jobs` on `threads` threads, each with its own Scratch; results in job order, at most
    2 × threads jobs in flight. Most of a chunk's work (bincount, numpy comparisons, nonzero, packing) runs on one
    core whatever torch's thread count, so chunks go side by side instead, with torch ops on one thread each."""
    local = threading.local()

    def run(job):
        if not hasattr(local, "scratch"):
            local.scratch = Scratch(bottom)
        return work(job, local.scratch)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="locate-score") as pool:
            pending: deque = deque()
            for job in jobs:
                pending.append(pool.submit(run, job))
                if len(pending) >= 2 * threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    finally:
        torch.set_num_threads(before)


def progress(total: int, desc: str):
    """A progress bar counted in elements (a 70 B checkpoint takes a while per pass)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="elem", unit_scale=True, mininterval=2)


def paired_names(base: Reader, tuned: Reader) -> list[str]:
    """Sorted tensor names; raises LocateError listing names, shapes or dtypes that differ."""
    problems = []
    only_base, only_tuned = sorted(set(base.files) - set(tuned.files)), sorted(set(tuned.files) - set(base.files))
    if only_base:
        problems.append(f"only in base: {', '.join(only_base[:10])}")
    if only_tuned:
        problems.append(f"only in tuned: {', '.join(only_tuned[:10])}")
    names = sorted(set(base.files) & set(tuned.files))
    for n in names:
        (sb, db), (st, dt) = base.meta(n), tuned.meta(n)
        if sb != st or db != dt:
            problems.append(f"{n}: base {list(sb)} {db} vs tuned {list(st)} {dt}")
    if problems:
        raise LocateError("checkpoints differ: " + "; ".join(problems[:20]))
    return names


# ------------------------------------------------------------------------------------------- selection
@dataclass
class Cut:
    """Where the k-th key of a group lies: keys in bins above `bin` all count, `need` more come from the bin,
    which holds `count` elements. Resolved by collecting the bin's keys (`candidates`), or, for a big bin, by
    the exact threshold key found in the low-bits pass (`exact_key`, of which the first `need_at_key` count)."""
    k: int
    bin: int
    need: int
    count: int
    exact_key: int = -1
    need_at_key: int = 0
    candidates: list = field(default_factory=list)  # (key, tensor_order, flat_idx) chunks

    @property
    def takes_whole_bin(self) -> bool:
        return self.need == self.count


def group_of(name: str, scope: str) -> str:
    if scope == "global":
        return "all"
    if scope == "per_tensor":
        return name
    m = LAYER.search(name)
    return f"layer{m.group(1)}" if m else "other"


NONFINITE = 0x7F800000  # bit patterns at or above this are Inf or NaN (the sign bit is cleared by abs)


def check_finite(chunk_hist: torch.Tensor, shift: int, bottom: bool, name: str) -> None:
    """Pass 1's per-chunk histogram already says whether a key is Inf/NaN: no separate isfinite scan."""
    first = NONFINITE >> shift
    bad = chunk_hist[:len(chunk_hist) - first] if bottom else chunk_hist[first:]
    if bool(bad.any()):
        raise LocateError(f"{name}: NaN or Inf in the checkpoint weights")


def count_into(hist: torch.Tensor, values: torch.Tensor) -> None:
    """hist[v] += 1 for each v, in place: a threshold bin holds few of a chunk's keys, and a bincount would
    allocate the whole low-bits histogram for every chunk."""
    hist.index_put_((values.long(),), torch.ones(len(values), dtype=hist.dtype), accumulate=True)


def find_cut(hist: np.ndarray, k: int) -> Cut:
    """The bin holding the k-th largest key, counting from the top, and how many of its elements are needed."""
    from_top = np.cumsum(hist[::-1])
    idx = int(np.searchsorted(from_top, k))  # first position where the running count reaches k
    b = len(hist) - 1 - idx
    above = int(from_top[idx - 1]) if idx > 0 else 0
    return Cut(k=k, bin=b, need=k - above, count=int(hist[b]))


def pin_exact_key(cut: Cut, low_hist: np.ndarray, shift: int) -> None:
    """From the low-bits histogram of a big threshold bin: the exact k-th key and how many equal to it count."""
    from_top = np.cumsum(low_hist[::-1])
    idx = int(np.searchsorted(from_top, cut.need))
    j = len(low_hist) - 1 - idx
    above = int(from_top[idx - 1]) if idx > 0 else 0
    cut.exact_key = (cut.bin << shift) | j
    cut.need_at_key = cut.need - above


@dataclass
class LocateResult:
    paths: dict[str, Path]
    summary: dict


def compute_cuts(groups: dict[str, tuple[int, torch.Tensor]], ratios: dict[str, float],
                 band_start: float) -> dict[str, dict[str, tuple[Cut, Cut | None]]]:
    """Per label and group: the cut for the top r% and, with a band, the cut for the top band_start% (or None)."""
    cuts: dict[str, dict[str, tuple[Cut, Cut | None]]] = {}
    for label, r in ratios.items():
        cuts[label] = {}
        for gname, (n, hist) in groups.items():
            k_hi, k_lo = math.floor(n * r / 100), math.floor(n * band_start / 100)
            if k_hi == 0:
                raise LocateError(f"ratio {label}={r}% of {n} elements in group {gname} selects nothing")
            h = hist.numpy()
            cuts[label][gname] = (find_cut(h, k_hi), find_cut(h, k_lo) if k_lo > 0 else None)
    return cuts


def check_ratios(ratios: dict[str, float], band_start: float, lr: float) -> None:
    for label, r in ratios.items():
        if not 0 < r <= 100:
            raise LocateError(f"ratio {label}={r} is outside (0, 100]")
        if not 0 <= band_start < r:
            raise LocateError(f"band_start {band_start} must be in [0, {label}={r})")
    if lr <= 0:
        raise LocateError(f"learning rate α must be > 0, got {lr}")


# Threshold bins of up to this many elements are resolved from their collected keys (24 bytes each); bigger ones
# take the exact low-bits pass. ALLO_LOCATE_COLLECT_CAP trades that memory for the extra pass (0: always the pass).
COLLECT_CAP = int(os.environ.get("ALLO_LOCATE_COLLECT_CAP", 1 << 22))


def locate(base_dir: str | Path, tuned_dir: str | Path, lr: float, ratios: dict[str, float], out_dir: str | Path,
           scope: str = "global", band_start: float = 0.0, bottom: bool = False, bin_bits: int = 20,
           collect_cap: int | None = None) -> LocateResult:
    """Write one mask file per named ratio (e.g. {"n1": 5, "n2": 10}) from two reads of the checkpoints."""
    check_ratios(ratios, band_start, lr)
    t0 = time.perf_counter()
    base, tuned = Reader(base_dir), Reader(tuned_dir)
    names = paired_names(base, tuned)
    shapes = {n: base.meta(n)[0] for n in names}
    sizes = {n: math.prod(shape) for n, shape in shapes.items()}
    shift = KEY_BITS - bin_bits
    groups: dict[str, dict] = {}
    cap = COLLECT_CAP if collect_cap is None else collect_cap
    # ---- pass 1: per group, a histogram of the keys' top bits
    changed = bottom  # whether any weight differs (the `bottom` ranking is meaningful either way)
    import xxhash

    hashes = {"base": xxhash.xxh3_128(), "tuned": xxhash.xxh3_128()}  # of the weights, by the read-ahead thread
    threads = scoring_threads()

    def histogram(job: Chunk, scratch: Scratch) -> tuple[int, str, int, int, torch.Tensor, bool]:
        order, name, offset, b, t = job
        n = b.numel()
        chunk_hist = torch.bincount(scratch.keys(b, t).bitwise_right_shift_(shift), minlength=2 ** bin_bits)
        # a key outside bin 0 is nonzero; only a chunk of tiny keys is scored again to look for one
        nonzero = int(chunk_hist[0]) < n or bool(torch.count_nonzero(scratch.keys(b, t)))
        return order, name, offset, n, chunk_hist, nonzero

    # a group's cuts are computed as soon as its last tensor is in, and its histogram (8 MB) dropped: with the
    # per_tensor scope a 70 B model would otherwise hold ~700 of them
    last = {group_of(n, scope): i for i, n in enumerate(names)}
    cuts: dict[str, dict[str, tuple[Cut, Cut | None]]] = {label: {} for label in ratios}

    def close_group(gname: str) -> None:
        g = groups[gname]
        for label, per in compute_cuts({gname: (g["n"], g.pop("hist"))}, ratios, band_start).items():
            cuts[label].update(per)

    with ReadAhead([base, tuned], names, [hashes["base"], hashes["tuned"]]) as ahead, \
            progress(sum(sizes.values()), "locate pass 1 (histograms)") as bar, \
            closing(in_order(chunks(base, tuned, names, ahead), histogram, threads, bottom)) as results:
        for order, name, offset, n, chunk_hist, nonzero in results:  # closing: threads stop at once on an error
            check_finite(chunk_hist, shift, bottom, name)
            gname = group_of(name, scope)
            if gname not in groups:
                groups[gname] = {"n": 0, "hist": torch.zeros(2 ** bin_bits, dtype=torch.int64)}
            groups[gname]["n"] += n
            groups[gname]["hist"] += chunk_hist
            changed = changed or nonzero
            bar.update(n)
            if order == last[gname] and offset + n == sizes[name]:
                close_group(gname)
    total = sum(g["n"] for g in groups.values())
    if not changed:
        raise LocateError("the two checkpoints are identical (every score is 0): nothing to rank; was the warm-up "
                          "run trained (lr, steps)?")
    for gname, g in groups.items():  # groups whose last tensor is empty
        if "hist" in g:
            close_group(gname)
    # ---- pass 1b (only for threshold bins too big to collect): low-bits histograms pin the exact keys
    big = {(gname, c.bin) for per in cuts.values() for gname, pair in per.items() for c in pair
           if c is not None and not c.takes_whole_bin and c.count > cap}
    if big:
        low_hists = {gb: torch.zeros(2 ** shift, dtype=torch.int64) for gb in big}
        low_mask = (1 << shift) - 1
        scratch = Scratch(bottom)
        wanted = [n for n in names if any(g == group_of(n, scope) for g, _ in big)]
        with progress(sum(sizes[n] for n in wanted), "locate pass 1b (threshold keys)") as bar:
            for _, name, _, b, t in chunks(base, tuned, wanted):
                key = scratch.keys(b, t)
                bins = scratch.bins_of(key, shift)
                for g, bn in big:
                    if g == group_of(name, scope):
                        count_into(low_hists[(g, bn)], key[bins == bn] & low_mask)
                bar.update(key.numel())
        for per in cuts.values():
            for gname, pair in per.items():
                for c in pair:
                    if c is not None and (gname, c.bin) in big:
                        pin_exact_key(c, low_hists[(gname, c.bin)].numpy(), shift)
    # ---- pass 2: stream masks out; collected threshold bins are patched at the end
    out_dir = Path(out_dir)
    writers = {label: MaskWriter(out_dir / f"{label}.safetensors", list(shapes.items())) for label in ratios}
    taken: dict[tuple, int] = {}
    counts: dict[str, dict[str, int]] = {label: {} for label in ratios}

    def select(job: Chunk, scratch: Scratch) -> tuple[int, str, int, int, dict]:
        order, name, offset, b, t = job
        key = scratch.keys(b, t).numpy()
        pair_parts = {label: band_parts(key, cuts[label][group_of(name, scope)], shift, order, offset, scratch)
                      for label in ratios}
        return order, name, offset, len(key), pair_parts

    with ReadAhead([base, tuned], names) as ahead, \
            progress(sum(sizes.values()), "locate pass 2 (masks)") as bar, \
            closing(in_order(chunks(base, tuned, names, ahead), select, threads, bottom)) as results:
        for order, name, offset, n, pair_parts in results:  # read from storage again if larger than memory
            gname = group_of(name, scope)
            for label, parts in pair_parts.items():
                sel = resolve_band(parts, cuts[label][gname], taken, (label, gname))
                writers[label].write_packed(name, sel, offset)
                counts[label][name] = counts[label].get(name, 0) + int(np.bitwise_count(sel).sum())
            bar.update(n)
    # collected threshold bins: resolve the exact cut among their keys and patch the files
    for label in ratios:
        for gname, (hi_cut, lo_cut) in cuts[label].items():
            for cut, sign in ((hi_cut, 1), (lo_cut, -1)):
                if cut is None or not cut.candidates:
                    continue
                for order, idx in _resolve(cut):
                    name = names[order]
                    writers[label].patch(name, idx, sign > 0)
                    counts[label][name] += sign * len(idx)
    paths = {}
    elapsed = time.perf_counter() - t0
    for label, r in ratios.items():
        selected = sum(counts[label].values())
        meta = {"ratio": r, "band_start": band_start, "scope": scope, "bottom": bottom, "lr": lr,
                "selected": selected, "total": total, "achieved_ratio": 100 * selected / total,
                "base": str(base_dir), "tuned": str(tuned_dir), "base_hash": hashes["base"].hexdigest(),
                "tuned_hash": hashes["tuned"].hexdigest(),
                "hash": "xxh3-128 of every tensor's bytes, tensors in sorted-name order"}
        writers[label].close()
        sidecar = out_dir / f"{label}.json"
        from allo.io import write_json

        write_json(sidecar, {**meta, "counts": counts[label], "seconds": round(elapsed, 3)})
        paths[label] = writers[label].path
    return LocateResult(paths, {"elements": total, "seconds": elapsed,
                                "achieved": {lb: 100 * sum(c.values()) / total for lb, c in counts.items()}})


Parts = list  # per cut of a band (top, then band start): (packed selection, packed ties or None)


def band_parts(key: np.ndarray, pair: tuple[Cut, Cut | None], shift: int, order: int, offset: int,
               scratch: Scratch) -> Parts:
    """A chunk's selection for one label, as far as it can be made without the chunks before it: per cut, the
    elements above it and, at a pinned exact key, the elements tied at it, both packed; only the in-order
    `resolve_band` can share the ties out. Runs on the scoring threads."""
    return [compare(key, cut, shift, order, offset, scratch) for cut in pair if cut is not None]


def resolve_band(parts: Parts, pair: tuple[Cut, Cut | None], taken: dict, slot: tuple) -> np.ndarray:
    """The chunk's packed selection for one label: ties at an exact key go to the first chunks in order (`taken`
    counts what the chunks before this one took), then a band's start cut is taken out. Call in chunk order."""
    done = []
    for (sel, ties), cut, role in zip(parts, pair, ("hi", "lo")):
        if ties is not None:
            left = cut.need_at_key - taken.get(slot + (role,), 0)
            got = first_set_bits(ties, left)
            sel |= got
            taken[slot + (role,)] = taken.get(slot + (role,), 0) + int(np.bitwise_count(got).sum())
        done.append(sel)
    return done[0] & ~done[1] if len(done) == 2 else done[0]


def select_band(key: torch.Tensor, pair: tuple[Cut, Cut | None], shift: int, taken: dict, slot: tuple, order: int,
                offset: int, scratch: Scratch) -> torch.Tensor:
    """`band_parts` and `resolve_band` in one, unpacked: for callers that go through their chunks in order."""
    packed = resolve_band(band_parts(key.numpy(), pair, shift, order, offset, scratch), pair, taken, slot)
    return unpack_bits(packed, 0, key.numel())


def compare(key: np.ndarray, cut: Cut, shift: int, order: int, offset: int,
            scratch: Scratch) -> tuple[np.ndarray, np.ndarray | None]:
    """(keys surely above the cut, keys tied at its exact key or None), packed. The elements of a collected
    threshold bin are appended to `cut.candidates` (list.append is atomic and `_resolve` sorts them, so any thread
    may). Comparisons run in numpy on a view of a scratch buffer (numpy's are cheaper than torch's), and the bin's
    few elements are found in the packed masks, an eighth of the bytes to scan."""
    lo, hi = cut.bin << shift, (cut.bin + 1) << shift
    buf = scratch.buf("cmp", len(key)).numpy()
    if cut.takes_whole_bin:
        return pack_bits(np.greater_equal(key, lo, out=buf)), None
    if cut.exact_key >= 0:  # big bin, threshold key known: all above it, the first `need_at_key` equal to it
        above = pack_bits(np.greater(key, cut.exact_key, out=buf))
        return above, pack_bits(np.equal(key, cut.exact_key, out=buf))
    above = pack_bits(np.greater_equal(key, hi, out=buf)) if hi < 2 ** 31 else np.zeros(-(-len(key) // 8), np.uint8)
    in_bin = np.bitwise_xor(pack_bits(np.greater_equal(key, lo, out=buf)), above)
    nz = np.flatnonzero(in_bin)  # bytes holding the bin's elements (a few per chunk): collect them
    if len(nz):
        rows, bits = np.nonzero(np.unpackbits(in_bin[nz], bitorder="little").reshape(-1, 8))
        idx = torch.from_numpy(nz[rows] * 8 + bits)
        cut.candidates.append((torch.from_numpy(key[idx.numpy()].astype(np.int64)), torch.full_like(idx, order),
                               idx + offset))
    return above, None


def _resolve(cut: Cut) -> Iterator[tuple[int, torch.Tensor]]:
    """The `need` best candidates of a collected bin: larger key first, then earlier tensor, then lower index."""
    keys = torch.cat([c[0] for c in cut.candidates])
    orders = torch.cat([c[1] for c in cut.candidates])
    idx = torch.cat([c[2] for c in cut.candidates])
    # lexicographic sort by (-key, order, idx) via stable sorts from the least significant key
    perm = torch.argsort(idx, stable=True)
    perm = perm[torch.argsort(orders[perm], stable=True)]
    perm = perm[torch.argsort(-keys[perm], stable=True)]
    chosen = perm[:cut.need]
    for order in orders[chosen].unique().tolist():
        pick = chosen[orders[chosen] == order]
        yield order, idx[pick]
