"""Planned vs measured peak memory of a masked training stage on CPU: how far `allo plan` can be trusted.

The improve stage (10% mask, pairs in one forward) runs a few steps on a random-init Llama of two sizes (0.1 M and
35 M parameters), in four engines, each with dense and sparse Adam moments: fp32 on 2 ranks under ZeRO-0 and
ZeRO-3, and a bf16 recipe on one rank, which trains with ZeRO-0 and fp32 weights under bf16 autocast
(`train.single_rank: fast`; the path of a one-GPU run). CPU memory is process RSS, which also holds the Python,
torch, DeepSpeed and gloo runtime; so the comparison is differential: measured (peak RSS of rank 0, large − small)
over planned (large − small). The plan's terms that apply on CPU are all of them except the GPU runtime reserve:
model states (weights, gradients, fp32 copies, Adam moments, neuron mask, ZeRO-3's gathered layer, ZeRO buckets),
activations, logits and autocast's bf16 weight copies; the buckets are the same for both sizes and cancel.

    python bench/plan_memory.py            # prints one row per case and the ratio; exit 1 when a ratio is off by
                                           # more than 15%
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
# (ds_config, sparse moments, ranks, model.dtype)
CASES = [("zero0", False, 2, "fp32"), ("zero0", True, 2, "fp32"), ("zero3", False, 2, "fp32"),
         ("zero3", True, 2, "fp32"), ("zero3", False, 1, "bf16"), ("zero3", True, 1, "bf16")]
TOLERANCE = 0.15


def _setup(tmp: Path) -> None:
    from tiny import make_tokenizer, write_pairs

    make_tokenizer(tmp / "tok", vocab_size=2000)
    write_pairs(tmp / "pairs.jsonl", n=48)


def _recipe(tmp: Path, size: str, zero: str, sparse: bool, ranks: int, dtype: str) -> Path:
    init = {**SIZES[size], "max_position_embeddings": 256, "tie_word_embeddings": False}
    name = f"{size}-{zero}-{sparse}-{ranks}-{dtype}"
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps({
        "output_dir": str(tmp / f"out-{name}"),
        "model": {"path": None, "tokenizer": str(tmp / "tok"), "dtype": dtype, "init": init},
        "data": {"train": str(tmp / "pairs.jsonl"), "template": "raw", "max_length": 64, "max_prompt_length": 32},
        "train": {"micro_batch_size": 4, "global_batch_size": 4 * ranks, "max_steps": 3,
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


def measure(tmp: Path, size: str, zero: str, sparse: bool, ranks: int, dtype: str) -> tuple[float, int]:
    """(rank 0's peak RSS in bytes, the plan's bytes) of the improve stage for one case."""
    from allo.config import load_recipe
    from allo.launch import torchrun_command
    from allo.plan import Hardware, model_config, shape_of, train_plan
    from allo.steps import REGISTRY

    recipe_path = _recipe(tmp, size, zero, sparse, ranks, dtype)
    mask = _mask(tmp, recipe_path)
    # glibc keeps freed heap memory in the process (RSS then tracks the high-water mark of everything ever freed, not
    # the tensors alive): a fixed mmap threshold gives every allocation of 64 KiB or more its own mapping, returned
    # on free, so peak RSS follows peak live memory as a GPU's max_memory_allocated does.
    env = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    import os

    proc = subprocess.run(torchrun_command(["improve", str(recipe_path), "--mask", str(mask)], ranks), cwd=ROOT,
                          env={**{k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}, **env},
                          capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"{size} {zero} sparse={sparse} {ranks} ranks {dtype}: exit {proc.returncode}\n"
                           f"{proc.stderr[-3000:]}")
    recipe = load_recipe(str(recipe_path))
    rows = [json.loads(x) for x in (Path(recipe.output_dir) / "improve" / "metrics.jsonl").read_text().splitlines()]
    planned = train_plan(recipe, REGISTRY["improve"], shape_of(model_config(recipe)),
                         Hardware(1, ranks, 10 ** 12, cpu=True)).peak
    return max(r["peak_mem_mb"] for r in rows) * 2 ** 20, planned


def compare(tmp: Path, cases=CASES) -> list[dict]:
    """One row per case; the small model's run (dense moments: its sparse saving is a few KB) is shared by the cases
    of its engine."""
    _setup(tmp)
    out, small = [], {}
    for zero, sparse, ranks, dtype in cases:
        engine = (zero, ranks, dtype)
        if engine not in small:
            small[engine] = measure(tmp, "small", zero, False, ranks, dtype)
        (m_small, p_small), (m_large, p_large) = small[engine], measure(tmp, "large", zero, sparse, ranks, dtype)
        out.append({"zero": zero, "sparse": sparse, "ranks": ranks, "dtype": dtype,
                    "measured_mb": round((m_large - m_small) / 2 ** 20, 1),
                    "planned_mb": round((p_large - p_small) / 2 ** 20, 1),
                    "ratio": round((m_large - m_small) / (p_large - p_small), 3)})
    return out


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    with tempfile.TemporaryDirectory() as d:
        rows = compare(Path(d))
    print("| ds_config | ranks | dtype | Adam moments | measured Δ MB | planned Δ MB | measured / planned |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['zero']} | {r['ranks']} | {r['dtype']} | {'sparse' if r['sparse'] else 'dense'} | "
              f"{r['measured_mb']} | {r['planned_mb']} | {r['ratio']} |")
    return 0 if all(abs(r["ratio"] - 1) <= TOLERANCE for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
