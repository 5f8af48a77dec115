"""`make experiment`'s protocol, with the training runs stubbed (a function of the learning rates stands in for
accuracy): tuning reads only the development split (seed 0's test file does not exist yet, and no tuning run names
it), every method gets the same grid, the chosen rate is the development split's best, and the test split is
evaluated once per seed at the chosen rates, reported with the paired ALLO − DPO comparison."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes" / "tiny"))
import experiment  # noqa: E402


def test_tuning_never_reads_the_test_split(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "OUT", tmp_path)
    base = experiment.base_rates([])
    calls = []

    def fake_allo(stage, sets, *extra, ranks=2):
        kv = dict(s.split("=", 1) for s in sets)
        run = Path(kv["output_dir"])
        calls.append({"eval": kv["task.eval"], "test_exists": (run / "data" / "test.jsonl").exists(),
                      "sets": list(sets)})
        factor = {s: float(kv[f"{s}.train.lr"]) / base[s] for s in base}
        # dev favours the largest rate for DPO, the smallest for ALLO, x1 for the rest; test gives ALLO +1 point
        score = {"+DPO": factor["dpo"], "+ALLO": 1 / factor["improve"], "+NPO": -abs(factor["npo"] - 1),
                 "+SimPO": -abs(factor["simpo"] - 1)}
        acc = {"SFT": 0.3, **{k: 0.4 + 0.01 * v for k, v in score.items()}}
        if kv["task.eval"].endswith("test.jsonl"):
            acc = {"SFT": 0.3, "+DPO": 0.5, "+NPO": 0.45, "+SimPO": 0.46, "+ALLO": 0.51 + 0.001 * int(kv["seed"])}
        (run / "eval").mkdir(parents=True, exist_ok=True)
        (run / "eval" / "results.json").write_text(json.dumps({"accuracy": acc}))

    monkeypatch.setattr(experiment.demo, "allo", fake_allo)
    experiment.main(["--quick", "--seeds", "0", "1", "2"])
    tuning, testing = calls[:len(experiment.GRID)], calls[len(experiment.GRID):]
    assert all(c["eval"].endswith("seed0/data/dev.jsonl") and not c["test_exists"] for c in tuning)
    assert not any("test.jsonl" in s for c in tuning for s in c["sets"])
    assert [c["eval"].rsplit("/", 3)[-3] for c in testing] == ["seed0", "seed1", "seed2"]
    assert all(c["eval"].endswith("test.jsonl") and c["test_exists"] for c in testing)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["tuning"]["best_factor"] == {"+DPO": max(experiment.GRID), "+NPO": 1.0, "+SimPO": 1.0,
                                               "+ALLO": min(experiment.GRID)}
    chosen = {s.split("=")[0]: float(s.split("=")[1]) for s in testing[0]["sets"] if ".train.lr=" in s}
    assert abs(chosen["dpo.train.lr"] / base["dpo"] - max(experiment.GRID)) < 1e-3
    assert abs(chosen["forget.train.lr"] / base["forget"] - min(experiment.GRID)) < 1e-3
    text = (tmp_path / "table.md").read_text()
    assert "ALLO − DPO per seed: +1.0, +1.1, +1.2" in text and "ALLO ahead on 3 of 3 seeds" in text
