"""`allo run RECIPE`: the scheduler. Runs the steps of `allo.steps` in order, each skipped when its manifest says
it is complete with the same fingerprint, and writes every manifest.

A step's fingerprint hashes the recipe values it declares, the size and mtime of the input files the recipe
names, and its upstream steps' fingerprints, so a change anywhere reruns everything downstream of it.
Run it under torchrun: training steps use every rank; a rank-0 step runs on rank 0 with every core while the
other ranks wait. A failed step leaves the earlier ones intact; the error says how to resume (`--from STEP`).
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from allo.config import Recipe, to_dict
from allo.io import write_json
from allo.sharding import StepAborted, Sync, new_attempt
from allo.signals import EXIT_REQUEUE, write_preempted
from allo.steps import REGISTRY, STEPS, Context, Step, lookup, repeats, resolve

log = logging.getLogger(__name__)
__all__ = ["Pipeline", "STEPS", "StepFailed", "run_pipeline", "write_manifest"]


class StepFailed(RuntimeError):
    """A pipeline step failed; the message names the step and the command that resumes from it."""


def write_manifest(directory: Path, step: str, info: dict, fingerprint: Optional[str] = None) -> None:
    """The one writer of `STEP/manifest.json`. The fingerprint and `complete` go in last, in one atomic write: a
    manifest without them is never taken as complete."""
    body = {"step": step, **info}
    if fingerprint is not None:
        body["fingerprint"] = fingerprint
    if body.get("model"):  # a model card first: a complete manifest means the directory is ready to publish
        from allo.model_card import write_card

        write_card(step, body, Path(directory))
    write_json(Path(directory) / "manifest.json", {**body, "complete": True})


class Pipeline:
    def __init__(self, recipe: Recipe, recipe_path: Optional[str] = None, sync: Optional[Sync] = None,
                 argv: Optional[list[str]] = None):
        """`argv`: the `allo` arguments that started this run (for the resume command a failure prints)."""
        self.ctx = Context(recipe, recipe_path or "RECIPE.yaml",
                           sync or Sync(Path(recipe.output_dir), timeout_s=60 * recipe.distributed.wait_minutes))
        self.argv = argv if argv is not None else ["run", self.ctx.recipe_path]
        self._fingerprints: dict[str, str] = {}  # stable within a run: no step writes the recipe or task files

    def run(self, start: Optional[str] = None, only: Optional[str] = None) -> None:
        """Run the steps in order. `start`: rerun from that step on; `only`: rerun just that step (or those steps,
        comma-separated, in pipeline order)."""
        chosen = set(only.split(",")) if only else set()
        for name in ([start] if start else []) + sorted(chosen):
            if name not in REGISTRY:
                raise StepFailed(f"unknown step {name!r}; steps: {', '.join(STEPS)}")
        forced = chosen or (set(STEPS[STEPS.index(start):]) if start else set())
        for name in STEPS:
            if chosen and name not in chosen:
                continue
            step = REGISTRY[name]
            manifest = self.ctx.dir(name) / "manifest.json"
            fingerprint = self.fingerprint(name)
            recorded = _recorded(manifest)
            if name not in forced and recorded == fingerprint:
                if self.ctx.sync.rank == 0:
                    log.info("[%s] complete (%s); skipping", name, manifest)
                continue
            if self.ctx.sync.rank == 0:
                if recorded not in (None, fingerprint) and name not in forced:
                    log.info("[%s] inputs or settings changed since it completed; running it again", name)
                log.info("===== [%s] =====", name)
            sync = self.ctx.sync
            self.ctx.version = fingerprint
            try:
                info = self._execute(step)
                if sync.rank == 0:
                    write_manifest(self.ctx.dir(name), name, {**info, "attempt": sync.attempt}, fingerprint)
                    shutil.rmtree(self.ctx.dir(name) / "shards", ignore_errors=True)  # merged into the outputs (and
                    # any unfinished attempt's units with other settings)
                else:  # wait for rank 0's manifest in a file, not in a collective
                    sync.wait(name, lambda: _recorded(manifest, sync.attempt) == fingerprint, "rank 0")
            except SystemExit as stop:  # a signal: every rank stops at a unit boundary; the step resumes later
                if stop.code == EXIT_REQUEUE and sync.rank == 0 and step.train is None:
                    self._preempted(name)
                raise
            except Exception as e:  # name the step and the resume command; earlier outputs stay intact
                if not isinstance(e, StepAborted):
                    sync.fail(name, _phrase(e))
                raise StepFailed(f"step {name} failed: {_phrase(e)}. Earlier steps are intact; fix the cause and "
                                 f"resume with {resume_command(self.argv, name)}") from e

    def _preempted(self, name: str) -> None:
        """The marker a launcher reads to requeue (the training loop writes the same for training steps)."""
        write_preempted(self.ctx.dir(name), {"step": name, "time": time.time(), "stage": name},
                        self.ctx.recipe.train.preempt_marker)
        log.warning("stopping on signal during %s; its finished units are kept, exit %d (requeue)", name,
                    EXIT_REQUEUE)

    def _execute(self, step: Step) -> dict:
        """Run one step's body where it runs; returns its manifest fields (meaningful on rank 0)."""
        started = time.time()
        reason = step.skip(self.ctx.recipe) if step.skip else None
        if reason:
            info: Optional[dict] = {"skipped": reason}
        elif step.train is not None:
            from allo.stages.runner import train_step

            info = train_step(self.ctx, step)
            _free_memory()
            self.ctx.sync.install_signal_handlers()  # the training loop had its own
        else:
            from allo.generate import release

            try:
                if step.every_rank:
                    info = resolve(step.run)(self.ctx)
                else:
                    info = _with_all_cores(lambda: resolve(step.run)(self.ctx)) if self.ctx.sync.rank == 0 else None
            finally:  # a generation engine holds most of a GPU: the next step gets it back
                release()
                _free_memory()
        return {**(info or {}), "wall_s": round(time.time() - started, 2)}

    def fingerprint(self, name: str) -> str:
        """Hash of the step's recipe values, its input files (size, mtime) and its upstream steps' fingerprints."""
        if name not in self._fingerprints:
            step, values = REGISTRY[name], to_dict(self.ctx.recipe)
            reused = repeats(step, self.ctx.recipe)  # then its outputs are that step's: it is upstream too
            covered = _by_content_of(name)
            parts = {"config": {k: _outcome(k, lookup(values, k), covered) for k in step.config},
                     "files": {k: _stat(lookup(values, k)) for k in step.files},
                     "upstream": [self.fingerprint(u) for u in step.upstream + ((reused,) if reused else ())]}
            self._fingerprints[name] = hashlib.sha256(
                json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return self._fingerprints[name]


def _outcome(key: str, value, by_content: set[str]):
    """A recipe value as far as it decides a step's outputs: `train` sections (the shared one and each stage's) lose
    their bookkeeping knobs (TrainConfig.BOOKKEEPING), and input paths that the step or one upstream of it
    fingerprints by their files (`by_content`) count by those bytes, not by how the path is spelt."""
    from allo.config import TrainConfig

    if isinstance(value, dict):
        return {k: _outcome(f"{key}.{k}", v, by_content) for k, v in value.items()
                if not ((key == "train" or key.endswith(".train")) and k in TrainConfig.BOOKKEEPING)
                and f"{key}.{k}" not in by_content}
    return None if key in by_content else value


def _by_content_of(name: str) -> set[str]:
    """Recipe keys whose files a step's fingerprint covers by content: its own `files` and its upstream's."""
    step = REGISTRY[name]
    return set(step.files).union(*(_by_content_of(u) for u in step.upstream))


def _with_all_cores(fn):
    """Run a single-process step with every core (the other ranks wait on a file meanwhile)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def _recorded(manifest: Path, attempt: Optional[str] = None) -> Optional[str]:
    """The fingerprint of a complete manifest (written in `attempt`, when given), or None."""
    try:
        m = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    if attempt is not None and m.get("attempt") != attempt:
        return None
    return m.get("fingerprint") if m.get("complete") else None


def _phrase(e: Exception) -> str:
    phrased = isinstance(e, (StepFailed, StepAborted, ValueError, OSError))  # already say file and key
    return str(e) if phrased else f"{type(e).__name__}: {e}"


def _stat(path) -> Optional[list]:
    """(size, mtime) of a file, or of every file under a directory: cheap for multi-GB checkpoints."""
    if path is None:
        return None
    p = Path(path)
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p] if p.exists() else []
    # names relative to the given path: the same bytes reached by another spelling (relative, absolute, a link to
    # them) give the same list
    return [[str(f.relative_to(p)) if p.is_dir() else p.name, f.stat().st_size, f.stat().st_mtime_ns]
            for f in files] or [str(path), "missing"]


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def external_files(recipe: Recipe, only: Optional[str] = None) -> list[tuple[str, str]]:
    """(recipe key, path) of every input file from outside the run that the steps (or the steps `only`, comma-
    separated) read."""
    values, out = to_dict(recipe), []
    for step in REGISTRY.values():
        if (only and step.name not in only.split(",")) or (step.skip and step.skip(recipe)):
            continue
        out += [(k, lookup(values, k)) for k in step.files if lookup(values, k)]
        if step.name == "eval":
            out += [("task.benchmarks", b.split("=", 1)[1]) for b in recipe.task.benchmarks if "=" in str(b)]
    return list(dict.fromkeys(out))


def resume_command(argv: list[str], step: str) -> str:
    """The command that ran (`argv`: its allo arguments) with `--from STEP` in place of its --from/--only, under the
    launcher that started it: a Slurm job is resubmitted, a torchrun run relaunched on as many processes."""
    from allo.launch import launched_as

    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--from", "--only"):
            skip = True
        elif not a.startswith(("--from=", "--only=")):
            args.append(a)
    if args and args[0] != "run":  # `allo STEP RECIPE` is `allo run RECIPE --only STEP`
        args[0] = "run"
    args += ["--from", step]
    if os.environ.get("SLURM_JOB_ID"):
        return f"the same slurm/submit.sh command with `-- --from {step}` at its end"
    return f"`{launched_as(args)}`"


def run_pipeline(recipe: Recipe, recipe_path: Optional[str] = None, start: Optional[str] = None,
                 only: Optional[str] = None, argv: Optional[list[str]] = None) -> Pipeline:
    import torch.distributed as dist

    from allo.engine import init_distributed

    init_distributed(recipe.distributed.timeout_minutes)
    rank, world = dist.get_rank(), dist.get_world_size()
    sync = Sync(Path(recipe.output_dir), rank, world, new_attempt(dist if world > 1 else None),
                60 * recipe.distributed.wait_minutes)
    sync.install_signal_handlers()
    pipe = Pipeline(recipe, recipe_path, sync, argv)
    pipe.run(start=start, only=only)
    if rank == 0:  # the markers of this attempt are no longer needed
        shutil.rmtree(sync.dir, ignore_errors=True)
    return pipe
