"""The reduced demo (`recipes/tiny/demo.py --quick`, one seed): every stage runs and writes its outputs.
Accuracies are not checked: they are whatever the tiny run measures."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ENV, ROOT, torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run():
    run = ROOT / "runs" / "tiny-quick" / "seed7"
    shutil.rmtree(run, ignore_errors=True)
    proc = subprocess.run([sys.executable, "recipes/tiny/demo.py", "--quick", "--seeds", "7"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run, proc


def test_quick_demo_runs_every_stage(quick_run):
    run, proc = quick_run
    for stage in ("sft", "warmup", "reward-train", "forget", "improve", "dpo", "npo", "simpo"):
        manifest = json.loads((run / stage / "manifest.json").read_text())
        assert manifest["complete"] and (run / stage / "model" / "model.safetensors").exists(), stage
        assert (run / stage / "metrics.jsonl").exists()
    for m in ("n1", "n2"):
        assert (run / "locate" / f"{m}.safetensors").exists()
    # the ALLO stages moved only their masks: forget vs its input (SFT), improve vs its input (forget)
    from allo.masks.io import load_masks

    for stage, init, mask in (("forget", "sft", "n1"), ("improve", "forget", "n2")):
        before = load_file(str(run / init / "model" / "model.safetensors"))
        after = load_file(str(run / stage / "model" / "model.safetensors"))
        keep = load_masks(run / "locate" / f"{mask}.safetensors")
        for name, m in keep.items():
            assert torch.equal(before[name][~m], after[name][~m]), f"{stage}: {name} moved outside {mask}"
    from allo.steps import STEPS

    assert all(json.loads((run / s / "manifest.json").read_text())["complete"] for s in STEPS)
    forget = [json.loads(x) for x in (run / "reward-score" / "forget.jsonl").read_text().splitlines()]
    assert forget and all(0.0 <= p <= 1.0 for rec in forget for p in rec["keep_probs"])
    result = json.loads((run / "demo_result.json").read_text())
    assert set(result["accuracy"]) == {"SFT", "+DPO", "+NPO", "+SimPO", "+ALLO"}
    for label, kinds in result["by_kind"].items():  # the mechanism check: planted-error problems and the rest
        (right_w, n_w), (right_o, n_o) = kinds["with"], kinds["without"]
        assert n_w > 0 and n_o > 0 and (right_w + right_o) / (n_w + n_o) == pytest.approx(result["accuracy"][label])
    assert '| with a "gives away" step | without |' in proc.stdout
    assert "| +ALLO |" in proc.stdout
    # one process per rank runs every stage: DeepSpeed's per-engine warning once, each stage under its step's name
    text = proc.stdout + proc.stderr
    assert text.count("untested optimizer") == 1, text.count("untested optimizer")
    assert "stage reward-train:" in text and "stage sft: " in text
    for png in ("curves.png", "masks.png", "token_rewards.png"):
        assert (run / "report" / png).stat().st_size > 1000, png


def test_manifests_skip_and_from_reruns(quick_run):
    """After a finished run, `allo run` on the recipe the demo wrote for it skips every step (the run continues by
    hand); `--from simpo` reruns simpo and every step after it; a changed setting reruns exactly its step and the
    steps downstream."""
    from allo.steps import STEPS

    run, _ = quick_run
    args = ["run", str(run / "recipe.yaml")]
    assert "--from STEP" in (run / "recipe.yaml").read_text()
    before = {s: os.path.getmtime(run / s / "manifest.json") for s in STEPS}
    proc = torchrun(args)
    assert proc.stderr.count("complete (") == len(STEPS)
    assert {s: os.path.getmtime(run / s / "manifest.json") for s in STEPS} == before
    torchrun(args + ["--from", "simpo"])
    after = {s: os.path.getmtime(run / s / "manifest.json") for s in STEPS}
    rerun = {s for s in STEPS if after[s] != before[s]}
    assert rerun == set(STEPS[STEPS.index("simpo"):]), rerun  # simpo, the matched baselines (off: skips), eval
    torchrun(args + ["--set", "improve.beta=0.2"])  # a changed setting reruns its step and everything downstream
    changed = {s for s in STEPS if os.path.getmtime(run / s / "manifest.json") != after[s]}
    # the step-matched baselines (off here) read improve's step count: each records its skip again
    assert changed == {"improve", "dpo-steps", "dpo-pairs-rewrites", "eval"}, changed


def test_ablate_controls_over_the_run(quick_run):
    """`allo ablate` over the finished run: each variant reuses the run's steps (symlinks; the run's own files are
    not touched), its masks have the asked ratio and origin, without-forget trains improve from the SFT model, and
    `allo report` tables and plots them."""
    from allo.masks.io import load_masks
    from allo.steps import STEPS

    run, _ = quick_run
    sets = ["forget.train.max_steps=2"]
    before = {s: os.path.getmtime(run / s / "manifest.json") for s in STEPS}
    torchrun(["ablate", str(run / "recipe.yaml"), *[x for s in sets for x in ("--set", s)],
              "--ratios", "20", "5:25", "--without", "forget", "locate", "token-reward", "noise-mask",
              "--mask", "random"])
    refused = torchrun(["ablate", str(run / "recipe.yaml"), *[x for s in sets for x in ("--set", s)],
                        "--set", "warmup.train.lr=0.5", "--ratios", "30"], check=False)
    assert refused.returncode != 0 and "the ablation's settings change step warmup" in refused.stderr
    assert {s: os.path.getmtime(run / s / "manifest.json") for s in STEPS} == before, "the run itself was rewritten"
    ab = run / "ablate"
    assert sorted(p.name for p in ab.iterdir()) == ["mask-random", "ratio-20", "ratio-5-25", "without-forget",
                                                   "without-locate", "without-noise-mask", "without-token-reward"]
    for variant in ab.iterdir():
        for step in ("sft", "sample", "pairs", "warmup", "reward-train", "reward-score", "dpo"):
            assert (variant / step).resolve() == (run / step).resolve() and (variant / step).is_symlink(), step
        res = json.loads((variant / "eval" / "results.json").read_text())
        assert list(res["accuracy"]) == ["+ALLO"]  # ALLO's eval only
    parent = {m: json.loads((run / "locate" / f"{m}.json").read_text()) for m in ("n1", "n2")}
    for m in ("n1", "n2"):
        sweep = json.loads((ab / "ratio-20" / "locate" / f"{m}.json").read_text())
        assert sweep["ratio"] == 20 and abs(sweep["achieved_ratio"] - 20) < 0.01 and sweep["selection"] == "top"
        rnd = json.loads((ab / "mask-random" / "locate" / f"{m}.json").read_text())
        assert rnd["selection"] == "random" and rnd["random_seed"] == 7
        assert abs(rnd["achieved_ratio"] - parent[m]["achieved_ratio"]) < 0.01, "a random mask of the same size"
    pair = {m: json.loads((ab / "ratio-5-25" / "locate" / f"{m}.json").read_text())["ratio"] for m in ("n1", "n2")}
    assert pair == {"n1": 5, "n2": 25}
    for stage in ("forget", "improve"):  # without locate: every parameter trains
        assert json.loads((ab / "without-locate" / stage / "manifest.json").read_text())["trainable_fraction"] == 1.0
    last = lambda variant, stage: json.loads(  # noqa: E731
        (ab / variant / stage / "metrics.jsonl").read_text().splitlines()[-1])
    assert last("without-token-reward", "forget")["weighted_token_fraction"] == 1.0, "uniform weights: every token"
    assert last("without-noise-mask", "improve")["rejected_kept_fraction"] == 1.0, "every rejected token kept"
    top = load_masks(run / "locate" / "n2.safetensors")
    rnd = load_masks(ab / "mask-random" / "locate" / "n2.safetensors")
    overlap = sum(int((top[n] & rnd[n]).sum()) for n in top) / sum(int(top[n].sum()) for n in top)
    assert abs(overlap - parent["n2"]["ratio"] / 100) < 0.05, f"a random mask overlaps the top by chance: {overlap}"
    wf = ab / "without-forget"
    assert json.loads((wf / "forget" / "manifest.json").read_text())["skipped"].startswith("forget.enabled is false")
    assert (wf / "forget" / "model").resolve() == (run / "sft" / "model").resolve()
    sft = load_file(str(run / "sft" / "model" / "model.safetensors"))
    improved = load_file(str(wf / "improve" / "model" / "model.safetensors"))
    keep = load_masks(wf / "locate" / "n2.safetensors")
    assert all(torch.equal(sft[n][~keep[n]], improved[n][~keep[n]]) for n in keep), "improve started from SFT"
    tables = (run / "report" / "tables.md").read_text()
    assert all(f"| {v} |" in tables for v in ("run", "ratio-20", "without-forget", "mask-random"))
    for png in ("ablation_ratios.png", "ablation_controls.png"):
        assert (run / "report" / png).stat().st_size > 1000, png


def test_matched_baselines_over_the_run(quick_run):
    """`make experiment`'s matched baselines on the finished run: DPO-steps takes as many optimizer steps as forget
    and improve did (their metrics.jsonl), NPO-DPO starts from the NPO model, DPO-rewrites trains on the teacher's
    right rewrites of the wrong responses; an ablation of a run with them switches DPO-steps off."""
    from allo.tasks import is_correct

    run, _ = quick_run
    on = [x for s in ("dpo_steps", "npo_dpo", "dpo_rewrites") for x in ("--set", f"{s}.enabled=true")]
    torchrun(["run", str(run / "recipe.yaml"), *on, "--only", "dpo-steps,npo-dpo,dpo-rewrites"])
    last = lambda stage: json.loads((run / stage / "metrics.jsonl").read_text().splitlines()[-1])["step"]  # noqa: E731
    manifest = lambda stage: json.loads((run / stage / "manifest.json").read_text())  # noqa: E731
    assert last("dpo-steps") == last("forget") + last("improve") == manifest("dpo-steps")["steps"]
    assert manifest("dpo-steps")["examples"] == manifest("dpo")["examples"], "the same pairs, more passes"
    assert manifest("npo-dpo")["init"] == str(run / "npo" / "model") and last("npo-dpo") == last("dpo")
    pairs = [json.loads(x) for x in (run / "reward-data" / "pairs.jsonl").read_text().splitlines()]
    answers = {json.loads(x)["prompt"]: json.loads(x)["answer"] for x in
               (run / "data" / "problems.jsonl").read_text().splitlines()}
    assert len(pairs) == manifest("reward-data")["kept"]
    assert manifest("dpo-rewrites")["examples"] == sum(bool(p["rejected"].strip()) for p in pairs)  # empty: skipped
    assert all(is_correct(p["chosen"], answers[p["prompt"]], "math") for p in pairs)
    assert not any(is_correct(p["rejected"], answers[p["prompt"]], "math") for p in pairs)
    torchrun(["ablate", str(run / "recipe.yaml"), *on, "--set", "forget.train.max_steps=2", "--without", "locate"])
    variant = run / "ablate" / "without-locate"
    assert manifest("dpo-steps")["steps"] == last("forget") + last("improve"), "the run's own is untouched"
    assert json.loads((variant / "dpo-steps" / "manifest.json").read_text())["skipped"].startswith("dpo_steps.enabled")
    assert (variant / "npo-dpo").resolve() == (run / "npo-dpo").resolve()


def test_baselines_with_allo_information(quick_run):
    """The baselines given what ALLO is given: DPO on the sampled pairs plus the rewrite pairs for forget + improve's
    steps; DPO+NLL (its NLL in the metrics, at dpo_nll's weight); SFT on the sampled problems' gold references (RFT),
    and DPO from it. Each manifest counts its compute."""
    run, _ = quick_run
    on = [x for s in ("dpo_pairs_rewrites", "dpo_nll", "rft", "rft_dpo") for x in ("--set", f"{s}.enabled=true")]
    torchrun(["run", str(run / "recipe.yaml"), *on, "--set", "dpo_nll.nll_weight=0.5", "--set", "rft_dpo.beta=0.3",
              "--only",
              "pairs-rewrites,dpo-pairs-rewrites,dpo-nll,rft-data,rft,rft-dpo"])
    manifest = lambda stage: json.loads((run / stage / "manifest.json").read_text())  # noqa: E731
    lines = lambda path: (run / path).read_text().splitlines()  # noqa: E731
    assert len(lines("pairs-rewrites/pairs.jsonl")) == len(lines("pairs/pairs.jsonl")) + len(
        lines("reward-data/pairs.jsonl"))
    assert manifest("dpo-pairs-rewrites")["steps"] == manifest("forget")["steps"] + manifest("improve")["steps"]
    nll = [json.loads(x) for x in lines("dpo-nll/metrics.jsonl")]
    trained_with = lambda step: yaml.safe_load((run / step / "config.yaml").read_text())["dpo"]  # noqa: E731
    assert all("nll/chosen" in r for r in nll) and trained_with("dpo-nll")["nll_weight"] == 0.5
    assert trained_with("rft-dpo")["beta"] == 0.3 and trained_with("dpo-nll")["beta"] == 0.1  # own β, else dpo's
    problems = {json.loads(x)["prompt"]: json.loads(x)["reference"] for x in lines("data/problems.jsonl")}
    sampled = {json.loads(x)["prompt"] for x in lines("sample/samples.jsonl")}
    rft = [json.loads(x) for x in lines("rft-data/sft.jsonl")]
    assert len(rft) == len(sampled) and all(r["response"] == problems[r["prompt"]] for r in rft)
    assert manifest("rft")["examples"] == len(rft) and manifest("rft-dpo")["init"] == str(run / "rft" / "model")
    for step in ("dpo-pairs-rewrites", "dpo-nll", "rft", "rft-dpo"):
        passes = manifest(step)["passes"]
        assert passes["backward"] > 0 and passes["forward"] >= passes["backward"], step
