"""Peak memory of the reference log-prob cache at UltraFeedback scale, computed and consumed, against its float32
size (goal: peak RSS growth <= 1.5x).

A child process (so peak RSS is its own) streams a synthetic cache of --pairs preference pairs x 2 responses x
--tokens tokens into --ranks shard files with `allo.logprobs.ReferenceWriter` (random log-probs in micro-batches
of 8 pairs, as the trainer writes them), then reads every pair's rows back in a random order with
`ReferenceCache`, as the training loop does, and pads them into micro-batches. Prints the float32 size, the
child's RSS before the cache work (imports) and its peak (VmHWM), and the ratio of the growth to the float32 size.
Usage: python bench/reference_cache.py [--pairs 65536] [--tokens 1024] [--ranks 2] [--dir /tmp/allo_refcache]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(args) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    from allo.logprobs import ReferenceCache, ReferenceWriter

    base = rss_mib("VmRSS")
    d = Path(args.dir)
    shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    lengths = [args.tokens, args.tokens]
    paths = []
    for rank in range(args.ranks):  # each rank's share, as `Trainer._compute_reference` streams it
        mine = list(range(rank, args.pairs, args.ranks))
        w = ReferenceWriter(d / f"rank{rank}-of-{args.ranks}.safetensors", "bench", mine, [lengths] * len(mine))
        for i in range(0, len(mine), 8):
            logps = -torch.rand(2 * len(mine[i:i + 8]), args.tokens)
            for j, idx in enumerate(mine[i:i + 8]):
                w.add(idx, [logps[j], logps[len(mine[i:i + 8]) + j]])
        w.close()
        paths.append(w.path)
    computed = time.perf_counter() - t0
    cache = ReferenceCache(paths, "bench")
    perm = torch.randperm(args.pairs, generator=torch.Generator().manual_seed(0)).tolist()
    total = 0.0
    t0 = time.perf_counter()
    for i in range(0, args.pairs, 8):
        rows = [r for idx in perm[i:i + 8] for r in cache.rows(idx)]
        total += float(torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).sum())
    consumed = time.perf_counter() - t0
    cache.close()
    shutil.rmtree(d, ignore_errors=True)
    return {"base_rss_mib": base, "peak_rss_mib": rss_mib("VmHWM"), "compute_s": computed, "consume_s": consumed,
            "checksum": total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=65536)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--dir", default="/tmp/allo_refcache")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    cmd = [sys.executable, __file__, "--child", "--pairs", str(args.pairs), "--tokens", str(args.tokens),
           "--ranks", str(args.ranks), "--dir", args.dir]
    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    fp32 = args.pairs * 2 * args.tokens * 4 / 2 ** 20
    growth = r["peak_rss_mib"] - r["base_rss_mib"]
    print(f"reference cache: {args.pairs} pairs x 2 x {args.tokens} tokens, {args.ranks} shards; float32 size "
          f"{fp32:.0f} MiB")
    print(f"| what | value |\n|---|---|\n| compute (stream to shards) | {r['compute_s']:.1f} s |\n"
          f"| consume (every pair once, random order) | {r['consume_s']:.1f} s |\n"
          f"| RSS after imports | {r['base_rss_mib']:.0f} MiB |\n| peak RSS | {r['peak_rss_mib']:.0f} MiB |\n"
          f"| peak growth / float32 size (goal <= 1.5) | {growth / fp32:.3f} |\n"
          f"| peak RSS / float32 size | {r['peak_rss_mib'] / fp32:.3f} |")


if __name__ == "__main__":
    main()
