"""bench/gpu.py end to end on CPU (--smoke): the script `make gpu-check` runs on a GPU must not be broken when it gets there;
and bench/profile_share.py's reading of a raw py-spy profile."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ENV, ROOT

sys.path.insert(0, str(ROOT / "bench"))
import profile_share  # noqa: E402


def _bf16_attention_backward_works() -> bool:
    """torch 2.13's bf16 attention backward on the CPU raises "pack_vnni2 is only supported when avx512 is
    supported" when ATEN_CPU_CAPABILITY is forced below what the CPU has (default on an AVX-512 machine): a
    limitation of forcing torch's dispatch level, not of a CPU."""
    import torch

    q = torch.randn(1, 4, 128, 16, dtype=torch.bfloat16, requires_grad=True)
    try:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    except RuntimeError as e:
        if "pack_vnni2" in str(e):
            return False
        raise
    return True


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path):
    """`make gpu-check`'s script on the CPU at tiny sizes: the gpu tests collect, and bench/gpu.py runs TRL, allo dpo
    and allo improve (dense and sparse moments) side by side and prints the table with the goal ratios."""
    if not _bf16_attention_backward_works():
        pytest.skip("this torch cannot run bf16 attention backward at the forced ATEN_CPU_CAPABILITY (pack_vnni2 "
                    "needs AVX-512 kernels); the smoke runs bf16 as the GPU check does")
    out = tmp_path / "check"
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "run", "--smoke"], cwd=ROOT, text=True, timeout=900,
                          env=dict(ENV, OUT=str(out), PYTHON=sys.executable), capture_output=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tests collected" in (out / "pytest.log").read_text() or "collected" in (out / "pytest.log").read_text()
    res = json.loads((out / "gpu.json").read_text())
    for run in ("trl", "dpo", "dpo_zero3", "allo_dense", "allo_sparse"):
        assert res[run]["tokens_per_s"] > 0 and 0 < res[run]["mfu"] < 1 and res[run]["peak_mem_mb"] > 0, run
    assert res["allo_sparse"]["optim_state_mb"] < res["allo_dense"]["optim_state_mb"]
    assert [r["round"] for r in res["rounds"]["trl"]] == [0, 1] and res["dpo_zero3"]["rounds"] == 1
    speed = res["ratios"]["allo dpo tokens/s ÷ TRL DPOTrainer's"]
    assert speed["rounds"] == 2 and speed["low"] <= speed["value"] <= speed["high"]
    assert res["trl"]["ref_model_mb"] == 0 and "no reference model kept" in res["trl"]["settings"]
    table = proc.stdout[proc.stdout.rindex(res["device"] + ":"):]  # printed last, after the tests' tail
    assert "| allo_sparse | 2 |" in table and "| allo dpo tokens/s ÷ TRL DPOTrainer's |" in table
    assert (out / "table.md").read_text().strip() == table.split("\ngpu-check:")[0].strip()


@pytest.mark.slow
def test_gpu_check_verify_imports_everything_from_the_image_and_the_wheels(tmp_path):
    """`bash bench/gpu_check.sh verify`: the wheels (fetched for this Python where absent), installed with --no-index
    beside only a GPU image's packages, import all that `make gpu-check` imports; without one of them it fails."""
    import shutil

    proc = subprocess.run(["bash", "bench/gpu_check.sh", "verify"], cwd=ROOT, env=dict(ENV, PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "every module make gpu-check imports is there" in proc.stdout
    wheels = next(ROOT.glob(f".whl-verify-{sys.version_info[0]}.{sys.version_info[1]}"))
    partial = tmp_path / "wheels"
    shutil.copytree(wheels, partial)
    for w in partial.glob("einops-*.whl"):  # deepspeed's flops profiler imports it
        w.unlink()
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "verify"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(ENV, PYTHON=sys.executable, VERIFY_WHEELS=str(partial)), timeout=900)
    assert proc.returncode == 1 and "No module named 'einops'" in proc.stderr
    assert "in neither the GPU image nor .whl/" in proc.stderr


def test_ratio_interval_hand_computed():
    """Round ratios 2 and 4 (steps equal within each run): the geometric mean √8, and the hierarchical bootstrap's
    95% interval [2, 4] (a quarter of the draws take round 1 twice, a quarter round 2 twice). One round of equal
    steps has no spread."""
    import gpu

    value, low, high = gpu.ratio_interval([[2.0, 2.0], [4.0, 4.0]], [[1.0, 1.0], [1.0, 1.0]])
    assert value == pytest.approx(8 ** 0.5, rel=1e-12) and (low, high) == (2.0, 4.0)
    assert gpu.ratio_interval([[3.0, 3.0, 3.0]], [[1.5, 1.5]]) == (2.0, 2.0, 2.0)


def test_runs_go_by_value_in_alternating_rounds():
    import gpu

    assert gpu.schedule(2) == [(0, "trl"), (0, "dpo"), (0, "allo_dense"), (0, "allo_sparse"),
                               (1, "dpo"), (1, "trl"), (1, "allo_sparse"), (1, "allo_dense"), (1, "dpo_zero3")]
    assert gpu.schedule(1)[-1] == (0, "dpo_zero3")


def test_a_cut_short_check_still_prints_its_table(tmp_path):
    """What a run killed at its time limit left behind: its table with the figures that finished, the reason for
    each row that has none, and the ratios it can form; and a sentence when nothing was written at all."""
    import gpu

    res = {"device": "GPU", "params": 1e9, "peak_flops": 1e15, "seq": 8, "micro_pairs": 1, "steps": 4,
           "rounds": {"trl": [{"round": 0, "step_tokens_per_s": [100.0, 100.0], "peak_mem_mb": 50.0,
                               "ref_model_mb": 0.0, "settings": "TRL 1.16.0 DPOTrainer: precomputed"}],
                      "dpo": [{"round": 0, "step_tokens_per_s": [150.0, 150.0], "peak_mem_mb": 40.0,
                               "optim_state_mb": 8.0}],
                      "allo_dense": [{"round": 0, "error": "exit 1: ...\nCUDA out of memory"}]},
           "not_run": {"allo_sparse": "time budget (300 s) reached"}}
    gpu.summarise(res)
    gpu.write(res, tmp_path / "gpu.json")
    out = subprocess.run([sys.executable, "bench/gpu.py", "--table", str(tmp_path / "gpu.json")], cwd=ROOT,
                         env=ENV, capture_output=True, text=True, check=True).stdout
    assert "| dpo | 1 | 150 |" in out and "| allo dpo tokens/s ÷ TRL DPOTrainer's | 1.500 | [1.500, 1.500] | 1 |" in out
    assert "| allo_dense | — | failed: exit 1: ... |" in out
    assert "| allo_sparse | — | not run: time budget (300 s) reached |" in out
    assert "| dpo_zero3 | — | not run: not reached |" in out and "TRL: TRL 1.16.0 DPOTrainer: precomputed" in out
    missing = subprocess.run([sys.executable, "bench/gpu.py", "--table", str(tmp_path / "none.json")], cwd=ROOT,
                             env=ENV, capture_output=True, text=True)
    assert missing.returncode == 1 and "never written" in missing.stdout


def test_a_failing_child_shows_its_stderr_and_log(tmp_path):
    import gpu

    log = tmp_path / "logs" / "child.log"
    with pytest.raises(gpu.ChildFailed) as e:
        gpu.run_child([sys.executable, "-c", "import sys; print('starting'); sys.exit('boom: the real cause')"], log,
                      ENV)
    assert "boom: the real cause" in str(e.value) and str(log) in str(e.value)
    assert "boom: the real cause" in log.read_text()


def test_profile_share_counts_train_loop_samples():
    train = "process 1:\"python\";<module> (allo/cli.py:9);train (allo/train.py:207)"
    lines = [f"{train};before_step (allo/masks/apply.py:140);masked_fill (torch) 3\n",
             f"{train};step (deepspeed/runtime/zero/stage3.py:2100);step (allo/optim.py:94) 5\n",
             f"{train};step (allo/optim.py:61);step (allo/optim.py:87) 2\n",
             f"{train};forward (transformers/models/llama.py:300) 40\n",
             "process 1:\"python\";<module> (allo/cli.py:9);load (allo/model.py:3) 99\n"]  # outside the loop
    total, counts = profile_share.shares(lines)
    assert total == 50
    assert counts == {"GradMasker.before_step": 3, "MaskedAdamW.step": 7, "allo/optim.py:94": 5, "allo/optim.py:87": 2}


def test_run_all_ratios_from_fastest_and_median_rounds():
    import run_all

    steps = {"trl_precomputed": [0.30, 0.20, 0.25], "allo_dpo": [0.10, 0.16, 0.12], "trl_live_reference": [0.4] * 3,
             "allo_improve_10": [0.11, 0.13, 0.30], "zero3_dpo": [0.50, 0.70], "zero3_dpo_masked_10": [0.52, 0.71]}
    for r in (5, 10, 20):
        steps[f"zero3_improve_dense_{r}"], steps[f"zero3_improve_sparse_{r}"] = [0.55, 0.65], [0.6, 0.6]
    res = {"step_s_all": steps, "locate": {"fraction_of_read_bandwidth": 0.1, "locate": {"peak_rss_mb": 900},
                                           "rss_goal_mb": 1000}}
    for name, times in steps.items():
        res[name] = {"step_s": min(times), "pairs_per_s": 8 / min(times), "peak_rss_mb": 600,
                     "optim_state_mb": 1.0 if "sparse" in name else 10.0}
    got = {name: (value, median) for _, name, value, median, _ in run_all.ratios_of(res)}
    value, median = got["ALLO improve (10% mask) / allo DPO, pairs/s"]
    assert value == pytest.approx(0.10 / 0.11) and median == pytest.approx(0.12 / 0.13)
    value, median = got["masked dense 10% / DPO step time (ZeRO-3, 2 ranks)"]
    assert value == pytest.approx(0.55 / 0.50) and median == pytest.approx(0.60 / 0.60)
    assert got["sparse / dense Adam moments at 10%"] == (pytest.approx(0.1), None)
    value, median = got["DPO under the 10% mask / DPO step time (masking alone)"]
    assert value == pytest.approx(0.52 / 0.50) and median == pytest.approx(0.615 / 0.60)
    assert got["locate peak RSS / (2 x largest tensor + 1 GiB)"] == (pytest.approx(0.9), None)
    assert "| 1 | ALLO improve (10% mask) / allo DPO, pairs/s | 0.909 | 0.923 | >= 0.95 |" in run_all.table(
        run_all.ratios_of(res))
