"""Step manifests and fingerprints: what the scheduler (`allo.pipeline`), the stage runner, the pre-flight and the
ablations all read to know whether a step's outputs are complete and current.

A step's fingerprint hashes the recipe values it declares, the size and mtime of the input files the recipe names,
and the *output ids* of its upstream steps: each complete manifest carries a fresh id, so a step rerun by
`--only`/`--from` (same settings, new outputs) makes every step that read its outputs stale.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Optional

from allo.config import Recipe, to_dict
from allo.io import write_json
from allo.steps import REGISTRY, STEPS, lookup, repeats

MANIFEST = "manifest.json"


def write_manifest(directory: Path, step: str, info: dict, fingerprint: Optional[str] = None) -> None:
    """The one writer of `STEP/manifest.json`. The fingerprint, the output id and `complete` go in last, in one
    atomic write: a manifest without them is never taken as complete."""
    body = {"step": step, **{k: v for k, v in info.items() if k not in ("output_id", "complete")}}
    if fingerprint is not None:
        body["fingerprint"] = fingerprint
    if body.get("model"):  # a model card first: a complete manifest means the directory is ready to publish
        from allo.model_card import write_card

        write_card(step, body, Path(directory))
    write_json(Path(directory) / MANIFEST, {**body, "output_id": uuid.uuid4().hex, "complete": True})


def read_manifest(directory: Path) -> dict:
    """A step directory's manifest, {} when it is missing or unreadable (an interrupted write leaves none)."""
    try:
        m = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return m if isinstance(m, dict) else {}


def recorded(directory: Path, attempt: Optional[str] = None) -> Optional[str]:
    """The fingerprint of a complete manifest (written in `attempt`, when given), or None."""
    m = read_manifest(directory)
    if attempt is not None and m.get("attempt") != attempt:
        return None
    return m.get("fingerprint") if m.get("complete") else None


def selection(start: Optional[str] = None, only: Optional[str] = None) -> tuple[set[str], set[str]]:
    """(forced, chosen) of `allo run [--from START] [--only A,B]`: the steps run whatever their manifests say, and
    the steps the run is limited to (empty: no limit). ValueError naming an unknown step."""
    chosen = set(only.split(",")) if only else set()
    unknown = [n for n in ([start] if start else []) + sorted(chosen) if n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown step {unknown[0]!r}; steps: {', '.join(STEPS)}")
    return chosen or (set(STEPS[STEPS.index(start):]) if start else set()), chosen


class Fingerprints:
    """Fingerprints of a recipe's steps against the manifests under `out` (default: the recipe's output_dir).
    Not cached: a step that completes changes the fingerprints of the steps after it."""

    def __init__(self, recipe: Recipe, out: Optional[Path] = None):
        self.recipe = recipe
        self.out = Path(out or recipe.output_dir)
        self.values = to_dict(recipe)

    def upstream(self, name: str) -> tuple[str, ...]:
        """The steps whose outputs `name` reads, including a step whose training it would repeat."""
        reused = repeats(REGISTRY[name], self.recipe)
        return REGISTRY[name].upstream + ((reused,) if reused else ())

    def of(self, name: str) -> str:
        step = REGISTRY[name]
        covered = _by_content_of(name)
        parts = {"config": {k: _outcome(k, lookup(self.values, k), covered) for k in step.config},
                 "files": {k: _stat(lookup(self.values, k)) for k in step.files},
                 "upstream": [self.output_id(u) for u in self.upstream(name) if u != name]}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def output_id(self, name: str) -> Optional[str]:
        m = read_manifest(self.out / name)
        return m.get("output_id") if m.get("complete") else None

    def current(self, name: str) -> bool:
        """The step's manifest is complete with its present fingerprint."""
        return recorded(self.out / name) == self.of(name)

    def to_run(self, forced: Iterable[str] = (), chosen: Iterable[str] = ()) -> list[str]:
        """The steps `allo run` will execute, in order: a forced step, one not current, and (unless `chosen`
        restricts the run to some steps) every step downstream of one that will run."""
        forced, chosen, out = set(forced), set(chosen), []
        for name in STEPS:
            if chosen and name not in chosen:
                continue
            if name in forced or not self.current(name) or any(u in out for u in self.upstream(name)):
                out.append(name)
        return out

    def stale(self) -> list[str]:
        """Complete steps whose fingerprint no longer matches (an input, a setting or an upstream output changed)."""
        return [n for n in STEPS if recorded(self.out / n) is not None and not self.current(n)]


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
    return set(step.files).union(*(_by_content_of(u) for u in step.upstream if u != name))


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


def reuse_steps(recipe: Recipe, parent: Path, child: Path) -> list[str]:
    """Copy into `child` (the recipe's run) the steps of the finished run in `parent` that `recipe` would not
    rerun there: complete in `parent` with the fingerprint `recipe` gives them, reading only steps whose outputs
    `child` shares with `parent`. The copies keep their manifests (output ids included), so `allo run` in `child`
    skips them and their readers' fingerprints hold. A step current in `child` already is kept, its own outputs
    or not. A copy, not a link: should `allo run` judge a step otherwise, it retrains it in `child`, never in
    `parent`. Each copy lands whole (a temporary directory renamed), so an interrupted copy leaves no complete
    manifest over missing files. Returns the steps copied, in pipeline order."""
    theirs, ours = Fingerprints(recipe, parent), Fingerprints(recipe, child)
    shared: list[str] = []  # steps whose outputs in `child` are `parent`'s
    copied: list[str] = []
    for name in STEPS:
        if ours.current(name):
            if ours.output_id(name) == theirs.output_id(name):
                shared.append(name)
            continue
        if not theirs.current(name) or not all(u in shared for u in theirs.upstream(name) if u != name):
            continue
        tmp = child / f".{name}.copying"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(parent / name, tmp, symlinks=True)
        shutil.rmtree(child / name, ignore_errors=True)
        tmp.rename(child / name)
        shared.append(name)
        copied.append(name)
    return copied
