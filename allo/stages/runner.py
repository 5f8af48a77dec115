"""Run one training stage end to end: records -> tokens -> Trainer (setup, train, export) -> manifest."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from allo.config import Recipe, save_resolved, to_dict
from allo.data.records import DataError, read_records
from allo.data.tokenize import TruncationPolicy, tokenize_records
from allo.stages import STAGES
from allo.steps import Context, Step, repeats, resolve

log = logging.getLogger(__name__)


def load_examples(recipe: Recipe, stage: str, data: str, tokenizer) -> list[dict]:
    """Read and tokenise a stage's records; forget records carry per-token keep-probabilities."""
    d = STAGES[stage]
    optional = ("keep_probs",) if "keep_probs" in d.token_arrays else ()
    records, _ = read_records(data, d.fields, split=recipe.data.split, subset=recipe.data.subset,
                              columns=recipe.data.columns,
                              on_bad_record=recipe.data.on_bad_record, limit=recipe.data.limit, optional=optional)
    policy = TruncationPolicy(recipe.data.max_length, recipe.data.max_prompt_length, recipe.data.truncation)
    examples = tokenize_records(records, tokenizer, recipe.data.template, policy, d.responses)
    for name in d.token_arrays:
        for rec, ex in zip(records, examples):
            values = rec.get(name)
            if not isinstance(values, list) or len(values) < len(ex["responses"][0]):
                have = len(values) if isinstance(values, list) else "none"
                raise DataError(f"{rec['source']}: field '{name}' needs one value per response token "
                                f"({len(ex['responses'][0])} tokens incl. EOS), has {have}")
            ex[name] = [torch.tensor(values[: len(ex["responses"][0])], dtype=torch.float32)]  # 4 bytes a value
    return examples


def run_stage(recipe: Recipe, stage: str, *, data: Optional[str] = None, init: Optional[str] = None,
              mask: Optional[str] = None, out_dir: Optional[str] = None, section: Optional[str] = None,
              after: Optional[str] = None, name: Optional[str] = None) -> dict:
    """Train `stage` from `init` (default model.path) on `data` (default data.train) into OUT/model; returns the
    fields of the step's manifest (on every rank; rank 0 writes it).

    `section`: the recipe section whose train overrides apply (default: the stage's own), for steps that run a
    stage's objective with another section's settings (the reward model is an sft run with the reward section).
    `after`: a "module:function" every rank calls with (recipe, strategy, engine, named parameters, init, out dir)
    once training is done, before the export (the warm-up's masks from its partitions, its fp32 weights).
    """
    from allo.engine import Strategy, fit_micro_batch
    from allo.guards import check_stalled
    from allo.metrics import reset_peak_memory
    from allo.model import build_model, load_tokenizer
    from allo.plan import checkpointing_for
    from allo.train import Stage, Trainer

    d = STAGES[stage]
    section = section or d.section
    label = name or (stage if section == d.section else section)  # what the logs call it: the step (reward-train)
    train_cfg = recipe.stage_train(section)
    data = data or recipe.data.train
    if data is None:
        raise DataError(f"stage {stage}: no data (set data.train in the recipe or pass --data)")
    if d.mask and mask is None:
        raise ValueError(f"stage {stage} updates only its neuron mask ({d.mask}); pass --mask FILE "
                         f"(made by `allo locate`)")
    if train_cfg.sparse_optimizer_state and mask is None:
        raise ValueError(f"stage {stage}: train.sparse_optimizer_state needs a neuron mask (--mask); without one "
                         "every element trains and dense AdamW state is what you want")
    out = Path(out_dir or Path(recipe.output_dir) / stage)
    world = int(os.environ.get("WORLD_SIZE", 1))
    micro = fit_micro_batch(train_cfg.global_batch_size, train_cfg.micro_batch_size, world)
    if micro != train_cfg.micro_batch_size:
        log.info("stage %s: micro batch %d -> %d so that global batch %d splits over %d ranks", label,
                 train_cfg.micro_batch_size, micro, train_cfg.global_batch_size, world)
        train_cfg = replace(train_cfg, micro_batch_size=micro)
    strategy = Strategy(train_cfg.ds_config, train_cfg, recipe.model.dtype)
    reset_peak_memory(strategy.device)  # this stage's peak, not an earlier stage's of the same process
    started = time.time()
    init_path = init or recipe.model.path
    tokenizer = load_tokenizer(recipe.model if init is None else
                               type(recipe.model)(**{**vars(recipe.model), "tokenizer": init}))
    examples = load_examples(recipe, stage, data, tokenizer)
    if len(examples) < train_cfg.global_batch_size:
        raise ValueError(f"stage {label}: {len(examples)} examples cannot fill one global batch of "
                         f"{train_cfg.global_batch_size}; lower {recipe.train_key(section, 'global_batch_size')} "
                         "or add data")
    torch.manual_seed(recipe.seed)
    with strategy.model_init_context():
        model = build_model(recipe.model, tokenizer, path=init_path, seed=recipe.seed,
                            train_dtype=strategy.weight_dtype)
    checkpointing, why = checkpointing_for(recipe, stage, section, model.config, strategy.world,
                                           train_cfg.micro_batch_size, strategy.device)
    if recipe.model.gradient_checkpointing == "auto":
        checkpointing, why = agree_on_checkpointing(strategy, checkpointing, why)
    if checkpointing:  # the name transformers >= 5.21 gives it; the older one on the GPU install's 5.20
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    if strategy.is_rank0:
        log.info("stage %s: gradient checkpointing %s (%s)", label, "on" if checkpointing else "off", why)
    needs_ref = d.needs_reference and getattr(getattr(recipe, d.section), "loss_type", "") != "simpo"
    spec = Stage(label, examples, d.objective(recipe), d.token_arrays,
                 needs_ref, mask, reference_key=str(init_path))
    if strategy.is_rank0:
        out.mkdir(parents=True, exist_ok=True)
        save_resolved(recipe, out / "config.yaml", stage=section, train=train_cfg)
    trainer = Trainer(strategy, model, tokenizer, spec, train_cfg, out, seed=recipe.seed, group=recipe.output_dir,
                      config=to_dict(recipe), guards=recipe.guards)
    trainer.setup()
    trainer.train()
    check_stalled(label, trainer.trace, recipe.guards)
    if after:
        resolve(after)(recipe, strategy, trainer.engine, list(model.named_parameters()), str(init_path), out)
    exported = trainer.export()
    strategy.release()  # `allo run` loads and trains more models in this process after this stage
    return {"stage": stage, "init": init_path, "data": data, "mask": mask, "model": str(exported),
            "steps": trainer.pos.step, "examples": len(examples), "world": strategy.world,
            "passes": sequence_passes(trainer.pos.step, train_cfg.global_batch_size, examples, needs_ref),
            "zero_stage": strategy.zero_stage, "trainable_fraction": trainer.trainable_fraction,
            "wall_s": round(time.time() - started, 2)}


def sequence_passes(steps: int, global_batch: int, examples: list[dict], needs_reference: bool) -> dict[str, int]:
    """The compute a stage spent, in sequences through the model: each optimizer step's global batch of examples,
    every response of each (DPO: chosen and rejected) forward and backward, plus one forward per sequence of the
    data for the reference log-probs where the objective needs them. Recomputed forwards under gradient
    checkpointing are not counted (they do not depend on the method)."""
    slots = len(examples[0].get("responses", (None,))) if examples else 1
    trained = steps * global_batch * slots
    return {"forward": trained + (len(examples) * slots if needs_reference else 0), "backward": trained}


def agree_on_checkpointing(comm, checkpointing: bool, why: str) -> tuple[bool, str]:
    """Collective (`comm`: anything with all_reduce): `auto` checkpointing is decided by each rank from its own GPU's
    memory; on mixed GPUs they could differ, so it is on everywhere when any rank needs it."""
    if comm.world == 1:
        return checkpointing, why
    anyone = comm.all_reduce(torch.tensor([float(checkpointing)]), "max").item() > 0
    return (anyone, why) if anyone == checkpointing else (anyone, "another rank's GPU needs it (auto)")


def train_step(ctx: Context, step: Step) -> Optional[dict]:
    """A declared training step of `allo run`: its data, starting weights and mask from its inputs; or, when it
    would repeat another step's training exactly (`Training.same_as`), that step's outputs."""
    t = step.train
    source = repeats(step, ctx.recipe)
    if source:
        return _take_outputs(ctx, source, step.name) if ctx.sync.rank == 0 else None
    from allo.preflight import check_training

    recipe = t.adapt(ctx.recipe)
    if t.steps_of:
        recipe = _steps_matched(ctx, recipe, step)
    data, init, mask = ctx.path(t.data), ctx.path(t.init), ctx.path(t.mask) if t.mask else None
    if not getattr(getattr(recipe, t.section), "enabled", True):
        return _pass_through(ctx, step.name, t.section, init) if ctx.sync.rank == 0 else None
    check_training(recipe, data=data, init=init, mask=mask, out=ctx.dir(step.name),
                   keep_last=recipe.stage_train(t.section).keep_last)
    return run_stage(recipe, t.stage, data=data, init=init, mask=mask, out_dir=str(ctx.dir(step.name)),
                     section=t.section, after=t.after, name=step.name)


def _steps_matched(ctx: Context, recipe: Recipe, step: Step) -> Recipe:
    """`recipe` with the step's train.max_steps set to the optimizer steps its `steps_of` steps took (their
    manifests; a step switched off took none)."""
    import json

    t = step.train
    took = {name: json.loads((ctx.dir(name) / "manifest.json").read_text()).get("steps", 0) for name in t.steps_of}
    total = sum(took.values())
    if total < 1:
        raise ValueError(f"step {step.name} matches the optimizer steps of {', '.join(t.steps_of)}, which took none")
    section = getattr(recipe, t.section)
    if ctx.sync.rank == 0:
        log.info("%s: %d optimizer steps, as many as %s", step.name, total,
                 " + ".join(f"{name} {n}" for name, n in took.items()))
    return replace(recipe, **{t.section: replace(section, train={**section.train, "max_steps": total})})


def _pass_through(ctx: Context, name: str, section: str, init: str) -> dict:
    """A step switched off (`SECTION.enabled: false`, an ablation): its model is its starting model, a symlink, so
    the steps after it and the eval step read what they always read."""
    import shutil

    out = ctx.dir(name)
    out.mkdir(parents=True, exist_ok=True)
    link = out / "model"
    if link.is_symlink() or link.is_file():
        link.unlink()
    shutil.rmtree(link, ignore_errors=True)
    link.symlink_to(Path(init).resolve(), target_is_directory=True)
    log.info("%s: %s.enabled is false; passing %s through untrained", name, section, init)
    return {"skipped": f"{section}.enabled is false: the model is the starting model", "passes_through": init}


def _take_outputs(ctx: Context, source: str, name: str) -> dict:
    """`source`'s model (hard links: no second copy on disk; a later rewrite of `source` replaces its files, never
    these) and metrics, as `name`'s."""
    import json
    import shutil

    src, dst = ctx.dir(source), ctx.dir(name)
    shutil.rmtree(dst / "model", ignore_errors=True)
    shutil.copytree(src / "model", dst / "model", copy_function=_link_or_copy)
    for f in ("metrics.jsonl", "config.yaml"):
        if (src / f).exists():
            shutil.copyfile(src / f, dst / f)
    done = json.loads((src / "manifest.json").read_text())
    log.info("%s: the recipe gives it exactly %s's data, weights and settings; taking %s's model instead of training "
             "it again", name, source, source)
    own = ("step", "fingerprint", "attempt", "complete", "wall_s", "output_id")  # the manifest's, not the model's
    return {**{k: v for k, v in done.items() if k not in own},
            "stage": name, "model": str(dst / "model"), "same_as": source}


def _link_or_copy(src: str, dst: str) -> None:
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def run_standalone(recipe: Recipe, step: Step, args) -> None:
    """`allo STAGE RECIPE [--data --init --out --mask]`: one training stage with explicit inputs."""
    from allo.manifests import write_manifest

    out = args.out or str(Path(recipe.output_dir) / step.name)
    t = step.train
    info = run_stage(recipe, t.stage, data=args.data, init=args.init, mask=args.mask, out_dir=out, after=t.after)
    if _rank0():
        write_manifest(Path(out), step.name, info)


def _rank0() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
