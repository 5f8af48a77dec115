"""One TRL DPOTrainer run on the bench model and pairs (a subprocess of bench/run_all.py and bench/gpu.py); prints
JSON.

Same model, data, max length, batch, optimizer (AdamW, no weight decay), β and learning rate as the `allo dpo` run
it is compared with; `--precompute` makes TRL compute reference log-probs before training (as allo always does),
without it the reference model runs live in every step. On the CPU (default) in fp32; with `--gpu`, TRL's own
defaults for a GPU (bf16 mixed precision, gradient checkpointing on), and the peak is CUDA's allocator peak.

TRL at its leanest valid setting: no `ref_model` is passed, so with precomputed log-probs (and no FSDP) TRL computes
them with the initial policy and keeps no reference model at all (trl/trainer/dpo_trainer.py, `ref_model is None`
with `precompute_ref_log_probs`); with a live reference TRL loads its own copy. Whatever reference TRL keeps, its
bytes on the device are reported (`ref_model_mb`), so that a memory comparison can leave them out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--pairs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--precompute", action="store_true")
    p.add_argument("--gpu", action="store_true", help="train on the GPU with TRL's defaults (bf16, checkpointing)")
    args = p.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    import trl
    from trl import DPOConfig, DPOTrainer

    from allo.metrics import peak_rss_mb

    rows = [json.loads(x) for x in open(args.pairs) if x.strip()]
    ds = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    device = {} if args.gpu else dict(use_cpu=True, bf16=False)  # on the GPU: TRL's defaults
    cfg = DPOConfig(output_dir=args.out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                    max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
                    weight_decay=0.0, beta=0.1, max_length=args.max_length, truncation_mode="keep_end",
                    precompute_ref_log_probs=args.precompute, report_to=[], logging_steps=1000,
                    save_strategy="no", dataloader_num_workers=0, seed=0, **device)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    ref = trainer.ref_model
    ref_mb = 0.0 if ref is None else sum(
        p.numel() * p.element_size() for p in ref.parameters() if p.device.type != "cpu" or not args.gpu) / 2 ** 20
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    steps = [b - a for a, b in zip(stamps, stamps[1:])][2:] or [b - a for a, b in zip(stamps, stamps[1:])]
    peak = {"peak_mem_mb": torch.cuda.max_memory_allocated() / 2 ** 20} if args.gpu else {}
    settings = (f"TRL {trl.__version__} DPOTrainer: " + ("bf16 autocast, gradient checkpointing (its GPU defaults)"
                if args.gpu else "fp32 on the CPU") + ", reference log-probs " +
                ("precomputed" if args.precompute else "live") + ", " +
                ("no reference model kept" if ref is None else f"a reference model of {ref_mb:.1f} MiB kept"))
    print(json.dumps({"step_s": statistics.median(steps), "pairs_per_s": args.batch / statistics.median(steps),
                      "step_times": steps, "train_s": total, "peak_rss_mb": peak_rss_mb(), **peak,
                      "steps": len(stamps), "ref_model_mb": ref_mb, "settings": settings}))


if __name__ == "__main__":
    main()
