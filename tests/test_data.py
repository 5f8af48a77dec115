"""Records, templates, tokenisation and the collator; real preference data from ../shared when present."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allo.data.records import DataError, read_records
from allo.data.templates import ALPACA_COT, render
from allo.data.tokenize import IGNORE, TruncationPolicy, collate, encode_prompt, tokenize_records, truncate


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tiny import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_real_preference_set(shared_dir, tok):
    path = shared_dir / "benchdata/preference/hh_rlhf_harmless_base_test_first2000_pcr.jsonl"
    records, stats = read_records(str(path))
    assert stats.read == 2000 and stats.kept + sum(stats.skipped.values()) == 2000
    assert records[0]["source"] == f"{path}:1" and records[0]["prompt"].rstrip().endswith("Assistant:")
    ex = tokenize_records(records[:50], tok, "raw", TruncationPolicy(256, 128), ("chosen", "rejected"))
    assert all(e["prompt_ids"][0] == tok.bos_token_id and e["prompt_ids"].count(tok.bos_token_id) == 1 for e in ex)
    assert all(len(e["prompt_ids"]) + max(map(len, e["responses"])) <= 256 for e in ex)


def test_bad_records_name_file_line_and_field(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", ['{"prompt": "q", "chosen": "a", "rejected": "b"}',
                                           '{"prompt": "q", "chosen": "a"',
                                           '{"prompt": "q", "chosen": 3, "rejected": "b"}',
                                           '{"prompt": "q", "rejected": "b"}'])
    with pytest.raises(DataError, match=rf"{p}:2: not valid JSON"):
        read_records(str(p))
    recs, stats = read_records(str(p), on_bad_record="skip")
    assert len(recs) == 1 and stats.skipped["malformed"] == 3
    p2 = write_lines(tmp_path / "e.jsonl", ['{"prompt": "q", "chosen": 3, "rejected": "b"}'])
    with pytest.raises(DataError, match=rf"{p2}:1: field 'chosen' must be a string"):
        read_records(str(p2))
    p3 = write_lines(tmp_path / "f.jsonl", ['{"prompt": "q", "rejected": "b"}'])
    with pytest.raises(DataError, match=rf"{p3}:1: missing field 'chosen'"):
        read_records(str(p3))


def test_degenerate_pairs_are_counted_not_silent(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", ['{"prompt": "q", "chosen": "a", "rejected": "a"}',
                                           '{"prompt": "q", "chosen": " ", "rejected": "b"}',
                                           '{"prompt": "q", "chosen": "a", "rejected": "b"}'])
    recs, stats = read_records(str(p))
    assert len(recs) == 1 and stats.skipped == {"chosen == rejected": 1, "empty response": 1}
    assert "skipped 2" in stats.summary("d")


def test_json_parquet_columns_and_messages(tmp_path):
    rows = [{"question": "q1", "good": [{"role": "assistant", "content": "a"}], "bad": "b"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    recs, _ = read_records(str(tmp_path / "d.json"), columns={"prompt": "question", "chosen": "good",
                                                              "rejected": "bad"})
    assert recs[0]["chosen"][0]["content"] == "a" and recs[0]["source"].endswith("d.json[0]")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "chosen": "a", "rejected": "b"}]), tmp_path / "d.parquet")
    assert read_records(str(tmp_path / "d.parquet"))[0][0]["rejected"] == "b"


def test_alpaca_template_and_prompt_masked_labels(tok):
    p, r = render("What is 2+3?", " 2 plus 3 is 5. The answer is 5.", "alpaca_cot")
    assert p == ALPACA_COT.format(prompt="What is 2+3?")
    ex = tokenize_records([{"prompt": "What is 2+3?", "chosen": " 5", "rejected": " 6"}], tok, "alpaca_cot",
                          TruncationPolicy(128, 64), ("chosen", "rejected"))
    batch = collate(ex, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 2  # chosen and rejected in one forward
    n_prompt = len(ex[0]["prompt_ids"])
    assert (batch["labels"][:, :n_prompt] == IGNORE).all()
    assert batch["labels"][0, n_prompt:n_prompt + len(ex[0]["responses"][0])].tolist() == ex[0]["responses"][0]
    assert ex[0]["responses"][0][-1] == tok.eos_token_id


def test_truncation_keeps_bos_and_prompt_end():
    prompt, responses, cut = truncate([1] + list(range(100, 120)), [[7] * 30, [8] * 5],
                                      TruncationPolicy(max_length=24, max_prompt_length=8), has_bos=True)
    assert cut and prompt == [1] + list(range(113, 120)) and len(responses[0]) == 16 and responses[1] == [8] * 5


def test_collator_places_token_arrays_at_response_positions(tok):
    ex = [{"prompt_ids": [1, 5], "responses": [[7, 8, 2]], "index": 0, "keep_probs": [[0.1, 0.9, 0.4]]},
          {"prompt_ids": [1], "responses": [[9, 2]], "index": 1, "keep_probs": [[0.3, 0.2]]}]
    b = collate(ex, 0, ("keep_probs",))
    assert torch.allclose(b["keep_probs"][0], torch.tensor([0, 0, 0.1, 0.9, 0.4]))
    assert torch.allclose(b["keep_probs"][1], torch.tensor([0, 0.3, 0.2, 0, 0]))
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.text(max_size=60), st.builds(json.dumps, st.dictionaries(
    st.sampled_from(["prompt", "chosen", "rejected", "extra"]),
    st.one_of(st.text(max_size=8), st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2)),
    max_size=4))), max_size=8))
def test_jsonl_reader_on_random_input(tmp_path, lines):
    p = tmp_path / "fuzz.jsonl"
    p.write_text("\n".join(line.replace("\n", " ") for line in lines) + "\n")
    try:
        recs, stats = read_records(str(p), on_bad_record="error")
    except DataError as e:
        assert str(e).startswith(f"{p}:")
        return
    assert stats.kept == len(recs) and stats.kept + sum(stats.skipped.values()) == stats.read
    recs2, stats2 = read_records(str(p), on_bad_record="skip")
    assert stats2.kept + sum(stats2.skipped.values()) == stats2.read


def test_encode_prompt_adds_exactly_one_bos(tok):
    ids = encode_prompt(tok, tok.bos_token + "hello")
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_chat_template_renders_prompt_and_reply(tok):
    import copy

    chat = copy.deepcopy(tok)
    chat.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+3?"}]
    p, r = render(msgs, "5", "chat", chat)
    assert p == "<|system|>be brief</s><|user|>2+3?</s><|assistant|>" and r == "5</s>"
    ex = tokenize_records([{"prompt": msgs, "chosen": "5", "rejected": "6"}], chat, "chat",
                          TruncationPolicy(128, 64), ("chosen", "rejected"))
    assert ex[0]["responses"][0][-1] == chat.eos_token_id and ex[0]["responses"][0].count(chat.eos_token_id) == 1
    with pytest.raises(ValueError, match="single-turn"):
        render(msgs + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}], "5", "alpaca")


def test_undecodable_and_non_object_lines_name_file_and_line(tmp_path):
    """Bytes that are not UTF-8 on one line: the error names the file, the line and the byte; a JSON line that is
    not an object is reported as such; with on_bad_record: skip both are counted, the rest is kept."""
    p = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}).encode()
    p.write_bytes(good + b"\n" + b'{"prompt": "\xff"}\n' + b'"just a string"\n' + good + b"\n")
    with pytest.raises(DataError, match=rf"{p}:2: not UTF-8 text \(byte 0xff at column 13\)"):
        read_records(str(p))
    records, stats = read_records(str(p), on_bad_record="skip")
    assert len(records) == 2 and stats.skipped["malformed"] == 2
    q = tmp_path / "string.jsonl"
    q.write_bytes(good + b"\n" + b'"just a string"\n')
    with pytest.raises(DataError, match=rf"{q}:2: expected a JSON object, got str"):
        read_records(str(q))


def test_hub_dataset_with_a_subset(monkeypatch) -> None:
    """data.subset reaches load_dataset as its configuration name, and the records' places say which."""
    import datasets

    from allo.config import load_recipe
    from allo.data.records import read_records

    calls = []

    def fake(path, name=None, split=None):
        calls.append((path, name, split))
        return [{"prompt": "p", "chosen": "a", "rejected": "b"}]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    recipe = load_recipe(None, ["data.subset=main", "data.split=test"])
    records, _ = read_records("org/pairs", split=recipe.data.split, subset=recipe.data.subset)
    assert calls == [("org/pairs", "main", "test")] and records[0]["source"] == "org/pairs[main:test][0]"
    read_records("org/pairs")
    assert calls[-1] == ("org/pairs", None, "train")


@pytest.mark.parametrize("rank", ["0", "1"])
def test_skipped_records_are_counted_always_and_named_on_rank_0_only(tmp_path, caplog, monkeypatch, rank):
    import json as _json
    import logging

    from allo.data.records import SKIPS_NAMED, read_records

    monkeypatch.setenv("RANK", rank)
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"p{i}", "chosen": 3 if i % 2 else "a", "rejected": "b"} for i in range(2 * SKIPS_NAMED + 10)]
    rows += [{"prompt": "e", "chosen": " ", "rejected": "b"}] * 7  # data, not damage: counted, never named
    path.write_text("\n".join(_json.dumps(r) for r in rows) + "\n")
    with caplog.at_level(logging.INFO, logger="allo.data.records"):
        records, stats = read_records(str(path), on_bad_record="skip")
    assert stats.skipped["malformed"] == SKIPS_NAMED + 5 and len(records) == SKIPS_NAMED + 5
    assert stats.skipped["empty response"] == 7
    named = [r for r in caplog.records if "skipping" in r.getMessage()]
    assert len(named) == (SKIPS_NAMED if rank == "0" else 0)
    assert all("must be a string" in r.getMessage() for r in named)
    assert any(f"skipped {SKIPS_NAMED + 12} (7 empty response, {SKIPS_NAMED + 5} malformed)" in r.getMessage()
               for r in caplog.records) == (rank == "0")
