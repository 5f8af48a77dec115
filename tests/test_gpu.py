"""The GPU path end to end, on one CUDA GPU (`pytest -m gpu`; `make gpu-check` runs them on a GPU machine). Each
check is the CPU suite's own, run with the GPU visible (conftest.GPU_ENV) on one rank, so DeepSpeed and allo both
choose CUDA and NCCL:
- no frozen element moves in bf16, with dense and sparse Adam moments, on the one-rank path (ZeRO-0 under
  autocast) and under ZeRO-3 as configured;
- SIGTERM then resume is bit-identical;
- locate from the warm-up's partitions equals the offline exact top-k;
- the reduced tiny pipeline (`recipes/tiny/demo.py --quick`) runs every step;
- on two GPUs (NCCL, ZeRO-3 partitions across them): frozen elements, locate from partitions, SIGTERM + resume.
Skipped, with the reason, where torch sees no GPU (the last three where it sees fewer than two).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import GPU_ENV, ROOT
from test_locate_partitioned import check_partition_locate
from test_masked_training import check_frozen, mask_file  # noqa: F401 - mask_file is a fixture
from test_resume import check_sigterm_resume

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.mark.parametrize("single_rank", ["fast", "as_configured"])  # ZeRO-0 under autocast, and ZeRO-3 itself
@pytest.mark.parametrize("moments", ["dense", "sparse"])
def test_frozen_elements_do_not_move_bf16(tmp_path, tiny_model, pairs_file, mask_file, moments,  # noqa: F811
                                          single_rank):
    check_frozen(tmp_path, tiny_model, pairs_file, mask_file, "ds_configs/zero3.json", "bf16",
                 ("--set", f"train.sparse_optimizer_state={'true' if moments == 'sparse' else 'false'}",
                  "--set", f"train.single_rank={single_rank}"), env=GPU_ENV, nproc=1)


def test_sigterm_then_resume_is_bitwise_identical(tmp_path, tiny_model, pairs_file):
    check_sigterm_resume(tmp_path, tiny_model, pairs_file, env=GPU_ENV, nproc=1)


def test_locate_from_partitions_equals_offline(tmp_path, tiny_model, pairs_file):
    check_partition_locate(tmp_path, tiny_model, pairs_file,
                           "locate: {from_partitions: true, forget_ratio: 10, improve_ratio: 15}", GPU_ENV, {},
                           nproc=1)


def test_tiny_pipeline_runs_on_the_gpu():
    out = ROOT / "runs" / "tiny-gpu-check"
    run = out / "seed0"
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, "recipes/tiny/demo.py", "--quick", "--seeds", "0", "--ranks", "1",
                           "--set", "model.dtype=bf16", "--out", str(out)], cwd=ROOT, env=GPU_ENV,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "GPU:" in proc.stdout, "the demo ran on the CPU"
    for step in ("sft", "warmup", "forget", "improve", "dpo", "eval"):
        assert json.loads((run / step / "manifest.json").read_text())["complete"], step
    peaks = [json.loads(x)["peak_mem_mb"] for x in (run / "improve" / "metrics.jsonl").read_text().splitlines()]
    assert peaks and all(p > 0 for p in peaks)


# ------------------------------------------------------------------------------------------------- two GPUs
@pytest.mark.gpu2
@pytest.mark.parametrize("moments", ["dense", "sparse"])
def test_frozen_elements_do_not_move_on_two_gpus(tmp_path, tiny_model, pairs_file, mask_file, moments):  # noqa: F811
    check_frozen(tmp_path, tiny_model, pairs_file, mask_file, "ds_configs/zero3.json", "bf16",
                 ("--set", f"train.sparse_optimizer_state={'true' if moments == 'sparse' else 'false'}"),
                 env=GPU_ENV, nproc=2)


@pytest.mark.gpu2
def test_locate_from_partitions_equals_offline_on_two_gpus(tmp_path, tiny_model, pairs_file):
    check_partition_locate(tmp_path, tiny_model, pairs_file,
                           "locate: {from_partitions: true, forget_ratio: 10, improve_ratio: 15}", GPU_ENV, {},
                           nproc=2)


@pytest.mark.gpu2
def test_sigterm_then_resume_is_bitwise_identical_on_two_gpus(tmp_path, tiny_model, pairs_file):
    check_sigterm_resume(tmp_path, tiny_model, pairs_file, env=GPU_ENV, nproc=2)
