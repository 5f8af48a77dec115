"""Shared fixtures: a tiny Llama + tokenizer directory, preference data, and a 2-rank launcher (torchrun)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # CI has no model hub; huggingface_hub reads this at import time
sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_model_dir, write_pairs  # noqa: E402

from allo.launch import torchrun_command  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# The CPU suite's children see no GPU, so DeepSpeed and allo both choose the CPU (and gloo) on any machine; the
# `gpu`-marked tests run with GPU_ENV, where both choose the GPU. Neither sets DS_ACCELERATOR: allo derives it.
GPU_ENV = {k: v for k, v in dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                                 PYTHONUNBUFFERED="1").items() if k != "DS_ACCELERATOR"}
ENV = dict(GPU_ENV, CUDA_VISIBLE_DEVICES="")


def torchrun(args: list[str], nproc: int = 2, timeout: int = 300, check: bool = True, env: dict | None = None,
             **popen) -> subprocess.CompletedProcess:
    """Run `python -m allo ARGS` on `nproc` ranks with a fresh rendezvous port (reused ports flake)."""
    proc = subprocess.run(torchrun_command(args, nproc), cwd=ROOT, env=env or ENV, capture_output=True, text=True,
                          timeout=timeout, **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl", n=32)


def write_recipe(path: Path, model: Path, data: Path, out: Path, extra: str = "") -> Path:
    path.write_text(f"""output_dir: {out}
model: {{path: {model}, dtype: fp32}}
data: {{train: {data}, template: raw, max_length: 64, max_prompt_length: 32}}
train: {{micro_batch_size: 2, global_batch_size: 8, weight_decay: 0.1, ds_config: ds_configs/zero3.json}}
{extra}
""")
    return path


def assert_adamw_close(a: dict, b: dict, lr: float, steps: int, b1: float = 0.9, b2: float = 0.999) -> None:
    """Two runs of `steps` AdamW steps whose gradients differ by float32 rounding. AdamW's update lr·m̂/(√v̂+ε) is
    scale-free where |g| >> ε: those elements agree to a few ulp a step (rtol 1e-5 over a few steps). Where |g| is
    within rounding of ε, the update's slope is ~lr/ε, and rounding may move it anywhere within AdamW's own bound
    |m̂|/√v̂ <= sqrt(sum a_i²/b_i) (Cauchy-Schwarz over the bias-corrected weights a_i of m̂ and b_i of v̂) times lr
    a step, in either run. Such elements are a small minority (at most 1% here); every element stays within twice
    the bound."""
    import math

    import torch

    bound = 0.0
    for t in range(1, steps + 1):
        w1 = [(1 - b1) * b1 ** (t - i) / (1 - b1 ** t) for i in range(1, t + 1)]
        w2 = [(1 - b2) * b2 ** (t - i) / (1 - b2 ** t) for i in range(1, t + 1)]
        bound += lr * math.sqrt(sum(x * x / y for x, y in zip(w1, w2)))
    assert set(a) == set(b)
    loose = total = 0
    for name in a:
        diff = (a[name].float() - b[name].float()).abs()
        assert float(diff.max()) <= 2 * bound, f"{name}: {float(diff.max())} beyond AdamW's bound {2 * bound}"
        loose += int((~torch.isclose(a[name], b[name], rtol=1e-5, atol=1e-6)).sum())
        total += diff.numel()
    assert loose <= 0.01 * total, f"{loose} of {total} elements differ by more than float rounding"


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.exists():
        pytest.skip(f"{SHARED} is absent: the real benchmark samples live beside the checkout (see README)")
    return SHARED


def pytest_collection_modifyitems(config, items) -> None:
    """`gpu` tests need CUDA, `gpu2` tests two GPUs: skipped, with the reason, where torch sees fewer."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    none = pytest.mark.skip(reason="needs a CUDA GPU (torch sees none): run `make gpu-check` on a GPU machine")
    one = pytest.mark.skip(reason=f"needs two CUDA GPUs (torch sees {gpus}): run `make gpu-check` on a node with two")
    for item in items:
        if "gpu" in item.keywords and gpus == 0:
            item.add_marker(none)
        elif "gpu2" in item.keywords and gpus < 2:
            item.add_marker(one)


# ------------------------------------------------------------------------------------------- the local Slurm
def sh(*cmd: str, **kw) -> str:
    return subprocess.run(list(cmd), check=True, capture_output=True, text=True, **kw).stdout.strip()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A real Slurm (controller + 2 node daemons on this host, tests/slurm_local.sh), shared by the tests that
    submit to it. Needs root (it installs Debian's slurm packages if missing)."""
    import shutil

    if not sys.platform.startswith("linux"):
        pytest.skip("the local Slurm cluster needs Linux")
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd/munge needs root (they are started and stopped by this test)")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("no Slurm installed and no apt-get to install Debian's slurm-wlm")
    d = tmp_path_factory.mktemp("slurm")
    subprocess.run(["bash", str(ROOT / "tests/slurm_local.sh"), "up", str(d), "2"], check=True, timeout=600)
    yield d
    subprocess.run(["bash", str(ROOT / "tests/slurm_local.sh"), "down", str(d)], timeout=60)


def job_state(job: str) -> dict:
    out = sh("scontrol", "show", "job", job, "-o")
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_for(job: str, timeout: float = 400) -> dict:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        st = job_state(job)
        if st["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return st
        time.sleep(0.5)
    raise AssertionError(f"job {job} still {job_state(job)['JobState']} after {timeout} s")
