"""Per-token log-probabilities of responses, aligned with ``input_ids``, and the reference cache on disk.

``token_logps(logits, labels)[n, t]`` is log p(x_t | x_<t) for response tokens (labels != -100) and 0
elsewhere. Position 0 is never a response token because every prompt holds at least BOS.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from allo.data.tokenize import IGNORE


LOGP_CHUNK = 1 << 26  # logit elements upcast to float32 at a time (256 MiB)


class _TokenLogps(torch.autograd.Function):
    """log p(x_t+1 | x_<=t) for positions 0..T-2 of (N, T, V) logits, a few positions at a time.

    Forward: each piece is upcast to float32 once; only the log-sum-exp (N·T floats) is kept. Backward: the gradient
    of a log-prob with respect to its logits is onehot − softmax, written piece by piece into one gradient tensor of
    the logits' dtype: one read and one write of the logits, where autograd over sliced pieces would recompute each
    piece and zero-fill and add a full logits-sized gradient per piece."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        n, t, v = logits.shape[0], targets.shape[1], logits.shape[2]
        step = max(1, chunk // max(1, n * v))
        out = torch.empty(n, t, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for i in range(0, t, step):
            j = min(i + step, t)
            piece = logits[:, i:j].float()
            lse[:, i:j] = torch.logsumexp(piece, dim=-1)
            out[:, i:j] = piece.gather(-1, targets[:, i:j].unsqueeze(-1)).squeeze(-1) - lse[:, i:j]
        ctx.save_for_backward(logits, targets, lse)
        ctx.step = step
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        t = targets.shape[1]
        grad[:, t:].zero_()  # the last position predicts nothing
        minus_one = torch.full((), -1.0, device=logits.device)
        for i in range(0, t, ctx.step):
            j = min(i + ctx.step, t)
            probs = (logits[:, i:j] - lse[:, i:j].unsqueeze(-1)).exp_()  # float32 by promotion: no upcast pass
            index = targets[:, i:j].unsqueeze(-1)
            probs.scatter_add_(-1, index, minus_one.expand(index.shape))  # softmax − onehot, at the targets only
            torch.mul(probs, -grad_out[:, i:j].unsqueeze(-1), out=grad[:, i:j])  # written once, in the logits' dtype
        return grad, None, None


def token_logps(logits: torch.Tensor, labels: torch.Tensor, chunk: int = LOGP_CHUNK) -> torch.Tensor:
    """(N, T, V) logits and (N, T) labels -> (N, T) log-probs in float32 (0 outside responses).

    The float32 upcast and log-softmax run over a few positions at a time (at most `chunk` logits), so the extra
    memory is one piece, not N·T·V floats (8 k tokens × a 128 k vocabulary would be 4 GiB per sequence), and the
    backward writes the logits' gradient once (`_TokenLogps`)."""
    targets = labels[:, 1:]
    logp = _TokenLogps.apply(logits, targets.clamp(min=0), chunk)
    return torch.nn.functional.pad(logp * (targets != IGNORE), (1, 0))


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    return labels != IGNORE


class ReferenceWriter:
    """One rank's share of the reference cache: a safetensors file holding "index" (I64 [m]), "offsets"
    (I64 [m·slots + 1]) and "values" (F32, every response token's log-prob, slot by slot). The sizes are known from
    the tokenised examples, so the values are streamed after the header: memory stays one micro-batch, whatever
    the data set. Atomic (`SafetensorsWriter`)."""

    def __init__(self, path: str | Path, key: str, indices: Sequence[int], lengths: Sequence[Sequence[int]]):
        """`indices`: the examples in the order they will be added; `lengths`: each one's response lengths."""
        from allo.io import SafetensorsWriter

        self.order = list(indices)
        offsets = np.concatenate([[0], np.cumsum([n for per in lengths for n in per], dtype=np.int64)]).astype(np.int64)
        index = np.asarray(self.order, dtype=np.int64)
        total = int(offsets[-1])
        self.out = SafetensorsWriter(path, [("index", "I64", [len(index)], index.nbytes),
                                            ("offsets", "I64", [len(offsets)], offsets.nbytes),
                                            ("values", "F32", [total], 4 * total)],
                                     {"key": key, "format": "allo-reference/1"})
        self.path = self.out.path
        self.out.write("index", index.tobytes())
        self.out.write("offsets", offsets.tobytes())
        self.next, self.written = 0, 0  # examples and bytes of values written

    def add(self, index: int, rows: Sequence[torch.Tensor]) -> None:
        """The log-probs of example `index`, one row per response slot; examples come in the order given."""
        if self.next >= len(self.order) or self.order[self.next] != index:
            raise ValueError(f"{self.path}: example {index} written out of order")
        for row in rows:
            data = row.detach().to("cpu", torch.float32).numpy().tobytes()
            self.out.write("values", data, self.written)
            self.written += len(data)
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.order):
            raise ValueError(f"{self.path}: {len(self.order) - self.next} examples were never written")
        self.out.close()


class ReferenceCache:
    """Reads the rows of any example from the ranks' shard files with positioned reads (no memory map grows into
    the resident set): what a micro-batch needs, when it needs it."""

    def __init__(self, paths: Sequence[str | Path], key: str):
        self.files, self.where = [], {}
        from allo.io import safetensors_header

        for path in paths:
            header, start = safetensors_header(path)
            if header.get("__metadata__", {}).get("key") != key:
                self.close()
                raise ValueError(f"{path}: made for other starting weights or examples")
            fd = os.open(path, os.O_RDONLY)
            self.files.append(fd)

            def read(name: str, dtype) -> np.ndarray:
                a, b = header[name]["data_offsets"]
                return np.frombuffer(os.pread(fd, b - a, start + a), dtype=dtype)

            index, offsets = read("index", np.int64), read("offsets", np.int64)
            values_at = start + header["values"]["data_offsets"][0]
            slots = (len(offsets) - 1) // max(1, len(index))
            for j, idx in enumerate(index.tolist()):
                self.where[idx] = (fd, values_at, offsets[j * slots:(j + 1) * slots + 1].tolist())

    def rows(self, index: int) -> list[torch.Tensor]:
        fd, at, bounds = self.where[index]
        data = np.frombuffer(os.pread(fd, 4 * (bounds[-1] - bounds[0]), at + 4 * bounds[0]), dtype=np.float32)
        return [torch.from_numpy(data[a - bounds[0]:b - bounds[0]].copy()) for a, b in zip(bounds, bounds[1:])]

    def close(self) -> None:
        for fd in self.files:
            os.close(fd)
        self.files = []


def open_reference_cache(directory: str | Path, key: str, world: int) -> Optional[ReferenceCache]:
    """The cache in `directory` if every one of the `world` shards exists and was made for `key`, else None."""
    paths = [Path(directory) / f"rank{r}-of-{world}.safetensors" for r in range(world)]
    if not all(p.exists() for p in paths):
        return None
    try:
        return ReferenceCache(paths, key)
    except (ValueError, KeyError, OSError):
        return None
