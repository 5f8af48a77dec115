"""Recipe validation: unknown keys, wrong types and out-of-range values name file, line, key and what is allowed."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from allo.config import ConfigError, Recipe, describe, load_recipe, parse_override

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_file_line_and_allowed(tmp_path):
    p = write(tmp_path, "seed: 1\ntrain:\n  lr: 1e-6\n  learning_rate: 3\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert f"{p}:4: train.learning_rate: unknown key" in msg and "global_batch_size" in msg


def test_wrong_type_and_range(tmp_path):
    with pytest.raises(ConfigError, match=r"r.yaml:2: train.global_batch_size: 'big' is not int"):
        load_recipe(write(tmp_path, "train:\n  global_batch_size: big\n"))
    with pytest.raises(ConfigError, match=r"r.yaml:2: improve.epsilon: 1.5 is out of range \(must be <= 1\)"):
        load_recipe(write(tmp_path, "improve:\n  epsilon: 1.5\n"))
    with pytest.raises(ConfigError, match=r"forget.token_weight: 'hard' is not one of 'indicator', 'soft', 'raw'"):
        load_recipe(write(tmp_path, "forget: {token_weight: hard}\n"))
    with pytest.raises(ConfigError, match=r"r.yaml:1: warmup.train.warmup: unknown key"):
        load_recipe(write(tmp_path, "warmup: {train: {warmup: 3}}\n"))


def test_cross_field_checks_fail_before_work(tmp_path):
    with pytest.raises(ConfigError, match=r"r.yaml:1: data.max_prompt_length: 600 leaves no room"):
        load_recipe(write(tmp_path, "data: {max_prompt_length: 600, max_length: 512}\n"))


def test_scientific_notation_is_a_float(tmp_path):
    assert load_recipe(write(tmp_path, "train: {lr: 5e-7}\n")).train.lr == 5e-7


def test_set_overrides_and_their_errors(tmp_path):
    r = load_recipe(write(tmp_path, "seed: 1\n"), ["train.lr=5e-7", "improve.noise_side=both", "seed=3"])
    assert (r.train.lr, r.improve.noise_side, r.seed) == (5e-7, "both", 3)
    with pytest.raises(ConfigError, match=r"--set train.lr: train.lr: 'fast' is not float"):
        load_recipe(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("train.lr")


def test_stage_train_resolves_by_specificity(tmp_path):
    r = load_recipe(None)
    assert r.stage_train("improve").lr == 5e-6 and r.stage_train("improve").global_batch_size == 128
    r = load_recipe(None, ["train.global_batch_size=8"])  # the shared section beats spec defaults
    assert r.stage_train("improve").global_batch_size == 8 and r.stage_train("forget").lr == 5e-7
    assert r.stage_train("reward").global_batch_size == 8 and r.stage_train("reward").lr == 2e-5
    r = load_recipe(None, ["train.lr=1e-5", "forget.train.lr=2e-7"])  # the stage section beats the shared one
    assert r.stage_train("forget").lr == 2e-7 and r.stage_train("improve").lr == 1e-5


def test_explicit_train_keys_survive_replace():
    """`dataclasses.replace` (how the reward model's recipe is made) keeps which train keys the recipe set."""
    import dataclasses

    r = load_recipe(None, ["train.global_batch_size=8"])
    r2 = dataclasses.replace(r, data=dataclasses.replace(r.data, template="raw"))
    assert r2.stage_train("improve").global_batch_size == 8 and r2.stage_train("reward").global_batch_size == 8
    assert "train_keys" not in __import__("allo.config", fromlist=["to_dict"]).to_dict(r)
    assert not any(line.startswith("train_keys") for line in describe(Recipe))
    with pytest.raises(ConfigError, match="train_keys: unknown key"):
        load_recipe(None, ["train_keys=[lr]"])


def test_settings_that_were_environment_variables_are_knobs(tmp_path):
    doc = "\n".join(describe(Recipe))
    for key in ("locate.threads", "locate.collect_cap", "generation.backend", "generation.tensor_parallel",
                "generation.dtype", "generation.gpu_memory_utilization", "generation.max_model_len",
                "train.preempt_marker"):
        assert f"\n{key} (" in doc, key
    with pytest.raises(ConfigError, match=r"model.attn_implementation: 'flash_attn' is not one of 'sdpa', 'eager'"):
        load_recipe(None, ["model.attn_implementation=flash_attn"])
    with pytest.raises(ConfigError, match="generation.gpu_memory_utilization: 1.5 is out of range"):
        load_recipe(None, ["generation.gpu_memory_utilization=1.5"])


def test_every_recipe_in_the_repo_validates():
    recipes = sorted(ROOT.glob("recipes/**/*.yaml"))
    assert recipes, "no recipes found"
    for path in recipes:
        load_recipe(path)


def test_every_knob_is_documented():
    lines = describe(Recipe)
    assert all(line.split(": ", 1)[1].strip() for line in lines if not line.split(" (")[0].endswith(".train"))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_random_yaml_never_crashes_with_a_bare_traceback(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    p.write_text(text)
    try:
        load_recipe(p)
    except ConfigError as e:
        assert str(p) in str(e)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["lr", "epochs", "global_batch_size", "warmup_ratio", "scheduler", "x"]),
                       st.one_of(st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=5), st.none(),
                                 st.booleans()), max_size=4))
def test_random_train_sections_validate_or_explain(values):
    import yaml

    try:
        r = load_recipe(None, [f"train.{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                               for k, v in values.items()])
    except ConfigError as e:
        assert "train." in str(e)
    else:
        assert r.train.lr > 0 and r.train.global_batch_size >= 1


def test_matched_baseline_objective_takes_its_own_beta():
    """A matched DPO baseline trains with the dpo section's objective, its own β where it sets one (so that each
    baseline's β is tuned apart) and, for DPO+NLL, its own NLL weight; DPO's own section is never changed."""
    from allo.stages.matched import dpo_recipe

    r = load_recipe(None, ["dpo.beta=0.2", "dpo.label_smoothing=0.1", "dpo_steps.beta=0.05", "dpo_nll.nll_weight=0.5"])
    steps = dpo_recipe(r, "dpo_steps").dpo
    assert (steps.beta, steps.label_smoothing, steps.nll_weight) == (0.05, 0.1, 0.0)
    assert dpo_recipe(r, "npo_dpo").dpo.beta == 0.2  # unset: the dpo section's
    nll = dpo_recipe(r, "dpo_nll").dpo
    assert (nll.beta, nll.nll_weight) == (0.2, 0.5) and r.dpo.nll_weight == 0.0
    with pytest.raises(ValueError, match="dpo_steps.beta"):
        load_recipe(None, ["dpo_steps.beta=0"])
