"""GPU figures: plain DPO vs ALLO's improve stage on a randomly initialised Llama of about 1.1 B parameters
(TinyLlama's shape, config only, nothing downloaded), ZeRO-3 on one GPU, bf16, sequences of 1024 tokens.

Per run: tokens/s (median of the steps after the first two), model FLOPs utilisation
MFU = 6 · N · tokens/s / P, where P is this GPU's bf16 matmul peak measured in the same run (8192³ matmuls), and
peak GPU memory (torch.cuda.max_memory_allocated). Runs: `allo dpo` (all parameters), `allo improve` with a
random 10% mask and dense Adam state, and the same with sparse Adam state. Goals: DPO MFU >= 35%, ALLO within 5%
of it, ALLO's peak memory below DPO's. Writes bench/results/gpu.json; record the table in bench/RESULTS.md with
the date and GPU model.
Usage: python bench/gpu.py [--steps 20] [--micro 4]      (on a GPU machine)
       python bench/gpu.py --smoke                       (a tiny model on CPU: checks the script, not the GPU)
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
from conftest import ENV  # noqa: E402
from tiny import make_tokenizer  # noqa: E402

import masked_step  # noqa: E402
from allo.launch import torchrun_command  # noqa: E402

LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, max_position_embeddings=2048, vocab_size=32000, tie_word_embeddings=False)
SMOKE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, vocab_size=512, tie_word_embeddings=False)


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
    """Model directory (random init, bf16 on disk) and pairs long enough to fill `seq` tokens after truncation."""
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
            f.write(json.dumps({"prompt": text(seq), "chosen": text(seq), "rejected": text(seq)}) + "\n")
    return tmp / "model", n_params


def run(tmp: Path, name: str, stage: str, steps: int, micro: int, seq: int, extra: list[str], smoke: bool) -> dict:
    recipe = tmp / f"{name}.yaml"
    recipe.write_text(f"""output_dir: {tmp / 'runs'}
model: {{path: {tmp / 'model'}, dtype: bf16}}
data: {{train: {tmp / 'pairs.jsonl'}, template: raw, max_length: {seq}, max_prompt_length: {seq // 4}}}
train: {{micro_batch_size: {micro}, global_batch_size: {micro}, lr: 1.0e-5, max_steps: {steps}, scheduler: constant,
         warmup_ratio: 0.0, ds_config: ds_configs/zero3.json}}
""")
    env = dict(ENV) if smoke else {k: v for k, v in ENV.items() if k != "DS_ACCELERATOR"}
    subprocess.run(torchrun_command([stage, str(recipe), "--out", str(tmp / "runs" / name), *extra], 1), cwd=ROOT,
                   env=env, check=True, capture_output=True)
    rows = [json.loads(x) for x in (tmp / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    steady = rows[2:] or rows
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
            "step_s": statistics.median(r["step_s"] for r in steady), "peak_mem_mb": max(r["peak_mem_mb"] for r in rows),
            "optim_state_mb": rows[-1]["optim_state_mb"]}


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--micro", type=int, default=4, help="pairs per step (2 × micro sequences of --seq tokens)")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script end to end")
    p.add_argument("--out", help="default: bench/results/gpu.json (gpu_smoke.json with --smoke)")
    args = p.parse_args()
    args.out = args.out or str(ROOT / "bench" / "results" / ("gpu_smoke.json" if args.smoke else "gpu.json"))
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no GPU here; run it on a GPU machine (or --smoke to check the script)")
    seq, steps = (128, 4) if args.smoke else (args.seq, args.steps)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    res: dict = {"date": time.strftime("%Y-%m-%d"), "smoke": args.smoke, "seq": seq, "micro_pairs": args.micro,
                 "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}
    res["peak_flops"] = peak_matmul_flops(device, args.smoke)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model, n_params = build(tmp, SMOKE if args.smoke else LLAMA_1B, seq, max(8, args.micro * (steps + 2)))
        res["params"] = n_params
        mask = str(masked_step.mask(model, 10, tmp / "m10.safetensors"))
        res["dpo"] = run(tmp, "dpo", "dpo", steps, args.micro, seq, [], args.smoke)
        for mode in ("dense", "sparse"):
            res[f"allo_{mode}"] = run(tmp, f"allo_{mode}", "improve", steps, args.micro, seq, [
                "--mask", mask, "--set", f"train.sparse_optimizer_state={'true' if mode == 'sparse' else 'false'}"],
                args.smoke)
    for key in ("dpo", "allo_dense", "allo_sparse"):
        res[key]["mfu"] = 6 * n_params * res[key]["tokens_per_s"] / res["peak_flops"]
    print(f"{res['device']}: {n_params / 1e9:.2f} B parameters, measured matmul peak "
          f"{res['peak_flops'] / 1e12:.1f} TFLOP/s, sequence {seq}, {args.micro} pairs per step")
    print("| run | tokens/s | MFU | MFU / DPO | peak memory MB | memory / DPO | Adam state MB |\n|---|---|---|---|---|---|---|")
    for key in ("dpo", "allo_dense", "allo_sparse"):
        r = res[key]
        print(f"| {key} | {r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% | {r['mfu'] / res['dpo']['mfu']:.3f} | "
              f"{r['peak_mem_mb']:.0f} | {r['peak_mem_mb'] / res['dpo']['peak_mem_mb']:.3f} | "
              f"{r['optim_state_mb']:.0f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
