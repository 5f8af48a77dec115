"""`allo run RECIPE`: the scheduler. Runs the steps of `allo.steps` in order, each skipped when its manifest says
it is complete with the same fingerprint, and writes every manifest.

Fingerprints and manifests live in `allo.manifests`: a changed setting, input file or upstream output reruns the
step and everything downstream of it.
Run it under torchrun: training steps use every rank; a rank-0 step runs on rank 0 with every core while the
other ranks wait. A failed step leaves the completed ones as they are; the error names the command that resumes.
"""
from __future__ import annotations

import gc
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from allo.config import Recipe
from allo.manifests import Fingerprints, recorded, selection, write_manifest
from allo.sharding import StepAborted, Sync, new_attempt
from allo.signals import EXIT_REQUEUE, write_preempted
from allo.steps import REGISTRY, STEPS, Context, Step, resolve

log = logging.getLogger(__name__)
__all__ = ["Pipeline", "STEPS", "StepFailed", "run_pipeline"]


class StepFailed(RuntimeError):
    """A pipeline step failed; the message names the step and the command that resumes from it. `shown`: this rank
    is the one whose failure the terminal shows (one rank per failure, not every rank)."""

    def __init__(self, message: str, shown: bool = True):
        super().__init__(message)
        self.shown = shown


class Pipeline:
    def __init__(self, recipe: Recipe, recipe_path: Optional[str] = None, sync: Optional[Sync] = None,
                 argv: Optional[list[str]] = None):
        """`argv`: the `allo` arguments that started this run (for the resume command a failure prints)."""
        self.ctx = Context(recipe, recipe_path or "RECIPE.yaml",
                           sync or Sync(Path(recipe.output_dir), timeout_s=60 * recipe.distributed.wait_minutes))
        self.argv = argv if argv is not None else ["run", self.ctx.recipe_path]
        self.fingerprints = Fingerprints(recipe, self.ctx.out)

    def fingerprint(self, name: str) -> str:
        return self.fingerprints.of(name)

    def run(self, start: Optional[str] = None, only: Optional[str] = None) -> None:
        """Run the steps in order. `start`: rerun from that step on; `only`: rerun just that step (or those steps,
        comma-separated, in pipeline order)."""
        try:
            forced, chosen = selection(start, only)
        except ValueError as e:
            raise StepFailed(str(e)) from None
        for name in STEPS:
            if chosen and name not in chosen:
                continue
            step = REGISTRY[name]
            manifest = self.ctx.dir(name) / "manifest.json"
            fingerprint = self.fingerprint(name)  # after the steps before it ran: their output ids are in it
            done = recorded(self.ctx.dir(name))
            if name not in forced and done == fingerprint:
                if self.ctx.sync.rank == 0:
                    log.info("[%s] complete (%s); skipping", name, manifest)
                continue
            if self.ctx.sync.rank == 0:
                if done not in (None, fingerprint) and name not in forced:
                    log.info("[%s] its settings, input files or an upstream step's outputs changed since it "
                             "completed; running it again", name)
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
                    sync.wait(name, lambda: recorded(self.ctx.dir(name), sync.attempt) == fingerprint, "rank 0")
            except SystemExit as stop:  # a signal: every rank stops at a unit boundary; the step resumes later
                if stop.code == EXIT_REQUEUE and sync.rank == 0 and step.train is None:
                    self._preempted(name)
                raise
            except Exception as e:  # name the step and the resume command; completed steps stay as they are
                shown = not isinstance(e, StepAborted) and sync.fail(name, _phrase(e))
                raise StepFailed(f"step {name} failed: {_phrase(e)}. Completed steps are kept; fix the cause and "
                                 f"resume with {resume_command(self.argv, name)}", shown) from e
        stale = [n for n in self.fingerprints.stale() if chosen and n not in chosen]
        if stale and self.ctx.sync.rank == 0:
            log.warning("%d completed step(s) read outputs or settings that changed and are now stale: %s; "
                        "%s reruns them", len(stale), ", ".join(stale), _plain_run(self.argv))

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


def _with_all_cores(fn):
    """Run a single-process step with every core (the other ranks wait on a file meanwhile)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def _phrase(e: Exception) -> str:
    phrased = isinstance(e, (StepFailed, StepAborted, ValueError, OSError))  # already say file and key
    return str(e) if phrased else f"{type(e).__name__}: {e}"


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _split(argv: list[str]) -> tuple[list[str], Optional[str]]:
    """`argv` without its --from/--only, and the --only value (None without one)."""
    args, only, it = [], None, iter(argv)
    for a in it:
        if a in ("--from", "--only"):
            value = next(it, "")
            only = value if a == "--only" else only
        elif a.startswith(("--from=", "--only=")):
            only = a.split("=", 1)[1] if a.startswith("--only=") else only
        else:
            args.append(a)
    return args, only


def _as_launched(args: list[str]) -> str:
    """`allo ARGS` under the launcher that started this process: resubmitted through slurm/submit.sh when it
    submitted the job (it exports ALLO_RESUBMIT, its own command line up to the allo arguments), else relaunched
    with torchrun on as many processes, or plain `allo`."""
    import shlex

    from allo.launch import launched_as

    if os.environ.get("SLURM_JOB_ID"):
        prefix = os.environ.get("ALLO_RESUBMIT")
        extra = shlex.join(args[2:])  # submit.sh puts STAGE and RECIPE first itself
        if prefix:
            return f"`{prefix}{' -- ' + extra if extra else ''}`"
        return f"a new Slurm job running `{shlex.join(['allo', *args])}`"
    return f"`{launched_as(args)}`"


def resume_command(argv: list[str], step: str) -> str:
    """The command that resumes a run (`argv`: its allo arguments) whose step `step` failed: the same command with
    the user's own --set values, where completed steps are skipped; a run limited by --only keeps the chosen steps
    from the failed one on; under the launcher that started it."""
    args, only = _split(argv)
    if only and args[:1] == ["run"]:
        chosen = set(only.split(","))
        rest = [n for n in STEPS[STEPS.index(step):] if n in chosen] if step in STEPS else sorted(chosen)
        args += ["--only", ",".join(rest)]
    elif args[:1] != ["run"]:  # `allo STEP RECIPE`: that step again
        args = list(argv)
    return _as_launched(args)


def _plain_run(argv: list[str]) -> str:
    """The command that runs every step that is not current: `allo run` with the user's recipe and --set values."""
    args, _ = _split(argv)
    return _as_launched(["run", *args[1:]])


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
