"""Silent degeneration stops loudly (issue 19): the teacher refuses tasks it does not know, and each guard rail
between steps stops (or warns) on a constructed degenerate input, naming the knob that lowers it."""
from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from conftest import torchrun, write_recipe
from safetensors.torch import load_file

from allo.config import ConfigError, GuardsConfig, load_recipe
from allo.guards import GuardStop, check_flagged, check_pairs, check_rewrites, check_stalled
from allo.losses import token_weights
from allo.masks.io import save_masks
from allo.reward.teacher import check_programmatic, python_rewrites
from allo.stages.sampling import make_pairs

G = GuardsConfig()
# The case: unit-conversion word problems, which the arithmetic teacher cannot read.
UNITS = [{"prompt": f"A rope is {n} meters long. How many centimeters is that?", "wrong": f" {n} * 100 = {n}00. The "
          f"answer is {n}40.", "reference": f" {n} * 100 = {n}00. The answer is {n}00.", "answer": f"{n}00"}
         for n in range(2, 9)]


def test_programmatic_teacher_refuses_other_tasks() -> None:
    with pytest.raises(ValueError, match=r"programmatic only understands the tiny recipe's arithmetic .* 7 of 7 "
                                         r"problems are not of that kind .*A rope is 2 meters.*python:MODULE:FUNCTION"):
        check_programmatic(UNITS)
    check_programmatic([{"prompt": "Tom has 12 apples. He buys 7 more. How many apples does Tom have now?"}])


def test_python_teacher_by_import_path(tmp_path, monkeypatch) -> None:
    (tmp_path / "myteacher.py").write_text(
        "def fix(problem, wrong, reference):\n"
        "    if '5 meters' in problem:\n        raise RuntimeError('cannot')\n"
        "    return wrong.replace('40.', '00.') if 'meters' in problem else None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = python_rewrites("python:myteacher:fix")(UNITS)
    assert out[0] == " 2 * 100 = 200. The answer is 200." and out[3] is None  # the raise counts as a failure
    with pytest.raises(ValueError, match=r"cannot import nope from myteacher \(AttributeError"):
        python_rewrites("python:myteacher:nope")
    with pytest.raises(ValueError, match="cannot import fix from no_such_pkg.x"):
        python_rewrites("python:no_such_pkg.x:fix")
    with pytest.raises(ConfigError, match="reward.teacher: 'python:fix' is not programmatic, openai or python:"):
        load_recipe(None, ["reward.teacher=python:fix"])
    assert load_recipe(None, ["reward.teacher=python:myteacher:fix"]).reward.teacher == "python:myteacher:fix"


def test_pairs_guard(caplog) -> None:
    """On make_pairs' own counts: samples all right (or all wrong) give no pair."""
    right = [{"prompt": f"p{i}", "response": f"r{j}", "answer": "1", "correct": True} for i in range(40) for j in range(4)]
    _, stats = make_pairs(right)
    with pytest.raises(GuardStop, match="0 preference pairs from 40 problems, fewer than guards.min_pairs 1"):
        check_pairs(stats, G)
    mixed = right + [{"prompt": "p0", "response": "bad", "answer": "1", "correct": False}]
    _, stats = make_pairs(mixed)
    with caplog.at_level(logging.WARNING):
        check_pairs(stats, G)
    assert "only 2.5% of 40 problems yield a pair" in caplog.text
    check_pairs({"pairs": 0}, GuardsConfig(min_pairs=0))
    with pytest.raises(GuardStop, match="31 preference pairs, fewer than guards.min_pairs 64: sampling found too few "
                                        "problems with both"):
        check_pairs({"pairs": 31}, GuardsConfig(min_pairs=64))


def test_rewrite_guard() -> None:
    with pytest.raises(GuardStop, match=r"0 of 7 teacher rewrites are right \(0.0% < guards.min_rewrite_share 20%; "
                                        r"7 wrong"):
        check_rewrites({"items": 7, "kept": 0, "rewrite_wrong": 7, "teacher_failed": 0}, G)
    check_rewrites({"items": 7, "kept": 2}, G)
    check_rewrites({"items": 7, "kept": 0}, GuardsConfig(min_rewrite_share=0))


def test_flagged_guard(caplog) -> None:
    keep = [1.0] * 500
    for mode in ("indicator", "soft"):
        with pytest.raises(GuardStop, match=r"flags 0.00% of 500 tokens .* 0.00% get a nonzero forget weight"):
            check_flagged(keep, token_weights(torch.tensor(keep), mode).tolist(), G)
    keep = [0.9] * 499 + [0.1]
    shares = check_flagged(keep, token_weights(torch.tensor(keep), "indicator").tolist(), G)
    assert shares == {"flagged_share": 0.002, "weighted_share": 0.002}
    with caplog.at_level(logging.WARNING):
        check_flagged([0.1] * 10, [1.0] * 10, G)
    assert "flags 100.0% of the wrong responses' tokens" in caplog.text


def test_stalled_guard(caplog) -> None:
    with pytest.raises(GuardStop, match="forget: the gradient norm was 0 at all 3 steps"):
        check_stalled("forget", [(0.5, 0.0), (0.4, 0.0), (0.3, 0.0)], G)
    with pytest.raises(GuardStop, match="the loss was 0.693147, unchanged to the last bit"):
        check_stalled("dpo", [(0.6931471805599453, float("nan"))] * 5, G)
    check_stalled("dpo", [(0.6931471805599453, float("nan"))] * 5, GuardsConfig(stalled=False))
    with caplog.at_level(logging.WARNING):
        check_stalled("dpo", [(0.69315, 0.1), (0.69314, 0.1), (0.69313, 0.1)], G)
    assert "dpo: the loss barely moved over 3 steps" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_stalled("dpo", [(0.69, 0.1), (0.6, 0.1), (0.5, 0.1)], G)
    assert caplog.text == ""


def test_forget_on_nothing_stops(tmp_path, tiny_model, pairs_file) -> None:
    """The issue's end state, built directly: forget records whose every token the reward model kept. The stage
    runs, its loss is 0 at every step, and the guard stops it instead of exporting an unchanged model."""
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    data = tmp_path / "forget.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "rejected": r["rejected"], "keep_probs": [1.0] * 99})
                            + "\n" for r in rows))
    mask = tmp_path / "all.safetensors"
    weights = load_file(str(tiny_model / "model.safetensors"))
    save_masks(mask, {k: torch.ones_like(v, dtype=torch.bool) for k, v in weights.items()}, {})
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, data, tmp_path / "out",
                          "forget: {train: {max_steps: 3, global_batch_size: 4, micro_batch_size: 2}}")
    proc = torchrun(["forget", str(recipe), "--mask", str(mask)], nproc=1, check=False, timeout=180)
    assert proc.returncode != 0
    assert re.search(r"allo forget: error: forget: the (gradient norm was 0|loss was 0, unchanged to the last bit over "
                     r"different batches,) at all 3 steps, so the weights did not move", proc.stderr), \
        proc.stderr[-3000:]
    assert not (tmp_path / "out" / "forget" / "model").exists()


def test_reward_data_refuses_an_unknown_task(tmp_path, tiny_model) -> None:
    """`allo run` on unit-conversion pairs with the programmatic teacher stops at reward-data with the sentence."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": u["prompt"], "chosen": u["reference"], "rejected": u["wrong"]})
                             + "\n" for u in UNITS))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, pairs, tmp_path / "out",
                          f"task: {{pairs: {pairs}, family: math}}")
    torchrun(["run", str(recipe), "--only", "pairs"], nproc=1)
    proc = torchrun(["run", str(recipe), "--only", "reward-data"], nproc=1, check=False)
    assert proc.returncode != 0
    assert "programmatic only understands" in proc.stderr and "7 of 7 problems" in proc.stderr, proc.stderr[-3000:]


def test_empty_responses_make_no_pair_and_reach_no_teacher() -> None:
    """Empty sampled responses are counted, never paired and never among the wrong responses the teacher rewrites
    and forget trains on: the pairs the guard counts are the pairs training gets."""
    from allo.stages.sampling import unique_wrong

    samples = [{"prompt": "p", "response": r, "answer": "3", "correct": c}
               for r, c in ((" 3", True), ("", False), ("  ", False), (" 4", False))]
    pairs, stats = make_pairs(samples, max_per_problem=10)
    assert stats["empty_responses"] == 2 and [(p["chosen"], p["rejected"]) for p in pairs] == [(" 3", " 4")]
    wrong, counts = unique_wrong(samples)
    assert [w["rejected"] for w in wrong] == [" 4"] and counts["wrong_samples"] == 1


def test_nonfinite_guard_counts_the_last_steps_in_a_row() -> None:
    from allo.guards import check_nonfinite

    nan, inf = float("nan"), float("inf")
    assert check_nonfinite("improve", [1.0, nan, 2.0, inf], G) == 1
    assert check_nonfinite("improve", [nan, nan, 1.0], G) == 0
    with pytest.raises(GuardStop, match="NaN or Inf at the last 3 steps"):
        check_nonfinite("improve", [1.0, nan, inf, nan], G)
    assert check_nonfinite("improve", [nan] * 9, GuardsConfig(max_nonfinite_steps=0)) == 9


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_a_nan_gradient_skips_its_step_and_the_run_goes_on(tmp_path, tiny_model, pairs_file, nproc) -> None:
    """On the one-rank engine (the optimizer clips) and under ZeRO-3 on two ranks (the optimizer skips on the
    device from DeepSpeed's global norm; the NaN on rank 0 only), a NaN in a selected element's gradient at step 2
    of 4: that step is skipped and counted, the stage finishes, every masked-out element is bit-identical and no
    weight is NaN; NaN at every step stops the stage at guards.max_nonfinite_steps."""
    import os

    from conftest import ENV, ROOT
    from test_masked_training import make_mask

    masks, counts = make_mask(tiny_model)
    mask = tmp_path / "n2.safetensors"
    save_masks(mask, masks, {"counts": counts, "ratio": 10})
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, pairs_file, tmp_path / "run", "improve: {train: {lr: 0.01}}")
    path = os.pathsep.join([str(ROOT / "tests" / "nan_grad"), ENV.get("PYTHONPATH", "")])
    env = dict(ENV, PYTHONPATH=path, ALLO_TEST_NAN_AT="optimizer" if nproc == 1 else "gradients")
    proc = torchrun(["improve", str(recipe), "--mask", str(mask), "--set", "train.max_steps=4"], nproc=nproc,
                    env=dict(env, ALLO_TEST_NAN_STEPS="2"))
    assert "1 step(s) up to step 2 skipped: gradient norm NaN or Inf" in proc.stderr, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "improve" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in rows] == [0, 1, 1, 1]
    start, end = load_file(str(tiny_model / "model.safetensors")), load_file(
        str(tmp_path / "run" / "improve" / "model" / "model.safetensors"))
    for name, m in masks.items():
        assert torch.equal(start[name][~m], end[name][~m]) and torch.isfinite(end[name]).all(), name
    stopped = torchrun(["improve", str(recipe), "--mask", str(mask), "--set", "train.max_steps=4", "--set",
                        f"output_dir={tmp_path / 'run2'}", "--set", "guards.max_nonfinite_steps=2"], nproc=nproc,
                       env=dict(env, ALLO_TEST_NAN_STEPS="1,2,3,4"), check=False)
    assert stopped.returncode != 0 and "NaN or Inf at the last 2 steps" in stopped.stderr, stopped.stderr[-3000:]
