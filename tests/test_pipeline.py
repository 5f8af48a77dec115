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
    with pytest.raises(StepFailed, match=r"step sample failed: task.problems is not set.*--from sample`"):
        Pipeline(recipe, "r.yaml").run()
    with pytest.raises(StepFailed, match="unknown step 'sampel'"):
        Pipeline(recipe, "r.yaml").run(start="sampel")
