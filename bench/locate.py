"""Locate throughput and memory next to a plain read of the same checkpoint files, in one run.

Writes two synthetic sharded safetensors checkpoints (random fp32 "base" and "tuned" = base + noise) of about
--params parameters with Llama-like tensor shapes, then, each in a fresh subprocess so peak RSS is its own:
  read    : read every tensor of both checkpoints once (the bandwidth reference; locate reads them twice),
  locate  : `allo.masks.locate.locate` with two ratios (N1 5%, N2 10%).
Each runs twice, alternating, and the faster run of each counts; first with the files in the page cache (warm:
the read is a memory-bandwidth figure), then, where this process may empty the page cache (root), from storage
(cold: the case of a checkpoint larger than memory). Prints the times, the ratio read_time / locate_time
("fraction of read bandwidth", goal >= 0.5) for each, and peak RSS (VmHWM of the child itself) against the goal
2 × largest tensor + 1 GiB.
Usage: python bench/locate.py [--params 1e9] [--dir /tmp/allo_locate_bench] [--keep]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layer_shapes(hidden: int) -> dict[str, tuple[int, ...]]:
    inter = int(hidden * 8 / 3) // 64 * 64
    return {"self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (hidden // 4, hidden),
            "self_attn.v_proj.weight": (hidden // 4, hidden), "self_attn.o_proj.weight": (hidden, hidden),
            "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
            "mlp.down_proj.weight": (hidden, inter), "input_layernorm.weight": (hidden,),
            "post_attention_layernorm.weight": (hidden,)}


def write_checkpoints(d: Path, params: float) -> tuple[int, int]:
    import torch
    from safetensors.torch import save_file

    hidden, vocab = 2048, 32000
    per_layer = sum(math.prod(s) for s in layer_shapes(hidden).values())
    layers = max(1, int((params - 2 * vocab * hidden) // per_layer))
    g = torch.Generator().manual_seed(0)
    total, largest = 0, 0
    index = {}
    for name in ("base", "tuned"):
        (d / name).mkdir(parents=True, exist_ok=True)
    shards = [("model.embed_tokens.weight", (vocab, hidden)), ("lm_head.weight", (vocab, hidden))]
    groups = [shards] + [[(f"model.layers.{i}.{k}", s) for k, s in layer_shapes(hidden).items()]
                         for i in range(layers)]
    for j, group in enumerate(groups):
        base, tuned = {}, {}
        for n, shape in group:
            w = torch.randn(shape, generator=g)
            base[n] = w
            tuned[n] = w + 1e-3 * torch.randn(shape, generator=g)
            total += w.numel()
            largest = max(largest, w.numel())
        f = f"model-{j:05d}.safetensors"
        save_file(base, str(d / "base" / f))
        save_file(tuned, str(d / "tuned" / f))
        index.update({n: f for n, _ in group})
    for name in ("base", "tuned"):
        (d / name / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    return total, largest


def child(mode: str, d: Path) -> None:
    from safetensors import safe_open

    sys.path.insert(0, str(ROOT))
    from allo.masks.locate import locate  # imported before the clock starts, like safetensors for the read
    from allo.metrics import peak_rss_mb

    t0 = time.perf_counter()
    if mode == "read":
        for name in ("base", "tuned"):
            for f in sorted((d / name).glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        h.get_tensor(k).sum()  # touch every byte
    else:
        locate(d / "base", d / "tuned", 1e-6, {"n1": 5, "n2": 10}, d / "masks")
    print(json.dumps({"seconds": time.perf_counter() - t0,
                      "peak_rss_mb": peak_rss_mb()}))


def drop_page_cache() -> bool:
    """Empty the kernel's page cache so the next read comes from storage; False where that is not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def rounds(d: Path, cold: bool) -> dict:
    """read and locate, alternated twice, each in a fresh process (from storage when `cold`); the faster of each."""
    res: dict = {}
    for mode in ("read", "locate", "read", "locate"):
        if cold:
            drop_page_cache()
        out = subprocess.run([sys.executable, __file__, "--dir", str(d), "--child", mode], check=True,
                             capture_output=True, text=True).stdout
        got = json.loads(out.strip().splitlines()[-1])
        res[mode] = min(res.get(mode, got), got, key=lambda r: r["seconds"])
    res["fraction_of_read_bandwidth"] = res["read"]["seconds"] / res["locate"]["seconds"]
    return res


def measure(params: float, d: Path, keep: bool = False) -> dict:
    """Write the checkpoints, time a plain read and a locate of them (each in a fresh process); the figures."""
    shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    total, largest = write_checkpoints(d, params)
    print(f"wrote 2 × {total / 1e9:.2f} B fp32 parameters ({2 * total * 4 / 2 ** 30:.1f} GiB) in "
          f"{time.perf_counter() - t0:.0f} s; largest tensor {largest * 4 / 2 ** 20:.0f} MiB")
    res: dict = {"params": total, "largest_tensor_mb": largest * 4 / 2 ** 20}
    res.update(rounds(d, cold=False))
    if drop_page_cache():
        res["cold"] = rounds(d, cold=True)
    res["rss_goal_mb"] = (2 * largest * 4 + 2 ** 30) / 2 ** 20
    if not keep:
        shutil.rmtree(d, ignore_errors=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params", type=float, default=1e9)
    p.add_argument("--dir", default="/tmp/allo_locate_bench")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--child", choices=["read", "locate"], help=argparse.SUPPRESS)
    args = p.parse_args()
    d = Path(args.dir)
    if args.child:
        return child(args.child, d)
    res = measure(args.params, d, args.keep)
    goal_mb = res["rss_goal_mb"]
    print("| page cache | run | seconds | peak RSS MiB |\n|---|---|---|---|")
    for label, r in (("warm", res), ("cold", res.get("cold"))):
        if r:
            for mode in ("read", "locate"):
                print(f"| {label} | {mode} | {r[mode]['seconds']:.2f} | {r[mode]['peak_rss_mb']:.0f} |")
            print(f"| {label} | fraction of read bandwidth (goal >= 0.5) | {r['fraction_of_read_bandwidth']:.2f} | |")
    print(f"locate peak RSS {res['locate']['peak_rss_mb']:.0f} MiB vs goal {goal_mb:.0f} MiB (2 × largest tensor + 1 GiB)")


if __name__ == "__main__":
    main()
