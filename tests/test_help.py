"""Asking for help is always safe: every launcher script and every `allo` subcommand answers -h and --help wherever
they stand on the line, prints its usage and exits 0 without submitting or launching anything; a dry run runs
nothing wherever its flag stands. And the help itself is whole: no summary cut mid-sentence, every subcommand and
flag described, no pointer to a document that does not ship."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ENV, ROOT

SCRIPTS = ["slurm/submit.sh", "slurm/node.sh", "slurm/allo.sbatch", "recipes/run_one_node.sh", "recipes/qa/run.sh",
           "recipes/math/run.sh", "recipes/instruct/run.sh", "bench/gpu_check.sh", "eval/eval.sbatch"]


@pytest.fixture
def trap(tmp_path) -> tuple[dict, Path]:
    """An environment in which sbatch, srun, scontrol and torchrun only leave a note, and the Python that the
    scripts call records its arguments before doing the work."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for tool in ("sbatch", "srun", "scontrol", "torchrun"):
        (bin_dir / tool).write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {calls}\n")
        (bin_dir / tool).chmod(0o755)
    py = bin_dir / "python"
    py.write_text(f"#!/bin/sh\necho python \"$@\" >> {calls}\nexec {sys.executable} \"$@\"\n")
    py.chmod(0o755)
    env = dict(ENV, PATH=f"{bin_dir}:{os.environ['PATH']}", ALLO_PYTHON=str(py), ALLO_LOG_DIR=str(tmp_path / "logs"))
    return env, calls


def _launched(calls: Path) -> list[str]:
    text = calls.read_text() if calls.exists() else ""
    return [line for line in text.splitlines() if not line.startswith("python") or "torchrun" in line]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("args", [["--help"], ["-h"], ["recipes/tiny/recipe.yaml", "--help"],
                                  ["recipes/tiny/recipe.yaml", "--nodes", "2", "-h"],
                                  ["recipes/tiny/recipe.yaml", "--", "run", "--help"]])
def test_scripts_answer_help_anywhere_and_launch_nothing(script, args, trap):
    env, calls = trap
    proc = subprocess.run(["bash", script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    usage = "recipes/run_one_node.sh" if script.endswith("/run.sh") else script  # a recipe's run.sh delegates
    first = (ROOT / usage).read_text().splitlines()[1].lstrip("# ").strip()
    assert first[:30] in proc.stdout, f"{script} {args}: usage not printed:\n{proc.stdout[:500]}"
    assert not calls.exists(), f"{script} {args} ran: {calls.read_text()}"


@pytest.mark.parametrize("launcher", ["run_one_node", "submit"])
def test_a_dry_run_runs_nothing_wherever_the_flag_stands(launcher, trap, tmp_path, tiny_model, pairs_file):
    from conftest import write_recipe

    env, calls = trap
    recipe = str(write_recipe(tmp_path / "r.yaml", tiny_model, pairs_file, tmp_path / "out",
                              f"task: {{sft_data: {pairs_file}, problems: {pairs_file}}}"))
    cmd = {"run_one_node": ["recipes/run_one_node.sh", recipe, "--dry-run", "--only", "sft"],
           "submit": ["slurm/submit.sh", recipe, "--cpu", "--nodes", "2", "--dry-run", "--gpus-per-node", "2"]}[launcher]
    proc = subprocess.run(["bash", *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "command:" in proc.stdout
    assert _launched(calls) == [], _launched(calls)


@pytest.mark.parametrize("cmd", [["recipes/math/run.sh", "--from", "improve", "--dry-run"],
                                 ["slurm/submit.sh", "recipes/qa/recipe.yaml", "--dry-run", "--nodes", "2",
                                  "--gpus-per-node", "8", "--cpu"]])
def test_a_dry_run_checks_the_whole_job(cmd, trap, monkeypatch):
    """A paper recipe's dry run without its data, model or key: every problem at once, exit 2, nothing run."""
    env, calls = trap
    env = {k: v for k, v in env.items() if k != "OPENAI_API_KEY"}
    proc = subprocess.run(["bash", *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "problems, each with its fix" in proc.stderr
    assert "meta-llama/Llama-2-7b-hf: no such directory" in proc.stderr
    assert "the API key variable OPENAI_API_KEY is not set" in proc.stderr
    assert "command:" not in proc.stdout and _launched(calls) == []


def _subcommands() -> list[list[str]]:
    from allo.cli import _parser
    from allo.eval.cli import SUBCOMMANDS

    top = _parser()
    names = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
    return [[n] for n in names] + [["eval", s] for s in SUBCOMMANDS] + [["masks", "show"]]


@pytest.mark.parametrize("where", ["alone", "after a recipe", "after --set"])
def test_every_allo_subcommand_answers_help_anywhere(where, capsys, monkeypatch, tmp_path):
    from allo.cli import main

    monkeypatch.chdir(tmp_path)  # nothing may be written here
    for sub in _subcommands():
        tail = {"alone": ["--help"], "after a recipe": [str(ROOT / "recipes/tiny/recipe.yaml"), "-h"],
                "after --set": ["--set", "train.lr=1", "-h"]}[where]
        with pytest.raises(SystemExit) as e:
            main([*sub, *tail])
        assert e.value.code == 0, (sub, where)
        out = capsys.readouterr().out
        assert out.startswith("usage:"), (sub, where, out[:200])
    assert list(tmp_path.iterdir()) == []


def _parsers():
    from allo.cli import _parser
    from allo.eval.cli import _parser as eval_parser

    todo, seen = [("allo", _parser()), ("allo eval", eval_parser())], []
    while todo:
        name, p = todo.pop()
        seen.append((name, p))
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                todo += [(f"{name} {n}", sp) for n, sp in a.choices.items()]
    return seen


def test_help_is_whole():
    summary = subprocess.run([sys.executable, "-m", "allo", "--help"], cwd=ROOT, env=ENV, capture_output=True,
                             text=True).stdout
    assert summary.count("(") == summary.count(")"), "a subcommand's summary stops inside a parenthesis"
    eval_help = subprocess.run([sys.executable, "-m", "allo", "eval", "--help"], cwd=ROOT, env=ENV,
                               capture_output=True, text=True).stdout
    assert "suite" in eval_help and "bench" in eval_help
    for name, p in _parsers():
        assert p.description, f"`{name}` has no description"
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            assert a.help, f"`{name}` {'/'.join(a.option_strings) or a.dest} has no help"


def test_no_pointer_to_a_document_that_does_not_ship():
    local = (".venv", ".whl", "runs")  # venvs (.venv, .venv-gpu, .venv-vllm), wheel folders, run outputs
    texts = [p for p in ROOT.rglob("*") if p.suffix in (".py", ".md", ".yaml", ".sh") and p.name != Path(__file__).name
             and not any(part.startswith(local) for part in p.relative_to(ROOT).parts)]
    for path in texts:
        text = path.read_text(errors="ignore")
        assert not re.search(r"(?i)\bspec §|ALLO_SPEC|huggingface-cli", text), path
        for doc in re.findall(r"\bdocs/[\w./-]+\.md", text):
            assert (ROOT / doc).exists(), f"{path} points to {doc}"


def test_user_documents_speak_to_users():
    """The README, docs/, eval/README.md and the recipes' comments: no commit hashes, no development history, no
    pointer into the project's own shared folder (measurement history lives in bench/RESULTS.md, dated)."""
    docs = [ROOT / "README.md", ROOT / "eval" / "README.md", *sorted((ROOT / "docs").glob("*.md")),
            *sorted((ROOT / "recipes").rglob("*.yaml")), *sorted((ROOT / "recipes").rglob("*.sh"))]
    for path in docs:
        text = path.read_text()
        for pattern in (r"\bcommit [0-9a-f]{7,40}\b", r"\bat [0-9a-f]{7}\b", r"before a change to how",
                        r"seed write-up", r"spec defaults", r"\.\./shared", r"\bsession\b"):
            found = re.search(pattern, text)
            assert not found, f"{path.relative_to(ROOT)}: {found.group()!r}"
        hashes = [w for w in re.findall(r"\b[0-9a-f]{7,12}\b", text) if re.search(r"[a-f]", w) and
                  re.search(r"[0-9]", w)]
        assert not hashes, f"{path.relative_to(ROOT)}: commit-like {hashes[:3]}"
