"""Bad inputs stop a command before any process group or engine starts, with `allo STAGE: error: PATH[:LINE]: ...`,
exit status 2 and no traceback on the terminal (issue 19)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from conftest import ENV, ROOT, write_recipe

from allo.cli import main
from allo.masks.io import save_masks
from allo.preflight import InputError, check_output, model_dir


@pytest.fixture
def setup(tmp_path, tiny_model, pairs_file):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, pairs_file, tmp_path / "out")
    return tmp_path, recipe


def _fails(capsys, argv: list[str], *expected: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    line = err.splitlines()[-1]
    assert line.startswith(f"allo {argv[0]}: error: "), err
    for text in expected:
        assert text in line, line
    assert "Traceback" not in err
    return line


def test_non_utf8_line_names_file_and_line(setup, pairs_file, capsys) -> None:
    tmp, recipe = setup
    bad = tmp / "bad.jsonl"
    bad.write_bytes(pairs_file.read_bytes() + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    _fails(capsys, ["dpo", str(recipe), "--data", str(bad)], f"{bad}:33: not UTF-8 text (byte 0xe9")
    # with on_bad_record: skip the line is the stage's to skip and count, so the up-front check lets it through
    from allo import preflight
    preflight.check_data(str(bad), skip_bad=True)


def test_missing_init_dir_and_hub_id_offline(setup, capsys) -> None:
    tmp, recipe = setup
    _fails(capsys, ["dpo", str(recipe), "--init", str(tmp / "nowhere")], f"{tmp / 'nowhere'}: no such directory")
    _fails(capsys, ["dpo", str(recipe), "--init", "someorg/somemodel"], "someorg/somemodel: no such directory, and no "
           "hub model of that name in the local Hugging Face cache")
    _fails(capsys, ["run", str(recipe), "--set", f"model.path={tmp}/gone/model"], f"{tmp}/gone/model: no such dir")
    _fails(capsys, ["run", str(recipe), "--set", f"model.tokenizer={tmp}/gone/tok"], f"{tmp}/gone/tok: no such "
           "tokenizer directory (model.tokenizer)")
    _fails(capsys, ["dpo", str(recipe), "--set", "model.tokenizer=someorg/sometok"], "someorg/sometok: no such "
           "directory, and no hub tokenizer of that name")


def test_broken_checkpoints_name_the_file(setup, tiny_model, capsys) -> None:
    tmp, recipe = setup

    def copy(name: str) -> Path:
        d = tmp / name
        shutil.copytree(tiny_model, d)
        return d

    truncated = copy("truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _fails(capsys, ["dpo", str(recipe), "--init", str(truncated)], f"{weights}: truncated or corrupt")
    garbage = copy("garbage")
    (garbage / "model.safetensors").write_bytes(b"\xff" * 64)
    _fails(capsys, ["dpo", str(recipe), "--init", str(garbage)], "not a readable safetensors file")
    no_config = copy("no_config")
    (no_config / "config.json").unlink()
    _fails(capsys, ["dpo", str(recipe), "--init", str(no_config)], f"{no_config}/config.json: missing")
    no_tok = copy("no_tok")
    for f in no_tok.glob("tokenizer*"):
        f.unlink()
    _fails(capsys, ["dpo", str(recipe), "--init", str(no_tok)], f"{no_tok}: no tokenizer")
    for argv in (["locate", "--base", str(truncated), "--tuned", str(tiny_model), "--lr", "1e-6", "--ratio", "10",
                  "--out", str(tmp / "m")], ["masks", "show", str(weights)],
                 ["eval", "bench", "--model", str(truncated), "--benchmark", "gsm8k", "--out", str(tmp / "e")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{weights}: truncated or corrupt" in err.splitlines()[-1] and "Traceback" not in err, err
    sharded = copy("sharded")
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    _fails(capsys, ["dpo", str(recipe), "--init", str(sharded)], "model-00001-of-00002.safetensors: missing, named by "
           "model.safetensors.index.json (2 of 2 shards missing")


def test_mask_must_fit_the_model(setup, tiny_model, capsys) -> None:
    import torch

    tmp, recipe = setup
    wrong = tmp / "wrong.safetensors"
    save_masks(wrong, {"model.embed_tokens.weight": torch.ones(3, 3, dtype=torch.bool)}, {})
    _fails(capsys, ["improve", str(recipe), "--mask", str(wrong)], f"{wrong} does not fit the model",
           "model.embed_tokens.weight: mask (3, 3) vs model")
    alien = tmp / "alien.safetensors"
    save_masks(alien, {"transformer.h.0.attn.weight": torch.ones(2, dtype=torch.bool)}, {})
    _fails(capsys, ["improve", str(recipe), "--mask", str(alien)], "1 masks name no model parameter: "
           "transformer.h.0.attn.weight")
    not_mask = tmp / "not_mask.safetensors"
    not_mask.write_text("hello")
    _fails(capsys, ["improve", str(recipe), "--mask", str(not_mask)], f"{not_mask}: not a readable safetensors")


def test_output_dir_writable_and_room(setup, tmp_path, caplog) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match=f"{blocker}/out: cannot write there"):
        check_output(blocker / "out", 0)
    with caplog.at_level(logging.WARNING):
        check_output(tmp_path / "ok", 10**18)
    assert "GB free, and this stage writes about 1000000000.0 GB" in caplog.text


def test_local_model_dir_accepted(tiny_model) -> None:
    assert model_dir(str(tiny_model)) == tiny_model


def test_every_rank_stops_before_the_process_group(setup, tiny_model) -> None:
    """Each rank of a 2-rank job checks alike and stops with exit 2 on its own: no rendezvous is attempted (a rank
    that tried would wait for its missing peer until the subprocess timeout)."""
    import subprocess
    import sys

    tmp, recipe = setup
    broken = tmp / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:5000])
    for rank in (0, 1):
        env = dict(ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT="1")
        proc = subprocess.run([sys.executable, "-m", "allo", "dpo", str(recipe), "--init", str(broken)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr[-2000:]
        if rank == 0:  # every rank finds the same fault; rank 0 says it
            assert proc.stderr.strip().splitlines()[-1].startswith(
                f"allo dpo: error: {broken}/model.safetensors: truncated or corrupt"), proc.stderr[-2000:]
        else:
            assert "allo dpo: error" not in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
