"""Per-token log-probabilities of responses, aligned with ``input_ids``.

``token_logps(logits, labels)[n, t]`` is log p(x_t | x_<t) for response tokens (labels != -100) and 0
elsewhere. Position 0 is never a response token because every prompt holds at least BOS.
"""
from __future__ import annotations

import torch

from allo.data.tokenize import IGNORE


LOGP_CHUNK = 1 << 26  # logit elements upcast to float32 at a time (256 MiB)


def _logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_logps(logits: torch.Tensor, labels: torch.Tensor, chunk: int = LOGP_CHUNK) -> torch.Tensor:
    """(N, T, V) logits and (N, T) labels -> (N, T) log-probs in float32 (0 outside responses).

    The float32 upcast and log-softmax run over a few positions at a time (at most `chunk` logits), and under
    autograd each piece is recomputed in backward instead of kept, so the extra memory is one piece, not N·T·V
    floats (8 k tokens × a 128 k vocabulary would be 4 GiB per sequence)."""
    targets = labels[:, 1:]
    valid = targets != IGNORE
    logits = logits[:, :-1]
    n, t, v = logits.shape
    step = max(1, chunk // max(1, n * v))
    if step >= t:
        logp = _logps(logits, targets)
    else:
        from torch.utils.checkpoint import checkpoint

        keep = torch.is_grad_enabled() and logits.requires_grad
        logp = torch.cat([checkpoint(_logps, logits[:, i:i + step], targets[:, i:i + step], use_reentrant=False)
                          if keep else _logps(logits[:, i:i + step], targets[:, i:i + step])
                          for i in range(0, t, step)], dim=1)
    return torch.nn.functional.pad(logp * valid, (1, 0))


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    return labels != IGNORE


def save_reference_cache(path, key: str, logps: dict[int, list[list[float]]]) -> None:
    """Store per-example, per-response token log-probs as one flat float32 tensor plus offsets (safetensors)."""
    from pathlib import Path

    from safetensors.torch import save_file

    values, offsets, shape = [], [0], []
    for idx in sorted(logps):
        shape.append([idx, len(logps[idx])])
        for row in logps[idx]:
            values.extend(row)
            offsets.append(len(values))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"values": torch.tensor(values, dtype=torch.float32), "offsets": torch.tensor(offsets),
               "shape": torch.tensor(shape, dtype=torch.long).reshape(-1, 2)}, str(tmp), metadata={"key": key})
    tmp.replace(path)


def load_reference_cache(path, key: str) -> dict[int, list[list[float]]] | None:
    """The cache at `path` if it was made for `key` (same starting weights and examples), else None."""
    from pathlib import Path

    from safetensors import safe_open

    if not Path(path).exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("key") != key:
            return None
        values, offsets, shape = f.get_tensor("values"), f.get_tensor("offsets").tolist(), f.get_tensor("shape")
    out, row = {}, 0
    for idx, n_slots in shape.tolist():
        out[idx] = [values[offsets[row + s]:offsets[row + s + 1]].tolist() for s in range(n_slots)]
        row += n_slots
    return out
