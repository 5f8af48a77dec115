"""What `improve.k_basis` changes in practice: the share of a rejected response's tokens that the improve stage keeps
as key errors (K = ⌊ε·L⌋ of them, ε = 0.1), with L the response's own length (`response`, allo's default) or the
padded width of its micro-batch of pairs, prompt included (`padded`, the reference code's).

The qa recipe's setting on real data: ECQA, QASC and StrategyQA training records from ../shared/benchdata
(the qa recipe's SFT sources), the Alpaca-CoT template, micro batches of the qa recipe's size (4 pairs), and
allo's own tokenising, collating and K code. Two stand-ins, stated in the output: a byte-level BPE of 32,000
tokens trained on these texts takes the place of Llama-2's tokenizer (not available offline), and a rejected
response is another problem's rationale (sampled wrong answers have rationale-like lengths; none are stored).

    python bench/k_basis.py [--micro 4] [--epsilon 0.1]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "benchdata"


def qa_records(tmp: Path) -> list[dict]:
    """{prompt, response} of the qa recipe's training sources, built by recipes/prepare_data.py as for the recipe."""
    import subprocess

    subprocess.run([sys.executable, str(ROOT / "recipes" / "prepare_data.py"), "qa", "--out", str(tmp), "--source",
                    f"ecqa={SHARED / 'ecqa' / 'rlmec_train_first500.jsonl'}", "--source",
                    f"qasc={SHARED / 'qasc' / 'rlmec_train_first500.jsonl'}", "--source",
                    f"strategyqa={SHARED / 'strategyqa' / 'train_90pct.json'}"], check=True, capture_output=True)
    return [json.loads(x) for x in (tmp / "sft.jsonl").read_text().splitlines()]


def kept_shares(records: list[dict], tokenizer, micro: int, epsilon: float, seed: int = 0) -> dict[str, list[float]]:
    import torch

    from allo.data.tokenize import TruncationPolicy, collate, tokenize_records
    from allo.logprobs import response_mask
    from allo.losses import _k_per_row

    rng = random.Random(seed)
    others = [r["response"] for r in records]
    rng.shuffle(others)
    pairs = [{"prompt": r["prompt"], "chosen": r["response"], "rejected": o} for r, o in zip(records, others)]
    examples = tokenize_records(pairs, tokenizer, "alpaca_cot", TruncationPolicy(1024, 512, "keep_end"),
                                ("chosen", "rejected"))
    rng.shuffle(examples)
    out: dict[str, list[float]] = {"response": [], "padded": []}
    for i in range(0, len(examples) - micro + 1, micro):
        batch = collate(examples[i:i + micro], tokenizer.pad_token_id)
        mask = response_mask(batch["labels"])[micro:]  # slot-major: the rejected rows
        n = mask.sum(-1).to(torch.float64)
        for basis in out:
            out[basis] += (_k_per_row(mask, epsilon, basis) / n).tolist()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--micro", type=int, default=4, help="pairs per micro batch (the qa recipe's micro_batch_size)")
    p.add_argument("--epsilon", type=float, default=0.1)
    args = p.parse_args()
    if not SHARED.exists():
        raise SystemExit(f"{SHARED} is absent: this measurement reads the shared benchmark samples")
    from allo.data.templates import render_prompt
    from allo.model import train_tokenizer

    with tempfile.TemporaryDirectory() as d:
        records = qa_records(Path(d) / "data")
        texts = [r["prompt"] + "\n" + r["response"] for r in records]
        tokenizer = train_tokenizer(texts, 32000, Path(d) / "tok")
        shares = kept_shares(records, tokenizer, args.micro, args.epsilon)
    lengths = [len(tokenizer(r["response"])["input_ids"]) for r in records]
    prompt_lengths = [len(tokenizer(render_prompt(r["prompt"], "alpaca_cot", tokenizer))["input_ids"])
                      for r in records]
    result = {"records": len(records), "micro_pairs": args.micro, "epsilon": args.epsilon,
              "response_tokens_median": statistics.median(lengths),
              "prompt_tokens_median": statistics.median(prompt_lengths),
              "tokenizer": "byte-level BPE, 32,000 tokens, trained on these texts (stand-in for Llama-2's)",
              "rejected": "another problem's rationale (stand-in for a sampled wrong answer)"}
    for basis, v in shares.items():
        q = statistics.quantiles(v, n=10)
        result[basis] = {"kept_share_mean": round(statistics.mean(v), 3), "median": round(statistics.median(v), 3),
                         "p10": round(q[0], 3), "p90": round(q[-1], 3),
                         "rows_fully_kept": round(sum(x >= 1 for x in v) / len(v), 3)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
