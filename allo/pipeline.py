"""`allo run RECIPE`: every step of the spec in order, each skipped when its manifest says it is complete.

Steps and their outputs under OUTPUT_DIR (spec §0):
  sft           sft/model                      (skipped when task.sft_data is unset: model.path is the SFT model)
  sample        sample/samples.jsonl           n labelled responses per training problem
  pairs         pairs/pairs.jsonl              (correct, wrong) pairs, at most sample.max_pairs_per_problem each
  warmup        warmup/model                   plain DPO from SFT, all parameters
  locate        locate/n1.safetensors, n2      exact top-k masks from |θ'−θ|/α
  reward-data   reward-data/reward.jsonl       teacher's minimum-edit rewrites (+ "keep" copies)
  reward-train  reward-train/model             the token reward model (the sft stage on reward.jsonl)
  reward-score  reward-score/forget.jsonl      keep-probability of every token of every wrong response
  forget        forget/model                   token-weighted NPO, mask N1, from SFT
  improve       improve/model                  noise-masked DPO, mask N2, from forget
  dpo, npo      dpo/model, npo/model           baselines from SFT
  eval          eval/results.json              greedy accuracy of SFT, DPO, NPO, ALLO on task.eval
Run it under torchrun: training steps use every rank; the other steps run on rank 0 while the others wait.
A failed step leaves the earlier ones intact; the error says how to resume (`--from STEP`).
"""
from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from allo.config import Recipe, TrainConfig
from allo.io import write_json, write_jsonl

log = logging.getLogger(__name__)
STEPS = ("sft", "sample", "pairs", "warmup", "locate", "reward-data", "reward-train", "reward-score", "forget",
         "improve", "dpo", "npo", "eval")
TRAINING_STEPS = {"sft", "warmup", "reward-train", "forget", "improve", "dpo", "npo"}
# What each step reads: upstream steps, and the recipe values that change its output. A step is skipped only when
# its manifest is complete *and* records the same fingerprint of these (upstream fingerprints included, so a
# change anywhere reruns everything downstream of it).
DEPS = {"sft": (), "sample": ("sft",), "pairs": ("sample",), "warmup": ("sft", "pairs"), "locate": ("sft", "warmup"),
        "reward-data": ("pairs",), "reward-train": ("sft", "reward-data"), "reward-score": ("reward-train", "pairs"),
        "forget": ("sft", "reward-score", "locate"), "improve": ("forget", "pairs", "locate"), "dpo": ("sft", "pairs"),
        "npo": ("sft", "pairs"), "eval": ("sft", "dpo", "npo", "improve")}
TRAIN_KEYS = ("model", "data", "train", "seed")
CONFIG = {"sft": TRAIN_KEYS + ("sft", "task.sft_data"), "sample": ("sample", "task.problems", "task.family",
                                                                    "data.template", "seed"),
          "pairs": ("sample.max_pairs_per_problem", "seed", "task.pairs", "data.split", "data.columns"),
          "warmup": TRAIN_KEYS + ("warmup", "locate.from_partitions"),
          "locate": ("locate", "warmup.train", "train.lr"),
          "reward-data": ("reward.teacher", "reward.teacher_endpoint.base_url", "reward.teacher_endpoint.model",
                          "task.family"),
          "reward-train": TRAIN_KEYS + ("reward",), "reward-score": ("data.template",),
          "forget": TRAIN_KEYS + ("forget",), "improve": TRAIN_KEYS + ("improve",), "dpo": TRAIN_KEYS + ("dpo",),
          "npo": TRAIN_KEYS + ("npo",), "eval": ("task", "data.template")}
FILES = {"sft": ("task.sft_data",), "sample": ("task.problems",), "pairs": ("task.pairs",),
         "eval": ("task.eval", "task.alpaca_eval", "task.arena_hard")}


class StepFailed(RuntimeError):
    """A pipeline step failed; the message names the step and the command that resumes from it."""


class Pipeline:
    def __init__(self, recipe: Recipe, recipe_path: Optional[str] = None):
        self.r = recipe
        self.out = Path(recipe.output_dir)
        self.recipe_path = recipe_path or "RECIPE.yaml"
        self._fingerprints: dict[str, str] = {}  # stable within a run: no step writes the recipe or task files

    # --------------------------------------------------------------------------------------- paths
    def step_dir(self, step: str) -> Path:
        return self.out / step

    @property
    def sft_model(self) -> str:
        if self.r.task.sft_data:
            return str(self.step_dir("sft") / "model")
        if not self.r.model.path:
            raise StepFailed("model.path is empty and task.sft_data is unset: there is no SFT model to start from")
        return self.r.model.path

    def file(self, step: str, name: str) -> str:
        return str(self.step_dir(step) / name)

    # ----------------------------------------------------------------------------------------- driver
    def run(self, start: Optional[str] = None, only: Optional[str] = None) -> None:
        """Run the steps in order. `start`: rerun from that step on; `only`: rerun just that step."""
        for name in (start, only):
            if name is not None and name not in STEPS:
                raise StepFailed(f"unknown step {name!r}; steps: {', '.join(STEPS)}")
        forced = {only} if only else set(STEPS[STEPS.index(start):]) if start else set()
        for step in STEPS:
            if only and step != only:
                continue
            manifest = self.step_dir(step) / "manifest.json"
            fingerprint = self.fingerprint(step)
            recorded = _recorded(manifest)
            if step not in forced and recorded == fingerprint:
                if _rank() == 0:
                    log.info("[%s] complete (%s); skipping", step, manifest)
                continue
            if _rank() == 0 and recorded not in (None, fingerprint) and step not in forced:
                log.info("[%s] inputs or settings changed since it completed; running it again", step)
            if _rank() == 0:
                log.info("===== [%s] =====", step)
            started = time.time()
            try:
                if step in TRAINING_STEPS:
                    getattr(self, "step_" + step.replace("-", "_"))()
                    _free_memory()
                    info = json.loads(manifest.read_text()) if _rank() == 0 else None
                else:
                    info = _on_rank0_with_all_cores(getattr(self, "step_" + step.replace("-", "_")))
                    info = {"step": step, **(info or {}), "wall_s": round(time.time() - started, 2)}
                if _rank() == 0:  # the fingerprint goes in last: a manifest without it is never "complete"
                    write_json(manifest, {**info, "fingerprint": fingerprint, "complete": True})
                _barrier()
            except Exception as e:  # name the step and the resume command; earlier outputs stay intact
                what = str(e) if isinstance(e, StepFailed) else f"{type(e).__name__}: {e}"
                raise StepFailed(f"step {step} failed: {what}. Earlier steps are intact; fix the cause and resume "
                                 f"with `allo run {self.recipe_path} --from {step}`") from e

    def fingerprint(self, step: str) -> str:
        """Hash of the step's recipe values, its input files (size, mtime) and its upstream steps' fingerprints."""
        if step not in self._fingerprints:
            self._fingerprints[step] = self._fingerprint(step)
        return self._fingerprints[step]

    def _fingerprint(self, step: str) -> str:
        import dataclasses
        import hashlib
        import os

        values = dataclasses.asdict(self.r)
        parts = {"config": {k: _lookup(values, k) for k in CONFIG[step]},
                 "files": {k: _stat(_lookup(values, k)) for k in FILES.get(step, ())},
                 "upstream": [self.fingerprint(d) for d in DEPS[step]]}
        if step == "sft" and not self.r.task.sft_data:
            parts["files"]["model.path"] = _stat(self.r.model.path) if self.r.model.path and os.path.exists(
                self.r.model.path) else self.r.model.path
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------------------------ training steps
    def _train(self, stage: str, recipe: Recipe, data: str, init: Optional[str], out: str,
               mask: Optional[str] = None, train: Optional[TrainConfig] = None, locate_out: Optional[str] = None) -> None:
        from allo.stages.runner import run_stage

        run_stage(recipe, stage, data=data, init=init, mask=mask, out_dir=out, train=train, locate_out=locate_out)

    def step_sft(self) -> None:
        if not self.r.task.sft_data:
            if _rank() == 0:
                write_json(self.step_dir("sft") / "manifest.json", {
                    "step": "sft", "skipped": "task.sft_data unset: model.path is the SFT model"})
            return
        self._train("sft", self.r, self.r.task.sft_data, self.r.model.path, str(self.step_dir("sft")))

    def step_warmup(self) -> None:
        masks = str(self.step_dir("warmup") / "masks") if self.r.locate.from_partitions else None
        self._train("warmup", self.r, self.file("pairs", "pairs.jsonl"), self.sft_model, str(self.step_dir("warmup")),
                    locate_out=masks)

    def step_reward_train(self) -> None:
        reward = self.r.reward
        rm = replace(self.r, data=replace(self.r.data, template="raw", max_length=reward.max_length,
                                          max_prompt_length=reward.max_prompt_length))
        self._train("sft", rm, self.file("reward-data", "reward.jsonl"), reward.init or self.sft_model,
                    str(self.step_dir("reward-train")), train=self.r.stage_train("reward"))

    def step_forget(self) -> None:
        self._train("forget", self.r, self.file("reward-score", "forget.jsonl"), self.sft_model,
                    str(self.step_dir("forget")), mask=self.file("locate", "n1.safetensors"))

    def step_improve(self) -> None:
        self._train("improve", self.r, self.file("pairs", "pairs.jsonl"), str(self.step_dir("forget") / "model"),
                    str(self.step_dir("improve")), mask=self.file("locate", "n2.safetensors"))

    def step_dpo(self) -> None:
        self._train("dpo", self.r, self.file("pairs", "pairs.jsonl"), self.sft_model, str(self.step_dir("dpo")))

    def step_npo(self) -> None:
        self._train("npo", self.r, self.file("pairs", "pairs.jsonl"), self.sft_model, str(self.step_dir("npo")))

    # ------------------------------------------------------------------------------ single-process steps
    def step_sample(self) -> dict:
        from allo.generate import Sampling
        from allo.stages.sampling import sample

        if self.r.task.pairs:
            return {"skipped": "task.pairs is set: the pairs step reads them"}
        s = self.r.sample
        problems = load_problems(self.r.task.problems, "task.problems")
        samples = sample(self.sft_model, problems, self.r.data.template,
                         Sampling(n=s.n, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                                  seed=self.r.seed), self.r.task.family)
        for row, problem in zip(samples, [p for p in problems for _ in range(s.n)]):
            if "reference" in problem:
                row["reference"] = problem["reference"]
        write_jsonl(Path(self.file("sample", "samples.jsonl")), samples)
        return {"problems": len(problems), "samples": len(samples), "correct": sum(x["correct"] for x in samples)}

    def step_pairs(self) -> dict:
        from allo.stages.sampling import make_pairs

        if self.r.task.pairs:
            return self._given_pairs()
        samples = _read_jsonl(self.file("sample", "samples.jsonl"))
        reference = {x["prompt"]: x["reference"] for x in samples if "reference" in x}
        pairs, stats = make_pairs(samples, self.r.sample.max_pairs_per_problem, self.r.seed)
        for p in pairs:
            if p["prompt"] in reference:
                p["reference"] = reference[p["prompt"]]
        write_jsonl(Path(self.file("pairs", "pairs.jsonl")), pairs)
        return stats

    def _given_pairs(self) -> dict:
        """task.pairs, validated (data.columns / data.split / data.on_bad_record apply) into pairs/pairs.jsonl."""
        from allo.data.records import read_records

        d = self.r.data
        records, stats = read_records(self.r.task.pairs, split=d.split, columns=d.columns,
                                      on_bad_record=d.on_bad_record, optional=("reference", "answer"))
        rows = [{k: v for k, v in r.items() if k != "source"} for r in records]
        write_jsonl(Path(self.file("pairs", "pairs.jsonl")), rows)
        return {"pairs": len(rows), "source": self.r.task.pairs, "read": stats.read,
                "skipped": dict(stats.skipped)}

    def step_locate(self) -> dict:
        from allo.stages.locate import run_locate

        if self.r.locate.from_partitions:
            taken = self._masks_from_warmup()
            if taken:
                return taken
        paths = run_locate(self.r, base=self.sft_model, tuned=str(self.step_dir("warmup") / "model"),
                           out_dir=str(self.step_dir("locate")))
        return {"masks": {k: str(v) for k, v in paths.items()}}

    def _masks_from_warmup(self) -> Optional[dict]:
        """The masks the warm-up run computed from its partitions, if they match the recipe's ratios and scope."""
        import shutil

        src, loc = self.step_dir("warmup") / "masks", self.r.locate
        want = {"n1": loc.forget_ratio, "n2": loc.improve_ratio}
        for label, ratio in want.items():
            meta = src / f"{label}.json"
            m = json.loads(meta.read_text()) if meta.exists() else {}
            if (m.get("ratio"), m.get("scope"), m.get("band_start"), m.get("bottom")) != (
                    ratio, loc.scope, loc.band_start, loc.bottom):
                log.info("locate: the warm-up run's masks do not match the recipe (%s); locating from the exported "
                         "model instead", meta)
                return None
        out = {}
        self.step_dir("locate").mkdir(parents=True, exist_ok=True)
        for label in want:
            for ext in (".safetensors", ".json"):
                shutil.copyfile(src / f"{label}{ext}", self.step_dir("locate") / f"{label}{ext}")
            out[label] = str(self.step_dir("locate") / f"{label}.safetensors")
        return {"masks": out, "from_partitions": True}

    def step_reward_data(self) -> dict:
        from allo.reward.model import reward_data
        from allo.reward.teacher import llm_rewrites, programmatic_rewrites
        from allo.tasks import is_correct

        items = self._reward_items()
        if self.r.reward.teacher == "openai":
            from allo.openai_client import ChatClient

            client = ChatClient(self.r.reward.teacher_endpoint.endpoint("reward.teacher_endpoint"),
                                cache_dir=self.r.reward.teacher_cache or self.file("reward-data", "cache"))
            rewrites = llm_rewrites(client, items)
        else:
            rewrites = programmatic_rewrites(items)
        family = self.r.task.family
        is_right = (lambda text, gold: bool(text.strip())) if family == "instruct" else (
            lambda text, gold: is_correct(text, gold, family))
        records, counts = reward_data(items, rewrites, is_right)
        write_jsonl(Path(self.file("reward-data", "reward.jsonl")), records)
        log.info("reward data: %s", counts)
        return counts

    def step_reward_score(self) -> dict:
        import torch
        from transformers import AutoModelForCausalLM

        from allo.generate import device_and_dtype
        from allo.model import load_tokenizer
        from allo.reward.model import keep_probs

        rm_dir = str(self.step_dir("reward-train") / "model")
        tok = load_tokenizer(replace(self.r.model, tokenizer=rm_dir, path=rm_dir))
        # fp32 on any device: keep-probabilities become token weights, bf16 would quantise them
        rm = AutoModelForCausalLM.from_pretrained(rm_dir, dtype=torch.float32).to(device_and_dtype()[0])
        items = self._reward_items()
        probs = keep_probs(rm, tok, items, self.r.data.template)
        rows = [{"prompt": it["prompt"], "rejected": it["wrong"], "keep_probs": p} for it, p in zip(items, probs)]
        write_jsonl(Path(self.file("reward-score", "forget.jsonl")), rows)
        flat = [x for p in probs for x in p]
        return {"responses": len(rows), "tokens": len(flat),
                "unaligned_fraction": round(sum(x < 0.5 for x in flat) / max(1, len(flat)), 4)}

    def _reward_items(self) -> list[dict]:
        """Wrong responses with their reference: the problem's reference solution, else the chosen response
        (spec §2: for instruction following the chosen response is what the teacher edits towards)."""
        return [{"prompt": _text(p["prompt"], "user"), "wrong": _text(p["rejected"]),
                 "reference": _text(p.get("reference", p["chosen"])), "answer": p.get("answer", "")}
                for p in _read_jsonl(self.file("pairs", "pairs.jsonl"))]

    def step_eval(self) -> dict:
        """Greedy accuracy on task.eval, the task.benchmarks (Table 2) and, for instruction following, win rates
        against the SFT model judged by task.judge (Table 3), for SFT, DPO, NPO and ALLO."""
        from allo.eval import suite
        from allo.eval.provenance import harness
        from allo.stages.sampling import accuracy

        t = self.r.task
        models = {"SFT": self.sft_model, "+DPO": str(self.step_dir("dpo") / "model"),
                  "+NPO": str(self.step_dir("npo") / "model"), "+ALLO": str(self.step_dir("improve") / "model")}
        models = {k: v for k, v in models.items() if k == "SFT" or Path(v).exists()}
        result: dict = {"models": models, "decoding": "greedy", "max_new_tokens": t.eval_max_new_tokens, **harness()}
        if t.eval:
            problems = load_problems(t.eval, "task.eval")
            acc = {name: accuracy(path, problems, self.r.data.template, t.family, t.eval_max_new_tokens)
                   for name, path in models.items()}
            result.update(accuracy=acc, eval_data=t.eval, problems=len(problems))
            log.info("held-out accuracy: %s", {k: f"{100 * v:.1f}%" for k, v in acc.items()})
        if t.benchmarks:
            result["table2"] = suite.table2(models, t, self.r.data.template, self.step_dir("eval"))
        if t.alpaca_eval or t.arena_hard:
            result["table3"] = suite.table3(models, t, self.r.data.template, self.step_dir("eval"))
        if not (t.eval or t.benchmarks or t.alpaca_eval or t.arena_hard):
            raise StepFailed("nothing to evaluate: set task.eval, task.benchmarks, task.alpaca_eval or "
                             "task.arena_hard")
        write_json(self.step_dir("eval") / "results.json", result)
        return {k: result[k] for k in ("accuracy", "table2", "table3") if k in result}


def load_problems(path: Optional[str], key: str) -> list[dict]:
    """Problems {prompt, answer, reference?} from a records file; the answer may be a number in the file."""
    from allo.data.records import DataError, read_records

    if not path:
        raise StepFailed(f"{key} is not set in the recipe")
    records, _ = read_records(path, ("prompt",), optional=("answer", "reference", "response"))
    out = []
    for rec in records:
        if rec.get("answer") is None:
            raise DataError(f"{rec['source']}: missing field 'answer'")
        item = {"prompt": rec["prompt"], "answer": str(rec["answer"])}
        ref = rec.get("reference", rec.get("response"))
        if ref is not None:
            item["reference"] = ref
        out.append(item)
    return out


def _on_rank0_with_all_cores(fn):
    """Run a single-process step on rank 0 with every core (the other ranks sleep in a barrier meanwhile)."""
    if _rank() != 0:
        return None
    import os

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def _text(x, role: str = "assistant") -> str:
    """A string field as is; chat messages as the content of the last message with `role`."""
    if isinstance(x, str):
        return x
    return next((m["content"] for m in reversed(x) if m.get("role") == role), x[-1]["content"])


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _recorded(manifest: Path) -> Optional[str]:
    """The fingerprint of a complete manifest, or None."""
    try:
        m = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    return m.get("fingerprint") if m.get("complete") else None


def _lookup(values: dict, dotted: str):
    for key in dotted.split("."):
        values = values[key]
    return values


def _stat(path) -> Optional[list]:
    """(size, mtime) of a file, or of every file under a directory: cheap for multi-GB checkpoints."""
    if path is None:
        return None
    p = Path(path)
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p] if p.exists() else []
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files] or [str(path), "missing"]


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def run_pipeline(recipe: Recipe, recipe_path: Optional[str] = None, start: Optional[str] = None,
                 only: Optional[str] = None) -> Pipeline:
    from allo.engine import init_distributed

    init_distributed()
    pipe = Pipeline(recipe, recipe_path)
    pipe.run(start=start, only=only)
    return pipe
