"""The only owner of DeepSpeed: process group, config resolution, initialize, backward/step, checkpoints, export.

Follows the strategy object of OpenRLHF (``openrlhf/utils/deepspeed/deepspeed.py``): the training loop calls
``prepare``, ``backward``, ``step``, ``save_checkpoint``, ``load_checkpoint``, ``export_hf``, ``all_reduce``
and never imports deepspeed itself. ``ds_configs/*.json`` stay the source of truth for ZeRO settings; the
strategy fills only the fields marked "auto" (batch sizes, clipping, precision) from the recipe and refuses
explicit values that disagree with it.
"""
from __future__ import annotations

import importlib
import json
import logging
import math
import os
import socket
import warnings
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch

from allo.config import TrainConfig

log = logging.getLogger(__name__)


class LaunchError(ValueError):
    """A batch/world combination that cannot run, phrased with the numbers involved."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DeviceMismatch(LaunchError):
    """DeepSpeed's accelerator and torch disagree about where this process computes."""


def accelerator_name() -> str:
    """The accelerator DeepSpeed will use: DS_ACCELERATOR when set, else cuda when torch sees a GPU, else cpu. Set
    before deepspeed is imported, so that DeepSpeed and allo decide once and alike (and DeepSpeed does not warn)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    return os.environ["DS_ACCELERATOR"]


def run_device(accelerator: str, cuda_available: bool, local_rank: int) -> torch.device:
    """The device of this rank, taken from DeepSpeed's accelerator; a disagreement with torch is refused in one
    sentence that says how to fix it."""
    if accelerator == "cpu" and cuda_available:
        raise DeviceMismatch("DeepSpeed's accelerator is cpu (DS_ACCELERATOR=cpu) but torch sees a GPU: unset "
                             "DS_ACCELERATOR to train on the GPU, or hide the GPUs with CUDA_VISIBLE_DEVICES= to "
                             "train on the CPU")
    if accelerator == "cuda" and not cuda_available:
        raise DeviceMismatch("DeepSpeed's accelerator is cuda but torch sees no GPU (torch "
                             f"{torch.__version__}, CUDA {torch.version.cuda}): check CUDA_VISIBLE_DEVICES and the "
                             "driver, or unset DS_ACCELERATOR to train on the CPU")
    if accelerator not in ("cpu", "cuda"):
        raise DeviceMismatch(f"DeepSpeed's accelerator is {accelerator}; allo runs on cuda or cpu (set "
                             "DS_ACCELERATOR to one of them)")
    return torch.device("cuda", local_rank) if accelerator == "cuda" else torch.device("cpu")


def init_distributed(timeout_minutes: Optional[float] = None) -> torch.device:
    """Join (or, for a plain `python` run, create) the process group: gloo on CPU, NCCL on GPUs; collectives fail
    after `timeout_minutes` (DeepSpeed's default, 30, when None). Returns this rank's device."""
    accelerator_name()
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    device = run_device(get_accelerator().device_name(), torch.cuda.is_available(),
                        int(os.environ.get("LOCAL_RANK", 0)))
    if dist.is_initialized():
        return device
    # Workaround: deepspeed 0.19.8 calls c10d collectives that torch 2.13 deprecates, once per bucket per step.
    # Remove when deepspeed uses all_gather_single / reduce_scatter_single.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if "RANK" not in os.environ:  # single process without a launcher: avoid DeepSpeed's MPI discovery
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if device.type == "cpu":
        # Workaround: DeepSpeed JIT-builds its shared-memory comm op (~27 s) on every CPU init although gloo
        # suffices. Remove when deepspeed skips the build for gloo-only runs.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    kwargs = {"timeout": timedelta(minutes=timeout_minutes)} if timeout_minutes else {}
    from allo.comm import set_timeout

    set_timeout(timeout_minutes)  # the gloo side group's too
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="gloo" if device.type == "cpu" else "nccl", **kwargs)
    return device


def finish_distributed(code: int) -> None:
    """End a distributed stage after every rank finished its work: barrier, flush, then leave without
    interpreter teardown.

    Workaround: with torch 2.13 + deepspeed 0.19.8 on gloo, a rank intermittently aborted at exit ("terminate
    called without an active exception", SIGABRT) after all its work was done, also after an explicit
    destroy_process_group; torchrun then reports the whole run as failed. Everything a stage writes is already
    closed and renamed into place, so skipping teardown loses nothing. Remove when 200 consecutive 2-rank test
    launches exit cleanly without it.
    """
    import logging as _logging
    import sys as _sys

    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
    _logging.shutdown()
    _sys.stdout.flush()
    _sys.stderr.flush()
    os._exit(code)


def batch_arithmetic(global_batch: int, micro_batch: int, world: int) -> int:
    """Gradient accumulation steps so that micro × accumulation × world = global batch, or a LaunchError."""
    per_step = micro_batch * world
    if global_batch % per_step:
        raise LaunchError(
            f"global_batch_size {global_batch} is not a multiple of micro_batch_size {micro_batch} × world size "
            f"{world} = {per_step}; choose a global batch that is, e.g. {max(1, global_batch // per_step) * per_step}")
    return global_batch // per_step


def fit_micro_batch(global_batch: int, micro_batch: int, world: int) -> int:
    """The largest micro batch <= `micro_batch` that splits the global batch evenly over `world` ranks, so a recipe's
    global batch holds on any GPU count that divides it (32 on 16 GPUs: micro 2, not the recipe's 4)."""
    for m in range(micro_batch, 0, -1):
        if global_batch % (m * world) == 0:
            return m
    raise LaunchError(f"global_batch_size {global_batch} is not a multiple of world size {world} (with any micro "
                      f"batch <= {micro_batch}); use a world size that divides it, or change the global batch")


def ds_config_path(path: str | Path) -> Path:
    """A relative DeepSpeed config path as given (from the working directory) or, when no such file is there, from
    the checkout allo runs from: `ds_configs/zero3.json` then works from any directory."""
    path = Path(path)
    shipped = Path(__file__).resolve().parents[1] / path
    return shipped if not path.is_absolute() and not path.exists() and shipped.exists() else path


def resolve_ds_config(path: str | Path, train: TrainConfig, world: int, precision: str) -> dict:
    """Load a DeepSpeed JSON and fill its "auto" fields from the recipe; explicit values must agree."""
    path = ds_config_path(path)
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LaunchError(f"{path}: cannot read DeepSpeed config ({e})") from None
    gas = batch_arithmetic(train.global_batch_size, train.micro_batch_size, world)
    wanted = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": train.grad_clip,
    }
    for key, value in wanted.items():
        have = cfg.get(key, "auto")
        if have != "auto" and have != value:
            raise LaunchError(f"{path}: {key} is {have} but the recipe gives {value}; set it to \"auto\"")
        cfg[key] = value
    for key in ("bf16", "fp16"):
        section = cfg.setdefault(key, {"enabled": "auto"})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = key == "bf16" and precision == "bf16"
    if cfg["fp16"]["enabled"]:
        raise LaunchError(f"{path}: fp16 is not supported (use bf16 or fp32)")
    if cfg["bf16"]["enabled"] != (precision == "bf16"):
        raise LaunchError(f"{path}: bf16.enabled={cfg['bf16']['enabled']} disagrees with model.dtype={precision}")
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        cfg["zero_force_ds_cpu_optimizer"] = False  # our masked AdamW runs on the offloaded CPU tensors
    cfg["zero_allow_untested_optimizer"] = True
    cfg.setdefault("steps_per_print", 10 ** 9)
    cfg.setdefault("wall_clock_breakdown", False)
    # DeepSpeed's throughput timer is on by default and, without a DeepSpeed dataloader, starts in every forward and
    # stops in every step, each time waiting for the device (accelerator.synchronize): off unless the config asks
    # for it. allo measures tokens/s itself, at logging steps only.
    cfg.setdefault("timers", {}).setdefault("throughput", {}).setdefault("enabled", False)
    return cfg


def single_rank_config(cfg: dict, world: int, mode: str) -> tuple[dict, Optional[str]]:
    """The DeepSpeed config to run on `world` ranks, and why it differs from `cfg` (None: it does not).

    On one rank a ZeRO-1/2/3 config partitions nothing and still pays for it: ZeRO-3 gathers and releases every
    module's weights around its forward and backward, and bf16 ZeRO keeps bf16 weights, bf16 and fp32 gradients,
    fp32 masters and the moments (18-20 bytes a parameter). `mode` "fast" trains such a run with ZeRO-0 instead, and
    bf16 as fp32 weights under torch autocast (DeepSpeed's `torch_autocast`): weights, gradients and moments, 16
    bytes a parameter, the same numerics class as torch AMP. Offload configs are kept: they trade speed for GPU
    memory on purpose."""
    zero = cfg.get("zero_optimization", {})
    offload = any((zero.get(k) or {}).get("device", "none") not in ("none", None)
                  for k in ("offload_optimizer", "offload_param"))
    stage, bf16 = int(zero.get("stage", 0)), bool(cfg.get("bf16", {}).get("enabled"))
    if mode != "fast" or world != 1 or offload or (stage == 0 and not bf16):
        return cfg, None
    out = {**cfg, "zero_optimization": {"stage": 0}}
    why = [f"ZeRO-{stage} partitions nothing on one rank"] if stage else []
    if bf16:
        out["bf16"] = {"enabled": False}
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
        why.append("bf16 as fp32 weights under autocast: 16 bytes a parameter instead of "
                   f"{18 if stage == 3 else 20}")
    return out, "; ".join(why)


def skip_nonfinite_on_device(engine: Any) -> None:
    """ZeRO-3's step reads its global gradient norm on the host (`is_invalid_grad_norm`: `bool(norm)`) to skip a step
    whose norm is NaN or Inf: the host waits for the device once a step. allo's optimizer takes that decision on the
    device instead: it reads the same norm (DeepSpeed stores it before stepping its inner optimizer) and passes
    "non-finite" to the fused kernel as `found_inf`, which leaves weights, moments and step count untouched; every
    rank sees the same all-reduced norm, so all skip together. DeepSpeed's host check is switched off in its ZeRO-3
    module (this process trains only through allo), and the step counts as taken in DeepSpeed's own counters; allo
    counts it as skipped (`nonfinite_steps`). fp16 loss scaling, which needs the host check, is not an allo
    precision."""
    import deepspeed.runtime.zero.stage3 as stage3

    from allo.masks.apply import find_optimizer
    from allo.optim import MaskedAdamW

    stage3.is_invalid_grad_norm = lambda norm: False
    zero = engine.optimizer
    find_optimizer(engine, MaskedAdamW).norm_source = lambda: getattr(zero, "_global_grad_norm", None)


def autocast_of(cfg: dict) -> bool:
    """Whether a DeepSpeed config trains under torch autocast (fp32 weights, bf16 compute)."""
    return bool(cfg.get("torch_autocast", {}).get("enabled"))


def lr_lambda(total_steps: int, warmup_ratio: float, kind: str):
    """Linear warm-up to the peak, then cosine/linear decay to 0 or constant (as HF's schedulers)."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else max(0.0, 1 - progress)

    return f


class _Once(logging.Filter):
    """Lets the first record containing `text` through, drops the later ones."""

    def __init__(self, text: str):
        super().__init__()
        self.text, self.seen = text, False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.text not in record.getMessage():
            return True
        first, self.seen = not self.seen, True
        return first


def _say_once(logger: logging.Logger, text: str) -> None:
    """A warning DeepSpeed repeats for every engine of a process (every stage of `allo run`), said once: "untested
    optimizer" is allo's MaskedAdamW under ZeRO, tested here (tests/test_masked_training.py)."""
    if not any(isinstance(f, _Once) and f.text == text for f in logger.filters):
        logger.addFilter(_Once(text))


class Strategy:
    """Everything distributed. Create once per process; stages share it."""

    def __init__(self, ds_config: str | Path, train: TrainConfig, precision: str):
        from allo.comm import Communicator

        self.device = init_distributed()
        self.comm = Communicator.from_process_group(self.device)
        self.rank, self.world = self.comm.rank, self.comm.world
        self.precision = precision
        configured = resolve_ds_config(ds_config, train, self.world, precision)
        self.config, self.single_rank_note = single_rank_config(configured, self.world, train.single_rank)
        self.zero_stage = int(self.config["zero_optimization"].get("stage", 0))
        self.autocast = autocast_of(self.config)
        # ZeRO-0 without a mixed-precision wrapper: DeepSpeed would clip with a norm per parameter, a pass that
        # scales every gradient and host-to-device copies that wait for the device; the optimizer clips instead
        # (MaskedAdamW's max_grad_norm, inside its fused step)
        self.optimizer_clips = self.zero_stage == 0 and not self.config["bf16"]["enabled"]
        if self.optimizer_clips:
            self.config = {**self.config, "gradient_clipping": 0.0}
        # the dtype the weights train in: bf16 under DeepSpeed's bf16 optimizers, fp32 under autocast or fp32
        self.weight_dtype = torch.bfloat16 if precision == "bf16" and not self.autocast else torch.float32
        if self.single_rank_note and self.rank == 0:
            log.info("one rank: ZeRO-0 in place of %s (%s; train.single_rank=as_configured keeps it)", ds_config,
                     self.single_rank_note)
        self.engine = None
        self._clipper = None  # the optimizer that clips, where it does (grad_norm_tensor reads its norm)
        self._hf_ds = None

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def grad_accum(self) -> int:
        return self.config["gradient_accumulation_steps"]

    def model_init_context(self):
        """Context in which to load the model. Under ZeRO-3, transformers' from_pretrained sees the live
        HfDeepSpeedConfig and partitions parameters while it loads them (rank 0 reads, others get slices), so
        no rank ever holds the full model. transformers keeps only a weak reference: we hold it here."""
        if self.zero_stage == 3 and self._hf_ds is None:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds = HfDeepSpeedConfig(self.config)
        return nullcontext()

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> Any:
        import deepspeed

        _say_once(logging.getLogger("DeepSpeed"), "untested optimizer")
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=self.config)
        if self.world == 1 and self.zero_stage == 0:
            # DeepSpeed's ZeRO-0 all-reduce flattens the gradients into 5e8-element buckets and copies them back
            # even on one rank, where averaging over one rank changes nothing: a gradient-sized copy and three
            # passes over the gradients a step, skipped.
            self.engine.enable_backward_allreduce = False
        if self.optimizer_clips:
            from allo.masks.apply import find_optimizer
            from allo.optim import MaskedAdamW

            self._clipper = find_optimizer(self.engine, MaskedAdamW)
        if self.zero_stage == 3:
            skip_nonfinite_on_device(self.engine)
        return self.engine

    def release(self) -> None:
        """Forget this stage's engine and ZeRO-3 model-loading config, so later model loads in this process
        (sampling, scoring, the next stage) are plain again, not collective ZeRO-3 inits on one rank."""
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None
        if self._hf_ds is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self._hf_ds = None

    # --- the step --------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def grad_norm_tensor(self) -> Any:
        """The global gradient norm of the last step as its computer keeps it (a device tensor, a float, or None where
        none is computed), so reading it does not wait for the device: the optimizer's where it clips, else
        DeepSpeed's."""
        return self._clipper.grad_norm if self._clipper is not None else self.engine.get_global_grad_norm()

    # --- collectives (every rank must call these; see allo.comm for which group carries what) -------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        return self.comm.all_reduce(tensor, op)

    def all_gather_object(self, obj: Any) -> list:
        return self.comm.all_gather_object(obj)

    def gather_object(self, obj: Any) -> list | None:
        return self.comm.gather_object(obj)

    def barrier(self) -> None:
        self.comm.barrier()

    # --- checkpoints --------------------------------------------------------------------------------------
    def save_checkpoint(self, directory: Path, tag: str, client_state: dict) -> None:
        """Collective: DeepSpeed checkpoint (weights, optimizer, scheduler) plus our client state."""
        self.engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)
        self.barrier()

    def load_checkpoint(self, directory: Path, tag: str) -> dict:
        """Collective: restore a checkpoint; returns the client state saved with it."""
        _, client_state = self.engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                                      load_lr_scheduler_states=True)
        if client_state is None:
            raise RuntimeError(f"{directory}/{tag}: checkpoint could not be loaded")
        return client_state

    def export_hf(self, out_dir: Path, tokenizer: Any) -> None:
        """Collective: gather full 16-bit (or fp32) weights and write a Hugging Face safetensors model on rank 0."""
        module = self.engine.module
        if self.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()  # collective all-gather
        else:
            state = module.state_dict() if self.is_rank0 else None
        if self.is_rank0:
            from allo.model import save_pretrained

            # a bf16 recipe's models are bf16 on disk, whatever trained them
            save_pretrained(module, state, tokenizer, out_dir, dtype=torch.bfloat16 if self.autocast else None)
        self.barrier()
