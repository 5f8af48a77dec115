"""Checks of a command's inputs before any process group or DeepSpeed engine starts.

Every rank runs the same checks on the same files, so a bad input stops all of them alike with one sentence:
`PATH[:LINE]: what is wrong (what to do)`. Only headers and directory listings are read for checkpoints and masks;
data files are decoded line by line (what a stage reads anyway, minutes before it would fail).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable, Optional

from allo.io import hub_offline, safetensors_header

log = logging.getLogger(__name__)

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class InputError(ValueError):
    """An input that cannot work, phrased as `PATH[:LINE]: what is wrong (what to do)`."""


class Problems(InputError):
    """Every problem a pre-flight found, each with its fix: one run through a queue shows them all."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(problems[0] if len(problems) == 1 else f"{len(problems)} problems, each with its fix:\n"
                         + "\n".join(f"  {i}. {p}" for i, p in enumerate(problems, 1)))


def collect(checks: Iterable[Callable[[], None]]) -> list[str]:
    """Run every check, the failing ones too, and return what each that failed said (in order, each once)."""
    from allo.config import ConfigError
    from allo.engine import LaunchError

    out: list[str] = []
    for check in checks:
        try:
            check()
        except Problems as e:
            out += e.problems
        except (InputError, ConfigError, LaunchError, ValueError) as e:
            out.append(str(e))
    return list(dict.fromkeys(out))


def model_dir(path: str, *, tokenizer: bool = True) -> Optional[Path]:
    """The local directory of a model named by path or hub id, checked complete; None for a hub id that will be
    downloaded (online, not cached). `tokenizer`: the directory must also hold a tokenizer."""
    p = Path(path).expanduser()
    if p.is_dir():
        check_checkpoint(p, tokenizer=tokenizer)
        return p
    if p.exists():
        raise InputError(f"{path}: is a file; a model is a directory with config.json and weights "
                         "(as save_pretrained writes it)")
    if not HUB_ID.match(path):
        raise InputError(f"{path}: no such directory (check the path, or train the step that writes it first)")
    cached = _hub_snapshot(path)
    if cached is not None:
        check_checkpoint(cached, tokenizer=tokenizer)
        return cached
    if hub_offline():
        raise InputError(f"{path}: no such directory, and no hub model of that name in the local Hugging Face cache "
                         f"(HF_HUB_OFFLINE is set: download it first with `hf download {path}`, or fix "
                         "the path)")
    return None


def check_tokenizer(path: str) -> None:
    """`model.tokenizer`: a directory holding a tokenizer, or a hub id (in the cache when HF_HUB_OFFLINE is set)."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not any((p / f).is_file() for f in TOKENIZER_FILES):
            raise InputError(f"{path}: no tokenizer ({', '.join(TOKENIZER_FILES)}); save one there with "
                             "tokenizer.save_pretrained, or fix model.tokenizer")
        return
    if not HUB_ID.match(path):
        raise InputError(f"{path}: no such tokenizer directory (model.tokenizer)")
    if hub_offline() and _hub_snapshot(path, "tokenizer_config.json") is None:
        raise InputError(f"{path}: no such directory, and no hub tokenizer of that name in the local Hugging Face "
                         f"cache (HF_HUB_OFFLINE is set: `hf download {path}` first, or fix "
                         "model.tokenizer)")


def _hub_snapshot(repo: str, filename: str = "config.json") -> Optional[Path]:
    """The cached snapshot of a hub model, if `filename` of it is in the local cache (nothing is downloaded)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo, filename)
    except ValueError:  # not a valid repo id after all
        return None
    return Path(found).parent if isinstance(found, str) else None


def check_checkpoint(d: Path, *, tokenizer: bool = True) -> None:
    """config.json parses, a tokenizer is there (when asked), and every weight file the directory names is present
    and whole (a safetensors file's size must equal what its header describes)."""
    config = d / "config.json"
    if not config.is_file():
        raise InputError(f"{config}: missing; {d} is not a model directory (save one with save_pretrained, or "
                         "point at the directory that holds config.json)")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{config}: not valid JSON ({e}); the checkpoint is damaged, copy it again") from None
    if tokenizer and not any((d / f).is_file() for f in TOKENIZER_FILES):
        raise InputError(f"{d}: no tokenizer ({', '.join(TOKENIZER_FILES)}); save the tokenizer with the model or "
                         "set model.tokenizer")
    for f in weight_files(d):
        if f.suffix == ".safetensors":
            safetensors_size(f)


def weight_files(d: Path) -> list[Path]:
    """The weight files of a model directory: every shard its index names (each must exist), or the single file."""
    for name in WEIGHT_INDEXES:
        index = d / name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise InputError(f"{index}: not a weight index ({type(e).__name__}: {e}); copy the checkpoint "
                                 "again") from None
            missing = [s for s in shards if not (d / s).is_file()]
            if missing:
                raise InputError(f"{d / missing[0]}: missing, named by {index.name} ({len(missing)} of {len(shards)} "
                                 "shards missing; the copy or download is incomplete)")
            return [d / s for s in shards]
    for name in WEIGHT_FILES:
        if (d / name).is_file():
            return [d / name]
    raise InputError(f"{d}: no model weights ({', '.join(WEIGHT_FILES + WEIGHT_INDEXES)}); the checkpoint is "
                     "incomplete")


def safetensors_size(f: Path) -> tuple[dict, int]:
    """(header, bytes of tensor data) of a safetensors file, or InputError when the file is truncated or corrupt."""
    size = f.stat().st_size
    try:
        if size < 8:
            raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
        if n > size - 8:
            raise ValueError(f"header of {n} bytes in a file of {size}")
        header, start = safetensors_header(f)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise InputError(f"{f}: not a readable safetensors file ({e}); copy or download it again") from None
    if start + end != size:
        raise InputError(f"{f}: truncated or corrupt: its header describes {start + end} bytes, the file has {size} "
                         "(copy or download it again)")
    return header, end


def tensor_shapes(d: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape over a model directory's safetensors files (headers only)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in weight_files(d):
        if f.suffix == ".safetensors":
            header, _ = safetensors_size(f)
            shapes.update({k: tuple(t["shape"]) for k, t in header.items() if k != "__metadata__"})
    return shapes


def check_mask(mask: str, model: Optional[Path]) -> None:
    """The mask file opens, and each of its tensors names a tensor of the model with the same shape."""
    from allo.masks.io import MaskError, MaskFile, check_against_model

    p = Path(mask)
    if not p.is_file():
        raise InputError(f"{mask}: no such mask file (make one with `allo locate`)")
    safetensors_size(p)
    try:
        with MaskFile(p) as f:
            shapes = f.shapes
    except Exception as e:  # safetensors and JSON metadata errors alike: the file is not one of ours
        raise InputError(f"{mask}: not a mask file ({type(e).__name__}: {e}); make one with `allo locate`") from None
    if model is None:
        return
    have = tensor_shapes(model)
    if not have:  # .bin weights only: the stage checks the mask against the loaded model
        return
    tied = {n: n.replace("lm_head.weight", "model.embed_tokens.weight") for n in shapes
            if n.endswith("lm_head.weight") and n not in have}  # a tied head is not saved: it shares the embedding
    try:
        check_against_model(p, have, tied)
    except MaskError as e:
        raise InputError(f"{e} (locate the mask on the model in {model})") from None


def check_hub_dataset(name: str) -> None:
    """Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), a hub dataset must be in the local cache; online it passes."""
    from allo.io import hub_dataset_unavailable

    why = hub_dataset_unavailable(name)
    if why is not None:
        raise InputError(f"{name}: a hub dataset that is not in the local cache, and HF_HUB_OFFLINE is set: fetch "
                         f"it where there is a network (`hf download {name} --repo-type dataset`) or give a local "
                         "file (.jsonl, .json or .parquet)") from why


def check_data(path: str, skip_bad: bool = False) -> None:
    """A local data file exists and decodes (UTF-8 JSON lines, a JSON document, or Parquet); hub names pass (the
    stage reads them). Record fields are checked by the stage, which names each bad record's place too.
    `skip_bad`: undecodable JSONL lines are the stage's to skip and count (data.on_bad_record: skip)."""
    from allo.data.records import DataError, _iter_raw
    from allo.io import BadLine, iter_jsonl

    p = Path(path).expanduser()
    if not p.exists() and not p.suffix and "/" in path and HUB_ID.match(path):
        check_hub_dataset(path)
        return
    if not p.exists():
        raise InputError(f"{path}: no such data file (check the path)")
    try:
        if p.suffix in (".json", ".parquet") or p.is_dir():
            for _ in _iter_raw(str(p), "train"):
                pass
            return
        for n, rec in iter_jsonl(p, bad="yield"):
            if isinstance(rec, BadLine) and not skip_bad:
                raise InputError(f"{p}:{n}: {rec} (fix or remove the line, or set data.on_bad_record: skip)")
    except DataError as e:
        raise InputError(str(e)) from None
    except OSError as e:
        raise InputError(f"{p}: cannot read ({e.strerror or e})") from None


def check_output(out: Path, need_bytes: int) -> None:
    """`out` can be created and written (checked in its nearest existing directory, so a command that stops later
    leaves no empty directories behind); warns when the disk has less room than the stage will write."""
    there = out
    while not there.exists() and there != there.parent:
        there = there.parent
    try:
        if not there.is_dir():
            raise NotADirectoryError(20, "not a directory", str(there))
        probe = there / f".allo-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"{out}: cannot write there ({e.strerror or e}); set output_dir (or --out) to a writable "
                         "directory") from None
    free = shutil.disk_usage(there).free
    if need_bytes > free:
        log.warning("%s: %.1f GB free, and this stage writes about %.1f GB (the exported model plus its resumable "
                    "checkpoints); free space or move output_dir before it fails mid-save", out, free / 1e9,
                    need_bytes / 1e9)


def checkpoint_bytes(model: Optional[Path], dtype: str, keep_last: int) -> int:
    """About what a training stage writes: the exported model in its dtype plus `keep_last` resumable checkpoints
    (weights + fp32 master + two fp32 Adam moments per parameter)."""
    if model is None:
        return 0
    numel = sum(math.prod(shape) for shape in tensor_shapes(model).values()) + sum(
        f.stat().st_size // 2 for f in weight_files(model) if f.suffix != ".safetensors")  # .bin: 2 bytes a value
    width = 2 if dtype == "bf16" else 4
    return numel * width + keep_last * numel * (width + 12)


def check_training(recipe, *, data: Optional[str], init: Optional[str], mask: Optional[str], out: Path,
                   keep_last: int) -> None:
    """Everything a training stage reads and writes: data decodes, the starting checkpoint is whole, the mask fits
    it, and the output directory is writable with room."""
    if data:
        check_data(data, recipe.data.on_bad_record == "skip")
    path = init or recipe.model.path
    model = model_dir(path, tokenizer=init is not None or recipe.model.tokenizer is None) if path else None
    if recipe.model.tokenizer and init is None:
        check_tokenizer(recipe.model.tokenizer)
    if mask:
        check_mask(mask, model)
    check_output(out, checkpoint_bytes(model, recipe.model.dtype, keep_last))


def check_eval(recipe) -> None:
    """What the eval step will read from outside the run, checked before the first step trains: every benchmark (a
    local file, or a hub dataset that is cached when offline) and, for instruction following, a judge endpoint
    with its key."""
    from allo.eval.benchmarks import BenchmarkError, check_available
    from allo.openai_client import is_local

    problems = []
    for spec in recipe.task.benchmarks:
        name, _, data = str(spec).partition("=")
        try:
            check_available(name, data or None)
        except BenchmarkError as e:
            problems.append(f"task.benchmarks: {e}")
    if problems:
        raise Problems(problems)
    if recipe.task.alpaca_eval or recipe.task.arena_hard:
        judge = recipe.task.judge
        if not (judge.base_url and judge.model):
            raise InputError("task.alpaca_eval / task.arena_hard are judged by an LLM: set task.judge.base_url and "
                             "task.judge.model (any OpenAI-compatible endpoint, e.g. `vllm serve` of an open judge; "
                             "eval/README.md)")
        if judge.api_key_env and not os.environ.get(judge.api_key_env) and not is_local(judge.base_url):
            raise InputError(f"task.judge: the API key variable {judge.api_key_env} is not set for "
                             f"{judge.base_url}; export it, or set task.judge.api_key_env: null for a keyless server")


def check_trackers(recipe) -> None:
    """Every tracker a stage reports to (`train.report_to`, or a stage's own) is installed."""
    from allo.steps import REGISTRY
    from allo.tracking import check_installed

    check_installed(recipe.train.report_to)
    for section in dict.fromkeys(s.train.section for s in REGISTRY.values() if s.train):
        if "report_to" in getattr(recipe, section).train:
            check_installed(recipe.stage_train(section).report_to, f"{section}.train.report_to")


def check_run(recipe, files: Iterable[tuple[str, str]]) -> None:
    """`allo run`'s inputs from outside the run: the starting model, every data file the steps name (`files`:
    (recipe key, path)), and the output directory; every problem at once (`Problems`)."""
    model: list = [None]

    def starting_model() -> None:
        if recipe.model.path:
            model[0] = model_dir(recipe.model.path, tokenizer=recipe.model.tokenizer is None)

    def data(key: str, path: str) -> Callable[[], None]:
        def check() -> None:
            try:
                check_data(path, recipe.data.on_bad_record == "skip")
            except InputError as e:
                raise InputError(f"{e} (recipe key {key})") from None
        return check

    checks = [starting_model] + ([lambda: check_tokenizer(recipe.model.tokenizer)] if recipe.model.tokenizer else [])
    checks += [data(key, path) for key, path in files if key != "model.path"]
    checks.append(lambda: check_output(Path(recipe.output_dir),
                                       checkpoint_bytes(model[0], recipe.model.dtype, recipe.train.keep_last)))
    problems = collect(checks)
    if problems:
        raise Problems(problems)


# ------------------------------------------------------------------------------------------ the whole command
def check_teacher(recipe) -> None:
    """The rewrite teacher can be reached: an endpoint's key is in the environment (a hosted API), a python:
    teacher imports."""
    from allo.openai_client import is_local

    teacher = recipe.reward.teacher
    if teacher == "openai":
        ep = recipe.reward.teacher_endpoint
        if ep.api_key_env and not os.environ.get(ep.api_key_env) and not is_local(ep.base_url or ""):
            raise InputError(f"reward.teacher_endpoint: the API key variable {ep.api_key_env} is not set for "
                             f"{ep.base_url}; export it, or set reward.teacher_endpoint.api_key_env: null for a "
                             "keyless server")
    elif teacher.startswith("python:"):
        from allo.reward.teacher import python_rewrites

        python_rewrites(teacher)


def check_chat_template(recipe) -> None:
    """`data.template: chat` needs a tokenizer with a chat template (model.tokenizer, else model.path's); a hub id
    that is not cached is downloaded later and checked then."""
    source = recipe.model.tokenizer or recipe.model.path
    if not source:
        return
    d = Path(source).expanduser()
    if not d.is_dir():
        d = _hub_snapshot(source, "tokenizer_config.json")
        if d is None:
            return
    if (d / "chat_template.jinja").is_file() or (d / "chat_template.json").is_file():
        return
    try:
        config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    if not (isinstance(config, dict) and config.get("chat_template")):
        key = "model.tokenizer" if recipe.model.tokenizer else "model.path"
        raise InputError(f"{d}: data.template is 'chat' but this tokenizer ({key}) has no chat template (no "
                         "chat_template in tokenizer_config.json, no chat_template.jinja); use a chat model's "
                         "tokenizer, or set data.template: alpaca, alpaca_cot or raw")


def check_batch(steps: Iterable[tuple[str, str, object]], world: int) -> None:
    """Each training step's global batch (`steps`: (step, section, the recipe it trains with)) splits over `world`
    ranks (the micro batch shrinks to fit; the global batch must be a multiple of the world size): one problem per
    recipe key that set a value that does not, naming the steps it reaches."""
    bad: dict[tuple[str, int], list[str]] = {}
    for step, section, recipe in steps:
        g = recipe.stage_train(section).global_batch_size
        if g % world:
            bad.setdefault((recipe.train_key(section, "global_batch_size"), g), []).append(step)
    problems = []
    for (key, g), names in bad.items():
        lower, upper = (g // world) * world, (g // world + 1) * world
        problems.append(f"step{'s' if len(names) > 1 else ''} {', '.join(names)}: {key} = {g} is not a multiple of "
                        f"the world size {world} (each rank takes equal micro batches); set --set {key}={upper}"
                        + (f" or {lower}" if lower else "") + ", or use a world size that divides it")
    if problems:
        raise Problems(problems)


def training_sections(recipe, steps: Iterable[str]) -> list[tuple[str, str, object]]:
    """(step, section, recipe as the step trains with it) of the training steps among `steps` that train (not
    skipped, not switched off, not taking another step's outputs)."""
    from allo.steps import REGISTRY, repeats

    out = []
    for name in steps:
        step = REGISTRY[name]
        t = step.train
        if t is None or (step.skip and step.skip(recipe)) or repeats(step, recipe):
            continue
        adapted = t.adapt(recipe)
        if getattr(getattr(adapted, t.section), "enabled", True):
            out.append((name, t.section, adapted))
    return out


def command_problems(recipe, stage: str, world: int, *, data: Optional[str] = None, init: Optional[str] = None,
                     mask: Optional[str] = None, out: Optional[str] = None, start: Optional[str] = None,
                     only: Optional[str] = None) -> list[str]:
    """Everything `allo STAGE` will need, at `world` ranks, checked at once: every problem with its fix. For the
    pipeline, only the steps that will run (`allo.manifests.Fingerprints.to_run`) count, and a step whose upstream
    will neither run nor has completed is one problem."""
    from allo.steps import REGISTRY, STEPS

    step = REGISTRY.get(stage)
    checks: list[Callable[[], None]] = [lambda: check_trackers(recipe)]
    if step is not None and step.standalone:
        from allo.stages import STAGES

        section = STAGES[step.name].section
        where = Path(out or Path(recipe.output_dir) / step.name)
        checks += [lambda: check_training(recipe, data=data or recipe.data.train, init=init, mask=mask, out=where,
                                          keep_last=recipe.stage_train(section).keep_last),
                   lambda: check_batch([(step.name, section, recipe)], world)]
        if recipe.data.template == "chat" and init is None:
            checks.append(lambda: check_chat_template(recipe))
        return collect(checks)
    if stage == "ablate":
        return collect(checks + [lambda: check_run(recipe, _external_files(recipe, STEPS))])
    from allo.manifests import Fingerprints

    fp = Fingerprints(recipe)
    try:
        steps = steps_to_run(recipe, stage, start, only, fp)
    except ValueError as e:
        return [str(e)]
    if not steps:
        return collect(checks)
    live = [n for n in steps if not (REGISTRY[n].skip and REGISTRY[n].skip(recipe))]
    checks.append(lambda: check_run(recipe, _external_files(recipe, live)))
    from allo.steps import Context

    ctx = Context(recipe)
    for name in live:
        for ref in (r for r in REGISTRY[name].inputs if r not in REGISTRY[name].optional):
            u = ref.split("/", 1)[0]
            skipped = REGISTRY[u].skip and REGISTRY[u].skip(recipe)  # its outputs are not read (sample with pairs)
            if u != name and u not in steps and not skipped and not _exists(ctx, ref):
                checks.append(_missing_input(name, u, ref, ctx))
    if "eval" in live:
        checks.append(lambda: check_eval(recipe))
    if "reward-data" in live:
        checks.append(lambda: check_teacher(recipe))
    if recipe.data.template == "chat" and set(live) - {"pairs", "locate", "reward-data", "reward-train"}:
        checks.append(lambda: check_chat_template(recipe))
    checks.append(lambda: check_batch(training_sections(recipe, live), world))
    return collect(checks)


def steps_to_run(recipe, stage: str, start: Optional[str] = None, only: Optional[str] = None,
                 fingerprints=None) -> list[str]:
    """The steps `allo STAGE` (run, or one step: `run --only STEP`) with --from/--only will execute, in order
    (`allo.manifests.Fingerprints.to_run`). ValueError naming an unknown step."""
    from allo.manifests import Fingerprints, selection
    from allo.steps import REGISTRY

    forced, chosen = selection(start, only or (stage if stage in REGISTRY else None))
    return (fingerprints or Fingerprints(recipe)).to_run(forced, chosen)


def check_command(recipe, stage: str, world: int, **kw) -> None:
    """`command_problems`, raised together as one `Problems`."""
    problems = command_problems(recipe, stage, world, **kw)
    if problems:
        raise Problems(problems)


def _exists(ctx, ref: str) -> bool:
    try:
        return Path(ctx.path(ref)).exists()
    except ValueError:  # no SFT model at all: the sft step's own checks say why
        return True


def _missing_input(name: str, upstream: str, ref: str, ctx) -> Callable[[], None]:
    def check() -> None:
        raise InputError(f"{ctx.path(ref)}: step {name} reads it and step {upstream}, which writes it, has not "
                         "run there; run it first (`allo run` without --only runs every step that is missing)")
    return check


def _external_files(recipe, steps: Iterable[str]) -> list[tuple[str, str]]:
    """(recipe key, path) of every input file from outside the run that `steps` read."""
    from allo.config import to_dict
    from allo.steps import REGISTRY, lookup

    values, out = to_dict(recipe), []
    for name in steps:
        step = REGISTRY[name]
        out += [(k, lookup(values, k)) for k in step.files if lookup(values, k)]
        if name == "eval":
            out += [("task.benchmarks", b.split("=", 1)[1]) for b in recipe.task.benchmarks if "=" in str(b)]
    return list(dict.fromkeys(out))
