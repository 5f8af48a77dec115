"""Training data for the paper recipes (qa, math): SFT records and the problems the SFT model samples on.

  python recipes/prepare_data.py qa   --out data/qa   --source ecqa=PATH --source qasc=PATH ...
  python recipes/prepare_data.py math --out data/math --source gsm8k            (hub default: openai/gsm8k train)

Each --source is a benchmark name of `allo eval bench` with a local training file (formats in eval/README.md) or
a hub dataset name; without =PATH the benchmark's hub copy is read with split "train". Writes
OUT/sft.jsonl {prompt, response} (the reference rationale, ending "The answer is X." as docs/method.md §6 expects) and
OUT/problems.jsonl {prompt, answer, reference}, and prints the counts. The recipes read these two files.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allo.eval import benchmarks  # noqa: E402
from allo.io import write_jsonl  # noqa: E402

DEFAULT_SOURCES = {"qa": [], "math": ["gsm8k"]}  # the QA training sets (RLMEC's ECQA, QASC, ...) are local files


def rationale(item: dict, raw: dict) -> str | None:
    """A chain-of-thought response ending in "The answer is X.", or None when the source has no rationale."""
    sol = item.get("solution")
    if "facts" in raw:  # StrategyQA: its facts are the reasoning
        return " ".join(f.rstrip(".") + "." for f in raw["facts"]) + f" The answer is {item['answer']}."
    if not sol:
        return None
    if "####" in sol:  # GSM8K: drop the <<calculator>> annotations, state the answer as docs/method.md §6 does
        body = re.sub(r"<<[^>]*>>", "", sol.split("####")[0]).strip()
        return f"{body}\nThe answer is {item['answer']}."
    return sol.strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("family", choices=["qa", "math"])
    p.add_argument("--out", required=True)
    p.add_argument("--source", action="append", metavar="NAME[=PATH]",
                   help="training set (default: the family's benchmarks from the hub)")
    p.add_argument("--limit", type=int, help="first N records of each source")
    args = p.parse_args()
    sft, problems, counts = [], [], {}
    sources = args.source or DEFAULT_SOURCES[args.family]
    if not sources:
        raise SystemExit("prepare_data: pass --source NAME=PATH for each QA training file (e.g. "
                         "ecqa=RLMEC/evaluate/QA/ECQA/data/train.jsonl)")
    for spec in sources:
        name, _, path = spec.partition("=")
        try:
            items, src = benchmarks.load(name, path or None, args.limit, split="train")
        except (benchmarks.BenchmarkError, OSError) as e:
            raise SystemExit(f"prepare_data: {e}") from None
        raws = _raw(path, len(items))
        kept = 0
        for item, raw in zip(items, raws):
            ref = rationale(item, raw)
            if ref is None:
                continue
            kept += 1
            sft.append({"prompt": item["prompt"], "response": " " + ref})
            problems.append({"prompt": item["prompt"], "answer": item["answer"], "reference": " " + ref})
        counts[name] = {"read": len(items), "with_rationale": kept, "source": src["source"]}
    out = Path(args.out)
    write_jsonl(out / "sft.jsonl", sft)
    write_jsonl(out / "problems.jsonl", problems)
    print(json.dumps({"out": str(out), "records": len(sft), "sources": counts}, indent=2))


def _raw(path: str, n: int) -> list[dict]:
    """The raw records (for fields the normalizers drop, e.g. StrategyQA's facts); empty dicts for hub data."""
    if not path or not Path(path).exists():
        return [{}] * n
    text = Path(path).read_text()
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.split("\n") if x.strip()]
    return rows[:n]


if __name__ == "__main__":
    main()
