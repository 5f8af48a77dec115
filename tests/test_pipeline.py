"""`allo run`: manifests make completed steps skip, --from reruns from a step on, failures say how to resume."""
from __future__ import annotations

import json

import pytest

from allo.config import load_recipe
from allo.pipeline import Pipeline, StepFailed


def test_failure_names_step_and_resume_command(tmp_path):
    recipe = load_recipe(None, [f"output_dir={tmp_path}", "model.path=some/sft"])
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "manifest.json").write_text(json.dumps({"complete": True}))
    with pytest.raises(StepFailed, match=r"step sample failed: task.problems is not set.*resume with `allo run r.yaml`"):
        Pipeline(recipe, "r.yaml").run()
    with pytest.raises(StepFailed, match="unknown step 'sampel'"):
        Pipeline(recipe, "r.yaml").run(start="sampel")


@pytest.mark.slow
def test_dpo_baseline_takes_the_identical_warmup_run(tmp_path, tiny_model, pairs_file):
    """The paper recipes' DPO baseline is their warm-up run (same pairs, weights, settings and seed): `allo run`
    takes the warm-up's model instead of training the same 7B run twice, and trains once a setting differs."""
    import os

    from conftest import torchrun

    run = tmp_path / "run"
    (run / "pairs").mkdir(parents=True)
    (run / "pairs" / "pairs.jsonl").write_bytes(pairs_file.read_bytes())
    sets = [f"output_dir={run}", f"model.path={tiny_model}", "model.dtype=fp32", "data.template=raw",
            "data.max_length=64", "data.max_prompt_length=32", "train.micro_batch_size=4",
            "warmup.train.global_batch_size=8", "dpo.train.global_batch_size=8", "dpo.train.lr=1.0e-6"]
    args = [x for s in sets for x in ("--set", s)]
    torchrun(["run", "--only", "warmup"] + args, nproc=1)
    torchrun(["run", "--only", "dpo"] + args, nproc=1)
    manifest = json.loads((run / "dpo" / "manifest.json").read_text())
    assert manifest["same_as"] == "warmup" and manifest["trainable_fraction"] == 1.0
    a, b = run / "warmup" / "model" / "model.safetensors", run / "dpo" / "model" / "model.safetensors"
    assert os.path.samefile(a, b) and (run / "dpo" / "metrics.jsonl").exists()
    assert (run / "warmup" / "model" / "README.md").read_text().startswith("---\nlibrary_name: transformers")
    assert "# dpo model, trained with allo" in (run / "dpo" / "model" / "README.md").read_text()
    warmup_weights = a.read_bytes()
    torchrun(["run", "--only", "dpo"] + args + ["--set", "dpo.beta=0.2"], nproc=1)  # now it differs: it trains
    manifest = json.loads((run / "dpo" / "manifest.json").read_text())
    assert "same_as" not in manifest and manifest["steps"] == 4
    assert not os.path.samefile(a, b) and a.read_bytes() == warmup_weights != b.read_bytes()  # warm-up intact


def test_registry_orders_steps_after_their_inputs_and_refuses_cycles():
    from allo.steps import REGISTRY, STEPS, Step, _ordered

    for i, name in enumerate(STEPS):  # every input's step runs earlier
        assert all(STEPS.index(u) < i for u in REGISTRY[name].upstream if u != name), name
    a = Step("a", "", inputs=("b/x",))
    b = Step("b", "", inputs=("c/y",))
    c = Step("c", "")
    assert list(_ordered([a, b, c])) == ["c", "b", "a"]
    with pytest.raises(ValueError, match="form a cycle: a, b"):
        _ordered([a, Step("b", "", inputs=("a/z",))])
    with pytest.raises(ValueError, match="step a: input from unknown step 'b'"):
        _ordered([a])


def _downstream(names: set[str]) -> set[str]:
    from allo.steps import REGISTRY, STEPS

    out = set(names)
    for name in STEPS:  # pipeline order: upstream steps come first
        if any(u in out for u in REGISTRY[name].upstream):
            out.add(name)
    return out


def _complete_all(recipe) -> None:
    """Manifests for every step, as a finished run leaves them (in order: each takes its upstream's output ids)."""
    from allo.manifests import Fingerprints, write_manifest
    from allo.steps import STEPS

    fp = Fingerprints(recipe)
    for name in STEPS:
        write_manifest(fp.out / name, name, {}, fp.of(name))


def test_only_what_changes_a_steps_output_reruns_it(tmp_path):
    """Bookkeeping (trackers, checkpoint cadence and retention, logging interval, timeouts, the preemption marker)
    and another spelling of the same input files change no step's fingerprint, so nothing reruns; a learning
    rate, a mask ratio or a data file reruns exactly that step and what is downstream of it."""
    from allo.manifests import Fingerprints

    data = tmp_path / "data"
    data.mkdir()
    (data / "sft.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    (data / "problems.jsonl").write_text('{"prompt": "a", "answer": "1"}\n')
    (tmp_path / "link").symlink_to(data)
    base = [f"output_dir={tmp_path / 'run'}", f"task.sft_data={data / 'sft.jsonl'}",
            f"task.problems={data / 'problems.jsonl'}"]

    def to_run(*sets: str) -> set[str]:
        return set(Fingerprints(load_recipe("recipes/tiny/recipe.yaml", [*base, *sets])).to_run())

    _complete_all(load_recipe("recipes/tiny/recipe.yaml", base))
    assert to_run() == set()
    for knob in ("train.report_to=[]", "train.report_to=[tensorboard,wandb]", "train.save_every=7",
                 "train.save_every_minutes=30", "train.keep_last=5", "train.log_every=10", "train.tracker_project=x",
                 "train.preempt_marker=/tmp/marker", "improve.train.keep_last=9", "warmup.train.log_every=3",
                 "distributed.timeout_minutes=99", f"task.sft_data={tmp_path / 'link' / 'sft.jsonl'}",
                 f"task.problems={tmp_path / 'link' / '.' / 'problems.jsonl'}"):
        assert to_run(knob) == set(), f"{knob} would rerun a finished step"
    for knob, changed in (("train.lr=3.0e-4", {"sft", "warmup", "reward-train", "forget", "improve", "dpo", "npo",
                                                "simpo", "locate"}),
                          ("improve.train.lr=1.0e-3", {"improve"}),
                          ("locate.improve_ratio=20", {"locate"}),
                          ("forget.beta=0.2", {"forget"})):
        assert to_run(knob) == _downstream(changed), knob
    (data / "problems.jsonl").write_text('{"prompt": "a", "answer": "2"}\n')
    assert to_run() == _downstream({"sample"})


def test_a_rerun_steps_new_outputs_make_its_downstream_stale(tmp_path):
    """`--only sft` writes a new SFT model with the same settings: every step that read the old one is stale, and
    a plain run reruns exactly those."""
    from allo.manifests import Fingerprints, read_manifest, write_manifest

    recipe = load_recipe("recipes/tiny/recipe.yaml", [f"output_dir={tmp_path}"])
    _complete_all(recipe)
    fp = Fingerprints(recipe)
    before = read_manifest(tmp_path / "pairs")["output_id"]
    write_manifest(tmp_path / "pairs", "pairs", {}, fp.of("pairs"))  # what `allo run --only pairs` leaves
    assert read_manifest(tmp_path / "pairs")["output_id"] != before
    assert set(fp.stale()) == {s for s in _downstream({"pairs"}) if s != "pairs" and "pairs" in
                               fp.upstream(s)}  # the direct readers; the rest follow them
    assert set(fp.to_run()) == _downstream({"pairs"}) - {"pairs"}
    assert fp.to_run(chosen={"pairs"}) == []
    assert fp.to_run(forced={"pairs"}, chosen={"pairs"}) == ["pairs"]


def test_resume_hint_is_the_command_that_ran(monkeypatch):
    """The failed step's resume command keeps the user's --set values and launcher: the same run with its
    completed steps skipped, a run limited by --only from the failed step on, the same `allo STEP`; under Slurm
    the submit command with the allo arguments after its `--`."""
    from allo.pipeline import resume_command

    argv = ["run", "r.yaml", "--set", "train.lr=1e-5", "--only", "sample,pairs,eval", "--set", "seed=3"]
    for var in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "GROUP_WORLD_SIZE", "LOCAL_WORLD_SIZE", "ALLO_RESUBMIT"):
        monkeypatch.delenv(var, raising=False)
    assert resume_command(argv, "pairs") == \
        "`allo run r.yaml --set train.lr=1e-5 --set seed=3 --only pairs,eval`"
    assert resume_command(["run", "r.yaml", "--from", "pairs"], "forget") == "`allo run r.yaml`"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resume_command(["sample", "r.yaml", "--set", "a b=c"], "sample") == \
        "`python -m allo.torchrun --nproc_per_node 4 -m allo sample r.yaml --set 'a b=c'`"
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    monkeypatch.setenv("ALLO_RESUBMIT", "slurm/submit.sh r.yaml --nodes 2 --gpus-per-node 8")
    assert resume_command(argv, "pairs") == ("`slurm/submit.sh r.yaml --nodes 2 --gpus-per-node 8 -- --set "
                                             "train.lr=1e-5 --set seed=3 --only pairs,eval`")
    assert resume_command(["run", "r.yaml", "--from", "sft"], "pairs") == \
        "`slurm/submit.sh r.yaml --nodes 2 --gpus-per-node 8`"


@pytest.mark.slow
def test_a_step_failing_on_every_rank_is_shown_once(tmp_path, tiny_model, pairs_file):
    """Both ranks fail the same way (more batch than data): the terminal shows the failure once, from the rank
    that recorded it first; each rank's log file has its own."""
    from conftest import torchrun, write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, pairs_file, tmp_path / "run",
                          f"task: {{pairs: {pairs_file}}}\nwarmup: {{train: {{global_batch_size: 64}}}}")
    proc = torchrun(["run", str(recipe), "--only", "pairs,warmup"], check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("step warmup failed") == 1, proc.stderr[-4000:]
    assert "lower warmup.train.global_batch_size" in proc.stderr


def test_only_a_step_whose_inputs_were_never_made_says_which_step_makes_them(tmp_path, capsys):
    """`--only reward-data` on a new directory: one sentence naming the missing file and the step that writes it,
    exit 2, before any process group starts; nothing claims earlier steps are intact."""
    from allo.cli import main

    assert main(["run", "recipes/tiny/recipe.yaml", "--only", "reward-data", "--set", f"output_dir={tmp_path}",
                 "--set", "model.tokenizer=null", "--set", "model.init=null", "--set", "task.sft_data=null"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'pairs' / 'wrong.jsonl'}: step reward-data reads it and step pairs" in err, err
    assert "Errno" not in err and "intact" not in err


def test_an_ablation_over_a_run_that_predates_a_skipped_step(tmp_path):
    """A run made before a step existed has no record of it: when the recipe skips that step (a matched baseline
    left off), an ablation still reuses everything else and writes the step's own skip record, instead of refusing
    the run as incomplete; a step the recipe does run and the run lacks is still refused."""
    from allo.ablate import REDONE, _downstream_of_redone, link_reused
    from allo.config import load_recipe
    from allo.manifests import Fingerprints, write_manifest
    from allo.steps import REGISTRY

    recipe = load_recipe(None, [f"output_dir={tmp_path / 'run'}"])
    parent, off = tmp_path / "run", set(_downstream_of_redone())
    for name in REGISTRY:  # a finished run, without the steps it predates
        if name in REDONE or name in off or name in ("rft-data", "rft", "rft-dpo"):
            continue
        write_manifest(parent / name, name, {"complete": True}, Fingerprints(recipe, parent).of(name))
    link_reused(parent, tmp_path / "variant", recipe)
    assert (tmp_path / "variant" / "sample").is_symlink() and not (tmp_path / "variant" / "rft").exists()
    with pytest.raises(RuntimeError, match="step rft-data of the run is not complete"):
        link_reused(parent, tmp_path / "variant2", load_recipe(None, [f"output_dir={parent}", "rft.enabled=true"]))


def test_reuse_steps_copies_what_a_run_would_not_redo_and_keeps_its_own(tmp_path):
    """A run at another improve rate starts from copies of a finished run's steps: every step that rate cannot
    reach, with its manifest (so `allo run` skips it and its readers' fingerprints hold), and nothing it reaches.
    Asked again it copies nothing; a step the new run already made itself is kept, with what reads it; the
    finished run is left as it was."""
    from allo.manifests import Fingerprints, read_manifest, reuse_steps, write_manifest
    from allo.steps import STEPS

    parent, child = tmp_path / "run", tmp_path / "run-at3"
    _complete_all(load_recipe("recipes/tiny/recipe.yaml", [f"output_dir={parent}"]))
    before = {n: read_manifest(parent / n) for n in STEPS}
    recipe = load_recipe("recipes/tiny/recipe.yaml", [f"output_dir={child}", "improve.train.lr=1.0e-3"])
    reached = _downstream({"improve"})
    assert reuse_steps(recipe, parent, child) == [n for n in STEPS if n not in reached]
    assert all(read_manifest(child / n) == before[n] for n in STEPS if n not in reached)
    assert set(Fingerprints(recipe).to_run()) == reached
    assert reuse_steps(recipe, parent, child) == []
    assert {n: read_manifest(parent / n) for n in STEPS} == before

    own = tmp_path / "own-sft"  # a run that trained its own SFT model (same settings, other outputs)
    write_manifest(own / "sft", "sft", {}, Fingerprints(recipe, own).of("sft"))
    mine = read_manifest(own / "sft")["output_id"]
    copied = reuse_steps(recipe, parent, own)
    assert read_manifest(own / "sft")["output_id"] == mine and "sft" not in copied
    assert not set(copied) & _downstream({"sft"})
