"""Every step of `allo run`, declared once: the CLI, the scheduler, the launcher and the report all read this table.

A step names its inputs as other steps' outputs (``"pairs/pairs.jsonl"``, ``"sft/model"``), its own outputs, the
recipe keys its fingerprint covers and the recipe keys that name input files. The scheduler (`allo.pipeline`)
orders steps by their inputs, fingerprints them from these declarations and writes every manifest; a step's
body only computes and returns a small dict for its manifest.

Two kinds of body:
- ``train``: a training step, run on every rank by the shared loop (`allo.stages.runner.train_step`): which
  objective (`allo.stages.STAGES`), which recipe section holds its train overrides, which data, starting weights
  and mask.
- ``run``: a ``module:function`` path called with the `Context`: on every rank with ``every_rank`` (the sharded
  steps, `allo.sharding`), else on rank 0 while the other ranks wait on a file. Bodies are imported only when
  they run, so ``allo --help`` stays fast.

Adding a baseline is one entry here plus its objective in `allo.stages` (docs/internals.md, "Adding a step").
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from allo.config import Recipe
from allo.sharding import Sync

SFT_MODEL = "sft/model"  # the SFT model: sft/model, or model.path when task.sft_data is unset


@dataclass(frozen=True)
class Training:
    """A training step: the shared loop with one objective, on every rank."""
    stage: str                        # objective and record layout, a key of allo.stages.STAGES
    section: str                      # recipe section whose `train` dict overrides the train section
    data: str                         # records: an input ("pairs/pairs.jsonl") or "recipe:KEY"
    init: str                         # starting weights: an input ("forget/model") or "recipe:KEY|FALLBACK"
    mask: Optional[str] = None        # neuron mask, an input ("locate/n1.safetensors")
    recipe: Optional[str] = None      # "module:function"(recipe, section) adapting the recipe (the reward model's
                                      # data settings, a matched baseline's own β)
    after: Optional[str] = None       # "module:function" run on every rank after training (see runner.run_stage)
    same_as: Optional[str] = None     # a training step this one repeats when the recipe gives both the same
                                      # data, weights and settings: its outputs are taken instead of training again
    steps_of: tuple[str, ...] = ()    # train for as many optimizer steps as these steps took together (their
                                      # manifests' counts become train.max_steps): a step-matched baseline

    def adapt(self, recipe: Recipe) -> Recipe:
        """The recipe this step trains with: `recipe` through its adapter, if it has one."""
        return resolve(self.recipe)(recipe, self.section) if self.recipe else recipe


@dataclass(frozen=True)
class Step:
    name: str
    help: str
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()    # inputs read only where they exist (the eval step scores the models there are)
    config: tuple[str, ...] = ()      # recipe keys (dotted) that change the step's output
    files: tuple[str, ...] = ()       # recipe keys naming input files; their size and mtime join the fingerprint
    train: Optional[Training] = None
    run: Optional[str] = None         # "module:function"(ctx) -> dict for the manifest
    every_rank: bool = False          # run on every rank (training, collectives), else on rank 0 alone
    skip: Optional[Callable[[Recipe], Optional[str]]] = None  # a reason to skip for this recipe, or None
    label: Optional[str] = None       # row label of the model it produces in the eval tables ("+DPO")
    command: Optional[str] = None     # module whose add_arguments(parser) and main(recipe, args) run `allo NAME`
                                      # on one process with its own flags (default: `allo run --only NAME`)

    @property
    def upstream(self) -> tuple[str, ...]:
        """The steps whose outputs this one reads, in declaration order."""
        return tuple(dict.fromkeys(ref.split("/", 1)[0] for ref in self.inputs))

    @property
    def standalone(self) -> bool:
        """A training step that `allo NAME` runs on its own, with --data/--init/--out/--mask."""
        return self.train is not None and self.train.stage == self.name


TRAIN_KEYS = ("model", "data", "train", "seed")


def _declare() -> list[Step]:
    steps = [
        Step("sft", "Supervised fine-tuning on {prompt, response} records (also trains the tiny model and the token "
                    "reward model). Full-parameter, on the shared DeepSpeed loop.",
             outputs=("model",), config=TRAIN_KEYS + ("sft", "task.sft_data"), files=("task.sft_data", "model.path"),
             train=Training("sft", "sft", data="recipe:task.sft_data", init="recipe:model.path"),
             skip=lambda r: None if r.task.sft_data else "task.sft_data unset: model.path is the SFT model"),
        Step("sample", "Sample n responses per training problem from the SFT model (vLLM when present with a GPU, "
                       "else batched Hugging Face generation) and label each by its final answer.",
             inputs=(SFT_MODEL,), outputs=("samples.jsonl",),
             config=("sample", "task.problems", "task.max_problems", "task.family", "data.template", "data.limit",
                     "seed"), files=("task.problems",),
             run="allo.stages.sampling:sample_step", every_rank=True,
             skip=lambda r: "task.pairs is set: the pairs step reads them" if r.task.pairs else None),
        Step("pairs", "Build (correct, wrong) preference pairs per problem from the samples (distinct responses, at "
                      "most sample.max_pairs_per_problem, seeded), and the list of every distinct wrong response.",
             inputs=("sample/samples.jsonl",), outputs=("pairs.jsonl", "wrong.jsonl"),
             config=("sample.max_pairs_per_problem", "seed", "task.pairs", "data.split", "data.subset",
                     "data.columns", "data.on_bad_record", "data.limit"),
             files=("task.pairs",), run="allo.stages.sampling:pairs_step"),
        Step("warmup", "Plain full-parameter DPO from the SFT model for one epoch (docs/method.md §1): the reference "
                       "run whose weight changes |θ'−θ|/α rank the neurons.",
             inputs=(SFT_MODEL, "pairs/pairs.jsonl"), outputs=("model", "masks", "model_fp32"),
             config=TRAIN_KEYS + ("warmup", "locate.from_partitions", "locate.export_fp32"),
             train=Training("warmup", "warmup", data="pairs/pairs.jsonl", init=SFT_MODEL,
                            after="allo.stages.locate:after_warmup")),
        Step("locate", "Rank every parameter element by |θ'−θ|/α and write the N1 (forget) and N2 (improve) "
                       "masks.",
             inputs=(SFT_MODEL, "warmup/model"), outputs=("n1.safetensors", "n2.safetensors"),
             config=("locate", "warmup.train", "train.lr"), run="allo.stages.locate:locate_step",
             command="allo.stages.locate"),
        Step("reward-data", "Minimum-edit rewrites of wrong responses by a teacher (OpenAI-compatible endpoint or the "
                            "programmatic teacher) for training the token reward model; the right ones also as "
                            "preference pairs {prompt, chosen: rewrite, rejected: wrong response}.",
             inputs=("pairs/wrong.jsonl",), outputs=("reward.jsonl", "pairs.jsonl"),
             config=("reward.teacher", "reward.teacher_endpoint.base_url", "reward.teacher_endpoint.model",
                     "task.family", "data.limit"), run="allo.stages.reward:reward_data_step", every_rank=True),
        Step("reward-train", "Train the small token reward model (an LM sharing the policy's tokenizer) on the "
                             "rewrites.",
             inputs=(SFT_MODEL, "reward-data/reward.jsonl"), outputs=("model",), config=TRAIN_KEYS + ("reward",),
             train=Training("sft", "reward", data="reward-data/reward.jsonl", init="recipe:reward.init|" + SFT_MODEL,
                            recipe="allo.stages.reward:reward_model_recipe")),
        Step("reward-score", "Score every token of every wrong response with the reward model's keep-probability "
                             "p_ij.",
             inputs=("reward-train/model", "pairs/wrong.jsonl"), outputs=("forget.jsonl",),
             config=("data.template", "data.limit"), run="allo.stages.reward:reward_score_step", every_rank=True),
        Step("forget", "ALLO stage 2: token-weighted NPO on wrong responses, updating only the N1 mask "
                       "(docs/method.md §3).",
             inputs=(SFT_MODEL, "reward-score/forget.jsonl", "locate/n1.safetensors"), outputs=("model",),
             config=TRAIN_KEYS + ("forget",),
             train=Training("forget", "forget", data="reward-score/forget.jsonl", init=SFT_MODEL,
                            mask="locate/n1.safetensors")),
        Step("improve", "ALLO stage 3: DPO with noise-token masking, updating only the N2 mask (docs/method.md §4).",
             inputs=("forget/model", "pairs/pairs.jsonl", "locate/n2.safetensors"), outputs=("model",),
             config=TRAIN_KEYS + ("improve",), label="+ALLO",
             train=Training("improve", "improve", data="pairs/pairs.jsonl", init="forget/model",
                            mask="locate/n2.safetensors")),
        Step("dpo", "Baseline DPO (or IPO / SimPO with dpo.loss_type) from the SFT model on the same loop.",
             inputs=(SFT_MODEL, "pairs/pairs.jsonl"), outputs=("model",), config=TRAIN_KEYS + ("dpo",), label="+DPO",
             train=Training("dpo", "dpo", data="pairs/pairs.jsonl", init=SFT_MODEL, same_as="warmup")),
        Step("npo", "Baseline sequence-level NPO on every distinct wrong response on the same loop.",
             inputs=(SFT_MODEL, "pairs/wrong.jsonl"), outputs=("model",), config=TRAIN_KEYS + ("npo",), label="+NPO",
             train=Training("npo", "npo", data="pairs/wrong.jsonl", init=SFT_MODEL)),
        Step("simpo", "Baseline SimPO (length-normalised margin, no reference model; Table 2's +SimPO row) from the "
                      "SFT model on the same loop.",
             inputs=(SFT_MODEL, "pairs/pairs.jsonl"), outputs=("model",), config=TRAIN_KEYS + ("simpo",),
             label="+SimPO", train=Training("simpo", "simpo", data="pairs/pairs.jsonl", init=SFT_MODEL)),
        *_matched(),
    ]
    evaluated = tuple(f"{s.name}/model" for s in steps if s.label)  # every model with a row in the tables
    steps.append(
        Step("eval", "Greedy accuracy of the run's SFT model and every model with a table row (DPO, NPO, ALLO, ...) "
                     "on task.eval (the pipeline's eval step). The benchmark suite has subcommands: "
                     "`allo eval bench|score|answer|alpaca|alpaca-score|arena --help`.",
             inputs=(SFT_MODEL,) + evaluated, optional=evaluated, outputs=("results.json",),
             config=("task", "data.template"),
             files=("task.eval", "task.alpaca_eval", "task.arena_hard"), run="allo.stages.evaluate:eval_step",
             every_rank=True))
    return steps


def _matched() -> list[Step]:
    """The matched baselines of `make experiment`, each skipped unless its section is enabled: the DPO objective
    with ALLO's optimizer steps, after NPO, on the teacher's rewrites (alone, or with the sampled pairs for ALLO's
    steps), with an NLL term; SFT on the gold references (alone and followed by DPO)."""
    def off(*sections: str) -> Callable[[Recipe], Optional[str]]:
        """Skipped unless one of `sections` is enabled (rft trains for rft_dpo too)."""
        def skip(r: Recipe) -> Optional[str]:
            if any(getattr(r, s).enabled for s in sections):
                return None
            if len(sections) == 1:
                return f"{sections[0]}.enabled is false (a matched baseline)"
            return f"{' and '.join(f'{s}.enabled' for s in sections)} are false (matched baselines)"
        return skip

    def dpo(section: str, **where) -> Training:
        """DPO with the dpo section's objective and the baseline's own β (and NLL weight)."""
        return Training("dpo", section, recipe="allo.stages.matched:dpo_recipe", **where)

    return [
        Step("dpo-steps", "Matched baseline: DPO from the SFT model for as many optimizer steps as forget and improve "
                          "together (the pairs repeat as needed).",
             inputs=(SFT_MODEL, "pairs/pairs.jsonl", "forget/model", "improve/model"), outputs=("model",),
             config=TRAIN_KEYS + ("dpo", "dpo_steps"), label="+DPO-steps", skip=off("dpo_steps"),
             train=dpo("dpo_steps", data="pairs/pairs.jsonl", init=SFT_MODEL, steps_of=("forget", "improve"))),
        Step("npo-dpo", "Matched baseline: DPO on the pairs from the NPO baseline's model (NPO then DPO, every "
                        "parameter, on ALLO's wrong responses and pairs).",
             inputs=("npo/model", "pairs/pairs.jsonl"), outputs=("model",), config=TRAIN_KEYS + ("dpo", "npo_dpo"),
             label="+NPO-DPO", skip=off("npo_dpo"),
             train=dpo("npo_dpo", data="pairs/pairs.jsonl", init="npo/model")),
        Step("dpo-rewrites", "Matched baseline: DPO from the SFT model on pairs whose chosen response is the "
                             "teacher's rewrite of the wrong one (the teacher's signal, without ALLO).",
             inputs=(SFT_MODEL, "reward-data/pairs.jsonl"), outputs=("model",),
             config=TRAIN_KEYS + ("dpo", "dpo_rewrites"), label="+DPO-rewrites", skip=off("dpo_rewrites"),
             train=dpo("dpo_rewrites", data="reward-data/pairs.jsonl", init=SFT_MODEL)),
        Step("pairs-rewrites", "The sampled pairs and the teacher's rewrite pairs in one file (the data of "
                               "dpo-pairs-rewrites).",
             inputs=("pairs/pairs.jsonl", "reward-data/pairs.jsonl"), outputs=("pairs.jsonl",),
             run="allo.stages.matched:pairs_rewrites_step", skip=off("dpo_pairs_rewrites")),
        Step("dpo-pairs-rewrites", "Matched baseline: DPO from the SFT model on the sampled pairs plus the teacher's "
                                   "rewrite pairs, for as many optimizer steps as forget and improve together (ALLO's "
                                   "data and signal, without locating or token weights).",
             inputs=(SFT_MODEL, "pairs-rewrites/pairs.jsonl", "forget/model", "improve/model"), outputs=("model",),
             config=TRAIN_KEYS + ("dpo", "dpo_pairs_rewrites"), label="+DPO-pairs-rewrites",
             skip=off("dpo_pairs_rewrites"),
             train=dpo("dpo_pairs_rewrites", data="pairs-rewrites/pairs.jsonl", init=SFT_MODEL,
                       steps_of=("forget", "improve"))),
        Step("dpo-nll", "Matched baseline: DPO+NLL from the SFT model on the pairs (the dpo section's objective with "
                        "dpo_nll.nll_weight × the chosen responses' NLL added).",
             inputs=(SFT_MODEL, "pairs/pairs.jsonl"), outputs=("model",), config=TRAIN_KEYS + ("dpo", "dpo_nll"),
             label="+DPO-NLL", skip=off("dpo_nll"),
             train=dpo("dpo_nll", data="pairs/pairs.jsonl", init=SFT_MODEL)),
        Step("rft-data", "The gold reference solutions of the sampled problems as SFT records (the data of rft).",
             inputs=("sample/samples.jsonl",), outputs=("sft.jsonl",), config=("data.limit",),
             run="allo.stages.matched:rft_data_step",
             skip=off("rft", "rft_dpo")),
        Step("rft", "Matched baseline: SFT from the SFT model on the sampled problems' gold references (fine-tuning "
                    "on the solutions the reward model and teacher see).",
             inputs=(SFT_MODEL, "rft-data/sft.jsonl"), outputs=("model",), config=TRAIN_KEYS + ("rft",), label="+RFT",
             skip=off("rft", "rft_dpo"),
             train=Training("sft", "rft", data="rft-data/sft.jsonl", init=SFT_MODEL)),
        Step("rft-dpo", "Matched baseline: DPO on the pairs from the RFT model (gold-reference SFT, then DPO).",
             inputs=("rft/model", "pairs/pairs.jsonl"), outputs=("model",), config=TRAIN_KEYS + ("dpo", "rft_dpo"),
             label="+RFT-DPO", skip=off("rft_dpo"),
             train=dpo("rft_dpo", data="pairs/pairs.jsonl", init="rft/model")),
    ]


def _ordered(steps: list[Step]) -> dict[str, Step]:
    """Steps in an order where each comes after its inputs' steps; ties keep declaration order."""
    by_name = {s.name: s for s in steps}
    for s in steps:
        missing = [u for u in s.upstream if u not in by_name]
        if missing:
            raise ValueError(f"step {s.name}: input from unknown step {missing[0]!r}")
    done: dict[str, Step] = {}
    while len(done) < len(steps):
        ready = [s for s in steps if s.name not in done and all(u in done for u in s.upstream if u != s.name)]
        if not ready:
            left = ", ".join(s.name for s in steps if s.name not in done)
            raise ValueError(f"the steps' inputs form a cycle: {left}")
        done[ready[0].name] = ready[0]
    return done


REGISTRY: dict[str, Step] = _ordered(_declare())
STEPS: tuple[str, ...] = tuple(REGISTRY)             # run order
TRAINING: tuple[str, ...] = tuple(n for n, s in REGISTRY.items() if s.train)


def resolve(path: str) -> Callable:
    """``"module:function"`` -> the function."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class Context:
    """What a step body sees: the recipe, where every step's outputs live, and this rank's place (`sync`)."""
    recipe: Recipe
    recipe_path: str = "RECIPE.yaml"
    sync: Optional[Sync] = None
    version: str = "any"  # the running step's fingerprint (set by the scheduler): names its shard folder
    out: Path = field(init=False)

    def __post_init__(self) -> None:
        self.out = Path(self.recipe.output_dir)
        self.sync = self.sync or Sync(self.out)

    def dir(self, step: str) -> Path:
        return self.out / step

    def shards(self, step: str) -> Path:
        """Where a sharded step keeps its finished units for this version of its inputs and settings."""
        return self.dir(step) / "shards" / self.version

    @property
    def sft_model(self) -> str:
        if self.recipe.task.sft_data:
            return str(self.dir("sft") / "model")
        if not self.recipe.model.path:
            raise ValueError("model.path is empty and task.sft_data is unset: there is no SFT model to start from")
        return self.recipe.model.path

    def path(self, ref: str) -> str:
        """An input: "STEP/NAME" under the output dir ("sft/model" is model.path when the sft step is skipped), or
        "recipe:KEY" for a recipe value, "recipe:KEY|REF" falling back to REF when the value is unset."""
        if ref.startswith("recipe:"):
            key, _, fallback = ref[len("recipe:"):].partition("|")
            value = lookup(self.recipe, key)
            return value if value is not None or not fallback else self.path(fallback)
        if ref == SFT_MODEL:
            return self.sft_model
        step, _, name = ref.partition("/")
        return str(self.dir(step) / name)

    def models(self) -> dict[str, str]:
        """The models the eval step scores, by table label, in table order: SFT, then every labelled step's model
        that exists (only those of `task.eval_models`, "sft" included, when it is set)."""
        only = self.recipe.task.eval_models
        unknown = sorted(set(only or ()) - {"sft", *(s.name for s in table_rows())})
        if unknown:
            raise ValueError(f"task.eval_models: {', '.join(map(str, unknown))} not a step with a table row (allowed: "
                             f"sft, {', '.join(s.name for s in table_rows())})")
        out = {"SFT": self.sft_model} if only is None or "sft" in only else {}
        out.update({s.label: self.path(f"{s.name}/model") for s in table_rows()
                    if Path(self.path(f"{s.name}/model")).exists() and (only is None or s.name in only)})
        return out


def table_rows() -> list[Step]:
    """The steps with a row in the paper's tables, in its order: full-parameter baselines first, then the masked
    (ALLO) rows."""
    return sorted((s for s in REGISTRY.values() if s.label), key=lambda s: s.train is not None and bool(s.train.mask))


def repeats(step: Step, recipe: Recipe) -> Optional[str]:
    """The step whose training `step` would repeat under `recipe` (same data, starting weights, mask, resolved train
    settings and objective settings), or None. The paper recipes' DPO baseline is their warm-up run."""
    import dataclasses

    t = step.train
    if t is None or t.same_as is None:
        return None
    o = REGISTRY[t.same_as].train

    def settings(section: str) -> dict:
        return {k: v for k, v in dataclasses.asdict(getattr(recipe, section)).items() if k != "train"}

    same = ((t.data, t.init, t.mask) == (o.data, o.init, o.mask) and settings(t.section) == settings(o.section)
            and recipe.stage_train(t.section) == recipe.stage_train(o.section))
    return t.same_as if same else None


def lookup(recipe: Recipe, dotted: str):
    value = recipe
    for key in dotted.split("."):
        value = value[key] if isinstance(value, dict) else getattr(value, key)
    return value


