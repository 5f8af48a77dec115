"""Planned vs measured peak memory of a masked training stage on CPU, 2 ranks (issue 18's validation of `allo plan`).

For ZeRO-0 and ZeRO-3, each with dense and sparse Adam moments, the improve stage (10% mask, pairs in one forward)
runs a few steps on a random-init Llama of two sizes (0.1 M and 35 M parameters). CPU memory is process RSS, which also holds the Python, torch,
DeepSpeed and gloo runtime; so the comparison is differential: measured (peak RSS of rank 0, large − small) over
planned (large − small). The plan's terms that apply on CPU are all of them except the GPU runtime reserve:
model states (weights, gradients, fp32 copies, Adam moments, neuron mask, ZeRO-3's gathered layer, ZeRO buckets),
activations and logits; the buckets are the same for both sizes and cancel.

    python bench/plan_memory.py            # prints one row per case and the ratio; exit 1 when a ratio is off by
                                           # more than 25%
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
SIZES = {"small": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2),
         "large": dict(hidden_size=640, intermediate_size=1728, num_hidden_layers=8, num_attention_heads=10,
                       num_key_value_heads=2)}
CASES = [("zero0", False), ("zero0", True), ("zero3", False), ("zero3", True)]
TOLERANCE = 0.25


def _setup(tmp: Path) -> None:
    from tiny import make_tokenizer, write_pairs

    make_tokenizer(tmp / "tok", vocab_size=2000)
    write_pairs(tmp / "pairs.jsonl", n=48)


def _recipe(tmp: Path, size: str, zero: str, sparse: bool) -> Path:
    init = {**SIZES[size], "max_position_embeddings": 256, "tie_word_embeddings": False}
    path = tmp / f"{size}-{zero}-{sparse}.yaml"
    path.write_text(json.dumps({
        "output_dir": str(tmp / f"out-{size}-{zero}-{sparse}"),
        "model": {"path": None, "tokenizer": str(tmp / "tok"), "dtype": "fp32", "init": init},
        "data": {"train": str(tmp / "pairs.jsonl"), "template": "raw", "max_length": 64, "max_prompt_length": 32},
        "train": {"micro_batch_size": 4, "global_batch_size": 8, "max_steps": 3,
                  "ds_config": f"ds_configs/{zero}.json"},
        "improve": {"train": {"sparse_optimizer_state": sparse}}}))
    return path


def _mask(tmp: Path, recipe_path: Path) -> Path:
    """A random 10% mask over the recipe's model (names and shapes from the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    from allo.config import load_recipe
    from allo.masks.io import save_masks
    from allo.plan import model_config

    out = tmp / f"mask-{recipe_path.stem}.safetensors"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(load_recipe(str(recipe_path))))
    g = torch.Generator().manual_seed(0)
    save_masks(out, {n: torch.rand(p.shape, generator=g) < 0.1 for n, p in model.named_parameters()}, {})
    return out


def measure(tmp: Path, size: str, zero: str, sparse: bool) -> tuple[float, int]:
    """(rank 0's peak RSS in bytes, the plan's bytes) of the improve stage for one case."""
    from allo.config import load_recipe
    from allo.launch import torchrun_command
    from allo.plan import Hardware, model_config, shape_of, train_plan
    from allo.steps import REGISTRY

    recipe_path = _recipe(tmp, size, zero, sparse)
    mask = _mask(tmp, recipe_path)
    # glibc keeps freed heap memory in the process (RSS then tracks the high-water mark of everything ever freed, not
    # the tensors alive): a fixed mmap threshold gives every allocation of 64 KiB or more its own mapping, returned
    # on free, so peak RSS follows peak live memory as a GPU's max_memory_allocated does.
    env = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    import os

    proc = subprocess.run(torchrun_command(["improve", str(recipe_path), "--mask", str(mask)], 2), cwd=ROOT,
                          env={**{k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}, **env},
                          capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"{size} {zero} sparse={sparse}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    recipe = load_recipe(str(recipe_path))
    rows = [json.loads(x) for x in (Path(recipe.output_dir) / "improve" / "metrics.jsonl").read_text().splitlines()]
    planned = train_plan(recipe, REGISTRY["improve"], shape_of(model_config(recipe)),
                         Hardware(1, 2, 10 ** 12, cpu=True)).peak
    return max(r["peak_mem_mb"] for r in rows) * 2 ** 20, planned


def compare(tmp: Path, cases=CASES) -> list[dict]:
    """One row per case; the small model's run (dense moments: its sparse saving is a few KB) is shared by the cases
    of its ZeRO stage."""
    _setup(tmp)
    out, small = [], {}
    for zero, sparse in cases:
        if zero not in small:
            small[zero] = measure(tmp, "small", zero, False)
        (m_small, p_small), (m_large, p_large) = small[zero], measure(tmp, "large", zero, sparse)
        out.append({"zero": zero, "sparse": sparse, "measured_mb": round((m_large - m_small) / 2 ** 20, 1),
                    "planned_mb": round((p_large - p_small) / 2 ** 20, 1),
                    "ratio": round((m_large - m_small) / (p_large - p_small), 3)})
    return out


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    with tempfile.TemporaryDirectory() as d:
        rows = compare(Path(d))
    print("| ZeRO | Adam moments | measured Δ MB | planned Δ MB | measured / planned |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['zero']} | {'sparse' if r['sparse'] else 'dense'} | {r['measured_mb']} | {r['planned_mb']} | "
              f"{r['ratio']} |")
    return 0 if all(abs(r["ratio"] - 1) <= TOLERANCE for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
