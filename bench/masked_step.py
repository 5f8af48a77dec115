"""Masked-stage cost, measured side by side in one run (2 ranks, ZeRO-3, CPU):

1. step time of ALLO's improve stage (10% mask, dense and sparse Adam state) over plain full-parameter DPO on
   the same model, data and batch (goal: ≤ 1.05);
2. Adam-moment bytes, dense masked vs sparse, at mask ratios 5/10/20% (sparse goal at 10%: ~10% of dense).

Each configuration is a real `allo` run under torchrun; times are medians of the steps after the first two.
Usage: python bench/masked_step.py [--steps 12] [--rounds 1] [--only improve_dense_10] [--out FILE.json]
(`--only` runs the named configurations alone, e.g. under py-spy: see bench/RESULTS.md, profiling notes.)
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from conftest import ENV  # noqa: E402
from tiny import make_tokenizer, write_pairs  # noqa: E402

from allo.launch import torchrun_command  # noqa: E402

BENCH_LLAMA = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False)


# dpo_masked_10: plain DPO's objective under improve's 10% mask, which splits improve / DPO into the masking's cost
# (dpo_masked_10 / dpo) and the noise-masked objective's (improve_dense_10 / dpo_masked_10).
CONFIGS = ["dpo"] + [f"improve_{mode}_{r}" for r in (5, 10, 20) for mode in ("dense", "sparse")] + ["dpo_masked_10"]


def build(tmp: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(tmp / "model")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **BENCH_LLAMA)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp / "model"))
    write_pairs(tmp / "pairs.jsonl", n=96)
    return tmp / "model"


def mask(model: Path, ratio: float, out: Path) -> Path:
    from safetensors.torch import load_file

    from allo.masks.io import save_masks

    g = torch.Generator().manual_seed(1)
    w = load_file(str(model / "model.safetensors"))
    m = {n: torch.rand(t.shape, generator=g) < ratio / 100 for n, t in w.items()}
    save_masks(out, m, {"counts": {n: int(v.sum()) for n, v in m.items()}})
    return out


def run(tmp: Path, name: str, stage: str, steps: int, extra: list[str], nproc: int = 2, micro: int = 4,
        global_batch: int = 16, weight_decay: float = 0.01, ds_config: str = "ds_configs/zero3.json",
        env: dict | None = None) -> dict:
    """One `allo STAGE` run under torchrun; medians over the steps after the first two, and peak RSS."""
    recipe = tmp / f"{name}.yaml"
    recipe.write_text(f"""output_dir: {tmp / 'runs'}
model: {{path: {tmp / 'model'}, dtype: fp32}}
data: {{train: {tmp / 'pairs.jsonl'}, template: raw, max_length: 64, max_prompt_length: 32}}
train: {{micro_batch_size: {micro}, global_batch_size: {global_batch}, lr: 1.0e-4, max_steps: {steps},
         weight_decay: {weight_decay}, scheduler: constant, warmup_ratio: 0.0, ds_config: {ds_config}}}
""")
    cmd = torchrun_command([stage, str(recipe), "--out", str(tmp / "runs" / name), *extra], nproc)
    subprocess.run(cmd, cwd=ROOT, env=env or ENV, check=True, capture_output=True)
    rows = [json.loads(x) for x in (tmp / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    step = statistics.median(r["step_s"] for r in rows[2:])
    return {"step_s": step, "pairs_per_s": global_batch / step, "optim_state_mb": rows[-1]["optim_state_mb"],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[2:]),
            "peak_rss_mb": max(r["peak_mem_mb"] for r in rows)}


def figure1_runs(tmp: Path, model: Path, steps: int, env: dict) -> dict[str, Callable[[int], dict]]:
    """Figure 1's allo runs (run_all.py, figure1.py): plain DPO and the improve stage under a 10% mask, one process,
    ZeRO-0, each a function of the round number."""
    mask10 = str(mask(model, 10, tmp / "m10.safetensors"))
    single = dict(nproc=1, micro=8, global_batch=8, weight_decay=0.0, ds_config="ds_configs/zero0.json", env=env)
    return {"allo_dpo": lambda r: run(tmp, f"allo_dpo{r}", "dpo", steps, [], **single),
            "allo_improve_10": lambda r: run(tmp, f"allo_improve{r}", "improve", steps, ["--mask", mask10],
                                             **single)}


def fastest(res: dict, runs: dict[str, Callable[[int], dict]], rounds: int) -> None:
    """Run every configuration `rounds` times, in alternating order, and keep the fastest run of each in `res`
    (interference from other load only ever slows a run down); every step time goes to res["step_s_all"]."""
    orders = [list(runs), list(runs)[::-1]]
    for r in range(rounds):
        for name in orders[r % 2]:
            got = runs[name](r)
            res.setdefault("step_s_all", {}).setdefault(name, []).append(got["step_s"])
            res[name] = min(res.get(name, got), got, key=lambda x: x["step_s"])


def configs(tmp: Path, model: Path, steps: int, wanted: list[str]) -> dict[str, Callable[[int], dict]]:
    """The 2-rank ZeRO-3 runs named in `wanted` (from CONFIGS), each a function of the round number; each mask
    ratio's file is written once, for its dense and sparse runs alike."""
    runs: dict[str, Callable[[int], dict]] = {}
    if "dpo" in wanted:
        runs["dpo"] = lambda i: run(tmp, f"dpo_{i}", "dpo", steps, [])
    for r in (5, 10, 20):
        modes = [mode for mode in ("dense", "sparse") if f"improve_{mode}_{r}" in wanted]
        m = str(mask(model, r, tmp / f"m{r}.safetensors")) if modes or f"dpo_masked_{r}" in wanted else ""
        if f"dpo_masked_{r}" in wanted:
            runs[f"dpo_masked_{r}"] = lambda i, r=r, m=m: run(tmp, f"dpo_masked_{r}_{i}", "dpo", steps, ["--mask", m])
        for mode in modes:
            name = f"improve_{mode}_{r}"
            runs[name] = lambda i, name=name, m=m, mode=mode: run(tmp, f"{name}_{i}", "improve", steps, [
                "--mask", m, "--set", f"train.sparse_optimizer_state={'true' if mode == 'sparse' else 'false'}"])
    return runs


def objective_cost(micro: int = 4, width: int = 64, repeats: int = 2000) -> dict:
    """Seconds per call (forward and backward) of DPO's and the improve stage's objectives on a batch of the shape
    `run` trains on (micro pairs, `width` tokens, half of them prompt), one thread, in alternating blocks: what
    improve's noise-masked loss costs over DPO's, apart from any masking of gradients."""
    import time

    from allo.config import Recipe
    from allo.stages import STAGES

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rows = 2 * micro
    labels = torch.randint(3, 300, (rows, width), generator=g)
    labels[:, : width // 2] = -100
    batch = {"labels": labels, "ref_logps": -torch.rand(rows, width, generator=g) * 5}
    base = -torch.rand(rows, width, generator=g) * 5
    objectives = {name: STAGES[name].objective(Recipe()) for name in ("dpo", "improve")}
    best = {name: float("inf") for name in objectives}
    for _ in range(5):
        for name, objective in objectives.items():
            t0 = time.perf_counter()
            for _ in range(repeats):
                logps = base.clone().requires_grad_()
                loss, _ = objective(logps, batch)
                loss.backward()
            best[name] = min(best[name], (time.perf_counter() - t0) / repeats)
    return best


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=1, help="runs of each configuration, in alternating order; the "
                   "fastest counts, and the table gives the median round too")
    p.add_argument("--only", action="append", choices=CONFIGS, help="run only this configuration (repeatable)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "masked_step.json"))
    args = p.parse_args()
    wanted = args.only or CONFIGS
    res: dict = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = build(tmp)
        runs = configs(tmp, model, args.steps, wanted)
        fastest(res, runs, args.rounds)
    if "dpo" not in res:
        print(json.dumps(res, indent=2))
        return res
    dense_full = res["dpo"]["optim_state_mb"]
    table = ["| run | step s (fastest round) | step time / DPO | median round / DPO's | Adam moments MB | "
             "moments / dense masked |", "|---|---|---|---|---|---|"]
    med = {name: statistics.median(times) for name, times in res["step_s_all"].items()}
    for name in runs:
        r = res[name]
        dense = res.get(name.replace("sparse", "dense"), r)["optim_state_mb"]
        table.append(f"| {name} | {r['step_s']:.4f} | {r['step_s'] / res['dpo']['step_s']:.3f} | "
                     f"{med[name] / med['dpo']:.3f} | {r['optim_state_mb']:.2f} | {r['optim_state_mb'] / dense:.3f} |")
    print("\n".join(table))
    print(f"\nfull-parameter DPO moments: {dense_full:.2f} MB; goals: improve step / DPO step <= 1.05, "
          f"sparse moments at 10% ~ 0.10 of dense")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
