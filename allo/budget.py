"""What a job costs besides memory, for `allo plan`: each step's wall time on the job's GPUs, the `--time` to ask
Slurm for, and the requests and tokens sent to the teacher and the judge (money, not GPU-hours).

- Training: 6·N FLOPs a trained token (2·N more for reference log-probs) at the training MFU.
- Generation (sample, eval) is decode-bound, not compute-bound: every decode step reads all 16-bit weights and the
  batch's KV cache from GPU memory once for the whole batch, and computes 2·N FLOPs a token. Tokens/s per GPU is
  the slower of batch × bandwidth × DECODE_EFFICIENCY / bytes a step and MFU × peak FLOP/s / 2·N (the roofline of
  LLM decoding: Pope et al. 2022, "Efficiently Scaling Transformer Inference", §2). The batch is
  generation.batch_size for Hugging Face generation, vLLM's default of at most 256 running sequences for vLLM
  (never more than its KV cache holds).
- Locate from the warm-up run's partitions costs nothing extra; offline it streams both checkpoints in
  LOCATE_PASSES passes at DISK_BYTES_PER_S on one node while the other GPUs wait.
- reward-score: 2·N_rm FLOPs a token of every wrong response at the training MFU.
- Teacher and judge: requests, prompt and completion tokens (upper bounds from the recipe's counts), and the wall
  time of `concurrency` requests in flight at API_LATENCY_S + completion tokens / API_TOKENS_PER_S each.
Every such constant is an assumption, printed with the plan; measured values replace them as they come.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

DEFAULT_BANDWIDTH = 3.35e12     # H100 SXM HBM3, bytes/s; --gpu-bandwidth for other GPUs
DECODE_EFFICIENCY = 0.5         # share of the memory bandwidth decoding reaches (assumed)
VLLM_MAX_SEQS = 256             # vLLM's default max_num_seqs
LOCATE_PASSES = 3               # histogram, threshold keys, masks (allo.masks.select)
DISK_BYTES_PER_S = 1e9          # checkpoint read rate for offline locate (assumed)
API_LATENCY_S = 1.0             # per request, before its first token (assumed)
API_TOKENS_PER_S = 50.0         # completion tokens a second per request (assumed)
TEACHER_TEMPLATE_TOKENS = 120   # allo.reward.teacher's system prompt and headings
ALPACA_TEMPLATE_TOKENS = 500    # alpaca_eval's judge prompt around the two outputs
ARENA_TEMPLATE_TOKENS = 400     # Arena-Hard's system prompt and template
ARENA_JUDGMENT_TOKENS = 1000    # the judge writes its own answer, then a verdict (assumed)
TIME_MARGIN = 1.25              # model loads, checkpoints, process start-up on top of the plan's wall time
ASSUMPTIONS = (f"decoding at {DECODE_EFFICIENCY:g} of memory bandwidth, offline locate reading "
               f"{DISK_BYTES_PER_S / 1e9:g} GB/s, API requests {API_LATENCY_S:g} s + {API_TOKENS_PER_S:g} "
               "completion tokens/s each")


@dataclass
class Api:
    """Requests to an OpenAI-compatible endpoint: counts and tokens (upper bounds)."""
    who: str                        # teacher or judge
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    concurrency: int = 1
    price_in: float = 0.0           # USD per million tokens, from the endpoint's knobs
    price_out: float = 0.0
    notes: list[str] = field(default_factory=list)

    def add(self, requests: int, prompt: int, completion: int, note: str) -> None:
        self.requests += requests
        self.prompt_tokens += requests * prompt
        self.completion_tokens += requests * completion
        self.notes.append(note)

    @property
    def wall_s(self) -> float:
        per = API_LATENCY_S + self.completion_tokens / max(1, self.requests) / API_TOKENS_PER_S
        return math.ceil(self.requests / self.concurrency) * per if self.requests else 0.0

    @property
    def usd(self) -> float:
        return (self.prompt_tokens * self.price_in + self.completion_tokens * self.price_out) / 1e6

    def line(self) -> str:
        cost = f", about ${self.usd:,.2f} at the recipe's prices" if self.price_in or self.price_out else ""
        return (f"{self.who}: {self.requests:,} requests, {self.prompt_tokens / 1e6:.2f} M prompt + "
                f"{self.completion_tokens / 1e6:.2f} M completion tokens{cost} ({'; '.join(self.notes)})")


def api_of(endpoint: Any, who: str) -> Api:
    return Api(who, concurrency=endpoint.concurrency, price_in=endpoint.price_in, price_out=endpoint.price_out)


def decode_tokens_per_s(params: int, kv_width: int, layers: int, seq: int, batch: int, gpu_bytes: int,
                        bandwidth: float, flops: float, vllm: bool, utilization: float) -> tuple[float, int]:
    """(tokens/s one GPU generates, sequences in flight) for a model of `params` 16-bit weights whose KV cache
    holds 2·layers·kv_width 16-bit values a token, at `seq` tokens a sequence on average."""
    kv_per_seq = 2 * 2 * layers * kv_width * seq
    room = max(0, int(utilization * gpu_bytes) - 2 * params) if vllm else None
    seqs = VLLM_MAX_SEQS if vllm else batch  # vLLM schedules its own batch; generation.batch_size is a work unit
    if room is not None:
        seqs = max(1, min(seqs, room // max(1, kv_per_seq)))
    step_bytes = 2 * params + seqs * kv_per_seq
    memory_bound = seqs * bandwidth * DECODE_EFFICIENCY / step_bytes
    compute_bound = flops / (2 * params)
    return min(memory_bound, compute_bound), seqs


def hms(seconds: float) -> str:
    """Seconds as Slurm's --time: D-HH:MM:SS past a day, else HH:MM:SS (rounded up to the minute)."""
    minutes = max(1, math.ceil(seconds / 60))
    d, rest = divmod(minutes, 24 * 60)
    text = f"{rest // 60:02d}:{rest % 60:02d}:00"
    return f"{d}-{text}" if d else text


def suggested_time(wall_s: float) -> str:
    return hms(wall_s * TIME_MARGIN)
