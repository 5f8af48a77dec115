"""The paper recipes end to end, the way users run them (tests/paper_toy.py: the recipe file as written, with
overrides only for the model, the data, the endpoint and the scale):

- qa through `recipes/qa/run.sh` (one node, torchrun), then a rerun that skips every step;
- math through `slurm/submit.sh` into the real local Slurm (tests/slurm_local.sh), submitted from a directory
  outside the repository with a relative recipe path, --set values containing spaces and a Python environment
  other than .venv; its outputs and logs land where it was submitted from;
- instruct through `allo run` under torchrun, judged by the loopback judge.

Each run finishes and `allo report` writes its paper table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from chat_server import ChatServer
from conftest import ENV, ROOT, SHARED, wait_for
from paper_toy import overrides, reply

pytestmark = pytest.mark.slow
BENCH = SHARED if SHARED.exists() else None  # real benchmark slices when ../shared is there, else written files


@pytest.fixture()
def server():
    s = ChatServer(reply)
    yield s
    s.close()


def sets(args: list[str]) -> list[str]:
    return [x for v in args for x in ("--set", v)]


def report(run: Path, table: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "allo", "report", str(run)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (run / "report" / "tables.md").read_text()
    assert table in text and "+ALLO" in text, text
    return text


def test_qa_recipe_through_its_run_sh(tmp_path, server):
    run = tmp_path / "run"
    args = sets(overrides("qa", tmp_path, BENCH, server.url) + [f"output_dir={run}"])
    env = dict(ENV, ALLO_GPUS="2", ALLO_PYTHON=str(ROOT / ".venv" / "bin" / "python"))
    proc = subprocess.run(["recipes/qa/run.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    assert "python: " in proc.stdout and "world size: 1 nodes × 2 processes = 2" in proc.stdout
    text = report(run, "Table 2 layout")
    assert "| ECQA" in text
    log = (run / "logs" / "allo-rank0.log").read_text()
    assert "stage reward-train: gradient checkpointing" in log  # the step's own name, not its objective's (sft)
    teacher = sum(b["model"] == "teacher" for b in server.bodies)
    assert 0 < teacher <= 16, f"{teacher} teacher calls; data.limit is 16"  # no call beyond what was asked
    again = subprocess.run(["recipes/qa/run.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and "=====" not in again.stderr, again.stderr[-3000:]  # every step skipped
    assert sum(b["model"] == "teacher" for b in server.bodies) == teacher


def test_instruct_recipe_under_torchrun(tmp_path, server):
    from conftest import torchrun

    run = tmp_path / "run"
    torchrun(["run", "recipes/instruct/recipe.yaml", *sets(overrides("instruct", tmp_path, BENCH, server.url)
                                                           + [f"output_dir={run}"])], timeout=900)
    text = report(run, "Table 3 layout")
    assert "AlpacaEval 2.0" in text and "Arena-Hard" in text
    assert json.loads((run / "pairs" / "manifest.json").read_text())["pairs"] == 16  # data.limit
    assert sum(b["model"] == "teacher" for b in server.bodies) <= 16
    assert any(b["model"] == "judge" for b in server.bodies)


def _other_python(d: Path) -> Path:
    """A virtual environment that is not .venv: it sees .venv's packages through a .pth file, and allo from the
    checkout the launcher belongs to (slurm/python.sh puts it on PYTHONPATH)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(d)], check=True, timeout=120)
    site = Path(sysconfig.get_paths(vars={"base": str(d), "platbase": str(d)})["purelib"])
    site.mkdir(parents=True, exist_ok=True)
    (site / "dot_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return d / "bin" / "python"


def test_math_recipe_through_slurm_from_elsewhere(cluster, tmp_path, server):
    where = tmp_path / "project"  # the user's directory, outside the checkout
    where.mkdir()
    recipe = os.path.relpath(ROOT / "recipes" / "math" / "recipe.yaml", where)
    args = overrides("math", tmp_path / "inputs", BENCH, server.url) + ["output_dir=run"]
    assert any(" " in a for a in args)  # the endpoint's and the benchmark list's YAML have spaces
    env = dict(ENV, ALLO_PYTHON=str(_other_python(tmp_path / "env")))
    env.pop("ALLO_LOG_DIR", None)
    submit = [os.path.relpath(ROOT / "slurm" / "submit.sh", where), recipe, "--cpu", "--nodes", "2",
              "--gpus-per-node", "1", "--", *sets(args)]
    dry = subprocess.run([*submit[:1], *submit[1:5], "--dry-run", *submit[5:]], cwd=where, env=env,
                         capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stdout[-2000:] + dry.stderr[-3000:]
    assert f"python: {env['ALLO_PYTHON']} (ALLO_PYTHON)" in dry.stdout
    proc = subprocess.run(submit, cwd=where, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    st = wait_for(proc.stdout.splitlines()[-1], timeout=900)
    logs = "\n".join(p.read_text() for p in sorted((where / "logs").glob("*")) if p.is_file())
    assert st["JobState"] == "COMPLETED", f"{st}\n{logs[-6000:]}"
    assert not (ROOT / "run").exists() and not (ROOT / "logs").exists()
    run = where / "run"
    report(run, "Table 2 layout")
    results = json.loads((run / "eval" / "results.json").read_text())
    want = [a.split("=", 1)[0] for a in next(a for a in args if a.startswith("task.benchmarks="))[
        len("task.benchmarks=["):-1].split(", ")]
    scored = results["table2"]["SFT LLM" if "SFT LLM" in results["table2"] else "SFT"]
    assert [k for k in scored if not k.endswith("_avg")] == want  # the list with spaces reached the node whole
    assert json.loads((run / "warmup" / "manifest.json").read_text())["world"] == 2
