"""The paper recipes at toy scale, as a user runs them: the recipe file as written, with overrides only for

- the model: a tiny random-init model of the recipe's family (Llama for qa and math, Mistral with a chat template
  for instruct), its tokenizer trained on the task's own texts;
- the data: real slices of ../shared/benchdata when present (through recipes/prepare_data.py, as the README says),
  else small files written here in the same formats;
- the endpoint: a loopback OpenAI-compatible server as the teacher and the judge (`reply`);
- the scale: fewer problems, samples, tokens and steps, small batches, and a learning rate that moves a random-init
  model within them.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
PAPER = ("qa", "math", "instruct")
SFT_EPOCHS = {"qa": 30, "math": 50}  # short rationales (qa) are learnt sooner
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                 "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


def reply(body: dict, n: int) -> tuple:
    """The teacher returns the reference response (a correct "minimum edit"); the AlpacaEval judge says "M" with
    probability 0.6; the Arena-Hard judge calls it a tie."""
    from chat_server import ok

    user = body["messages"][-1]["content"]
    if "Wrong response:" in user:
        return ok(user.split("Reference response (correct):\n")[1].split("\n\nWrong response:")[0])
    if body.get("logprobs"):
        return ok("M", logprobs={"content": [{"token": "M", "logprob": math.log(0.6), "top_logprobs": [
            {"token": "M", "logprob": math.log(0.6)}, {"token": "m", "logprob": math.log(0.4)}]}]})
    return ok("Both answers are alike. My final verdict is tie: [[A=B]]")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _qa_rows(n: int, offset: int = 0) -> list[dict]:
    """RLMEC-format QA records (problem with Options lines, solution, answer)."""
    colors = ["red", "blue", "green", "yellow", "white"]
    return [{"problem": f"What color is thing {i}?\nOptions:\n" + "\n".join(colors),
             "solution": f"Thing {i} is {colors[i % 5]}. The answer is {colors[i % 5]}",
             "answer": colors[i % 5]} for i in range(offset, offset + n)]


def _gsm8k_rows(n: int, offset: int = 0) -> list[dict]:
    return [{"question": f"Tom has {i} apples and buys {i + 3} more. How many apples does he have?",
             "answer": f"He has {i} + {i + 3} = <<{i}+{i + 3}={2 * i + 3}>>{2 * i + 3} apples.\n#### {2 * i + 3}"}
            for i in range(offset, offset + n)]


def inputs(name: str, d: Path, shared: Optional[Path]) -> dict:
    """The recipe's data as files: SFT records and problems from recipes/prepare_data.py (qa, math), or pairs
    (instruct); benchmark files by name; AlpacaEval and Arena-Hard inputs (instruct)."""
    bench = shared / "benchdata" if shared else None
    out: dict = {"benchmarks": {}}
    if name in ("qa", "math"):
        if bench:
            train = {"qa": [f"ecqa={bench}/ecqa/rlmec_train_first500.jsonl"],
                     "math": [f"gsm8k={bench}/gsm8k/train_first500.jsonl"]}[name]
            out["benchmarks"] = {
                "qa": {"ecqa": bench / "ecqa/rlmec_test.jsonl", "qasc": bench / "qasc/rlmec_validation.jsonl",
                       "openbookqa": bench / "openbookqa/rlmec_test.jsonl",
                       "strategyqa": bench / "strategyqa/dev_10pct.json"},
                "math": {"gsm8k": bench / "gsm8k/test.jsonl", "math": bench / "math/MATH500_test.jsonl",
                         "mawps": bench / "math_other/mawps/test.jsonl"}}[name]
        else:
            rows = {"qa": _qa_rows, "math": _gsm8k_rows}[name]
            bname = {"qa": "ecqa", "math": "gsm8k"}[name]
            train = [f"{bname}={_write_jsonl(d / 'raw' / 'train.jsonl', rows(40))}"]
            out["benchmarks"] = {bname: _write_jsonl(d / "raw" / "test.jsonl", rows(8, offset=100))}
        args = [sys.executable, str(ROOT / "recipes/prepare_data.py"), name, "--out", str(d / "data"), "--limit", "40"]
        for s in train:
            args += ["--source", s]
        subprocess.run(args, check=True, capture_output=True, text=True, timeout=120)
        out["sft"], out["problems"] = d / "data" / "sft.jsonl", d / "data" / "problems.jsonl"
        return out
    if bench:
        out["pairs"] = bench / "preference/hh_rlhf_harmless_base_test_first2000_pcr.jsonl"
        out["alpaca_eval"] = bench / "alpaca_eval/gpt4_1106_preview_model_outputs.json"
        out["arena_hard"] = bench / "arena_hard/v0.1/question.jsonl"
    else:
        out["pairs"] = _write_jsonl(d / "raw" / "pairs.jsonl", [
            {"prompt": f"How do I greet person {i}?", "chosen": f" Say hello to person {i}.",
             "rejected": f" Ignore person {i}."} for i in range(40)])
        (d / "raw" / "alpaca.json").write_text(json.dumps(
            [{"instruction": f"Name a number above {i}.", "output": str(i + 1), "generator": "g"} for i in range(8)]))
        out["alpaca_eval"] = d / "raw" / "alpaca.json"
        out["arena_hard"] = _write_jsonl(d / "raw" / "question.jsonl", [
            {"uid": f"q{i}", "category": "arena-hard-v0.1", "prompt": f"Explain idea {i}."} for i in range(8)])
    return out


def texts_of(data: dict) -> list[str]:
    """The task's texts, for the tokenizer: every field of the SFT records or of the pairs."""
    out = []
    for key in ("sft", "pairs"):
        if key in data:
            for line in Path(data[key]).read_text().splitlines()[:400]:
                out += [v for v in json.loads(line).values() if isinstance(v, str)]
    return out


def family_model(name: str, out: Path, texts: list[str]) -> Path:
    """A tiny random-init model of the recipe's family with a byte-level BPE trained on `texts`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    from allo.model import train_tokenizer

    tok = train_tokenizer(texts, 1024, out)
    size = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    if name == "instruct":  # an SFT chat model: its tokenizer has a chat template
        tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(str(out))
        MistralForCausalLM(MistralConfig(**size, sliding_window=None)).save_pretrained(str(out))
    else:
        LlamaForCausalLM(LlamaConfig(**size)).save_pretrained(str(out))
    return out


def overrides(name: str, d: Path, shared: Optional[Path], url: str) -> list[str]:
    """The --set values of a toy run of recipes/NAME/recipe.yaml (model, data, endpoint, scale), its inputs
    written under `d`; output_dir is left to the caller."""
    data = inputs(name, d, shared)
    model = family_model(name, d / "model", texts_of(data))
    endpoint = f"{{base_url: '{url}', model: %s, api_key_env: null}}"
    benches = ", ".join(f"{k}={v}" for k, v in data["benchmarks"].items())
    sets = [f"model.path={model}", "model.dtype=fp32", "model.gradient_checkpointing=false",
            f"reward.teacher_endpoint={endpoint % 'teacher'}",
            # scale: a few problems, samples and tokens; batches a CPU takes in seconds
            "data.limit=16", "data.max_length=256", "data.max_prompt_length=128", "reward.max_length=320",
            "reward.max_prompt_length=192", "train.micro_batch_size=2", "train.global_batch_size=8",
            "train.lr=3.0e-3", "train.save_every_minutes=0", "generation.batch_size=32",
            "task.eval_limit=4", "task.eval_max_new_tokens=24", "reward.train={epochs: 1, lr: 3.0e-3}",
            "warmup.train.lr=3.0e-3", "forget.train.lr=3.0e-3", "improve.train.lr=3.0e-3",
            "dpo.train.lr=3.0e-3", "npo.train.lr=3.0e-3", "simpo.train.lr=3.0e-3"]
    if name == "instruct":
        sets += [f"task.pairs={data['pairs']}", f"task.alpaca_eval={data['alpaca_eval']}",
                 f"task.arena_hard={data['arena_hard']}", f"task.judge={endpoint % 'judge'}"]
    else:
        sets += [f"task.sft_data={data['sft']}", f"task.problems={data['problems']}", f"task.benchmarks=[{benches}]",
                 "sample.n=6", "sample.max_new_tokens=128",
                 # SFT until the model answers most, not all, of its training problems right: pairs to learn from
                 f"sft.train={{epochs: {SFT_EPOCHS[name]}, lr: 1.0e-2}}"]
    return sets


def main() -> None:
    """`python tests/paper_toy.py NAME OUT [--set K=V ...]`: the toy run of recipes/NAME/recipe.yaml into OUT on 2
    CPU ranks, with the loopback teacher and judge (the tests' setup, by hand)."""
    import argparse
    import os

    from chat_server import ChatServer

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("name", choices=PAPER)
    p.add_argument("out", type=Path)
    p.add_argument("--set", dest="sets", action="append", default=[])
    args = p.parse_args()
    shared = ROOT.parent / "shared"
    server = ChatServer(reply)
    try:
        sets = overrides(args.name, args.out / "inputs", shared if shared.exists() else None, server.url)
        sets += [f"output_dir={args.out / 'run'}", *args.sets]
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
        rc = subprocess.run([sys.executable, "-m", "allo.torchrun", "--nproc_per_node", "2", "-m", "allo", "run",
                             f"recipes/{args.name}/recipe.yaml", *[x for v in sets for x in ("--set", v)]],
                            cwd=ROOT, env=env).returncode
        print(f"exit {rc}; {sum(b['model'] == 'teacher' for b in server.bodies)} teacher and "
              f"{sum(b['model'] == 'judge' for b in server.bodies)} judge requests; log in {args.out / 'run' / 'logs'}")
    finally:
        server.close()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.path.insert(0, str(ROOT))
    main()
