"""A cluster user's first day: nothing silent, nothing written where it was not asked for, and every suggestion a
change from what is already set."""
from __future__ import annotations

import json
import re
import subprocess
import sys


from conftest import ENV, ROOT
from allo.cli import main


def _llama7b(tmp_path):
    """A directory holding only a Llama-2-7B config.json (what `allo plan` reads)."""
    from transformers import LlamaConfig

    d = tmp_path / "llama7b"
    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000).to_json_file(str(d.mkdir() or d / "config.json"))
    return d


def test_plan_refuses_memory_without_a_unit(capsys):
    assert main(["plan", "recipes/tiny/recipe.yaml", "--gpu-memory", "80"]) == 2
    assert "give a unit, e.g. 80GiB" in capsys.readouterr().err


def test_plan_never_suggests_what_is_already_set(tmp_path, capsys):
    """The math recipe already sets gradient checkpointing; on 40 GiB GPUs its fixes change something else."""
    model = _llama7b(tmp_path)
    code = main(["plan", "recipes/math/recipe.yaml", "--set", f"model.path={model}", "--set",
                 f"model.tokenizer={model}", "--gpu-memory", "24GiB", "--gpus-per-node", "2", "--problems", "7473",
                 "--json"])
    plan = json.loads(capsys.readouterr().out)
    fixes = [s["fix"] for s in plan["steps"] if s.get("fix")]
    assert code == 3 and fixes, plan
    for fix in fixes:
        assert "gradient_checkpointing" not in fix and "micro_batch_size=4 " not in fix + " ", fix


def test_report_on_a_directory_without_a_run_says_so(tmp_path, capsys):
    (tmp_path / "seed0" / "sft").mkdir(parents=True)
    (tmp_path / "seed0" / "sft" / "manifest.json").write_text("{}")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no run here" in err and str(tmp_path / "seed0") in err
    assert not (tmp_path / "report").exists()


def test_commands_without_a_recipe_write_nothing_here(tmp_path):
    """`allo locate` (and every step) with no recipe: an error, and nothing created in the working directory."""
    for args in (["locate"], ["improve"], ["run", "--only", "pairs"]):
        proc = subprocess.run([sys.executable, "-m", "allo", *args], cwd=tmp_path, env=dict(ENV, PYTHONPATH=str(ROOT)),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0, args
        assert list(tmp_path.iterdir()) == [], (args, list(tmp_path.iterdir()))


def test_set_typo_is_blamed_on_set_not_on_the_file(capsys):
    assert main(["config", "recipes/tiny/recipe.yaml", "--set", "trian.lr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("allo config: error: --set trian.lr: trian: unknown key"), err


def test_one_error_line_under_torchrun(tmp_path):
    """Both ranks find the same bad input; the terminal gets rank 0's line and one line from the launcher."""
    from allo.launch import torchrun_command

    proc = subprocess.run(torchrun_command(["improve", "recipes/tiny/recipe.yaml", "--set",
                                            f"output_dir={tmp_path}"], 2), cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 2 and lines[0].startswith("allo improve: error:") and "Traceback" not in proc.stderr, lines
    assert re.match(r"torchrun: rank [01] failed first \(exit 2\)", lines[1]), lines


def test_an_offline_benchmark_stops_the_run_before_its_first_step(tmp_path, tiny_model, pairs_file):
    """With no hub, `allo run` on a recipe whose eval reads gsm8k from the hub stops before training, in one
    sentence that names the benchmark and both ways to supply it."""
    from conftest import write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, pairs_file, tmp_path / "run",
                          "task: {benchmarks: [gsm8k]}")
    proc = subprocess.run([sys.executable, "-m", "allo", "run", str(recipe)], cwd=ROOT,
                          env=dict(ENV, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf")), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert "task.benchmarks: gsm8k" in err and "gsm8k=FILE" in err and "hf download openai/gsm8k" in err, err
    assert not any((tmp_path / "run").glob("*/manifest.json")), "a step ran before the check"


def test_suites_check_their_files_and_benchmarks_before_any_model(tmp_path, capsys, monkeypatch):
    from allo.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)  # no data/ here
    assert main(["eval", "suite", str(ROOT / "eval/instruct.yaml"), "--model", "m=/nowhere"]) == 2
    err = capsys.readouterr().err
    assert "alpaca_eval: data/instruct/alpaca_eval_gpt4_1106_preview_outputs.json: no such file" in err
    assert "Where the files come from" in err
    assert main(["eval", "suite", str(ROOT / "eval/math.yaml"), "--model", "m=/nowhere"]) == 2
    err = capsys.readouterr().err
    assert "gsm8k=FILE" in err and "hf download openai/gsm8k" in err
    readme = (ROOT / "eval/README.md").read_text()
    for name in ("alpaca_eval_gpt4_1106_preview_outputs.json", "arena-hard-v0.1", "MATH_test.jsonl", "ecqa_test",
                 "strategyqa_dev", "mawps_test", "tabmwp_test"):
        assert name in readme.split("## Where the files come from")[1].split("\n## ")[0], name


def test_the_judge_is_checked_before_the_first_step(tmp_path, tiny_model, pairs_file, shared_dir):
    from conftest import write_recipe

    alpaca = shared_dir / "benchdata/alpaca_eval/gpt4_1106_preview_model_outputs.json"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, pairs_file, tmp_path / "run",
                          f"task: {{alpaca_eval: {alpaca}, judge: {{base_url: 'https://judge.example/v1', "
                          f"model: j, api_key_env: ALLO_TEST_NO_SUCH_KEY}}}}")
    proc = subprocess.run([sys.executable, "-m", "allo", "run", str(recipe)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "ALLO_TEST_NO_SUCH_KEY is not set" in proc.stderr, proc.stderr[-1500:]


def test_submit_dry_run_shows_the_plan_or_why_not(tmp_path):
    """Offline without the model's config: the reason (refused, as the submission would be, unless --force); with
    it: the verdict, GPU-hours unknown until the problem count is known (not 0.0), then a number. The recipe's data
    and key are missing here, so every dry run also lists those problems and exits 2, with the plan beside them."""
    env = dict(ENV, ALLO_PYTHON=sys.executable, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               ALLO_LOG_DIR=str(tmp_path / "logs"))
    env.pop("OPENAI_API_KEY", None)
    base = ["bash", "slurm/submit.sh", "recipes/math/recipe.yaml", "--nodes", "2", "--gpus-per-node", "8",
            "--dry-run"]

    def plan_line(*extra, refused=False):
        proc = subprocess.run(base + list(extra), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stdout[-1500:] + proc.stderr[-1500:]
        assert "data/math/sft.jsonl: no such data file" in proc.stderr and "OPENAI_API_KEY" in proc.stderr
        assert ("--force" in proc.stderr) == refused  # a dry run refuses what a submission would, saying so
        return next(x for x in proc.stdout.splitlines() if x.startswith("memory plan:"))

    offline = plan_line(refused=True)
    assert "cannot be made" in offline and "hf download meta-llama/Llama-2-7b-hf config.json" in offline
    assert "cannot be made" in plan_line("--force")
    model = _llama7b(tmp_path)
    sets = ["--", "--set", f"model.path={model}", "--set", f"model.tokenizer={model}"]
    assert "GPU-hours unknown (no task.problems file yet: pass --problems N)" in plan_line(*sets)
    assert re.search(r"about [0-9.]+ GPU-hours", plan_line("--problems", "7473", *sets))
    assert not (tmp_path / "logs").exists()


def test_an_uncached_hub_dataset_is_refused_offline(tmp_path, tiny_model, monkeypatch, capsys):
    from allo.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code = main(["dpo", "--set", f"model.path={tiny_model}", "--set", "data.train=someorg/some-pairs",
                 "--set", f"output_dir={tmp_path}"])
    assert code == 2
    assert "someorg/some-pairs: a hub dataset that is not in the local cache" in capsys.readouterr().err


def test_report_on_a_run_without_eval_says_so(tmp_path, capsys, caplog):
    """A run whose steps have not reached eval: the plots it can make, and a sentence that the tables need the eval
    step; a run with nothing yet: an error (exit 2), not silence."""
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "manifest.json").write_text('{"complete": true}')
    assert main(["report", str(tmp_path)]) == 2
    assert "nothing to report yet" in capsys.readouterr().err
    (tmp_path / "sft" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    assert main(["report", str(tmp_path)]) == 0
    assert "curves.png" in capsys.readouterr().out
    assert "no tables: the eval step has not written results" in caplog.text
