"""GPU figures, side by side in one run: TRL's DPOTrainer, `allo dpo` (on one GPU: ZeRO-0 under bf16 autocast, and
ZeRO-3 as configured beside it), and `allo improve` under a random 10% mask with dense and with sparse Adam moments,
on a randomly initialised Llama of about 1.1 B parameters (TinyLlama's shape, config only, nothing downloaded), one
GPU, bf16, gradient checkpointing on for both, sequences of --seq tokens, --micro pairs per step.

Per run: tokens/s (median of the steps after the first two; every sequence fills --seq tokens), model FLOPs
utilisation MFU = 6 · N · tokens/s / P, where P is this GPU's bf16 matmul peak measured in the same run (8192³
matmuls), and peak GPU memory (torch.cuda.max_memory_allocated). TRL runs with its GPU defaults (bf16 mixed
precision, gradient checkpointing) and reference log-probs precomputed, as allo computes them. Prints one table
and the ratios the speed goals are stated in; writes bench/results/gpu.json (record the table in
bench/RESULTS.md with the date and GPU model). A child that fails prints its stderr tail and its log's path; the
other runs still go, and the script exits 1.
Usage: python bench/gpu.py [--steps 12] [--micro 4] [--seq 1024]   (on a GPU machine; `make gpu-check`)
       python bench/gpu.py --smoke                                (a tiny model on the CPU: checks the script)
       python bench/gpu.py --plan [--gpu-memory 141GiB]           (no GPU needed: `allo plan` of the allo runs)
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from conftest import ENV, GPU_ENV  # noqa: E402
from tiny import make_tokenizer  # noqa: E402

import masked_step  # noqa: E402
from allo.launch import torchrun_command  # noqa: E402

LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, max_position_embeddings=2048, vocab_size=32000, tie_word_embeddings=False)
SMOKE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, vocab_size=512, tie_word_embeddings=False)
RUNS = ("trl", "dpo", "dpo_zero3", "allo_dense", "allo_sparse")
# (label, numerator, denominator, key, goal): the goals of the speed work, as ratios measured in this run
RATIOS = (("allo dpo tokens/s ÷ TRL DPOTrainer's", "dpo", "trl", "tokens_per_s", ">= 1.0"),
          ("allo dpo peak memory ÷ TRL's", "dpo", "trl", "peak_mem_mb", "<= 1.0"),
          ("improve (dense moments) tokens/s ÷ allo dpo", "allo_dense", "dpo", "tokens_per_s", ">= 0.95"),
          ("improve (sparse moments) tokens/s ÷ allo dpo", "allo_sparse", "dpo", "tokens_per_s", ">= 1.0"),
          ("allo dpo tokens/s ÷ allo dpo under ZeRO-3 as configured", "dpo", "dpo_zero3", "tokens_per_s", ""),
          ("allo dpo peak memory ÷ allo dpo under ZeRO-3 as configured", "dpo", "dpo_zero3", "peak_mem_mb", ""))


class ChildFailed(RuntimeError):
    """A benchmark child exited non-zero; the message holds its stderr tail and the log's path."""


def run_child(cmd: list[str], log: Path, env: dict, timeout: int = 900) -> str:
    """Run `cmd`, its stdout and stderr into `log`; its stdout, or ChildFailed with the tail of what it printed."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              timeout=timeout)
        f.write(f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-40:])
        raise ChildFailed(f"exit {proc.returncode}: {' '.join(cmd[:6])} ...\n{tail}\nfull log: {log}")
    return proc.stdout


def peak_matmul_flops(device: str, smoke: bool) -> float:
    """Measured dense matmul throughput (FLOP/s) of this device: bf16 8192³ on a GPU."""
    n, dtype = (512, torch.float32) if smoke else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    reps, t0 = 20, time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def build(tmp: Path, cfg: dict, seq: int, pairs: int) -> tuple[Path, int]:
    """Model directory (random init, bf16 on disk) and pairs whose every sequence fills `seq` tokens after
    truncation: a short prompt (within allo's max_prompt_length of seq/4) and long responses."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(tmp / "model")
    torch.manual_seed(0)
    config = LlamaConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         **cfg)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(tmp / "model"))
    n_params = sum(p.numel() for p in model.parameters())
    rng = random.Random(0)
    words = ["apples", "Tom", "has", "buys", "more", "The", "answer", "is", "plus", "step", "think"]
    with open(tmp / "pairs.jsonl", "w") as f:
        for _ in range(pairs):
            text = lambda k: " ".join(rng.choice(words) + str(rng.randint(0, 99)) for _ in range(k))  # noqa: E731
            f.write(json.dumps({"prompt": text(seq // 16), "chosen": text(seq), "rejected": text(seq)}) + "\n")
    return tmp / "model", n_params


def allo_recipe(tmp: Path, micro: int, steps: int, seq: int) -> str:
    """The recipe of every allo run here: bf16, gradient checkpointing on (TRL's default, so that both recompute
    alike), the paper recipes' ds_config (on one GPU, `train.single_rank: fast` trains it with ZeRO-0 under
    autocast; the dpo_zero3 run keeps ZeRO-3)."""
    return f"""output_dir: {tmp / 'runs'}
model: {{path: {tmp / 'model'}, dtype: bf16, gradient_checkpointing: true}}
data: {{train: {tmp / 'pairs.jsonl'}, template: raw, max_length: {seq}, max_prompt_length: {seq // 4}}}
train: {{micro_batch_size: {micro}, global_batch_size: {micro}, lr: 1.0e-5, max_steps: {steps},
         scheduler: constant, warmup_ratio: 0.0, ds_config: ds_configs/zero3.json}}
"""


def allo_run(tmp: Path, name: str, stage: str, args, seq: int, extra: list[str], env: dict, logs: Path) -> dict:
    recipe = tmp / f"{name}.yaml"
    recipe.write_text(allo_recipe(tmp, args.micro, args.steps, seq))
    run_child(torchrun_command([stage, str(recipe), "--out", str(tmp / "runs" / name), *extra], 1),
              logs / f"{name}.log", env)
    rows = [json.loads(x) for x in (tmp / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    steady = rows[2:] or rows
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
            "step_s": statistics.median(r["step_s"] for r in steady), "peak_mem_mb": max(r["peak_mem_mb"] for r in rows),
            "optim_state_mb": rows[-1]["optim_state_mb"]}


def trl_run(tmp: Path, args, seq: int, env: dict, logs: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "trl_dpo.py"), "--model", str(tmp / "model"), "--pairs",
           str(tmp / "pairs.jsonl"), "--out", str(tmp / "trl"), "--batch", str(args.micro), "--max-length", str(seq),
           "--steps", str(args.steps), "--lr", "1e-5", "--precompute"] + ([] if args.smoke else ["--gpu"])
    res = json.loads(run_child(cmd, logs / "trl.log", env).strip().splitlines()[-1])
    res["tokens_per_s"] = 2 * args.micro * seq / res["step_s"]  # every chosen and rejected sequence fills `seq`
    res.setdefault("peak_mem_mb", res["peak_rss_mb"])
    return res


def table(res: dict) -> str:
    lines = [f"{res['device']}: {res['params'] / 1e9:.2f} B parameters, measured matmul peak "
             f"{res['peak_flops'] / 1e12:.1f} TFLOP/s, sequence {res['seq']}, {res['micro_pairs']} pairs per step",
             "", "| run | tokens/s | MFU | peak memory MB | Adam state MB |", "|---|---|---|---|---|"]
    for key in RUNS:
        r = res.get(key, {})
        if "error" in r:
            lines.append(f"| {key} | failed | | | |")
            continue
        state = f"{r['optim_state_mb']:.0f}" if "optim_state_mb" in r else "—"
        lines.append(f"| {key} | {r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% | {r['peak_mem_mb']:.0f} | {state} |")
    lines += ["", "| figure | measured | goal |", "|---|---|---|"]
    for label, num, den, key, goal in RATIOS:
        a, b = res.get(num, {}), res.get(den, {})
        value = f"{a[key] / b[key]:.3f}" if key in a and key in b else "—"
        lines.append(f"| {label} | {value} | {goal} |")
    mfu = f"{100 * res['dpo']['mfu']:.1f}%" if "mfu" in res.get("dpo", {}) else "—"
    lines.append(f"| allo dpo MFU | {mfu} | >= 35% |")
    return "\n".join(lines)


def print_plan(args) -> None:
    """`allo plan` of the dpo and improve runs as this script would start them on one GPU of --gpu-memory: the one-rank
    engine and ZeRO-3 as configured, each with the bytes torch.cuda.max_memory_allocated counts (the plan's peak
    without its runtime reserve), which is what the table's peak memory column measures."""
    from transformers import LlamaConfig

    from allo.config import load_recipe
    from allo.plan import GiB, Hardware, model_config, parse_bytes, shape_of, train_plan
    from allo.steps import REGISTRY

    hw = Hardware(1, 1, parse_bytes(args.gpu_memory))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        LlamaConfig(**LLAMA_1B).save_pretrained(str(tmp / "model"))
        text = allo_recipe(tmp, args.micro, args.steps, args.seq)
        for name, step, mode in (("dpo", "dpo", "fast"), ("dpo_zero3", "dpo", "as_configured"),
                                 ("allo_dense", "improve", "fast")):
            (tmp / "r.yaml").write_text(text.replace("ds_config:", f"single_rank: {mode}, ds_config:"))
            recipe = load_recipe(str(tmp / "r.yaml"))
            p = train_plan(recipe, REGISTRY[step], shape_of(model_config(recipe)), hw)
            allocated = p.peak - p.terms.get("runtime reserve", 0)
            print(f"{name}: {allocated / 2 ** 20:,.0f} MiB allocated at the peak ({p.peak / GiB:.2f} GiB with the "
                  f"runtime reserve); {p.engine}")
            print("\n".join(f"    {k:38s} {v / 2 ** 20:9,.0f} MiB  {', '.join(p.phases.get(k, ('always',)))}"
                            for k, v in p.terms.items()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--micro", type=int, default=4, help="pairs per step (2 × micro sequences of --seq tokens)")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script end to end")
    p.add_argument("--out", help="default: bench/results/gpu.json (gpu_smoke.json with --smoke); logs beside it")
    p.add_argument("--plan", action="store_true", help="print allo plan's memory for the allo runs; run nothing")
    p.add_argument("--gpu-memory", default="141GiB", help="the GPU's memory for --plan (default: an H200's)")
    args = p.parse_args()
    if args.plan:
        print_plan(args)
        return 0
    out = Path(args.out or ROOT / "bench" / "results" / ("gpu_smoke.json" if args.smoke else "gpu.json"))
    logs = out.parent / f"{out.stem}_logs"
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no GPU here; run it on a GPU machine (or --smoke to check the script)")
    seq = 128 if args.smoke else args.seq
    if args.smoke:
        args.steps = min(args.steps, 4)
    device = "cpu" if args.smoke else "cuda"
    env = ENV if args.smoke else GPU_ENV
    res: dict = {"date": time.strftime("%Y-%m-%d"), "smoke": args.smoke, "seq": seq, "micro_pairs": args.micro,
                 "steps": args.steps, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}
    res["peak_flops"] = peak_matmul_flops(device, args.smoke)
    failed = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model, n_params = build(tmp, SMOKE if args.smoke else LLAMA_1B, seq, max(8, args.micro * (args.steps + 2)))
        res["params"] = n_params
        mask = str(masked_step.mask(model, 10, tmp / "m10.safetensors"))
        jobs = {"trl": lambda: trl_run(tmp, args, seq, env, logs),
                "dpo": lambda: allo_run(tmp, "dpo", "dpo", args, seq, [], env, logs),
                "dpo_zero3": lambda: allo_run(tmp, "dpo_zero3", "dpo", args, seq,
                                              ["--set", "train.single_rank=as_configured"], env, logs)}
        for mode in ("dense", "sparse"):
            jobs[f"allo_{mode}"] = lambda mode=mode: allo_run(tmp, f"allo_{mode}", "improve", args, seq, [
                "--mask", mask, "--set", f"train.sparse_optimizer_state={'true' if mode == 'sparse' else 'false'}"],
                env, logs)
        for key, job in jobs.items():
            try:
                res[key] = job()
                res[key]["mfu"] = 6 * n_params * res[key]["tokens_per_s"] / res["peak_flops"]
            except (ChildFailed, subprocess.TimeoutExpired) as e:
                print(f"bench/gpu.py: {key} failed: {e}", file=sys.stderr, flush=True)
                res[key] = {"error": str(e)[-2000:]}
                failed.append(key)
    print(table(res))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"written {out}" + (f"; failed: {', '.join(failed)} (logs in {logs})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
