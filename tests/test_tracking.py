"""Experiment trackers (`train.report_to`) in their offline modes: what a stage or an eval logs reaches wandb's offline
run file and Trackio's local database, grouped by the pipeline run; a resumed stage continues its wandb run; a
tracker that is not installed is refused by name before anything runs."""
from __future__ import annotations

import importlib.util
import json
import re
import struct
from pathlib import Path

import pytest

from allo.config import load_recipe
from allo.tracking import check_installed, flatten, log_results, open_trackers


def wandb_history(run_dir: Path) -> tuple[dict, list[dict]]:
    """(run record {group, name, project, id}, history rows) of every offline run file under `run_dir`, read with
    wandb's own protobuf messages from its LevelDB-style log (7-byte file header, 32 KiB blocks, chunked records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    run, rows = {}, []
    for f in sorted(run_dir.rglob("run-*.wandb")):
        data, pos, buf = f.read_bytes(), 7, b""
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if left < 7 or kind == 0:  # block trailer / padding
                pos += left
                continue
            buf += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a FULL record, or the LAST chunk of one
                rec = pb.Record()
                rec.ParseFromString(buf)
                buf = b""
                if rec.WhichOneof("record_type") == "run":
                    run = {"group": rec.run.run_group, "name": rec.run.display_name, "project": rec.run.project,
                           "id": rec.run.run_id}
                elif rec.WhichOneof("record_type") == "history":
                    rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item})
    return run, rows


def trackio_logs(project: str, name: str) -> list[dict]:
    from trackio.sqlite_storage import SQLiteStorage

    return SQLiteStorage.get_logs(project, name)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    return tmp_path


def test_a_stage_logs_to_every_backend_and_resumes_its_wandb_run(offline):
    out = offline / "runs" / "x" / "dpo"
    for attempt, steps in ((False, [1, 2]), (True, [3, 4])):
        trackers = open_trackers(["tensorboard", "wandb", "trackio"], out, "allo-test", "runs/x", "dpo",
                                 {"train": {"lr": 1e-6}}, resume=attempt)
        for s in steps:
            for t in trackers:
                t.log({"loss": 1.0 / s}, s)
        for t in trackers:
            t.finish()
    run, rows = wandb_history(out / "wandb")
    assert run["group"] == "runs/x" and run["name"] == "dpo" and run["project"] == "allo-test"
    assert run["id"] == json.loads((out / "tracking.json").read_text())["wandb"]
    # offline-run-DATE_TIME-ID, with "-1" added when both attempts start within one second
    ids = {re.fullmatch(r"offline-run-\d{8}_\d{6}-(\w+?)(-\d+)?", p.name).group(1)
           for p in (out / "wandb").glob("offline-run-*")}
    assert len(ids) == 1, f"one wandb run id: {ids}"
    assert [(r["_step"], r["loss"]) for r in rows] == [(s, 1.0 / s) for s in (1, 2, 3, 4)]
    assert [(r["step"], r["loss"]) for r in trackio_logs("allo-test", "runs/x/dpo")] == \
        [(s, 1.0 / s) for s in (1, 2, 3, 4)]
    assert list((out / "tb").glob("events.out.tfevents.*"))


def test_eval_results_are_one_run_of_the_group(offline):
    results = {"accuracy": {"SFT": 0.25, "+ALLO": 0.5}, "table2": {"SFT": {"gsm8k": 12.5, "note": "x"}},
               "table3": {"_judge": {"model": "j"}}}
    assert flatten(results) == {"accuracy/SFT": 0.25, "accuracy/+ALLO": 0.5, "table2/SFT/gsm8k": 12.5}
    log_results(["wandb", "trackio"], offline / "run" / "eval", "allo-test", "run", "eval", results)
    run, rows = wandb_history(offline / "run" / "eval" / "wandb")
    assert (run["group"], run["name"]) == ("run", "eval")
    assert {k: v for k, v in rows[0].items() if not k.startswith("_")} == flatten(results)
    assert {k: v for k, v in trackio_logs("allo-test", "run/eval")[0].items()
            if k not in ("step", "timestamp")} == flatten(results)


def test_a_tracker_that_is_not_installed_is_named(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(RuntimeError, match=r"improve\.train\.report_to: wandb is not installed \(pip install wandb\)"):
        check_installed(load_recipe(None, ["improve.train={report_to: [wandb]}"]).stage_train("improve").report_to,
                        "improve.train.report_to")
    from allo.preflight import check_trackers

    with pytest.raises(RuntimeError, match=r"^improve\.train\.report_to: wandb"):
        check_trackers(load_recipe(None, ["improve.train={report_to: [wandb]}"]))
    check_trackers(load_recipe(None, ["train.report_to=[tensorboard, trackio]"]))  # installed ones pass
