"""Locating key neurons (spec §1): importance s_i = |θ'_i − θ_i| / α, exact top-k masks, two passes, streaming.

Scores are non-negative float32, whose bit patterns sort like their values, so an element's rank is decided
by an integer key (the bits; for `bottom` their complement). Pass 1 reads both checkpoints tensor by tensor
and builds, per selection group (the whole model, a layer, or a tensor), a histogram of the keys' top bits
with each bin's smallest and largest key. That gives, for every k wanted, the bin holding the k-th key and
how many elements of that bin are needed. Pass 2 reads the checkpoints again and streams each mask tensor
straight into its safetensors file: elements above the bin are selected, elements in it are resolved
exactly (if the bin holds one key value, the first `need` of them in tensor order; otherwise the bin's few
keys are kept and the exact cut is patched into the file at the end). Ties at the threshold go to the
earlier tensor (sorted names) and the lower flat index, so the selected count is exactly ⌊N·r/100⌋ and runs
are reproducible. Peak memory is one pair of tensors plus the histograms, never the model.

Not here: locating from a ZeRO-3 run's partitions without a merged checkpoint (a planned collective path).
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from safetensors import safe_open

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


CHUNK = 1 << 23  # elements scored at a time: bounds the temporaries, whatever the tensor size


class Reader:
    """Reads tensors by name from a checkpoint. Each read opens its shard and closes it again, so the pages of
    the memory-mapped file are released instead of accumulating in the process's resident set."""

    def __init__(self, directory: str | Path):
        self.files = checkpoint_files(directory)

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        with safe_open(str(self.files[name]), framework="pt") as h:
            sl = h.get_slice(name)
            return tuple(sl.get_shape()), sl.get_dtype()

    def rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of tensor `name` (the whole tensor if it is 0- or 1-dimensional), flattened."""
        with safe_open(str(self.files[name]), framework="pt") as h:
            sl = h.get_slice(name)
            t = sl[r0:r1] if len(sl.get_shape()) > 1 else sl[:]
            return t.reshape(-1)  # safetensors returns the rows as an owned copy: no clone needed


def chunks(base: Reader, tuned: Reader, name: str) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(flat offset, base chunk, tuned chunk) over a tensor in row blocks of about CHUNK elements."""
    shape = base.meta(name)[0]
    if len(shape) <= 1:
        yield 0, base.rows(name, 0, 1), tuned.rows(name, 0, 1)
        return
    row = math.prod(shape[1:])
    step = max(1, CHUNK // row)
    for r0 in range(0, shape[0], step):
        r1 = min(shape[0], r0 + step)
        yield r0 * row, base.rows(name, r0, r1), tuned.rows(name, r0, r1)


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
    """Where the k-th key of a group lies: above bin `bin` everything counts; `need` more come from the bin."""
    k: int
    bin: int
    need: int
    pure: bool                                   # the bin holds a single key value
    exact_key: int = -1                          # resolved threshold key (non-pure bins, after pass 2)
    candidates: list = field(default_factory=list)  # non-pure bins: (key, tensor_order, flat_idx) chunks


def group_of(name: str, scope: str) -> str:
    if scope == "global":
        return "all"
    if scope == "per_tensor":
        return name
    m = LAYER.search(name)
    return f"layer{m.group(1)}" if m else "other"


def keys_of(base: torch.Tensor, tuned: torch.Tensor, bottom: bool, name: str) -> torch.Tensor:
    """Integer rank keys of |θ' − θ| (the 1/α factor does not change the order)."""
    b, t = base.float(), tuned.float()
    if not (torch.isfinite(b).all() and torch.isfinite(t).all()):
        raise LocateError(f"{name}: NaN or Inf in the checkpoint weights")
    key = (t - b).abs().flatten().view(torch.int32)
    return (2 ** KEY_BITS - 1) - key if bottom else key


def find_cut(hist: np.ndarray, s1: np.ndarray, s2: np.ndarray, k: int) -> Cut:
    """The bin holding the k-th largest key, counting from the top. A bin is pure (one key value) iff the low bits
    of its keys have zero variance: count·Σx² = (Σx)², exact in integers (the sums are exact in float64)."""
    from_top = np.cumsum(hist[::-1])
    idx = int(np.searchsorted(from_top, k))  # first position where the running count reaches k
    b = len(hist) - 1 - idx
    above = int(from_top[idx - 1]) if idx > 0 else 0
    pure = int(hist[b]) * int(s2[b]) == int(s1[b]) ** 2
    return Cut(k=k, bin=b, need=k - above, pure=pure)


@dataclass
class LocateResult:
    paths: dict[str, Path]
    summary: dict


def locate(base_dir: str | Path, tuned_dir: str | Path, lr: float, ratios: dict[str, float], out_dir: str | Path,
           scope: str = "global", band_start: float = 0.0, bottom: bool = False, bin_bits: int = 20) -> LocateResult:
    """Write one mask file per named ratio (e.g. {"n1": 5, "n2": 10}) from two reads of the checkpoints."""
    for label, r in ratios.items():
        if not 0 < r <= 100:
            raise LocateError(f"ratio {label}={r} is outside (0, 100]")
        if not 0 <= band_start < r:
            raise LocateError(f"band_start {band_start} must be in [0, {label}={r})")
    if lr <= 0:
        raise LocateError(f"learning rate α must be > 0, got {lr}")
    t0 = time.perf_counter()
    base, tuned = Reader(base_dir), Reader(tuned_dir)
    names = paired_names(base, tuned)
    shift = KEY_BITS - bin_bits
    groups: dict[str, dict] = {}
    # ---- pass 1: per group, a histogram of the keys' top bits and Σ, Σ² of their low bits per bin
    low_mask = (1 << shift) - 1
    for name in names:
        g = groups.setdefault(group_of(name, scope), {
            "n": 0, "hist": np.zeros(2 ** bin_bits, np.int64), "s1": np.zeros(2 ** bin_bits, np.float64),
            "s2": np.zeros(2 ** bin_bits, np.float64), "zero": 0})
        for _, b, t in chunks(base, tuned, name):
            key = keys_of(b, t, bottom, name)
            bins = key >> shift
            low = (key & low_mask).double()
            g["n"] += key.numel()
            g["zero"] += int((key == 0).sum()) if not bottom else 0
            g["hist"] += torch.bincount(bins, minlength=2 ** bin_bits).numpy()
            g["s1"] += torch.bincount(bins, weights=low, minlength=2 ** bin_bits).numpy()
            g["s2"] += torch.bincount(bins, weights=low * low, minlength=2 ** bin_bits).numpy()
    total = sum(g["n"] for g in groups.values())
    if not bottom and all(g["zero"] == g["n"] for g in groups.values()):
        raise LocateError("the two checkpoints are identical (every score is 0): nothing to rank; was the warm-up "
                          "run trained (lr, steps)?")
    # cuts[label] = (cut for top-r%, cut for top-band_start% or None) per group
    cuts: dict[str, dict[str, tuple[Cut, Cut | None]]] = {}
    for label, r in ratios.items():
        cuts[label] = {}
        for gname, g in groups.items():
            k_hi = math.floor(g["n"] * r / 100)
            k_lo = math.floor(g["n"] * band_start / 100)
            if k_hi == 0:
                raise LocateError(f"ratio {label}={r}% of {g['n']} elements in group {gname} selects nothing")
            cut_hi = find_cut(g["hist"], g["s1"], g["s2"], k_hi)
            cut_lo = find_cut(g["hist"], g["s1"], g["s2"], k_lo) if k_lo > 0 else None
            cuts[label][gname] = (cut_hi, cut_lo)
    # ---- pass 2: stream masks out; pure bins resolved in order, impure bins collected then patched
    out_dir = Path(out_dir)
    writers = {label: StreamingMaskWriter(out_dir / f"{label}.safetensors",
                                          [(n, base.meta(n)[0]) for n in names]) for label in ratios}
    taken: dict[tuple, int] = {}
    counts: dict[str, dict[str, int]] = {label: {} for label in ratios}
    for order, name in enumerate(names):
        gname = group_of(name, scope)
        for offset, b, t in chunks(base, tuned, name):
            key = keys_of(b, t, bottom, name)
            for label in ratios:
                hi_cut, lo_cut = cuts[label][gname]
                sel = _select(key, hi_cut, shift, taken, (label, gname, "hi"), order, offset)
                if lo_cut is not None:
                    sel &= ~_select(key, lo_cut, shift, taken, (label, gname, "lo"), order, offset)
                writers[label].write(name, sel, offset)
                counts[label][name] = counts[label].get(name, 0) + int(sel.sum())
    # impure threshold bins: resolve the exact cut among the collected keys and patch the files
    for label in ratios:
        for gname, (hi_cut, lo_cut) in cuts[label].items():
            for cut, sign in ((hi_cut, 1), (lo_cut, -1)):
                if cut is None or cut.pure or cut.need == 0:
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
                "base": str(base_dir), "tuned": str(tuned_dir),
                "base_hash": _content_hash(base, names), "tuned_hash": _content_hash(tuned, names)}
        writers[label].close()
        sidecar = out_dir / f"{label}.json"
        from allo.io import write_json

        write_json(sidecar, {**meta, "counts": counts[label], "seconds": round(elapsed, 3)})
        paths[label] = writers[label].path
    return LocateResult(paths, {"elements": total, "seconds": elapsed,
                                "achieved": {lb: 100 * sum(c.values()) / total for lb, c in counts.items()}})


def _select(key: torch.Tensor, cut: Cut, shift: int, taken: dict, slot: tuple, order: int,
            offset: int) -> torch.Tensor:
    bins = key >> shift
    sel = bins > cut.bin
    in_bin = bins == cut.bin
    if cut.pure:  # one key value in the bin: the first `need` of them, in tensor then index order
        left = cut.need - taken.get(slot, 0)
        if left > 0:
            idx = in_bin.nonzero().flatten()[:left]
            sel[idx] = True
            taken[slot] = taken.get(slot, 0) + len(idx)
    elif cut.need > 0:
        idx = in_bin.nonzero().flatten()
        if len(idx):
            cut.candidates.append((key[idx].long(), torch.full_like(idx, order), idx + offset))
    return sel


def _resolve(cut: Cut) -> Iterator[tuple[int, torch.Tensor]]:
    """The `need` best candidates of an impure bin: larger key first, then earlier tensor, then lower index."""
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


def _content_hash(reader: Reader, names: Sequence[str]) -> str:
    """A cheap identity of a checkpoint: xxh3-128 of its safetensors headers (names, dtypes, shapes, offsets) and
    file sizes. Not a content hash of the weights: that would cost a third full read."""
    import xxhash

    h = xxhash.xxh3_128()
    for f in sorted(set(reader.files.values())):
        with open(f, "rb") as fh:  # noqa: PTH123
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(n))
        h.update(str(f.stat().st_size).encode())
    return h.hexdigest()


class StreamingMaskWriter:
    """Writes a safetensors file of BOOL tensors one tensor at a time (the header is known up front), so masks
    for a model larger than memory never exist in memory at once. Metadata goes to the JSON sidecar."""

    def __init__(self, path: Path, tensors: list[tuple[str, tuple[int, ...]]]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        header, offset = {}, 0
        self.offsets = {}
        for name, shape in tensors:
            n = math.prod(shape)
            header[name] = {"dtype": "BOOL", "shape": list(shape), "data_offsets": [offset, offset + n]}
            self.offsets[name] = offset
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.f = open(self.tmp, "wb")
        self.f.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, name: str, mask: torch.Tensor, offset: int = 0) -> None:
        """Write the flat elements [offset, offset + mask.numel()) of tensor `name`, in file order."""
        assert self.f.tell() == self.data_start + self.offsets[name] + offset, f"{name} written out of order"
        self.f.write(mask.to(torch.uint8).numpy().tobytes())

    def patch(self, name: str, flat_idx: torch.Tensor, value: bool) -> None:
        byte = b"\x01" if value else b"\x00"
        end = self.f.tell()
        for i in flat_idx.tolist():
            self.f.seek(self.data_start + self.offsets[name] + i)
            self.f.write(byte)
        self.f.seek(end)

    def close(self) -> None:
        self.f.flush()
        import os

        os.fsync(self.f.fileno())
        self.f.close()
        self.tmp.replace(self.path)
