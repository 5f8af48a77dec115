"""Recipes: one YAML file per run, validated into dataclasses.

Every knob is declared once, here, with its default, its help text and its allowed range. Loading checks
unknown keys, types and ranges and reports errors as ``file:line: key: problem (allowed: ...)``. Command-line
overrides (``--set train.lr=5e-7``) are parsed as YAML scalars and validated the same way.

Stage sections (``warmup``, ``forget``, ...) have a ``train`` dict of overrides and carry docs/method.md's
per-stage defaults (``SPEC_TRAIN``). A stage's training config resolves by specificity, most specific
first: a key the recipe sets in ``<stage>.train``, then a key the recipe sets in ``train``, then the stage's
spec default, then the ``TrainConfig`` default (``Recipe.stage_train``). So ``--set train.lr=5e-7`` reaches
every stage that does not set its own ``lr``. Secrets never live here: a config names the environment variable
holding a key.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Sequence, Union

import yaml


class ConfigError(ValueError):
    """A recipe problem, already phrased for the user (file, line, key, what is allowed)."""


def knob(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None,
         ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with help text and an optional numeric range (the single place a knob is documented)."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------- sections
Tracker = Literal["tensorboard", "wandb", "trackio"]  # `report_to` values; each is also its package's name


@dataclass
class ModelConfig:
    path: Optional[str] = knob(None, "Hugging Face hub id or local directory of the starting checkpoint. "
                                     "None with `init` set builds a randomly initialised model.")
    tokenizer: Optional[str] = knob(None, "Tokenizer hub id or directory; None uses `path`.")
    init: Optional[dict] = knob(None, "LlamaConfig keyword arguments for a random-init model (tiny recipe, tests).")
    dtype: Literal["fp32", "bf16"] = knob("bf16", "Training precision: bf16 mixed precision or plain fp32.")
    trust_remote_code: bool = knob(False, "Run model code shipped with a checkpoint. Off unless you trust it.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"] = knob(
        "sdpa", "transformers attention backend; flash_attention_2/3 need the flash-attn package and a GPU.")
    gradient_checkpointing: Union[bool, Literal["auto"]] = knob(
        "auto", "Recompute activations in backward to save memory (about a third more compute): true, false, or "
        "auto: on when `allo plan`'s peak for the stage without it is above 90% of the GPU's memory (off on the "
        "CPU). The stage's log and `allo plan` say which and why.")


@dataclass
class DataConfig:
    train: Optional[str] = knob(None, "Training records: a .jsonl/.json/.parquet file or a `datasets` hub name.")
    split: str = knob("train", "Split to read when `train` is a hub name.")
    subset: Optional[str] = knob(None, "Configuration (subset) of a hub dataset that has several, e.g. `main` for "
                                       "openai/gsm8k: load_dataset(name, subset, split=split).")
    columns: dict = knob(factory=dict, help="Column renames {our_name: their_name}, e.g. {prompt: question}.")
    template: Literal["alpaca", "alpaca_cot", "chat", "raw"] = knob(
        "alpaca_cot", "Prompt format: Alpaca (docs/method.md §6, `alpaca_cot` adds \"Let's think step by step.\"), the "
        "tokenizer's chat template, or the prompt text as is.")
    max_length: int = knob(1024, "Longest prompt+response in tokens; longer records are truncated.", ge=8)
    max_prompt_length: int = knob(512, "Prompts longer than this lose their start (`truncation: keep_end`).", ge=1)
    truncation: Literal["keep_end", "keep_start"] = knob("keep_end", "Which end of a long prompt to keep.")
    on_bad_record: Literal["error", "skip"] = knob(
        "error", "A malformed record (bad JSON, missing or non-string field) stops the run, or is skipped and "
        "counted. Empty responses and chosen == rejected are always skipped and counted.")
    limit: Optional[int] = knob(None, "Read only the first N records (debugging).", ge=1)
    eval: Optional[str] = knob(None, "Held-out problems for `allo eval` and the demo table.")


@dataclass
class TrainConfig:
    lr: float = knob(1e-6, "Peak learning rate (AdamW).", gt=0)
    epochs: float = knob(1.0, "Passes over the data (fractions allowed).", gt=0)
    max_steps: Optional[int] = knob(None, "Stop after this many optimizer steps (overrides `epochs`).", ge=1)
    global_batch_size: int = knob(32, "Records per optimizer step over all ranks (micro × accumulation × world).",
                                  ge=1)
    micro_batch_size: int = knob(1, "Records per rank per forward pass.", ge=1)
    scheduler: Literal["cosine", "linear", "constant"] = knob("cosine", "Learning-rate decay after warm-up.")
    warmup_ratio: float = knob(0.1, "Fraction of steps with linear learning-rate warm-up.", ge=0, lt=1)
    weight_decay: float = knob(0.0, "Decoupled AdamW weight decay (never applied to frozen elements).", ge=0)
    adam_beta1: float = knob(0.9, "AdamW β1.", ge=0, lt=1)
    adam_beta2: float = knob(0.999, "AdamW β2.", ge=0, lt=1)
    adam_eps: float = knob(1e-8, "AdamW ε.", gt=0)
    grad_clip: float = knob(1.0, "Clip the global gradient norm (after masking); 0 disables.", ge=0)
    sparse_optimizer_state: bool = knob(False, "Keep Adam moments only for masked-in elements (needs a mask).")
    packing: bool = knob(False, "Feed a micro batch's rows (chosen and rejected) to the model as one padding-free "
                                "sequence, position ids restarting per row so that attention stays within each row: "
                                "no compute or logits for padding on ragged data.")
    save_every: int = knob(0, "Checkpoint every N optimizer steps (0: only at the end and on SIGTERM/SIGUSR1).",
                           ge=0)
    save_every_minutes: float = knob(0.0, "Also checkpoint when this many minutes have passed since the last one "
                                          "(0: off); the paper recipes set 30, so a lost node costs at most that. "
                                          "Each write's duration is logged (metrics: ckpt_write_s): choose Slurm's "
                                          "--signal=USR1@N lead time above it.", ge=0)
    keep_last: int = knob(2, "Checkpoints kept on disk; older ones are deleted after a new one completes.", ge=1)
    log_every: int = knob(1, "Write metrics every N optimizer steps. The loop waits for the device only then (metric "
                             "means stay on the GPU in between), so a larger N lets a GPU run ahead; step_s and "
                             "tokens_per_s are the interval's means.", ge=1)
    preempt_marker: Optional[str] = knob(None, "A file written (JSON: step, stage, time) when a signal stops the run, "
                                               "for a launcher to decide on requeue; slurm/allo.sbatch sets it per job "
                                               "through ALLO_PREEMPT_MARKER, which overrides it.")
    ds_config: str = knob("ds_configs/zero3.json", "DeepSpeed JSON; its \"auto\" fields are filled from here.")
    single_rank: Literal["fast", "as_configured"] = knob(
        "fast", "On one rank ZeRO partitions nothing: `fast` trains there with ZeRO-0 in place of a ZeRO-1/2/3 "
        "ds_config without offload, bf16 as fp32 weights under torch autocast (16 bytes a parameter instead of "
        "18-20, no per-module hooks, no gradient all-reduce); `as_configured` keeps the ds_config. `allo plan` and "
        "the stage's log name the choice.")
    report_to: list[Tracker] = knob(
        factory=lambda: ["tensorboard"], help="Experiment trackers (rank 0): any of tensorboard (STAGE_DIR/tb), wandb, "
        "trackio; [] for none. One tracker run per stage, grouped by output_dir, eval results included; their "
        "environment settings apply (WANDB_MODE=offline, TRACKIO_DIR). metrics.jsonl is always written.")
    tracker_project: str = knob("allo", "The wandb / Trackio project the runs go to.")
    # Bookkeeping: what a step records and how often it saves, never what it computes. A completed step is not run
    # again when only these change (allo.pipeline's fingerprints leave them out).
    BOOKKEEPING: ClassVar[frozenset] = frozenset({"save_every", "save_every_minutes", "keep_last", "log_every",
                                                  "preempt_marker", "report_to", "tracker_project"})


def _train() -> Any:
    return knob(factory=dict, help="Keys of `train` set for this stage only (they win over the `train` section).")


def _nll_weight() -> Any:
    """The DPO+NLL knob, one definition for the DPO baseline's and the improve stage's sections."""
    return knob(0.0, "Adds this weight × the chosen responses' length-normalised NLL to the loss (iterative reasoning "
                     "preference optimisation, Pang et al. 2024: it keeps the chosen likelihood from falling). Off (0) "
                     "for paper runs; set it alike for dpo and improve to compare them fairly.", ge=0)


@dataclass
class SFTConfig:
    SPEC_TRAIN: ClassVar[dict] = dict(lr=1e-4, warmup_ratio=0.03, global_batch_size=32)
    train: dict = _train()


@dataclass
class DPOConfig:
    beta: float = knob(0.1, "DPO β (KL strength); for SimPO the reward scale.", gt=0)
    loss_type: Literal["sigmoid", "ipo", "simpo"] = knob("sigmoid", "DPO (sigmoid), IPO or SimPO.")
    label_smoothing: float = knob(0.0, "Conservative DPO: assumed fraction of flipped labels.", ge=0, lt=0.5)
    simpo_gamma: float = knob(0.5, "SimPO target margin γ.", ge=0)
    nll_weight: float = _nll_weight()
    SPEC_TRAIN: ClassVar[dict] = dict(lr=1e-6, warmup_ratio=0.1, global_batch_size=32)
    train: dict = _train()


@dataclass
class MatchedConfig:
    """A matched baseline of `make experiment` (README, "The demo as an experiment"): DPO with the `dpo` section's
    objective settings, started or fed differently. Off unless enabled, so runs train only what they ask for."""
    enabled: bool = knob(False, "Train this baseline (and give it a row in the eval table); `allo --help` says "
                                "what each one is.")
    beta: Optional[float] = knob(None, "This baseline's own DPO β (null: the dpo section's), so that each baseline's "
                                       "β is tuned apart; the SFT baseline (rft) has none.", gt=0)
    SPEC_TRAIN: ClassVar[dict] = DPOConfig.SPEC_TRAIN
    train: dict = _train()


@dataclass
class DPONLLConfig(MatchedConfig):
    """The DPO+NLL matched baseline: the dpo section's objective with its own NLL weight (and β, if set)."""
    nll_weight: float = knob(1.0, "Weight of the chosen responses' length-normalised NLL added to the DPO loss "
                                  "(Pang et al. 2024 use 1).", ge=0)


@dataclass
class SimPOConfig:
    beta: float = knob(2.0, "SimPO reward scale β on average log-probs (the SimPO paper's 2.0–2.5, not DPO's 0.1).",
                       gt=0)
    gamma: float = knob(1.0, "SimPO target reward margin γ (the SimPO paper's γ/β ≈ 0.5).", ge=0)
    SPEC_TRAIN: ClassVar[dict] = dict(lr=5e-7, warmup_ratio=0.1, global_batch_size=128)
    train: dict = _train()


@dataclass
class NPOConfig:
    beta: float = knob(0.1, "NPO β.", gt=0)
    SPEC_TRAIN: ClassVar[dict] = dict(lr=5e-7, warmup_ratio=0.03, global_batch_size=128)
    train: dict = _train()


@dataclass
class LocateConfig:
    forget_ratio: float = knob(5.0, "N1: percent of elements the forget stage may update.", gt=0, le=100)
    improve_ratio: float = knob(10.0, "N2: percent of elements the improve stage may update.", gt=0, le=100)
    scope: Literal["global", "per_tensor", "per_layer"] = knob("global", "Where the top-k threshold is taken.")
    band_start: float = knob(0.0, "Skip the top `band_start` percent (keep ranks in (l%, r%]).", ge=0, lt=100)
    bottom: bool = knob(False, "Select the least important elements instead (the paper's control).")
    random: bool = knob(False, "Select a uniformly random mask of the same size instead, seeded by `seed` (the "
                               "random-mask control); the warm-up's weights are not read.")
    from_partitions: bool = knob(False, "Compute the masks at the end of the warm-up run from its ZeRO-1/2/3 "
                                        "partitions, with collectives (no rank reads the merged θ'); the locate step "
                                        "then takes them over. This ranks the fp32 master drift (a bf16 export "
                                        "rounds most changes at lr 1e-6 away) and never merges the model on one node.")
    export_fp32: bool = knob(False, "Also write the warm-up's fp32 master weights to warmup/model_fp32 (4 bytes a "
                                    "parameter); the locate step then ranks their drift instead of the exported "
                                    "(bf16) model's.")
    threads: int = knob(0, "Threads scoring chunks side by side (0: every core, at most 8). The environment "
                           "variable ALLO_LOCATE_THREADS overrides it.", ge=0)
    collect_cap: int = knob(1 << 22, "Threshold bins of up to this many elements are resolved from their collected "
                                     "keys (24 bytes each); bigger ones take an extra exact pass over the data. "
                                     "Trades that memory for the pass (0: always the pass).", ge=0)


@dataclass
class ForgetConfig:
    enabled: bool = knob(True, "False: the step passes its starting model through untrained (the paper's ALLO "
                               "without forget: improve starts from the SFT model).")
    beta: float = knob(0.1, "Token-NPO β.", gt=0)
    token_weight: Literal["indicator", "soft", "raw", "uniform"] = knob(
        "indicator", "w = 1[p<0.5] (default), 1-p, p (the reference code's stored value), or 1 for every token "
        "(the \"without token reward\" control).")
    SPEC_TRAIN: ClassVar[dict] = dict(lr=5e-7, warmup_ratio=0.03, global_batch_size=128)
    train: dict = _train()


@dataclass
class ImproveConfig:
    enabled: bool = knob(True, "False: the step passes its starting model through untrained (the paper's ALLO "
                               "without improve: the forget model is ALLO's row).")
    beta: float = knob(0.1, "DPO β.", gt=0)
    epsilon: float = knob(0.1, "Fraction of rejected tokens kept as key errors (K = ⌊ε·L⌋).", gt=0, le=1)
    k_basis: Literal["response", "padded"] = knob("response", "L = response length, or the padded batch length "
                                                              "(reference code).")
    noise_side: Literal["rejected", "both"] = knob("rejected", "Apply noise masking to rejected only, or both.")
    nll_weight: float = _nll_weight()
    SPEC_TRAIN: ClassVar[dict] = dict(lr=5e-6, warmup_ratio=0.1, global_batch_size=128)
    train: dict = _train()


@dataclass
class EndpointConfig:
    """An OpenAI-compatible chat endpoint (hosted API or a vLLM server); the key stays in the environment."""
    base_url: Optional[str] = knob(None, "Base URL, e.g. https://api.openai.com/v1 or http://judge-host:8000/v1.")
    model: Optional[str] = knob(None, "Model name at that endpoint.")
    api_key_env: Optional[str] = knob("OPENAI_API_KEY", "Environment variable holding the API key (never logged); "
                                                        "null for a keyless local server.")
    api_version: Optional[str] = knob(None, "Azure OpenAI: the API version (e.g. 2024-10-21). When set, base_url is the "
                                            "Azure resource endpoint and model the deployment name.")
    timeout: float = knob(120.0, "Seconds per request before it is retried.", gt=0)
    max_retries: int = knob(6, "Retries on 429, 408/409, 5xx, timeouts, dropped connections (the openai SDK's: backoff "
                               "from 0.5 s doubling to 8 s, the server's Retry-After honoured up to 2 min) and on "
                               "malformed replies.", ge=0)
    concurrency: int = knob(8, "Requests in flight.", ge=1)
    price_in: float = knob(0.0, "USD per million prompt tokens, for the cost line in the log.", ge=0)
    price_out: float = knob(0.0, "USD per million completion tokens.", ge=0)

    def endpoint(self, what: str) -> "EndpointConfig":
        """This endpoint, once it names a server and a model (`what` says which recipe key, for the error)."""
        if not self.base_url or not self.model:
            raise ConfigError(f"{what}: base_url and model must be set")
        return self


@dataclass
class TaskConfig:
    sft_data: Optional[str] = knob(None, "SFT records {prompt, response}; None: model.path is already the SFT model.")
    problems: Optional[str] = knob(None, "Training problems {prompt, answer, reference?} to sample on.")
    max_problems: Optional[int] = knob(None, "Sample on only the first N of task.problems (data.limit, when smaller, "
                                             "caps them too): what the teacher and every later step see.", ge=1)
    pairs: Optional[str] = knob(None, "Preference pairs {prompt, chosen, rejected} to train on instead of sampled "
                                      "ones (instruction following: no checkable answers to sample against).")
    eval: Optional[str] = knob(None, "Held-out problems {prompt, answer} for `allo run`'s eval step.")
    family: Literal["math", "qa", "yesno", "instruct"] = knob(
        "math", "Answer checker (docs/method.md §6): numbers/LaTeX (math), option text (qa), yes/no, or none (instruct: "
        "rewrites are kept when non-empty, evaluation is by a judge).")
    eval_max_new_tokens: int = knob(512, "Greedy decoding budget of the eval step.", ge=1)
    benchmarks: list = knob(factory=list, help="Benchmarks the eval step scores every model on (`allo eval bench` "
                                                "names, each optionally NAME=FILE), e.g. [gsm8k, math=data/MATH500.jsonl].")
    eval_limit: Optional[int] = knob(None, "Score only the first N problems of each benchmark (quick looks).", ge=1)
    alpaca_eval: Optional[str] = knob(None, "Instruction following: an alpaca_eval outputs file whose instructions "
                                            "every model answers; judged against the SFT model's answers (paper).")
    arena_hard: Optional[str] = knob(None, "Instruction following: an Arena-Hard question.jsonl, judged the same way.")
    judge: EndpointConfig = knob(factory=EndpointConfig)
    eval_models: Optional[list] = knob(None, "The eval step's rows, as step names (e.g. [sft, improve]): those "
                                             "models only (Table 3 judges against the first). None: SFT and every "
                                             "model with a table row.")


@dataclass
class SampleConfig:
    n: int = knob(10, "Responses sampled per training problem.", ge=1)
    temperature: float = knob(0.7, "Sampling temperature (0: greedy).", ge=0)
    top_p: float = knob(0.95, "Nucleus sampling mass.", gt=0, le=1)
    max_new_tokens: int = knob(512, "Longest sampled response in tokens.", ge=1)
    max_pairs_per_problem: int = knob(5, "At most this many (correct, wrong) pairs per problem.", ge=1)


@dataclass
class GenerationConfig:
    """How the sample and eval steps generate (what they sample is `sample` / `task`)."""
    backend: Literal["auto", "hf", "vllm"] = knob(
        "auto", "vLLM when it is installed and a GPU is present (auto), or force one. The environment variable "
        "ALLO_GENERATE_BACKEND overrides it (e.g. vLLM's CPU build, which has no GPU).")
    batch_size: int = knob(64, "Responses per generation call: a sharded step's unit of work (its resume "
                               "granularity) is batch_size / n prompts. vLLM batches internally, so give it "
                               "thousands.", ge=1)
    tensor_parallel: int = knob(1, "vLLM: GPUs per engine (tensor parallel).", ge=1)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = knob("auto", "vLLM: weight and activation dtype.")
    gpu_memory_utilization: float = knob(0.9, "vLLM: share of the GPU's memory the engine may reserve (weights, "
                                              "KV cache). The engine is shut down at the end of its step, so the "
                                              "next training step gets the memory back.", gt=0, le=1)
    max_model_len: Optional[int] = knob(None, "vLLM: context length (prompt + response); None: the model's. "
                                              "Lower it when the KV cache for the model's full length does not fit.",
                                        ge=16)
    enforce_eager: bool = knob(False, "vLLM: run the model eagerly (no compilation, no CUDA graphs): a faster "
                                      "start, slower decoding. For short generations and vLLM's CPU build.")


@dataclass
class DistributedConfig:
    timeout_minutes: float = knob(30.0, "Process-group timeout: how long a collective (a training step's all-reduce, "
                                        "a checkpoint barrier) may wait for a rank before the job fails. Steps that "
                                        "are not training never wait in a collective.", gt=0)
    wait_minutes: float = knob(1440.0, "How long a rank that has finished its share of a step (or has none, in a "
                                       "rank-0 step) waits for the others, polling marker files, before it gives "
                                       "up.", gt=0)


@dataclass
class GuardsConfig:
    min_pairs: int = knob(1, "Stop after `pairs` when fewer preference pairs came out (0: off).", ge=0)
    warn_pair_share: float = knob(0.05, "Warn when fewer problems than this share yield a pair.", ge=0, le=1)
    min_rewrite_share: float = knob(0.2, "Stop after `reward-data` when fewer of the teacher's rewrites than this "
                                         "share are right (the reward model would learn only \"keep\"; 0: off).",
                                    ge=0, le=1)
    min_flagged_share: float = knob(1e-3, "Stop after `reward-score` when the token reward model flags (p < 0.5) "
                                          "fewer tokens of the wrong responses than this share, or when fewer get a "
                                          "nonzero forget weight (forget would train on nothing; 0: off).", ge=0, le=1)
    warn_flagged_share: float = knob(0.95, "Warn when the reward model flags more than this share (token-NPO is "
                                           "then close to plain NPO).", ge=0, le=1)
    stalled: bool = knob(True, "Stop a training stage whose gradient norm was 0 at every step (its weights did "
                               "not move), and warn when its loss moved less than `min_loss_change`.")
    min_loss_change: float = knob(1e-4, "Loss change (first vs last tenth of the steps) below which a stage is "
                                        "reported as barely moving.", ge=0)
    max_nonfinite_steps: int = knob(3, "Stop a training stage after this many optimizer steps in a row whose "
                                       "gradient norm was NaN or Inf (each such step is skipped and counted; 0: "
                                       "never stop).", ge=0)


@dataclass
class RewardConfig:
    teacher: str = knob(
        "programmatic", "Who rewrites wrong responses: `programmatic` (the minimum-edit teacher of the tiny "
        "recipe's arithmetic task, allo/tasks/arith.py; it refuses other tasks), `openai` (an LLM behind "
        "`teacher_endpoint`, any OpenAI-compatible server), or `python:MODULE:FUNCTION`, your own "
        "FUNCTION(problem, wrong, reference) -> rewrite or None, imported from MODULE (README, \"Your own teacher\").")
    teacher_endpoint: EndpointConfig = knob(factory=EndpointConfig)
    teacher_cache: Optional[str] = knob(None, "Teacher response cache; None: OUTPUT_DIR/reward-data/cache.")
    init: Optional[str] = knob(None, "Reward model's starting checkpoint; None: the SFT model (same tokenizer).")
    max_length: int = knob(1024, "Longest rewrite prompt + rewrite in tokens.", ge=8)
    max_prompt_length: int = knob(768, "Longest rewrite prompt (problem, reference, wrong response).", ge=1)
    SPEC_TRAIN: ClassVar[dict] = dict(lr=2e-5, epochs=3, global_batch_size=128, warmup_ratio=0.03)
    train: dict = _train()


@dataclass
class Recipe:
    output_dir: str = knob("runs/default", "Where every stage writes its outputs (relative to the working dir).")
    seed: int = knob(0, "Seed for data order, sampling and init.", ge=0)
    model: ModelConfig = knob(factory=ModelConfig)
    data: DataConfig = knob(factory=DataConfig)
    train: TrainConfig = knob(factory=TrainConfig)
    sft: SFTConfig = knob(factory=SFTConfig)
    warmup: DPOConfig = knob(factory=DPOConfig)
    dpo: DPOConfig = knob(factory=DPOConfig)
    dpo_steps: MatchedConfig = knob(factory=MatchedConfig)  # the matched baselines (allo.steps._matched)
    npo_dpo: MatchedConfig = knob(factory=MatchedConfig)
    dpo_rewrites: MatchedConfig = knob(factory=MatchedConfig)
    dpo_pairs_rewrites: MatchedConfig = knob(factory=MatchedConfig)
    dpo_nll: DPONLLConfig = knob(factory=DPONLLConfig)
    rft: MatchedConfig = knob(factory=MatchedConfig)
    rft_dpo: MatchedConfig = knob(factory=MatchedConfig)
    npo: NPOConfig = knob(factory=NPOConfig)
    simpo: SimPOConfig = knob(factory=SimPOConfig)
    locate: LocateConfig = knob(factory=LocateConfig)
    forget: ForgetConfig = knob(factory=ForgetConfig)
    improve: ImproveConfig = knob(factory=ImproveConfig)
    task: TaskConfig = knob(factory=TaskConfig)
    sample: SampleConfig = knob(factory=SampleConfig)
    generation: GenerationConfig = knob(factory=GenerationConfig)
    distributed: DistributedConfig = knob(factory=DistributedConfig)
    reward: RewardConfig = knob(factory=RewardConfig)
    guards: GuardsConfig = knob(factory=GuardsConfig)
    # Keys the recipe sets in its `train` section (they win over the stages' spec defaults). Filled by
    # `load_recipe`; a field, so `dataclasses.replace` keeps it; not a knob (`to_dict` and `--doc` leave it out).
    train_keys: frozenset = field(default=frozenset(), repr=False, metadata={"internal": True})

    def stage_train(self, stage: str) -> TrainConfig:
        """A stage's training config, resolved by specificity (see the module docstring)."""
        section = getattr(self, stage)
        spec = {k: v for k, v in section.SPEC_TRAIN.items() if k not in self.train_keys}
        return dataclasses.replace(self.train, **{**spec, **section.train})

    def train_key(self, stage: str, knob: str) -> str:
        """The recipe key that sets a stage's training value, the one a fix must change: `STAGE.train.KNOB` when that
        section sets it or the stage's own default applies, else `train.KNOB`."""
        section = getattr(self, stage)
        if knob in section.train or (knob in section.SPEC_TRAIN and knob not in self.train_keys):
            return f"{stage}.train.{knob}"
        return f"train.{knob}"


# --------------------------------------------------------------------------------------------- loading
class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-6` as a float (PyYAML follows YAML 1.1, which wants `1.0e-6`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _safe_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _yaml_lines(text: str) -> dict[tuple, int]:
    """Map each key path in a YAML document to its 1-based line, for error messages."""
    lines: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = path + (str(k.value),)
                lines[p] = k.start_mark.line + 1
                walk(v, p)

    root = yaml.compose(text, Loader=_Loader)
    if root is not None:
        walk(root, ())
    return lines


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list and typing.get_args(tp):
        return f"a list, each {_describe(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any) -> Any:
    """Return `value` as type `tp` or raise TypeError; ints are accepted for floats, nothing else is coerced."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise TypeError
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(arg, value)
            except TypeError:
                continue
        raise TypeError
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool, dict, list) and isinstance(value, tp):
        return value
    if origin is list and isinstance(value, list) and typing.get_args(tp):
        return [_coerce(typing.get_args(tp)[0], v) for v in value]
    if origin in (dict, list) and isinstance(value, origin):
        return value
    raise TypeError


_BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
           "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def _check_range(value: Any, meta: dict) -> Optional[str]:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    for key, (sym, ok) in _BOUNDS.items():
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            return f"{value} is out of range (must be {sym} {bound})"
    return None


def _build(cls: type, data: Any, path: tuple, where: "_Where") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(where.at(path, f"expected a mapping of {cls.__name__} keys, got {type(data).__name__}"))
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = str(unknown[0])
        raise ConfigError(where.at(path + (k,), f"unknown key (allowed: {', '.join(fields)})"))
    kwargs = {}
    for name, value in data.items():
        tp, f, p = hints[name], fields[name], path + (name,)
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, p, where)
            continue
        try:
            value = _coerce(tp, value)
        except TypeError:
            raise ConfigError(where.at(p, f"{value!r} is not {_describe(tp)}")) from None
        problem = _check_range(value, f.metadata)
        if problem:
            raise ConfigError(where.at(p, problem))
        if name == "train" and tp is dict:  # stage overrides: validate keys and types against TrainConfig
            value = _check_train_overrides(value, p, where)
        kwargs[name] = value
    return cls(**kwargs)


def _check_train_overrides(overrides: dict, path: tuple, where: "_Where") -> dict:
    built = _build(TrainConfig, overrides, path, where)
    return {k: getattr(built, k) for k in overrides}


@dataclass
class _Where:
    source: str
    lines: dict
    overridden: set = field(default_factory=set)

    def at(self, path: tuple, msg: str) -> str:
        for n in range(len(path), 0, -1):
            if path[:n] in self.overridden:
                return f"--set {'.'.join(path[:n])}: {'.'.join(path)}: {msg}"
        made = [o for o in sorted(self.overridden) if o[:len(path)] == path] if path not in self.lines else []
        if path and made:  # a section that only a --set created (a typo in its first key)
            return f"--set {'.'.join(made[0])}: {'.'.join(path)}: {msg}"
        line = None
        for n in range(len(path), 0, -1):
            line = self.lines.get(path[:n])
            if line:
                break
        loc = f"{self.source}:{line}" if line else self.source
        return f"{loc}: {'.'.join(path) or '<root>'}: {msg}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=5e-7` -> (['train', 'lr'], 5e-07); the value is parsed as a YAML scalar."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=5e-7")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = _safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({e})") from None
    return key.split("."), value


def read_yaml(path: str | Path | None, overrides: Sequence[str] = (), what: str = "keys") -> tuple[dict, "_Where"]:
    """A YAML mapping with `--set` overrides applied, and where each key came from (for `_build`'s errors)."""
    data: dict = {}
    where = _Where("<defaults>", {})
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
        try:
            data = _safe_load(text) or {}
            where = _Where(str(path), _yaml_lines(text))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            loc = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{loc}: not valid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of {what}, got {type(data).__name__}")
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {k} is not a section")
        node[keys[-1]] = value
        where.overridden.add(tuple(keys))
    return data, where


def load_config(cls: type, path: str | Path, overrides: Sequence[str] = (), what: str = "keys") -> Any:
    """Any knob dataclass (an eval suite, ...) from a YAML file, validated like a recipe."""
    data, where = read_yaml(path, overrides, what)
    return _build(cls, data, (), where)


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Read and validate a recipe; `path` None gives the defaults. Raises ConfigError with file:line."""
    data, where = read_yaml(path, overrides, "recipe keys (model:, data:, train:, ...)")
    recipe = dataclasses.replace(_build(Recipe, data, (), where), train_keys=frozenset(data.get("train") or {}))
    teacher = recipe.reward.teacher
    if teacher not in ("programmatic", "openai") and not re.fullmatch(r"python:[\w.]+:\w+", teacher):
        raise ConfigError(where.at(("reward", "teacher"), f"{teacher!r} is not programmatic, openai or "
                                   "python:MODULE:FUNCTION (e.g. python:mypkg.rewrite:fix)"))
    if recipe.reward.teacher == "openai" and not (recipe.reward.teacher_endpoint.base_url and
                                                  recipe.reward.teacher_endpoint.model):
        raise ConfigError(where.at(("reward", "teacher"), "openai needs reward.teacher_endpoint.base_url and .model"))
    if recipe.locate.random and recipe.locate.bottom:
        raise ConfigError(where.at(("locate", "random"), "random and bottom are two different controls; set one"))
    if recipe.data.max_prompt_length >= recipe.data.max_length:
        raise ConfigError(where.at(("data", "max_prompt_length"), f"{recipe.data.max_prompt_length} leaves no room "
                                   f"for a response within data.max_length {recipe.data.max_length}"))
    return recipe


def to_dict(recipe: Recipe) -> dict:
    """The recipe's knobs as plain data (what `allo config` prints and every stage saves)."""
    return {k: v for k, v in dataclasses.asdict(recipe).items() if not _internal(Recipe, k)}


def _internal(cls: type, name: str) -> bool:
    return any(f.name == name and f.metadata.get("internal") for f in dataclasses.fields(cls))


def save_resolved(recipe: Recipe, path: str | Path, stage: Optional[str] = None,
                  train: Optional[TrainConfig] = None) -> None:
    """Write the fully resolved recipe (and the train config a stage used) next to its outputs, atomically."""
    from allo.io import atomic_write_text

    data = to_dict(recipe)
    if stage is not None:
        data["resolved_train"] = {"stage": stage, **dataclasses.asdict(train or recipe.stage_train(stage))}
    atomic_write_text(Path(path), yaml.safe_dump(data, sort_keys=False))


def describe(cls: type = Recipe, prefix: str = "") -> list[str]:
    """Lines documenting every knob: `key (type, default): help`. Used by `allo config --doc`."""
    out = []
    hints = typing.get_type_hints(cls)
    inst = cls()
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        tp, name = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            out += describe(tp, name + ".")
            continue
        out.append(f"{name} ({_describe(tp)}, default {getattr(inst, f.name)!r}): {f.metadata.get('help', '')}")
    return out
