"""Small file helpers every stage shares: atomic writes of text, JSON and JSONL, and the one JSONL reader.

Atomic writes go to a temporary file in the same directory and are renamed into place, so a crash never
leaves a half-written file under the final name. Every file and directory allo writes gets the modes the process's
umask gives (mkstemp and safetensors create files as 0600, which teammates and eval jobs under other accounts
cannot read).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence


def _umask() -> int:
    """The process's umask (read without changing it where /proc says it; else set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | Path) -> None:
    """Give `path` (a file, or a directory and everything under it) the modes a plain open()/mkdir() would:
    0666 / 0777 less the umask."""
    mask = _umask()
    path = Path(path)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


class BadLine(str):
    """What a JSONL line that could not be read is, with bad="yield": the problem, phrased."""


def iter_jsonl(path: str | Path, bad: str = "raise") -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) for each non-empty line. Lines are split on "\n" only (U+2028 may sit inside
    a JSON string). A line that is not UTF-8 or not JSON raises ValueError naming `file:line`, or with
    bad="yield" comes as (line number, BadLine(the problem)) for a caller that skips and counts it."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                yield n, json.loads(line)
            except UnicodeDecodeError as e:
                problem = f"not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})"
            except json.JSONDecodeError as e:
                problem = f"not valid JSON ({e.msg} at column {e.colno})"
            else:
                continue
            if bad != "yield":
                raise ValueError(f"{path}:{n}: {problem}")
            yield n, BadLine(problem)


def read_json(path: str | Path) -> Any:
    """A JSON document; bytes that are not UTF-8 or text that is not JSON raise ValueError naming `file:line`."""
    raw = Path(path).read_bytes()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}; save the file as UTF-8)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None


def read_jsonl(path: str | Path) -> list:
    """Every record of a JSONL file (see `iter_jsonl` for what an error names)."""
    return [rec for _, rec in iter_jsonl(path)]


def drop_torn_tail(path: Path) -> None:
    """Cut a half-written last line (a run killed mid-write) so appended records start on a fresh line."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)


def safetensors_header(path: str | Path) -> tuple[dict, int]:
    """A safetensors file's JSON header (tensor name -> dtype, shape, data offsets; "__metadata__") and the byte
    where the data starts (the offsets count from there): 8 bytes of header length, then the header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


class SafetensorsWriter:
    """Writes a safetensors file one tensor (or one in-order piece of a tensor) at a time: the header is known up
    front from the names, dtypes and shapes, so a model larger than memory never exists in memory at once.
    Atomic: a temporary file renamed on `close`."""

    def __init__(self, path: str | Path, tensors: Sequence[tuple[str, str, Sequence[int], int]],
                 metadata: Optional[dict[str, str]] = None):
        """`tensors`: (name, safetensors dtype such as "F32", shape, bytes) in file order."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self.offsets: dict[str, int] = {}
        at = 0
        for name, dtype, shape, nbytes in tensors:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + nbytes]}
            self.offsets[name] = at
            at += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.f = open(self.tmp, "wb")
        self.f.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, name: str, data: bytes | memoryview, byte_offset: int = 0) -> None:
        """Bytes of tensor `name` from `byte_offset` on; tensors and pieces come in file order."""
        assert self.f.tell() == self.data_start + self.offsets[name] + byte_offset, f"{name} written out of order"
        self.f.write(data)

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        self.tmp.replace(self.path)


def hub_offline(datasets: bool = False) -> bool:
    """Whether the Hugging Face hub is switched off for this process: HF_HUB_OFFLINE, and for `datasets` (which
    also honours it) HF_DATASETS_OFFLINE."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if datasets else ("HF_HUB_OFFLINE",)
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in names)


def hub_dataset_unavailable(name: str, config: Optional[str] = None) -> Optional[Exception]:
    """Offline, why the hub dataset `name` cannot be read from the local cache (None when it can, and always None
    online, where the hub answers for itself)."""
    if not hub_offline(datasets=True):
        return None
    from datasets import load_dataset_builder

    try:
        load_dataset_builder(name, config)
    except Exception as e:  # noqa: BLE001 - whatever the reason, it cannot be read here
        return e
    return None
