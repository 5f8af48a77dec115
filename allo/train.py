"""The one training loop: batch -> loss -> engine.backward -> mask -> engine.step -> log/checkpoint.

Every stage (sft, warmup/dpo, npo, forget, improve) runs through ``Trainer``; a ``Stage`` says only which
examples, which loss and which mask. Shape follows torchtune's recipes: ``setup`` (build, resume, reference
log-probs) -> ``train`` -> ``save_checkpoint`` -> ``export``.

Data position is "consumed samples": step s of a run uses records perm_e[(s mod S)·G : (s mod S + 1)·G] of the
epoch's seeded permutation (G global batch, S steps per epoch), micro-batch a of rank r taking the slice
[(a·world + r)·micro, +micro). A resumed run therefore sees exactly the batches an uninterrupted run sees.
Resume policy: the checkpoint wins for weights, optimizer, scheduler and position; a recipe whose batch
arithmetic differs from the checkpoint's is refused rather than silently remapped.

SIGTERM and SIGUSR1 (what SLURM sends before preemption or the time limit) set a flag; at the next optimizer
step boundary all ranks agree on it (folded into the metrics all-reduce), save a checkpoint, write
``preempted.json`` and exit with EXIT_REQUEUE so a launcher can requeue the job.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from allo.config import GuardsConfig, TrainConfig
from allo.guards import check_nonfinite
from allo.data.tokenize import collate, pack, packing_problem
from allo.engine import Strategy, lr_lambda
from allo.io import atomic_write_text, write_json
from allo.logprobs import token_logps
from allo.masks.apply import GradMasker, build_masks, find_optimizer, optimizer_layout
from allo.masks.io import check_against_model, mask_counts
from allo.metrics import MetricLogger, RunningMeans, peak_memory_mb, reduce_steps
from allo.tracking import open_trackers
from allo.optim import MaskedAdamW
from allo.signals import EXIT_REQUEUE, stop_on_signal, write_preempted

log = logging.getLogger(__name__)

Objective = Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]


@dataclass
class Stage:
    """What differs between stages: the examples, the objective and the mask."""
    name: str
    examples: list[dict]
    objective: Objective                 # (token log-probs (N, T), batch) -> (loss, metrics)
    token_arrays: tuple[str, ...] = ()   # per-token example fields the collator places ("token_weights", ...)
    needs_reference: bool = False        # precompute reference log-probs with the starting weights
    mask_file: Optional[str] = None      # neuron mask (None: every element trains)
    reference_key: str = ""              # identifies the starting weights for the reference cache


@dataclass
class Position:
    step: int = 0
    consumed: int = 0


class Trainer:
    def __init__(self, strategy: Strategy, model: torch.nn.Module, tokenizer, stage: Stage, train: TrainConfig,
                 out_dir: str | Path, seed: int = 0, group: str = "", config: Optional[dict] = None,
                 guards: Optional[GuardsConfig] = None):
        """`group` and `config`: the pipeline run this stage belongs to and its recipe, for the trackers; `guards`:
        when to stop on steps skipped for a non-finite gradient norm."""
        self.guards = guards or GuardsConfig()
        self.nonfinite_steps = 0  # optimizer steps skipped for a NaN or Inf gradient norm
        self.strategy, self.model, self.tokenizer, self.stage = strategy, model, tokenizer, stage
        self.group, self.run_config = group or str(Path(out_dir).parent), config
        self.cfg, self.out_dir, self.seed = train, Path(out_dir), seed
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.pos = Position()
        self.stop_requested = False
        self.masker: Optional[GradMasker] = None
        self.mask_names: dict[str, str] = {}  # parameter name -> its name in the mask file
        self.reference = None  # the reference log-probs on disk (allo.logprobs.ReferenceCache), when needed
        self.last_save, self.last_write_s = time.monotonic(), None  # for save_every_minutes and the metrics
        self.trainable_fraction = 1.0
        self.packing_checked = False
        n, g = len(stage.examples), train.global_batch_size
        if n < g:
            raise ValueError(f"stage {stage.name}: {n} examples cannot fill one global batch of {g}; lower the "
                             "stage's global_batch_size or add data")
        self.steps_per_epoch = n // g
        self.total_steps = train.max_steps or max(1, math.ceil(train.epochs * self.steps_per_epoch))
        if strategy.is_rank0 and n % g:
            log.info("%s: %d examples per epoch do not fill the last global batch of %d; %d left out each epoch",
                     stage.name, n, g, n % g)

    # ------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        s, cfg = self.strategy, self.cfg
        if cfg.packing:
            refused = packing_problem(self._attention(), s.device.type)
            if refused:
                raise ValueError(refused)
        named = list(self.model.named_parameters())
        if self.stage.mask_file:
            self.trainable_fraction = self._freeze_unmasked(named)
        params = [p for _, p in named if p.requires_grad]
        optimizer = MaskedAdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                weight_decay=cfg.weight_decay,
                                sparse_state=cfg.sparse_optimizer_state and bool(self.stage.mask_file),
                                max_grad_norm=cfg.grad_clip if s.optimizer_clips else 0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(self.total_steps, cfg.warmup_ratio, cfg.scheduler))
        self.optimizer = optimizer
        self.engine = s.prepare(self.model, optimizer, scheduler)
        if self.stage.mask_file:
            pieces = optimizer_layout(self.engine, named)
            target_masks = build_masks(self.stage.mask_file, pieces, self.mask_names)
            find_optimizer(self.engine, MaskedAdamW).attach_masks(target_masks)
            if not s.optimizer_clips:  # where the optimizer clips, it masks the gradients before their norm itself
                self.masker = GradMasker(self.engine, pieces, target_masks, s.device)
            if s.is_rank0:
                log.info("masks on rank 0: %d elements for the optimizer (%s), %d more for the gradients",
                         sum(m.numel() for m in target_masks.values()),
                         ", ".join(sorted({str(m.device) for m in target_masks.values()})),
                         self.masker.mask_elements() if self.masker else 0)
        if s.is_rank0:
            log.info("stage %s: %d examples, global batch %d = micro %d × accumulation %d × world %d, "
                     "%d steps/epoch, %d steps, ZeRO-%d, %s, trainable fraction %.4f", self.stage.name,
                     len(self.stage.examples), cfg.global_batch_size, cfg.micro_batch_size, s.grad_accum, s.world,
                     self.steps_per_epoch, self.total_steps, s.zero_stage,
                     "bf16 autocast" if s.autocast else s.precision, self.trainable_fraction)
        if s.is_rank0:  # a marker from an earlier, preempted attempt is stale once this attempt runs
            (self.out_dir / "preempted.json").unlink(missing_ok=True)
        resumed = self._resume()
        if self.stage.needs_reference:
            self._reference_logps(must_exist=resumed)
        self.metrics = MetricLogger(self.out_dir, enabled=s.is_rank0, append=resumed, trackers=lambda: open_trackers(
            cfg.report_to, self.out_dir, cfg.tracker_project, self.group, self.out_dir.name, self.run_config, resumed))
        self.trace: list[tuple[float, float]] = []  # (loss, grad norm) of each step this process ran, every rank

    def _freeze_unmasked(self, named: list) -> float:
        """Check the mask fits the model and freeze tensors with no selected element (before initialize)."""
        shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in named}
        self.mask_names = check_against_model(self.stage.mask_file, shapes, aliases=_tied_aliases(self.model))
        counts = mask_counts(self.stage.mask_file)
        total = selected = 0
        for n, p in named:
            numel = int(getattr(p, "ds_numel", p.numel()))
            total += numel
            selected += counts[self.mask_names[n]]
            if counts[self.mask_names[n]] == 0:
                p.requires_grad_(False)
        return selected / total

    # ---------------------------------------------------------------------------------- reference log-probs
    def _reference_logps(self, must_exist: bool) -> None:
        """Per-token log-probs of the starting weights, computed once (each rank its share, streamed into its own
        shard file) and read back row by row as micro-batches need them: no rank holds them all in memory."""
        from allo.logprobs import open_reference_cache

        s = self.strategy
        directory = self.out_dir / "reference_logps"
        key = _fingerprint(self.stage)
        self.reference = open_reference_cache(directory, key, s.world)
        if self.reference is None and must_exist:
            raise RuntimeError(f"{directory}: reference log-probs of the starting model are missing or stale, so a "
                               f"resumed run cannot rebuild them; delete {self.ckpt_dir} to restart the stage")
        if self.reference is None:
            self._compute_reference(directory / f"rank{s.rank}-of-{s.world}.safetensors", key)
            s.barrier()
            self.reference = open_reference_cache(directory, key, s.world)
            if self.reference is None:
                raise RuntimeError(f"{directory}: a rank's reference log-probs are missing after computing them "
                                   "(is OUTPUT_DIR on a file system every node shares?)")

    @torch.no_grad()
    def _compute_reference(self, path: Path, key: str) -> None:
        from allo.logprobs import ReferenceWriter

        s, examples = self.strategy, self.stage.examples
        mine = examples[s.rank::s.world]
        per_rank = math.ceil(len(examples) / s.world)
        padded = mine + mine[-1:] * (per_rank - len(mine))  # equal forward counts: ZeRO-3 forwards are collective
        writer = ReferenceWriter(path, key, [ex["index"] for ex in mine],
                                 [[len(r) for r in ex["responses"]] for ex in mine])
        self.engine.module.eval()
        bs = self.cfg.micro_batch_size
        for i in range(0, per_rank, bs):
            chunk = padded[i:i + bs]
            logps = self._logps(self._collate(chunk))
            for j, ex in enumerate(chunk):
                if i + j >= len(mine):  # a padding repeat
                    continue
                start = len(ex["prompt_ids"])
                writer.add(ex["index"], [logps[slot * len(chunk) + j, start:start + len(r)]
                                         for slot, r in enumerate(ex["responses"])])
        self.engine.module.train()
        writer.close()

    def _collate(self, examples: list[dict], arrays: tuple[str, ...] = ()) -> dict:
        batch = collate(examples, self.tokenizer.pad_token_id, arrays)
        return pack(batch) if self.cfg.packing else batch

    def _logps(self, batch: dict) -> torch.Tensor:
        """(rows, width) token log-probs of a collated batch, from its padded rows or, packed, its one row."""
        dev = self.strategy.device
        if "packed_ids" in batch:
            varlen = {}
            if self._attention().startswith("flash"):  # the row boundaries from the host: no device-side derivation
                cu = batch["packed_cu_seq_lens"].to(dev)
                varlen = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=batch["packed_max_length"],
                              max_length_k=batch["packed_max_length"])
            logits = self.engine(input_ids=batch["packed_ids"].to(dev), position_ids=batch["packed_positions"].to(dev),
                                 use_cache=False, **varlen).logits
            flat = token_logps(logits, batch["packed_labels"].to(dev))[0]
            shape = batch["labels"].shape
            return flat.new_zeros(shape.numel()).index_copy(0, batch["packed_index"].to(dev), flat).view(shape)
        logits = self.engine(input_ids=batch["input_ids"].to(dev),
                             attention_mask=batch["attention_mask"].to(dev), use_cache=False).logits
        return token_logps(logits, batch["labels"].to(dev))

    def _attention(self) -> str:
        return getattr(getattr(self.model, "config", None), "_attn_implementation", None) or "eager"

    @torch.no_grad()
    def check_packing(self, batch: dict) -> None:
        """Stop a packed run whose rows would leak into each other (a model whose attention ignores the per-row
        position ids): before the first step, on this rank's first micro-batch, the packed log-probs must not change
        when another row's tokens do (exact: a masked score adds an exact zero, so isolated rows give identical
        bits) and must equal the padded ones to within the compute dtype's rounding. Collective: every rank runs the
        same forwards and all stop together."""
        self.engine.module.eval()
        try:
            padded = self._logps({k: v for k, v in batch.items() if not k.startswith("packed_")})
            packed = self._logps(batch)
            first = int(batch["attention_mask"][0].sum())  # row 0's tokens lead the packed row
            other = dict(batch, packed_ids=batch["packed_ids"].clone())
            other["packed_ids"][0, 1:first] = (other["packed_ids"][0, 1:first] + 1) % self.model.config.vocab_size
            changed = self._logps(other)
        finally:
            self.engine.module.train()
        labels = batch["labels"].to(packed.device) != -100
        rest = labels.clone()
        rest[0] = False
        leak = float((changed != packed)[rest].any()) if rest.any() else 0.0
        gap = float((packed - padded).abs()[labels].max()) if labels.any() else 0.0
        # A coarse bound (the isolation test above is the exact one): logits of magnitude ≲ 30 rounded in the compute
        # dtype differ by ≲ 30 u between two summation orders (u = 2^-8 in bf16; 2^-11 in fp32, where a GPU may
        # multiply in TF32); a row reading another row moves its log-probs far more. Allowed: 4 × 30 u.
        tol = 4 * 30 * (2.0 ** -8 if self.strategy.precision == "bf16" else 2.0 ** -11)
        worst = self.strategy.all_reduce(torch.tensor([leak, gap / tol]), "max")
        if worst[0] > 0 or worst[1] > 1:
            raise RuntimeError(f"train.packing: rows of a packed micro-batch see each other with model "
                               f"{type(self.model).__name__} (attention {self._attention()}): " +
                               ("another row's tokens change a row's log-probs" if worst[0] > 0 else
                                f"packed log-probs differ from padded ones by up to {float(worst[1]) * tol:.3g} "
                                f"(allowed {tol:.3g})") + "; set train.packing to false")
        if self.strategy.is_rank0:
            log.info("packing checked on the first micro-batch: rows isolated, packed log-probs within %.2g of padded "
                     "(%.2g allowed)", gap, tol)

    # ----------------------------------------------------------------------------------------------- train
    def _batch_indices(self, step: int, micro: int) -> list[int]:
        """Example indices of micro-batch `micro` of optimizer step `step` on this rank (see module docstring)."""
        cfg, s = self.cfg, self.strategy
        epoch, within = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        perm = torch.randperm(len(self.stage.examples), generator=g)
        start = within * cfg.global_batch_size + (micro * s.world + s.rank) * cfg.micro_batch_size
        return perm[start:start + cfg.micro_batch_size].tolist()

    def train(self) -> None:
        """The loop. Nothing in it waits for the device except a logging step: metric means stay on the device (one
        per step, `pending`) until then; the per-step agreement on stopping and on time-based checkpoints, and the
        token count, are host values reduced on the CPU (a gloo group under NCCL)."""
        s, cfg = self.strategy, self.cfg
        self._install_signal_handlers()
        means = RunningMeans()
        progress = _progress(self.total_steps, self.pos.step, self.stage.name, s.is_rank0)
        arrays = self.stage.token_arrays + (("ref_logps",) if self.stage.needs_reference else ())
        pending: list[tuple[int, dict, dict]] = []  # (step, device means, host values) not yet logged
        interval_start = time.perf_counter()
        while self.pos.step < self.total_steps:
            tokens = 0
            for micro in range(s.grad_accum):
                chosen = [self.stage.examples[i] for i in self._batch_indices(self.pos.step, micro)]
                if self.stage.needs_reference:
                    chosen = [{**ex, "ref_logps": self.reference.rows(ex["index"])} for ex in chosen]
                batch = self._collate(chosen, arrays)
                tokens += int(batch["attention_mask"].sum())  # counted on the host, before the copy
                if cfg.packing and not self.packing_checked:
                    self.check_packing(batch)
                    self.packing_checked = True
                batch = {k: v.to(s.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                         for k, v in batch.items()}
                loss, metrics = self.stage.objective(self._logps(batch), batch)
                s.backward(loss)
                if self.masker is not None:
                    self.masker.before_step()
                s.step()
                means.add(loss=loss, **metrics)
            self.pos.step += 1
            self.pos.consumed += cfg.global_batch_size
            due = cfg.save_every_minutes > 0 and time.monotonic() - self.last_save >= 60 * cfg.save_every_minutes
            # One CPU collective per step: the stop flag, the clock and the tokens of every rank. Decide on the
            # reduced values only: the handler may set `stop_requested` on one rank right after the reduce, and
            # acting on that would send the ranks down different paths (deadlock); it counts next step.
            flags = s.all_reduce(torch.tensor([float(self.stop_requested), float(due), float(tokens)],
                                              dtype=torch.float64), op="sum").tolist()
            stop, due = flags[0] > 0, flags[1] > 0
            step_means = means.take()
            norm = s.grad_norm_tensor()
            on_device = isinstance(norm, torch.Tensor) and norm.device == s.device
            if on_device:  # reduced with the means, not read now
                step_means["grad_norm"] = norm.detach().reshape(())
            host = {"tokens": flags[2], "lr": self.engine.get_lr()[0],
                    "epoch": self.pos.consumed / len(self.stage.examples),
                    # a float, None, or a CPU tensor (offloaded norms): read on the host, no device wait
                    **({} if on_device else {"grad_norm": float("nan") if norm is None else float(norm)})}
            pending.append((self.pos.step, step_means, host))
            progress.update(1)
            if stop or self.pos.step % cfg.log_every == 0 or self.pos.step == self.total_steps:
                now = time.perf_counter()
                self._log(pending, (now - interval_start) / len(pending), progress)
                pending, interval_start = [], now
            if stop:
                self.save_checkpoint()
                if s.is_rank0:
                    write_preempted(self.out_dir, {"step": self.pos.step, "time": time.time(),
                                                   "stage": self.stage.name}, cfg.preempt_marker)
                    log.warning("stopping on signal after step %d; checkpoint saved, exit %d (requeue)",
                                self.pos.step, EXIT_REQUEUE)
                self.metrics.close()
                progress.close()
                raise SystemExit(EXIT_REQUEUE)  # the CLI ends the process (allo.engine.finish_distributed)
            every = cfg.save_every and self.pos.step % cfg.save_every == 0
            if (every or due) and self.pos.step < self.total_steps:
                self.save_checkpoint()
        progress.close()
        self.metrics.close()
        if self.reference is not None:
            self.reference.close()

    def _log(self, pending: list[tuple[int, dict, dict]], step_s: float, progress) -> None:
        """Collective: the pending steps' means reduced at once; every step goes to the trace (the guard rails
        read it), the last one to the metrics. `step_s`: the interval's wall time per step (the device's work
        included, as this is where the host waits for it)."""
        s = self.strategy
        rows = reduce_steps(s, [m for _, m, _ in pending])
        for (_, _, host), row in zip(pending, rows):
            row.update(host)
            self.trace.append((float(row["loss"]), float(row["grad_norm"])))
        step, stats = pending[-1][0], rows[-1]
        if s.grad_norm_tensor() is not None:  # engines that compute a norm skip a step whose norm is not finite
            norms = [norm for _, norm in self.trace]
            skipped = sum(not math.isfinite(n) for n in norms[-len(rows):])
            if skipped and s.is_rank0:
                log.warning("%s: %d step(s) up to step %d skipped: gradient norm NaN or Inf (no weight moved)",
                            self.stage.name, skipped, step)
            self.nonfinite_steps += skipped
            stats["nonfinite_steps"] = self.nonfinite_steps
            check_nonfinite(self.stage.name, norms, self.guards)
        tokens = stats.pop("tokens")
        stats.update(step_s=step_s, tokens_per_s=tokens / step_s,
                     optim_state_mb=self.optimizer.state_bytes() * s.world / 2 ** 20,
                     trainable_fraction=self.trainable_fraction, peak_mem_mb=peak_memory_mb(s.device))
        if self.last_write_s is not None:  # the checkpoint written after an earlier step
            stats["ckpt_write_s"], self.last_write_s = self.last_write_s, None
        self.metrics.log(stats, step)
        progress.set_postfix(loss=f"{stats['loss']:.4f}")

    # ----------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        """Collective. `latest` moves only after every rank has written its files; old ones are rotated. How long
        the write took is logged and goes into the next metrics line (`ckpt_write_s`)."""
        t0 = time.monotonic()
        tag = f"step_{self.pos.step:07d}"
        client = {"position": vars(self.pos).copy(), "stage": self.stage.name, "world": self.strategy.world,
                  "global_batch_size": self.cfg.global_batch_size, "micro_batch_size": self.cfg.micro_batch_size,
                  "total_steps": self.total_steps}
        self.strategy.save_checkpoint(self.ckpt_dir, tag, client)  # ends with a barrier
        if self.strategy.is_rank0:
            write_json(self.ckpt_dir / tag / ENGINE_FILE, self._engine())  # read before DeepSpeed loads anything
            atomic_write_text(self.ckpt_dir / "latest", tag + "\n")
            tags = sorted(p.name for p in self.ckpt_dir.glob("step_*") if p.is_dir())
            for old in tags[:-self.cfg.keep_last]:
                shutil.rmtree(self.ckpt_dir / old, ignore_errors=True)
        self.strategy.barrier()
        self.last_save = time.monotonic()
        self.last_write_s = round(self.last_save - t0, 3)
        if self.strategy.is_rank0:
            log.info("checkpoint %s written in %.1f s (a preemption signal needs at least this lead time)", tag,
                     self.last_write_s)

    def _resume(self) -> bool:
        latest = self.ckpt_dir / "latest"
        if not latest.exists():
            return False
        tag = latest.read_text().strip()
        saved = self.ckpt_dir / tag / ENGINE_FILE
        if saved.exists() and json.loads(saved.read_text()) != self._engine():
            raise ValueError(f"{self.ckpt_dir / tag}: written by another engine "
                             f"({_engine_words(json.loads(saved.read_text()))}) than this run's "
                             f"({_engine_words(self._engine())}); resume with the settings that "
                             f"wrote it (train.ds_config, train.single_rank, the number of ranks), or delete "
                             f"{self.ckpt_dir} to restart the stage")
        client = self.strategy.load_checkpoint(self.ckpt_dir, tag)
        for key in ("world", "global_batch_size", "micro_batch_size"):
            have = {"world": self.strategy.world}.get(key, getattr(self.cfg, key, None))
            if client.get(key) != have:
                raise ValueError(f"{self.ckpt_dir / tag}: saved with {key}={client.get(key)}, now {have}; resume "
                                 f"needs the same batch layout (or delete {self.ckpt_dir} to restart the stage)")
        self.pos = Position(**client["position"])
        if self.strategy.is_rank0:
            log.info("resumed %s from %s at step %d (%d samples consumed)", self.stage.name, tag, self.pos.step,
                     self.pos.consumed)
        return True

    def _engine(self) -> dict:
        """What a checkpoint's files depend on: the ZeRO stage, whether weights train in fp32 under autocast, ranks."""
        s = self.strategy
        return {"zero_stage": s.zero_stage, "autocast": bool(s.autocast), "world": s.world}

    def export(self) -> Path:
        out = self.out_dir / "model"
        self.strategy.export_hf(out, self.tokenizer)
        return out

    # ------------------------------------------------------------------------------------------- signals
    def _install_signal_handlers(self) -> None:
        stop_on_signal(self, "will checkpoint and exit at the end of this step")


ENGINE_FILE = "allo_engine.json"


def _engine_words(engine: dict) -> str:
    return (f"ZeRO-{engine.get('zero_stage')}{', fp32 under autocast' if engine.get('autocast') else ''}, "
            f"{engine.get('world')} rank{'s' if engine.get('world') != 1 else ''}")


def _tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """Names that share storage with a parameter under another name (tied embeddings)."""
    seen = {id(p): n for n, p in model.named_parameters()}
    return {n: seen[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if seen[id(p)] != n}


def _fingerprint(stage: Stage) -> str:
    import hashlib

    h = hashlib.sha256(stage.reference_key.encode())
    for ex in stage.examples:
        h.update(json.dumps([ex["index"], ex["prompt_ids"], ex["responses"]]).encode())
    return h.hexdigest()


def _progress(total: int, initial: int, name: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=name, disable=not enabled, dynamic_ncols=True, file=sys.stderr)
