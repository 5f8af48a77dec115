"""GPU figures, side by side in one run: TRL's DPOTrainer, `allo dpo` (on one GPU: ZeRO-0 under bf16 autocast, and
ZeRO-3 as configured beside it), and `allo improve` under a random 10% mask with dense and with sparse Adam moments,
on a randomly initialised Llama of about 1.1 B parameters (TinyLlama's shape, config only, nothing downloaded), one
GPU, bf16, gradient checkpointing on for both, sequences of --seq tokens, --micro pairs per step.

Per run: tokens/s (every sequence fills --seq tokens; the steps after the first two), model FLOPs utilisation
MFU = 6 · N · tokens/s / P, where P is this GPU's bf16 matmul peak measured in the same run (8192³ matmuls), and peak
GPU memory (torch.cuda.max_memory_allocated). TRL runs at its leanest valid setting (bench/trl_dpo.py: reference
log-probs precomputed, no reference model kept; any reference it keeps is reported and left out of the memory ratio).

Runs in alternating rounds, by value: each round runs TRL and allo dpo (their order swapped every round), then improve
with dense and sparse moments; allo dpo under ZeRO-3 once, after round 2. A ratio is the geometric mean over rounds of
the per-round ratio of median tokens/s; its 95% interval comes from a hierarchical bootstrap (rounds, then steps
within a run). Rounds go on, up to --max-rounds, until every goal ratio's interval is within ±5% (a 5% difference
resolved), or until --budget-s would be passed by the next run. The JSON is written after every run and the finished
rows printed as they come, so a run cut short keeps what it measured; `--table FILE` prints the table of a JSON,
with the reason for each row that has no figure.
Usage: python bench/gpu.py [--steps 12] [--micro 4] [--seq 1024] [--budget-s S]   (on a GPU: `make gpu-check`)
       python bench/gpu.py --smoke                                (a tiny model on the CPU: checks the script)
       python bench/gpu.py --table bench/results/gpu.json         (the table of a finished or cut-short run)
       python bench/gpu.py --plan [--gpu-memory 141GiB]           (no GPU needed: `allo plan` of the allo runs)
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
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
RUNS = ("trl", "dpo", "allo_dense", "allo_sparse", "dpo_zero3")  # in the order of their value
# (label, numerator, denominator, key, goal): the goals of the speed work, as ratios measured in this run
RATIOS = (("allo dpo tokens/s ÷ TRL DPOTrainer's", "dpo", "trl", "tokens_per_s", ">= 1.0"),
          ("allo dpo peak memory ÷ TRL's", "dpo", "trl", "peak_mem_mb", "<= 1.0"),
          ("improve (dense moments) tokens/s ÷ allo dpo", "allo_dense", "dpo", "tokens_per_s", ">= 0.95"),
          ("improve (sparse moments) tokens/s ÷ allo dpo", "allo_sparse", "dpo", "tokens_per_s", ">= 1.0"),
          ("allo dpo tokens/s ÷ allo dpo under ZeRO-3 as configured", "dpo", "dpo_zero3", "tokens_per_s", ""),
          ("allo dpo peak memory ÷ allo dpo under ZeRO-3 as configured", "dpo", "dpo_zero3", "peak_mem_mb", ""))
RESOLVE = 0.05  # rounds go on until every goal ratio's 95% interval is within ±5% of it


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
    out = tmp / "runs" / name
    shutil.rmtree(out, ignore_errors=True)  # each round trains afresh
    run_child(torchrun_command([stage, str(recipe), "--out", str(out), *extra], 1), logs / f"{name}.log", env)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"step_tokens_per_s": [r["tokens_per_s"] for r in (rows[2:] or rows)],
            "peak_mem_mb": max(r["peak_mem_mb"] for r in rows), "optim_state_mb": rows[-1]["optim_state_mb"]}


def trl_run(tmp: Path, args, seq: int, env: dict, logs: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "trl_dpo.py"), "--model", str(tmp / "model"), "--pairs",
           str(tmp / "pairs.jsonl"), "--out", str(tmp / "trl"), "--batch", str(args.micro), "--max-length", str(seq),
           "--steps", str(args.steps), "--lr", "1e-5", "--precompute"] + ([] if args.smoke else ["--gpu"])
    res = json.loads(run_child(cmd, logs / "trl.log", env).strip().splitlines()[-1])
    tokens = 2 * args.micro * seq  # every chosen and rejected sequence fills `seq`
    peak = res.get("peak_mem_mb", res["peak_rss_mb"])
    return {"step_tokens_per_s": [tokens / t for t in res["step_times"]], "peak_mem_mb": peak - res["ref_model_mb"],
            "ref_model_mb": res["ref_model_mb"], "settings": res["settings"]}


# ------------------------------------------------------------------------------------------------- statistics
def _geomean(xs: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(x) for x in xs))


def ratio_interval(num: list[list[float]], den: list[list[float]], draws: int = 2000,
                   seed: int = 0) -> tuple[float, float, float]:
    """(ratio, low, high): the geometric mean over rounds of median(num) / median(den) within each round, and its 95%
    interval by a hierarchical bootstrap: rounds drawn with replacement (a round keeps its pair: both ran under the
    same conditions), then each run's steps drawn with replacement. One round gives step-to-step spread only."""
    rng = random.Random(seed)
    ratio = _geomean([statistics.median(a) / statistics.median(b) for a, b in zip(num, den)])
    pick = lambda xs: [rng.choice(xs) for _ in xs]  # noqa: E731
    boot = sorted(_geomean([statistics.median(pick(num[r])) / statistics.median(pick(den[r]))
                            for r in pick(list(range(len(num))))]) for _ in range(draws))
    return ratio, boot[int(0.025 * draws)], boot[int(0.975 * draws) - 1]


def summarise(res: dict) -> None:
    """Per run: medians over its rounds (the table's row); per ratio: its value, interval and rounds, from the
    rounds in which both runs finished."""
    for key, rounds in res["rounds"].items():
        done = [r for r in rounds if "error" not in r]
        if not done:
            res[key] = {"error": rounds[-1]["error"]}
            continue
        tps = statistics.median(statistics.median(r["step_tokens_per_s"]) for r in done)
        res[key] = {"tokens_per_s": tps, "mfu": 6 * res["params"] * tps / res["peak_flops"], "rounds": len(done),
                    "peak_mem_mb": statistics.median(r["peak_mem_mb"] for r in done),
                    **{k: done[-1][k] for k in ("optim_state_mb", "ref_model_mb", "settings") if k in done[-1]}}
    res["ratios"] = {}
    for label, num, den, key, goal in RATIOS:
        pairs = _same_round(res, num, den)
        if not pairs:
            continue
        if key == "tokens_per_s":
            value, low, high = ratio_interval([a["step_tokens_per_s"] for a, _ in pairs],
                                              [b["step_tokens_per_s"] for _, b in pairs])
        else:  # the allocator's peak hardly varies between runs: the median ratio and its range over rounds
            values = [a[key] / b[key] for a, b in pairs]
            value, low, high = statistics.median(values), min(values), max(values)
        res["ratios"][label] = {"value": value, "low": low, "high": high, "rounds": len(pairs), "goal": goal}


def _same_round(res: dict, num: str, den: str) -> list[tuple[dict, dict]]:
    """The finished runs of `num` and `den` paired by round (ZeRO-3's one run with the dpo run of its round)."""
    by_round = {k: {r["round"]: r for r in res["rounds"].get(k, []) if "error" not in r} for k in (num, den)}
    return [(by_round[num][i], by_round[den][i]) for i in sorted(by_round[num]) if i in by_round[den]]


def unresolved(res: dict) -> list[str]:
    """Goal ratios of tokens/s whose interval is wider than ±RESOLVE (or not measured yet)."""
    out = []
    for label, _, _, key, goal in RATIOS:
        r = res.get("ratios", {}).get(label)
        if goal and key == "tokens_per_s" and (r is None or max(r["high"] / r["value"] - 1,
                                                                1 - r["low"] / r["value"]) > RESOLVE):
            out.append(label)
    return out


def table(res: dict) -> str:
    lines = [f"{res['device']}: {res.get('params', 0) / 1e9:.2f} B parameters, measured matmul peak "
             f"{res.get('peak_flops', 0) / 1e12:.1f} TFLOP/s, sequence {res['seq']}, {res['micro_pairs']} pairs per "
             f"step, {res['steps']} steps per run", "",
             "| run | rounds | tokens/s | MFU | peak memory MB | Adam state MB |", "|---|---|---|---|---|---|"]
    for key in RUNS:
        r = res.get(key)
        if r is None:
            lines.append(f"| {key} | — | not run: {res.get('not_run', {}).get(key, 'not reached')} | | | |")
        elif "error" in r:
            lines.append(f"| {key} | — | failed: {_first_line(r['error'])} | | | |")
        else:
            state = f"{r['optim_state_mb']:.0f}" if "optim_state_mb" in r else "—"
            lines.append(f"| {key} | {r['rounds']} | {r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% | "
                         f"{r['peak_mem_mb']:.0f} | {state} |")
    lines += ["", "| figure | measured | 95% interval (tokens/s) or range (memory) | rounds | goal |",
              "|---|---|---|---|---|"]
    for label, _, _, _, goal in RATIOS:
        r = res.get("ratios", {}).get(label)
        if r is None:
            lines.append(f"| {label} | — | | | {goal} |")
        else:
            lines.append(f"| {label} | {r['value']:.3f} | [{r['low']:.3f}, {r['high']:.3f}] | {r['rounds']} | {goal} |")
    mfu = f"{100 * res['dpo']['mfu']:.1f}%" if "mfu" in res.get("dpo", {}) else "—"
    lines.append(f"| allo dpo MFU | {mfu} | | | >= 35% |")
    trl = res.get("trl", {})
    if "settings" in trl:
        lines.append(f"\nTRL: {trl['settings']}" + (f"; its reference model's {trl['ref_model_mb']:.0f} MiB are left "
                     "out of its peak (allo keeps no reference model)" if trl.get("ref_model_mb") else ""))
    if res.get("unresolved"):
        lines.append(f"not resolved to ±{100 * RESOLVE:.0f}%: {'; '.join(res['unresolved'])}")
    return "\n".join(lines)


def _first_line(error: str) -> str:
    return next((x for x in error.splitlines() if x.strip()), "?")[:160].replace("|", "/")


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


def schedule(max_rounds: int) -> list[tuple[int, str]]:
    """(round, run) in the order they run: TRL and allo dpo first (their order swapped every round), then improve
    with dense and sparse moments (swapped likewise); allo dpo under ZeRO-3 once, after round 2."""
    out = []
    for r in range(max_rounds):
        pair, improve = ["trl", "dpo"], ["allo_dense", "allo_sparse"]
        if r % 2:
            pair.reverse()
            improve.reverse()
        out += [(r, k) for k in pair + improve]
        if r == min(1, max_rounds - 1):
            out.append((r, "dpo_zero3"))
    return out


def write(res: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2))
    tmp.replace(out)  # atomic: a run killed mid-write keeps the previous file


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--micro", type=int, default=4, help="pairs per step (2 × micro sequences of --seq tokens)")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=2, help="rounds at least (time budget permitting)")
    p.add_argument("--max-rounds", type=int, default=6, help="rounds at most, while a goal ratio is unresolved")
    p.add_argument("--budget-s", type=float, default=0, help="start no run that would end after this many seconds "
                   "(estimated from the runs so far); 0: no limit")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script end to end")
    p.add_argument("--out", help="default: bench/results/gpu.json (gpu_smoke.json with --smoke); logs beside it")
    p.add_argument("--table", metavar="JSON", help="print the table of a written JSON; run nothing")
    p.add_argument("--plan", action="store_true", help="print allo plan's memory for the allo runs; run nothing")
    p.add_argument("--gpu-memory", default="141GiB", help="the GPU's memory for --plan (default: an H200's)")
    args = p.parse_args()
    if args.plan:
        print_plan(args)
        return 0
    if args.table:
        path = Path(args.table)
        if not path.exists():
            print(f"bench/gpu.py: {path} was never written: the check stopped before its first run finished")
            return 1
        print(table(json.loads(path.read_text())))
        return 0
    out = Path(args.out or ROOT / "bench" / "results" / ("gpu_smoke.json" if args.smoke else "gpu.json"))
    logs = out.parent / f"{out.stem}_logs"
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no GPU here; run it on a GPU machine (or --smoke to check the script)")
    t0 = time.monotonic()
    seq = 128 if args.smoke else args.seq
    if args.smoke:
        args.steps = min(args.steps, 4)
    device = "cpu" if args.smoke else "cuda"
    env = ENV if args.smoke else GPU_ENV
    res: dict = {"date": time.strftime("%Y-%m-%d"), "smoke": args.smoke, "seq": seq, "micro_pairs": args.micro,
                 "steps": args.steps, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                 "rounds": {}, "not_run": {}}
    res["peak_flops"] = peak_matmul_flops(device, args.smoke)
    failed: set[str] = set()
    took: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model, res["params"] = build(tmp, SMOKE if args.smoke else LLAMA_1B, seq, max(8, args.micro * (args.steps + 2)))
        write(res, out)
        print(f"bench/gpu.py: model built ({res['params'] / 1e9:.2f} B parameters) in {time.monotonic() - t0:.0f} s",
              flush=True)
        mask: list[str] = []  # built before the first improve run, after TRL and allo dpo have their figures

        def improve(mode: str) -> dict:
            if not mask:
                mask.append(str(masked_step.mask(model, 10, tmp / "m10.safetensors")))
            return allo_run(tmp, f"allo_{mode}", "improve", args, seq, ["--mask", mask[0], "--set",
                            f"train.sparse_optimizer_state={'true' if mode == 'sparse' else 'false'}"], env, logs)

        jobs = {"trl": lambda: trl_run(tmp, args, seq, env, logs),
                "dpo": lambda: allo_run(tmp, "dpo", "dpo", args, seq, [], env, logs),
                "allo_dense": lambda: improve("dense"), "allo_sparse": lambda: improve("sparse"),
                "dpo_zero3": lambda: allo_run(tmp, "dpo_zero3", "dpo", args, seq,
                                              ["--set", "train.single_rank=as_configured"], env, logs)}
        for r, key in schedule(args.max_rounds):
            if key in failed or (r >= args.rounds and not unresolved(res)):
                continue
            guess = took.get(key) or max(took.values(), default=0.0)
            if args.budget_s and time.monotonic() - t0 + guess > args.budget_s:
                res["not_run"].setdefault(key, f"time budget ({args.budget_s:.0f} s) reached")
                continue
            start = time.monotonic()
            try:
                run = {"round": r, **jobs[key]()}
            except (ChildFailed, subprocess.TimeoutExpired) as e:
                print(f"bench/gpu.py: {key} failed: {e}", file=sys.stderr, flush=True)
                run = {"round": r, "error": str(e)[-2000:]}
                failed.add(key)
            took[key] = time.monotonic() - start
            res["rounds"].setdefault(key, []).append(run)
            summarise(res)
            res["unresolved"] = unresolved(res)
            write(res, out)
            row = res[key]
            print(f"bench/gpu.py: round {r + 1} {key}: " + ("failed" if "error" in run else
                  f"{statistics.median(run['step_tokens_per_s']):.0f} tokens/s, peak {run['peak_mem_mb']:.0f} MB") +
                  f" ({took[key]:.0f} s; {row.get('rounds', 0)} rounds so far)", flush=True)
    print(table(res))
    print(f"written {out}" + (f"; failed: {', '.join(sorted(failed))} (logs in {logs})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
