"""`allo plan`: per-GPU memory and GPU-hours of every step of a recipe, before a job is queued.

Nothing is downloaded and no weights are read: the model is built from its `config.json` (a local directory or
the Hugging Face cache) on the meta device, which gives exact parameter counts for any architecture. Memory terms:

- model states per GPU follow DeepSpeed's own estimators (`estimate_zero2/3_model_states_mem_needs`): 16-bit
  weights and gradients, fp32 gradients, fp32 master weights and the two Adam moments, each divided over the ranks
  that ZeRO stage partitions it across, plus ZeRO-3's gathered largest layer (4 bytes a parameter). For ZeRO-1 and
  ZeRO-0 the same bytes per parameter apply with less partitioned; ZeRO-2/3 add the gradient reduce bucket
  (`reduce_bucket_size` elements). Neuron masks add 1 byte per local element (one flat mask that the optimizer and
  the gradient masker share; under ZeRO-3 with optimizer offload the gradient masker's copy stays on the GPU); sparse
  Adam moments keep 8 bytes plus a 4-byte index per selected element instead of 8 per element;
- activations of one micro batch (chosen and rejected rows together for preference stages) from the decoder layer's
  saved tensors: 7·H + 3·KV + 4·I values per token and layer (two RMSNorm inputs and outputs, q/k before and after
  rotary, v, the attention output, gate, up, SiLU and product), plus 2·heads·seq per token for eager attention's
  score and softmax matrices; with gradient checkpointing, one H-sized layer input per layer plus one layer's
  tensors during its recompute;
- logits: the micro batch's bf16 logits and the fp32 chunk `allo.logprobs.token_logps` upcasts (and its softmax);
- the reference log-probs: computed once before training and kept on disk (`allo.logprobs.ReferenceCache`), so
  only the micro batch's float32 values are on the GPU;
- a fixed runtime reserve on GPUs (CUDA context, NCCL buffers, allocator slack), shown on its own line;
- generation steps: vLLM reserves `generation.gpu_memory_utilization` of each GPU; the HF backend holds the 16-bit
  weights and a KV cache for its batch.

Tokens per step come from the data files when they exist (a tokenizer on disk counts a sample of records, else 4
characters a token), else from the recipe's counts. Wall time per step (training at MFU × peak FLOP/s, generation
decode-bound, locate, reward scoring, the teacher's and the judge's requests) is `allo.budget`'s; GPU-hours are
that wall time × the job's GPUs, which a job holds throughout. The plan ends with the --time to ask for and the
teacher's and judge's requests and tokens.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from allo.budget import Api
from allo.config import Recipe
from allo.optim import STEP_CHUNK

GiB = 2 ** 30
RUNTIME_RESERVE = 2 * GiB      # CUDA context, NCCL buffers, allocator slack (GPU only)
DEFAULT_TFLOPS = 989.0         # H100 SXM dense bf16; --gpu-tflops for other GPUs
ASSUMED_MFU = 0.35             # bench/gpu.py's goal for DPO, used until a measured value exists
SAMPLE_RECORDS = 2000          # records tokenised to estimate a data file's tokens
GPU_RESULT = Path(__file__).resolve().parents[1] / "bench" / "results" / "gpu.json"  # bench/gpu.py's, not its smoke


# A training step's phases, for terms that live in some only: the end of the forward (saved activations, logits,
# autocast's bf16 weight copies), the start of the backward (those, plus the logits' and the output layer's
# gradients and one layer recomputed) and its end with the optimizer step (every gradient, one layer's activations).
PHASES = ("forward", "backward", "step")


@dataclass
class Shape:
    """What memory depends on, from the model's config."""
    params: int
    largest_layer: int
    layers: int
    hidden: int
    heads: int
    kv: int           # key/value width: KV heads × head dim
    intermediate: int
    vocab: int
    linear_params: int = 0  # parameters of nn.Linear modules: what autocast casts to bf16


@dataclass
class Hardware:
    nodes: int
    gpus_per_node: int
    gpu_bytes: int
    tflops: float = DEFAULT_TFLOPS
    mfu: float = ASSUMED_MFU
    mfu_source: str = f"assumed {ASSUMED_MFU} (bench/gpu.py's DPO goal; no GPU measurement on record)"
    cpu: bool = False  # CPU processes: no runtime reserve (what tests measure)
    bandwidth: float = 3.35e12  # GPU memory bytes/s (H100 SXM), what decoding is bound by

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Zero:
    stage: int
    offload_optimizer: bool = False
    offload_params: bool = False
    bucket_elements: int = 0  # the gradient reduce bucket (ZeRO-2/3), in elements


@dataclass
class StepPlan:
    step: str
    kind: str                       # "train" or "generate"
    terms: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    tokens_source: str = ""
    flops: float = 0.0
    fits: bool = True
    fix: Optional[str] = None
    phases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # a transient term -> the phases it lives in
    engine: str = ""                                                 # what trains it, and why when not as configured
    wall_s: float = 0.0                                              # on the job's GPUs, which it holds throughout
    api: Optional[Api] = None                                        # requests to the teacher or the judge

    def at(self, phase: str) -> int:
        """Bytes live in `phase`: every term without a phase of its own, and those of `phase`."""
        return sum(v for k, v in self.terms.items() if phase in self.phases.get(k, (phase,)))

    @property
    def peak(self) -> int:
        """The largest of the phases' totals (the sum of every term where no term is transient)."""
        return max(self.at(ph) for ph in PHASES)


# --------------------------------------------------------------------------------------------- model shape
def shape_of(config: Any) -> Shape:
    """Exact parameter counts of a transformers config, from a model built on the meta device (no memory, no
    weights); tied parameters count once, as DeepSpeed's `model_to_params` counts them."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    unique = {id(p): p.numel() for p in model.parameters()}
    linear = {id(p): p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()}
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return Shape(params=sum(unique.values()), largest_layer=largest, layers=config.num_hidden_layers,
                 hidden=config.hidden_size, heads=heads, kv=kv_heads * head_dim,
                 intermediate=getattr(config, "intermediate_size", 4 * config.hidden_size),
                 vocab=config.vocab_size, linear_params=sum(linear.values()))


def model_config(recipe: Recipe, path: Optional[str] = None) -> Any:
    """The config of `path` (default model.path), or of the recipe's random-init model (`model.init`)."""
    from transformers import AutoConfig, LlamaConfig

    path = path or recipe.model.path
    if path:
        from allo.preflight import InputError

        try:  # a local directory, or the hub cache; never a download (local_files_only)
            return AutoConfig.from_pretrained(path, local_files_only=True,
                                              trust_remote_code=recipe.model.trust_remote_code)
        except (OSError, ValueError):
            raise InputError(f"{path}: no config.json here or in the Hugging Face cache (allo plan reads only "
                             f"config.json; fetch it with `hf download {path} config.json`)") from None
    init = dict(recipe.model.init or {})
    init.setdefault("vocab_size", _tokenizer_size(recipe.model.tokenizer) or 32000)
    return LlamaConfig(**init)


def _tokenizer_size(path: Optional[str]) -> Optional[int]:
    if not path or not Path(path).is_dir():
        return None
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(path))


# --------------------------------------------------------------------------------------------- memory terms
def zero_of(ds_config: str | dict) -> Zero:
    """The ZeRO settings of a DeepSpeed config file (or of a config already read)."""
    from allo.engine import ds_config_path

    full = ds_config if isinstance(ds_config, dict) else json.loads(ds_config_path(ds_config).read_text())
    cfg = full.get("zero_optimization", {})
    device = lambda key: (cfg.get(key) or {}).get("device", "none") not in ("none", None)  # noqa: E731
    stage = int(cfg.get("stage", 0))
    bucket = float(cfg.get("reduce_bucket_size", 5e8)) if stage >= 2 else 0  # DeepSpeed's default
    return Zero(stage, device("offload_optimizer"), device("offload_param"), int(bucket))


def engine_of(ds_config: str, precision: str, world: int, single_rank: str) -> tuple[Zero, bool, str]:
    """(ZeRO settings, bf16 under autocast, a line naming them) of the engine a stage gets on `world` ranks: the
    config's own, or what `train.single_rank` puts in its place on one rank (`allo.engine.single_rank_config`)."""
    from allo.engine import autocast_of, ds_config_path, single_rank_config

    cfg = json.loads(ds_config_path(ds_config).read_text())
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": precision == "bf16"}
    cfg, why = single_rank_config(cfg, world, single_rank)
    z = zero_of(cfg)
    autocast = autocast_of(cfg)
    offload = " with optimizer offload" if z.offload_optimizer else ""
    name = f"ZeRO-{z.stage}{offload}, " + ("fp32 weights under bf16 autocast" if autocast else precision)
    return z, autocast, f"{name} ({'in place of ' + ds_config + ': ' + why if why else ds_config})"


def model_states(s: Shape, z: Zero, hw: Hardware, mixed: bool = True, mask_ratio: Optional[float] = None,
                 sparse: bool = False) -> dict[str, int]:
    """Per-GPU bytes of weights, gradients, fp32 copies and Adam moments, in DeepSpeed's accounting (ZeRO-2: 2 + 18/W
    bytes a parameter; ZeRO-3: 18/W plus the gathered largest layer). `mixed`: bf16 training with fp32 masters
    (else fp32 weights and gradients; without ZeRO, no fp32 copies). `mask_ratio`: a neuron-masked stage."""
    n, w = s.params, hw.world
    part = lambda stage: n / w if z.stage >= stage else n  # noqa: E731  (elements held: partitioned from `stage`)
    width = 2 if mixed else 4
    terms = {"weights": width * part(3), "gradients": width * part(2)}
    if mixed or z.stage >= 1:  # DeepSpeed's optimizer wrappers keep fp32 copies (also of fp32 weights, for ZeRO)
        # ZeRO-3 converts gradients to fp32 one sub-group at a time: DeepSpeed allows 2 bytes for it
        terms["fp32 gradients"] = (2 if z.stage == 3 else 4) * part(1)
        terms["fp32 master weights"] = 4 * part(1)
    if mask_ratio is not None and sparse:  # moments and an int32 index for the selected elements only
        terms["Adam moments (sparse)"] = (8 + 4) * mask_ratio * part(1)
    else:
        terms["Adam moments"] = 8 * part(1)
    if mask_ratio is not None:  # a bool per element owned, shared by the optimizer and the gradient masker
        terms["neuron masks"] = part(1)
    if z.stage == 3:
        terms["gathered layer (ZeRO-3)"] = 4 * s.largest_layer
    if z.bucket_elements:
        terms["ZeRO reduce bucket"] = width * z.bucket_elements
    # MaskedAdamW's update: at most two fp32 temporaries of one slice (masked weight decay, sparse gathers; at most
    # STEP_CHUNK elements) of its largest tensor (an upper bound: the dense step without decay has none),
    # a flat partition under ZeRO (ZeRO-3 splits it into sub-groups of 1e9), a parameter without; sparse moments
    # also gather the selected weights and gradients.
    largest = min(part(1), 10 ** 9) if z.stage >= 1 else s.largest_layer
    terms["optimizer step temporaries"] = 2 * 4 * min(STEP_CHUNK, largest) + (
        8 * mask_ratio * largest if mask_ratio is not None and sparse else 0)
    if z.offload_optimizer:  # gradients, fp32 copies, moments and masks live in CPU memory (the gradient masker
        # masks the offloaded fp32 gradients there with the optimizer's own masks)
        for k in [k for k in terms if k.startswith(("gradients", "fp32", "Adam", "neuron", "optimizer"))]:
            terms.pop(k)
    if z.offload_params and z.stage == 3:
        terms.pop("weights")
    return {k: int(v) for k, v in terms.items()}


def activation_bytes(s: Shape, rows: int, seq: int, checkpointing: bool, attn: str, width: int = 2) -> int:
    """Saved activations of one forward/backward of `rows` sequences of `seq` tokens (see module doc)."""
    per_layer = 7 * s.hidden + 3 * s.kv + 4 * s.intermediate + (2 * s.heads * seq if attn == "eager" else 0)
    tokens = rows * seq
    if checkpointing:
        return width * tokens * (s.layers * s.hidden + per_layer)
    return width * tokens * s.layers * per_layer


def autocast_activations(s: Shape, rows: int, seq: int, checkpointing: bool, attn: str) -> dict[str, int]:
    """Saved activations under bf16 autocast with fp32 weights: the residual stream stays fp32 (the two RMSNorms'
    inputs and outputs, 4 bytes), the matmul inputs and outputs are bf16 (their casts of the norm outputs, q/k/v,
    attention output, gate, up, SiLU and product), eager attention's softmax runs in fp32. With checkpointing: each
    layer's fp32 input, and in the backward one layer recomputed."""
    layer = 4 * 4 * s.hidden + 2 * (3 * s.hidden + 3 * s.kv + 4 * s.intermediate) + (
        2 * 4 * s.heads * seq if attn == "eager" else 0)
    tokens = rows * seq
    if checkpointing:
        return {"checkpointed layer inputs (fp32)": 4 * tokens * s.layers * s.hidden,
                "one layer recomputed": tokens * layer}
    return {"activations": tokens * s.layers * layer}


def logits_bytes(s: Shape, rows: int, seq: int, width: int = 2) -> int:
    """The micro batch's logits plus the fp32 chunk token_logps upcasts and its log-softmax."""
    from allo.logprobs import LOGP_CHUNK

    return width * rows * seq * s.vocab + 2 * 4 * min(LOGP_CHUNK, rows * seq * s.vocab)


# --------------------------------------------------------------------------------------------- per step
def train_plan(recipe: Recipe, step, s: Shape, hw: Hardware, ds_config: Optional[str] = None,
               micro: Optional[int] = None, checkpointing: Optional[bool] = None) -> StepPlan:
    """The memory of one training step; `ds_config`, `micro`, `checkpointing`: in place of the recipe's."""
    from allo.stages import STAGES

    t = recipe.stage_train(step.train.section)
    d = STAGES[step.train.stage]
    z, autocast, engine = engine_of(ds_config or t.ds_config, recipe.model.dtype, hw.world, t.single_rank)
    micro = micro or t.micro_batch_size
    ckpt, why = (checkpointing, "") if checkpointing is not None else decide_checkpointing(
        recipe.model.gradient_checkpointing, hw.cpu, hw.gpu_bytes,
        lambda: train_plan(recipe, step, s, hw, ds_config, micro, checkpointing=False).peak)
    engine += f"; gradient checkpointing {'on' if ckpt else 'off'}" + (f" ({why})" if why else "")
    mixed = recipe.model.dtype == "bf16" and not autocast
    width = 2 if recipe.model.dtype == "bf16" else 4  # of the activations and logits
    ratio = {"n1": recipe.locate.forget_ratio, "n2": recipe.locate.improve_ratio}.get(d.mask or "", None)
    rows, seq = micro * len(d.responses), recipe.data.max_length
    attn = recipe.model.attn_implementation
    terms = model_states(s, z, hw, mixed, None if ratio is None else ratio / 100, t.sparse_optimizer_state)
    phases: dict[str, tuple[str, ...]] = {}
    if autocast:
        # fp32 weights under ZeRO-0, gradients set to None after each step. The backward frees a layer's saved
        # tensors as its gradients arrive: bytes live go linearly from the start (activations, logits and their
        # gradient, the head's gradient) to the end (every gradient), so the larger end is the peak. Gradients live
        # through every phase when micro batches accumulate into them. The bf16 casts of the Linear weights live
        # through the forward (autocast caches them until it exits) and, without checkpointing, the backward.
        accumulate = t.global_batch_size > micro * hw.world
        phases["gradients"] = PHASES if accumulate else ("step",)
        acts = autocast_activations(s, rows, seq, ckpt, attn)
        terms.update(acts)
        for k in acts:
            phases[k] = ("backward", "step") if k == "one layer recomputed" else ("forward", "backward")
        terms["bf16 weight copies (autocast)"] = 2 * s.linear_params
        phases["bf16 weight copies (autocast)"] = ("forward",) if ckpt else ("forward", "backward")
        terms["logits"] = logits_bytes(s, rows, seq, 2)
        terms["logits gradient"] = 2 * rows * seq * s.vocab
        phases["logits"], phases["logits gradient"] = ("forward", "backward"), ("backward",)
        if not accumulate:
            terms["output layer gradient"] = 4 * s.vocab * s.hidden
            phases["output layer gradient"] = ("backward",)
        phases["optimizer step temporaries"] = ("step",)
    else:
        terms["activations"] = activation_bytes(s, rows, seq, ckpt, attn, width)
        terms["logits"] = logits_bytes(s, rows, seq, width)
    if d.needs_reference:  # the precomputed reference log-probs live on disk; one micro batch of them is on the GPU
        terms["reference log-probs (micro batch)"] = 4 * rows * seq
    if not hw.cpu:
        terms["runtime reserve"] = RUNTIME_RESERVE
    return StepPlan(step.name, "train", terms, phases=phases, engine=engine)


AUTO_CHECKPOINT_FRACTION = 0.9  # of the GPU's memory, above which `gradient_checkpointing: auto` turns it on


def decide_checkpointing(setting: bool | str, cpu: bool, gpu_bytes: int,
                         peak_without: Callable[[], int]) -> tuple[bool, str]:
    """Whether a step recomputes activations, and why: the recipe's true or false, or under "auto" on when the plan's
    peak without it (asked for only then) leaves less than a tenth of the GPU free (the plan comes within 4-7% of
    measured GPU peaks), else off, as recomputing costs about a third more compute; off on the CPU."""
    if setting != "auto":
        return bool(setting), "model.gradient_checkpointing"
    if cpu:
        return False, "auto: off on the CPU"
    without = peak_without()
    on = without > AUTO_CHECKPOINT_FRACTION * gpu_bytes
    return on, (f"auto: the plan's peak without it, {without / GiB:.1f} GiB, is "
                f"{'above' if on else 'within'} {AUTO_CHECKPOINT_FRACTION:.0%} of {gpu_bytes / GiB:.0f} GiB")


def checkpointing_for(recipe: Recipe, stage: str, section: str, config: Any, world: int, micro: int,
                      device: Any) -> tuple[bool, str]:
    """`decide_checkpointing` for a training stage about to start on `device` (the stage logs it), with the plan of
    this model, world size and GPU."""
    from types import SimpleNamespace

    import torch

    cuda = device.type == "cuda"
    total = torch.cuda.get_device_properties(device).total_memory if cuda else 0
    step = SimpleNamespace(name=stage, train=SimpleNamespace(section=section, stage=stage))
    return decide_checkpointing(recipe.model.gradient_checkpointing, not cuda, total, lambda: train_plan(
        recipe, step, shape_of(config), Hardware(1, world, total), None, micro, checkpointing=False).peak)


def generate_plan(recipe: Recipe, step, s: Shape, hw: Hardware) -> StepPlan:
    g = recipe.generation
    if g.backend == "vllm" or (g.backend == "auto" and not hw.cpu):
        terms = {"vLLM engine (gpu_memory_utilization)": int(g.gpu_memory_utilization * hw.gpu_bytes)}
    else:
        seq = recipe.data.max_length
        terms = {"weights (16-bit)": 2 * s.params,
                 "KV cache": 2 * 2 * s.layers * s.kv * seq * g.batch_size}
    return StepPlan(step.name, "generate", terms)


def smallest_fix(recipe: Recipe, step, s: Shape, hw: Hardware) -> Optional[str]:
    """The first change (in this order) that makes a training step fit: a smaller micro batch, gradient
    checkpointing, ZeRO-3, optimizer offload, parameter offload, then more nodes. Only what differs from the recipe
    is suggested."""
    t = recipe.stage_train(step.train.section)
    sec = step.train.section
    ckpt = recipe.model.gradient_checkpointing
    ckpt = None if ckpt == "auto" else ckpt  # None: each candidate's plan decides as "auto" would

    def change(micro: int, checkpointing: bool, cfg: Optional[str] = None) -> str:
        sets = [f"{sec}.train.micro_batch_size={micro}"] if micro != t.micro_batch_size else []
        sets += ["model.gradient_checkpointing=true"] if checkpointing and ckpt is False else []
        sets += [f"{sec}.train.ds_config={cfg}"] if cfg and cfg != t.ds_config else []
        return " ".join(f"--set {x}" for x in sets)

    micro = t.micro_batch_size
    while micro > 1:
        micro //= 2
        if train_plan(recipe, step, s, hw, None, micro, ckpt).peak <= hw.gpu_bytes:
            return change(micro, bool(ckpt))
    if ckpt is False and train_plan(recipe, step, s, hw, None, 1, True).peak <= hw.gpu_bytes:
        return change(1, True)
    z = zero_of(t.ds_config)
    for cfg in ("ds_configs/zero3.json", "ds_configs/zero3_offload.json"):
        zz = zero_of(cfg)
        same = (zz.stage, zz.offload_optimizer, zz.offload_params) == (z.stage, z.offload_optimizer, z.offload_params)
        if not same and train_plan(recipe, step, s, hw, cfg, 1, True).peak <= hw.gpu_bytes:
            return change(1, True, cfg)
    for nodes in range(hw.nodes + 1, 64 * hw.nodes + 1):
        more = Hardware(nodes, hw.gpus_per_node, hw.gpu_bytes, cpu=hw.cpu)
        if train_plan(recipe, step, s, more, "ds_configs/zero3.json", 1, True).peak <= hw.gpu_bytes:
            return f"{nodes} nodes × {hw.gpus_per_node} GPUs with ZeRO-3, micro batch 1 and gradient checkpointing"
    return None


# --------------------------------------------------------------------------------------------- tokens, time
def _records(path: Optional[str]) -> Optional[list[dict]]:
    """The records of a local data file (None when there is none); every step that reads the same file shares one
    read (keyed by size and modification time, so a rewritten file is read again)."""
    if not path or not Path(path).is_file():
        return None
    st = Path(path).stat()
    return _read_records(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_records(path: str, size: int, mtime_ns: int) -> list[dict]:
    from allo.data.records import _iter_raw

    return [r for _, r in _iter_raw(path, "train") if isinstance(r, dict)]


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _text_chars(rec: dict, fields: tuple[str, ...]) -> list[int]:
    def chars(v: Any) -> int:
        return len(v) if isinstance(v, str) else sum(len(str(m.get("content", ""))) for m in v or [])
    prompt = chars(rec.get("prompt", ""))
    return [prompt + chars(rec.get(f, "")) for f in fields]


def data_tokens(recipe: Recipe, path: Optional[str], fields: tuple[str, ...], fallback_records: int,
                fallback_note: str) -> tuple[int, int, str]:
    """(tokens one epoch processes: every row of every record, each capped at data.max_length; records; source)."""
    cap = recipe.data.max_length
    records = _records(path)
    if records is not None and recipe.data.limit:  # what the stage reads
        records = records[:recipe.data.limit]
    if records is None:
        return (fallback_records * len(fields) * cap // 2, fallback_records,
                f"{fallback_note}; assumed half of data.max_length a row")
    sample = records[:SAMPLE_RECORDS]
    tok_dir = recipe.model.tokenizer or recipe.model.path
    per_char, how = 0.25, "4 characters a token"
    if tok_dir and Path(tok_dir).is_dir() and sample:
        tok = _tokenizer(str(tok_dir))
        texts = [str(r.get("prompt", "")) + str(r.get(fields[0], "")) for r in sample[:200]]
        chars = sum(len(t) for t in texts)
        if chars:
            per_char, how = sum(len(tok(t)["input_ids"]) for t in texts) / chars, "tokenizer on a sample"
    per_record = [sum(min(cap, int(c * per_char) + 2) for c in _text_chars(r, fields)) for r in sample]
    mean = sum(per_record) / max(1, len(per_record))
    return int(mean * len(records)), len(records), f"{len(records)} records in {path} ({how})"


def problem_count(recipe: Recipe, given: Optional[int]) -> tuple[int, str]:
    """Training problems: task.problems' records, else `given` (--problems), else 0 with a note saying so; at most
    data.limit and task.max_problems, as the sample step reads them."""
    problems = _records(recipe.task.problems)
    n, where = ((len(problems), f"{len(problems)} problems in {recipe.task.problems}") if problems is not None else
                (given, f"{given} problems (--problems)") if given else (0, NO_PROBLEMS))
    caps = [(v, k) for k, v in (("data.limit", recipe.data.limit), ("task.max_problems", recipe.task.max_problems))
            if v is not None and n and v < n]
    if caps:
        v, k = min(caps)
        return v, f"{v} problems ({k}; of {where})"
    return n, where


NO_PROBLEMS = "no task.problems file yet: pass --problems N"


def step_tokens(recipe: Recipe, step, problems: Optional[int] = None) -> tuple[int, int, str]:
    """Tokens per epoch of a training step's data, from its file when it exists (a run already started or the
    recipe's own file), else from the recipe's counts."""
    from allo.stages import STAGES

    run = Path(recipe.output_dir)
    n, where = problem_count(recipe, problems)
    pairs_guess = n * recipe.sample.max_pairs_per_problem
    note = f"at most sample.max_pairs_per_problem {recipe.sample.max_pairs_per_problem} pairs × {where}"
    given = _records(recipe.task.pairs)
    if given is not None:  # the given pairs, and at most one wrong response each
        pairs_guess = min(len(given), recipe.data.limit or len(given))
        note = f"{pairs_guess} pairs in {recipe.task.pairs}"
    fields = STAGES[step.train.stage].responses
    data = step.train.data
    if data.startswith("recipe:"):
        path = recipe.task.sft_data if data == "recipe:task.sft_data" else None
        return data_tokens(recipe, path, fields, n, f"one SFT record per problem, {where}")
    path = run / data
    if data == "pairs/pairs.jsonl" and recipe.task.pairs:
        path = Path(recipe.task.pairs)
    if path.exists():
        return data_tokens(recipe, str(path), fields, 0, "")
    if step.name == "reward-train":
        return data_tokens(recipe, None, fields, 2 * pairs_guess, f"about 2 × {note}")
    return data_tokens(recipe, None, fields, pairs_guess, note)


def train_flops(recipe: Recipe, step, s: Shape, tokens: int, records: int) -> float:
    """6·N per trained token over the stage's passes (epochs, or max_steps × global batch records), plus 2·N per
    token for the reference log-probs."""
    from allo.stages import STAGES

    t = recipe.stage_train(step.train.section)
    passes = t.max_steps * t.global_batch_size / max(1, records) if t.max_steps else t.epochs
    return 6 * s.params * tokens * passes + (2 * s.params * tokens if STAGES[step.train.stage].needs_reference else 0)


def generate_tokens(recipe: Recipe, step, problems: Optional[int] = None) -> tuple[int, str]:
    """Tokens a generation step writes (upper bounds: every response runs to its token budget)."""
    if step.name == "sample":
        n, where = problem_count(recipe, problems)
        return n * recipe.sample.n * recipe.sample.max_new_tokens, (
            f"sample.n {recipe.sample.n} × sample.max_new_tokens × {where} (upper bound)")
    items, notes = eval_items(recipe)
    models = eval_models(recipe)
    return models * items * recipe.task.eval_max_new_tokens, (
        f"{models} models × {items} problems ({', '.join(notes) or 'none'}) × task.eval_max_new_tokens (upper bound)")


def eval_models(recipe: Recipe) -> int:
    """Models the eval step scores: SFT and every table row the recipe trains (or task.eval_models)."""
    from allo.steps import REGISTRY

    if recipe.task.eval_models is not None:
        return len(recipe.task.eval_models)
    return 1 + sum(1 for st in REGISTRY.values() if st.label and not (st.skip and st.skip(recipe)))


def eval_items(recipe: Recipe) -> tuple[int, list[str]]:
    """(problems each model answers, what they are): held-out problems, each benchmark's (first task.eval_limit),
    AlpacaEval's and Arena-Hard's prompts. A hub benchmark is counted from its local copy only."""
    from allo.eval import benchmarks
    from allo.eval.suite import instruction_suites

    t, n, notes = recipe.task, 0, []
    held = _records(t.eval)
    if held:
        n += len(held)
        notes.append(f"{len(held)} held-out")
    for spec in t.benchmarks:
        name, _, data = str(spec).partition("=")
        try:
            source = benchmarks.source_of(name, data or None)
            count = len(_benchmark(name, str(source), Path(source).stat().st_mtime_ns)) if isinstance(
                source, Path) else None
        except (ValueError, OSError):
            notes.append(f"{name} not counted ({data or name} cannot be read here)")
            continue
        if count is None:
            notes.append(f"{name} not counted (from the hub; give {name}=FILE to count it)")
            continue
        count = min(count, t.eval_limit) if t.eval_limit else count
        n += count
        notes.append(f"{name} {count}")
    try:
        suites = instruction_suites(t)
    except (OSError, ValueError):
        suites = {}
        notes.append("AlpacaEval/Arena-Hard files not readable here (not counted)")
    for suite, prompts in suites.items():
        n += len(prompts)
        notes.append(f"{suite} {len(prompts)}")
    return n, notes


@functools.lru_cache(maxsize=32)
def _benchmark(name: str, path: str, mtime_ns: int) -> list[dict]:
    from allo.eval import benchmarks

    return benchmarks.load(name, path)[0]


def _tokens_of(text_chars: float) -> int:
    return int(text_chars / 4) + 1  # 4 characters a token (the plan's rule without a tokenizer)


def wrong_responses(recipe: Recipe, problems: Optional[int]) -> tuple[int, int, int, str]:
    """(count, mean prompt tokens, mean response tokens, what they are) of the wrong responses reward-data and
    reward-score read: the run's pairs/wrong.jsonl once it exists, else the given pairs, else at most sample.n per
    problem; the first data.limit of them."""
    run = Path(recipe.output_dir)
    wrong = _records(str(run / "pairs" / "wrong.jsonl")) or _records(recipe.task.pairs)
    if wrong is not None:
        rows = wrong[:recipe.data.limit] if recipe.data.limit else wrong
        prompt = sum(len(str(r.get("prompt", ""))) for r in rows) / max(1, len(rows))
        reply = sum(len(str(r.get("rejected", ""))) for r in rows) / max(1, len(rows))
        return len(rows), _tokens_of(prompt), _tokens_of(reply), f"{len(rows)} wrong responses"
    n, where = problem_count(recipe, problems)
    count = n * recipe.sample.n
    limited = recipe.data.limit is not None and recipe.data.limit < count
    return (min(count, recipe.data.limit) if limited else count, recipe.data.max_prompt_length // 2,
            recipe.sample.max_new_tokens, f"at most sample.n × {where}" + (", data.limit" if limited else ""))


def teacher_requests(recipe: Recipe, problems: Optional[int]) -> Api:
    """The rewrites reward-data asks an LLM teacher for: one per wrong response, the problem, a reference and the
    wrong response in, the rewrite out."""
    from allo.budget import TEACHER_TEMPLATE_TOKENS, api_of

    api = api_of(recipe.reward.teacher_endpoint, "teacher")
    if recipe.reward.teacher == "openai":
        count, prompt, reply, note = wrong_responses(recipe, problems)
        api.add(count, TEACHER_TEMPLATE_TOKENS + prompt + 2 * reply, reply, note)
    return api


def judge_requests(recipe: Recipe) -> Api:
    """Table 3's judging: every model against the first, AlpacaEval in both orders (one token each), Arena-Hard two
    games a question (a judgment each)."""
    from allo.budget import ALPACA_TEMPLATE_TOKENS, ARENA_JUDGMENT_TOKENS, ARENA_TEMPLATE_TOKENS, api_of
    from allo.eval.suite import instruction_suites

    t = recipe.task
    api = api_of(t.judge, "judge")
    try:
        suites = instruction_suites(t)
    except (OSError, ValueError):
        return api
    others = eval_models(recipe) - 1
    for suite, prompts in suites.items():
        mean = _tokens_of(sum(map(len, prompts)) / max(1, len(prompts))) + 2 * t.eval_max_new_tokens
        if suite == "alpaca_eval":
            api.add(others * len(prompts) * 2, ALPACA_TEMPLATE_TOKENS + mean, 1,
                    f"AlpacaEval {len(prompts)} × 2 orders × {others} models")
        else:
            api.add(others * len(prompts) * 2, ARENA_TEMPLATE_TOKENS + mean, ARENA_JUDGMENT_TOKENS,
                    f"Arena-Hard {len(prompts)} × 2 games × {others} models")
    return api


def generation_wall(recipe: Recipe, s: Shape, hw: Hardware, tokens: int) -> tuple[float, str]:
    """Seconds to decode `tokens` over the job's GPUs, and how fast (`allo.budget.decode_tokens_per_s`)."""
    from allo.budget import decode_tokens_per_s

    g = recipe.generation
    vllm = g.backend == "vllm" or (g.backend == "auto" and not hw.cpu)
    seq = (recipe.data.max_prompt_length + max(recipe.sample.max_new_tokens, recipe.task.eval_max_new_tokens)) // 2
    rate, seqs = decode_tokens_per_s(s.params, s.kv, s.layers, seq, g.batch_size, hw.gpu_bytes, hw.bandwidth,
                                     hw.mfu * hw.tflops * 1e12, vllm, g.gpu_memory_utilization)
    return tokens / (rate * hw.world), f"{rate:,.0f} tokens/s a GPU, {seqs} sequences in flight"


# --------------------------------------------------------------------------------------------- the plan
def measured_mfu() -> Optional[tuple[float, float, str]]:
    """(MFU, peak TFLOP/s, source) of the newest bench/gpu.py result on record, if any."""
    f = GPU_RESULT
    try:
        r = json.loads(f.read_text())
        return float(r["dpo"]["mfu"]), float(r["peak_flops"]) / 1e12, f"measured by bench/gpu.py ({f.name})"
    except (OSError, KeyError, ValueError, TypeError):
        return None


def plan(recipe: Recipe, hw: Hardware, only: Optional[list[str]] = None,
         problems: Optional[int] = None) -> list[StepPlan]:
    """The plan of every step the recipe runs (or of the steps in `only`)."""
    from allo.steps import REGISTRY

    unknown = [n for n in only or () if n not in REGISTRY]
    if unknown:
        raise ValueError(f"--step {unknown[0]}: no such step (steps: {', '.join(REGISTRY)})")
    s = shape_of(model_config(recipe))
    shapes = {None: s}
    out = []
    for step in REGISTRY.values():
        if (step.skip and step.skip(recipe)) or (only and step.name not in only):
            continue
        if step.train is not None:
            init = recipe.reward.init if step.name == "reward-train" else None
            if init not in shapes:
                shapes[init] = shape_of(model_config(recipe, init))
            sh = shapes[init]
            r = step.train.adapt(recipe)  # the reward model's lengths, a baseline's own β
            p = train_plan(r, step, sh, hw)
            p.tokens, records, p.tokens_source = step_tokens(r, step, problems)
            p.flops = train_flops(r, step, sh, p.tokens, records)
            p.wall_s = p.flops / (hw.mfu * hw.tflops * 1e12 * hw.world)
        elif step.name in ("sample", "eval"):
            p = generate_plan(recipe, step, s, hw)
            p.tokens, p.tokens_source = generate_tokens(recipe, step, problems)
            p.flops = 2 * s.params * p.tokens
            p.wall_s, rate = generation_wall(recipe, s, hw, p.tokens)
            p.tokens_source += f"; decode-bound at {rate}"
            if step.name == "eval" and (recipe.task.alpaca_eval or recipe.task.arena_hard):
                p.api = judge_requests(recipe)
                p.wall_s += p.api.wall_s
        else:
            p = other_step(recipe, step, s, hw, problems)
            if p is None:
                continue
        p.fits = p.peak <= hw.gpu_bytes
        if not p.fits and p.kind == "train":
            p.fix = smallest_fix(r, step, sh, hw)
        out.append(p)
    return out


def other_step(recipe: Recipe, step, s: Shape, hw: Hardware, problems: Optional[int]) -> Optional[StepPlan]:
    """locate, reward-data (the teacher) and reward-score: their wall time on the job, which holds every GPU."""
    from allo.budget import DISK_BYTES_PER_S, LOCATE_PASSES

    if step.name == "locate":
        width = 2 if recipe.model.dtype == "bf16" else 4
        if recipe.locate.from_partitions:
            return StepPlan(step.name, "locate", tokens_source="from the warm-up run's fp32 partitions: no pass of "
                                                               "its own")
        read = LOCATE_PASSES * 2 * width * s.params
        return StepPlan(step.name, "locate", wall_s=read / DISK_BYTES_PER_S, tokens_source=(
            f"{LOCATE_PASSES} passes over both checkpoints, {read / 1e9:.1f} GB read on one node"))
    if step.name == "reward-data":
        api = teacher_requests(recipe, problems)
        return StepPlan(step.name, "api", api=api, wall_s=api.wall_s, tokens_source=(
            f"{api.requests:,} teacher requests, {api.concurrency} in flight" if api.requests else
            f"reward.teacher {recipe.reward.teacher}: no requests"))
    if step.name == "reward-score":
        count, prompt, reply, note = wrong_responses(recipe, problems)
        tokens = count * (prompt + reply)
        p = StepPlan(step.name, "score", tokens=tokens, flops=2 * s.params * tokens,
                     tokens_source=f"a forward pass over each of {note}")
        p.wall_s = p.flops / (hw.mfu * hw.tflops * 1e12 * hw.world)
        return p
    return None


def gpu_hours(p: StepPlan, hw: Hardware) -> float:
    """The step's wall time × the job's GPUs: a job holds them all, whatever the step uses."""
    return p.wall_s * hw.world / 3600


def job_wall(steps: list[StepPlan]) -> float:
    return sum(p.wall_s for p in steps)


def verdict(steps: list[StepPlan], hw: Hardware) -> str:
    bad = [p for p in steps if not p.fits]
    hours = sum(gpu_hours(p, hw) for p in steps)
    worst = max(steps, key=lambda p: p.peak)
    head = (f"fits: every step within {hw.gpu_bytes / GiB:.0f} GiB per GPU (peak {worst.peak / GiB:.1f} GiB, "
            f"{worst.step})" if not bad else
            f"does not fit: {', '.join(p.step for p in bad)} {'exceeds' if len(bad) == 1 else 'exceed'} "
            f"{hw.gpu_bytes / GiB:.0f} GiB per GPU "
            f"({bad[0].step}: {bad[0].peak / GiB:.1f} GiB; fix: {bad[0].fix or 'none found'})")
    if any(NO_PROBLEMS in p.tokens_source for p in steps):  # not 0 GPU-hours: unknown
        return f"{head}; GPU-hours unknown ({NO_PROBLEMS})"
    from allo.budget import suggested_time

    calls = [f"{p.api.who} {p.api.requests:,} requests" for p in steps if p.api and p.api.requests]
    return (f"{head}; about {hours:.1f} GPU-hours ({hours / hw.world:.2f} h wall on {hw.world} GPUs) at MFU "
            f"{hw.mfu:.2f}; --time {suggested_time(job_wall(steps))}" + (f"; {', '.join(calls)}" if calls else ""))


def render(steps: list[StepPlan], hw: Hardware) -> str:
    lines = [f"{hw.nodes} nodes × {hw.gpus_per_node} GPUs, {hw.gpu_bytes / GiB:.0f} GiB each, "
             f"{hw.tflops:.0f} TFLOP/s peak, MFU {hw.mfu:.2f} ({hw.mfu_source})", ""]
    for p in steps:
        mark = "ok " if p.fits else "NO "
        lines.append(f"{mark}{p.step:13s} peak {p.peak / GiB:8.2f} GiB  {p.tokens / 1e6:10.2f} M tokens  "
                     f"{gpu_hours(p, hw):8.2f} GPU-h   ({p.tokens_source})")
        if p.engine:
            lines.append(f"      engine: {p.engine}")
        for k, v in p.terms.items():
            when = f"  ({', '.join(p.phases[k])})" if k in p.phases and len(p.phases[k]) < len(PHASES) else ""
            lines.append(f"      {k:38s} {v / GiB:8.2f} GiB{when}")
        if p.fix:
            lines.append(f"      smallest change that fits: {p.fix}")
    from allo.budget import ASSUMPTIONS, TIME_MARGIN

    lines += [""] + [p.api.line() for p in steps if p.api and p.api.requests]
    lines.append(f"wall time {job_wall(steps) / 3600:.2f} h; --time adds {100 * (TIME_MARGIN - 1):.0f}% for model "
                 f"loads, checkpoints and start-up (assumed: {ASSUMPTIONS})")
    return "\n".join(lines + ["", verdict(steps, hw)])


def as_json(steps: list[StepPlan], hw: Hardware) -> dict:
    return {"hardware": {"nodes": hw.nodes, "gpus_per_node": hw.gpus_per_node, "gpu_bytes": hw.gpu_bytes,
                         "tflops": hw.tflops, "mfu": hw.mfu, "mfu_source": hw.mfu_source},
            "steps": [{"step": p.step, "kind": p.kind, "engine": p.engine, "terms": p.terms,
                       "phases": {k: list(v) for k, v in p.phases.items()}, "peak": p.peak, "fits": p.fits,
                       "fix": p.fix, "tokens": p.tokens, "tokens_source": p.tokens_source,
                       "wall_s": round(p.wall_s, 1), "gpu_hours": round(gpu_hours(p, hw), 3),
                       **({"api": {"who": p.api.who, "requests": p.api.requests,
                                   "prompt_tokens": p.api.prompt_tokens, "completion_tokens": p.api.completion_tokens,
                                   "usd": round(p.api.usd, 2)}} if p.api else {})} for p in steps],
            "fits": all(p.fits for p in steps), "verdict": verdict(steps, hw)}


def parse_bytes(text: str) -> int:
    """"80GiB", "80GB", "141 GiB", "81920MiB" -> bytes."""
    units = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2 ** 10, "mib": 2 ** 20,
             "gib": GiB, "tib": 2 ** 40}
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    if not num or unit not in units:
        raise ValueError(f"--gpu-memory {text!r}: expected a size such as 80GiB, 80GB or 141GiB")
    if unit in ("", "b"):
        raise ValueError(f"--gpu-memory {text!r}: give a unit, e.g. {num}GiB or {num}GB ({num} alone would be "
                         f"{num} bytes)")
    return int(float(num) * units[unit])


def hardware(nodes: int, gpus_per_node: int, gpu_memory: str, tflops: Optional[float], mfu: Optional[float],
             cpu: bool = False) -> Hardware:
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"--nodes {nodes} and --gpus-per-node {gpus_per_node} must both be >= 1")
    hw = Hardware(nodes, gpus_per_node, parse_bytes(gpu_memory), cpu=cpu)
    measured = measured_mfu()
    if measured:
        hw.mfu, hw.tflops, hw.mfu_source = measured
    if tflops:
        hw.tflops = tflops
    if mfu:
        hw.mfu, hw.mfu_source = mfu, "given (--mfu)"
    if not 0 < hw.mfu <= 1:
        raise ValueError(f"--mfu {hw.mfu}: must be in (0, 1]")
    return hw


def add_arguments(p) -> None:
    p.add_argument("--nodes", type=int, default=1, help="nodes the job will run on (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (ranks) per node (default 8)")
    p.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU, e.g. 80GiB, 141GiB (default 80GiB)")
    p.add_argument("--gpu-tflops", type=float, help=f"peak dense bf16 TFLOP/s of one GPU (default {DEFAULT_TFLOPS:g}, "
                                                    "H100 SXM; or bench/gpu.py's measured peak)")
    p.add_argument("--mfu", type=float, help="model FLOP utilisation for GPU-hours (default: bench/gpu.py's measured "
                                             f"value when on record, else an assumed {ASSUMED_MFU})")
    p.add_argument("--problems", type=int, help="training problems, for GPU-hours before task.problems exists "
                                                "(e.g. 7473 for GSM8K's train split)")
    p.add_argument("--step", action="append", help="plan only this step (repeatable; default: every step)")
    p.add_argument("--json", action="store_true", help="the plan as JSON (for scripts)")
    p.add_argument("--verdict", action="store_true", help="print only the one-line verdict (slurm/submit.sh)")


def main(recipe: Recipe, args) -> int:
    """`allo plan`: prints the plan; exit 0 when every step fits, 3 when one does not."""
    hw = hardware(args.nodes, args.gpus_per_node, args.gpu_memory, args.gpu_tflops, args.mfu)
    steps = plan(recipe, hw, args.step, args.problems)
    print(json.dumps(as_json(steps, hw), indent=2) if args.json else verdict(steps, hw) if args.verdict else
          render(steps, hw))
    return 0 if all(p.fits for p in steps) else 3
