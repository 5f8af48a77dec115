"""Reading and validating records: preference pairs, SFT examples and forget examples.

A record is a dict of named text fields plus ``source`` ("file:line") so every later problem can be traced
to its origin. Fields are plain strings or chat messages (``[{role, content}]``). Sources: JSONL, JSON (an
array, or an object with a ``data`` array), Parquet, or a `datasets` hub name with a split.

Problems fall in two classes. Malformed records (bad JSON, missing or non-string field) raise
``DataError`` naming file, line and field, or are skipped and counted when ``on_bad_record: skip``.
Degenerate records (empty response, chosen == rejected) are always skipped and counted. The counts are
returned and logged, so nothing is dropped silently.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from allo.io import BadLine, iter_jsonl, read_json

log = logging.getLogger(__name__)

PREFERENCE = ("prompt", "chosen", "rejected")
SFT = ("prompt", "response")


class DataError(ValueError):
    """A bad record, phrased as `file:line: field: problem`."""


@dataclass
class ReadStats:
    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self, name: str) -> str:
        detail = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return f"{name}: read {self.read}, kept {self.kept}, skipped {sum(self.skipped.values())}" + (
            f" ({detail})" if detail else "")


def _iter_raw(path: str, split: str, subset: Optional[str] = None) -> Iterator[tuple[str, Any]]:
    """Yield (source, raw record) pairs; a raw record is a dict, or a str for an unparsable JSONL line."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p}: is a directory, not a data file (.jsonl, .json or .parquet)")
    try:
        yield from _iter_file(p, path, split, subset)
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror or e})") from None


def _iter_file(p: Path, path: str, split: str, subset: Optional[str]) -> Iterator[tuple[str, Any]]:
    if p.suffix == ".jsonl" or (p.exists() and p.suffix not in (".json", ".parquet")):
        for n, rec in iter_jsonl(p, bad="yield"):  # a bad line comes as its problem, to raise or count
            yield f"{p}:{n}", rec
    elif p.suffix == ".json":
        try:
            obj = read_json(p)
        except ValueError as e:
            raise DataError(str(e)) from None
        items = obj.get("data") if isinstance(obj, dict) else obj
        if not isinstance(items, list):
            raise DataError(f"{p}: expected a JSON array of records or an object with a 'data' array")
        for i, rec in enumerate(items):
            yield f"{p}[{i}]", rec
    elif p.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(p).to_pylist()
        except (pa.ArrowException, ValueError) as e:
            raise DataError(f"{p}: not a readable Parquet file ({e})") from None
        for i, rec in enumerate(rows):
            yield f"{p}[row {i}]", rec
    else:
        if p.suffix or "/" not in path:
            raise DataError(f"{path}: no such file (and not a hub dataset name 'owner/name')")
        import datasets

        for i, rec in enumerate(datasets.load_dataset(path, subset, split=split)):
            yield f"{path}[{subset + ':' if subset else ''}{split}][{i}]", rec


def _is_text(value: Any) -> bool:
    if isinstance(value, str):
        return True
    return (isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value))


def _lone_surrogate(value: Any) -> Optional[str]:
    """Where a text holds a lone UTF-16 surrogate (JSON's "\\ud800" escape decodes to one): no tokenizer can
    encode it, so it is a malformed record, not text."""
    for s in [value] if isinstance(value, str) else [t for m in value for t in (m["role"], m["content"])]:
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"character {e.start} is a lone surrogate U+{ord(s[e.start]):04X}, not Unicode text"
    return None


def _text_of(value: Any) -> str:
    return value if isinstance(value, str) else "".join(m["content"] for m in value)


SKIPS_NAMED = 20  # skipped records named one by one in the log; the summary counts every one


def read_records(path: str, fields: Sequence[str] = PREFERENCE, *, split: str = "train",
                 subset: Optional[str] = None, columns: dict | None = None, on_bad_record: str = "error",
                 limit: int | None = None, optional: Sequence[str] = ()) -> tuple[list[dict], ReadStats]:
    """Read, rename and validate records. Returns (records, stats); see the module docstring for policy."""
    rename = {theirs: ours for ours, theirs in (columns or {}).items()}
    stats = ReadStats()
    out: list[dict] = []
    responses = [f for f in fields if f != "prompt"]

    def skip(source: str, why: str, kind: str = "") -> None:
        """Counted always (the summary line); a malformed record is also named, on rank 0 only, the first
        SKIPS_NAMED of them (an empty response or a pair with chosen == rejected is data, not damage)."""
        stats.skipped[kind or why] += 1
        if kind == "malformed" and stats.skipped[kind] <= SKIPS_NAMED and int(os.environ.get("RANK", 0)) == 0:
            log.warning("skipping %s: %s", source, why)

    def bad(source: str, msg: str) -> None:
        if on_bad_record == "error":
            raise DataError(f"{source}: {msg}")
        skip(source, msg if len(msg) < 200 else msg[:200] + "...", "malformed")

    for source, raw in _iter_raw(path, split, subset):
        if limit is not None and stats.read >= limit:
            break
        stats.read += 1
        if isinstance(raw, BadLine):
            bad(source, raw)
            continue
        if not isinstance(raw, dict):
            bad(source, f"expected a JSON object, got {type(raw).__name__}")
            continue
        rec = {rename.get(k, k): v for k, v in raw.items()}
        missing = [f for f in fields if f not in rec]
        if missing:
            bad(source, f"missing field '{missing[0]}' (have: {', '.join(sorted(rec)) or 'none'})")
            continue
        wrong = [f for f in fields if not _is_text(rec[f])]
        if wrong:
            f = wrong[0]
            bad(source, f"field '{f}' must be a string or a list of {{role, content}} messages, "
                        f"got {type(rec[f]).__name__}")
            continue
        broken = next(((f, why) for f in fields if (why := _lone_surrogate(rec[f]))), None)
        if broken:
            bad(source, f"field '{broken[0]}': {broken[1]}")
            continue
        if any(not _text_of(rec[f]).strip() for f in responses):
            skip(source, "empty response")
            continue
        if "chosen" in fields and "rejected" in fields and rec["chosen"] == rec["rejected"]:
            skip(source, "chosen == rejected")
            continue
        kept = {f: rec[f] for f in fields}
        kept.update({f: rec[f] for f in optional if f in rec})
        kept["source"] = source
        out.append(kept)
        stats.kept += 1
    if int(os.environ.get("RANK", 0)) == 0:
        (log.warning if stats.skipped else log.info)(stats.summary(path))
    return out, stats
