"""Fuzzing what users type and feed (issue 19): records, recipes and `--set` strings.

Every generated case is either accepted or rejected with an error that names its place (file:line, file[index],
or `--set KEY`); any other exception is a failure. With `on_bad_record: skip` the skipped count equals the number
of bad records generated, judged by the independent oracle `_expected_bad` below.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from allo.config import ConfigError, load_recipe
from allo.data.records import PREFERENCE, DataError, read_records
from allo.data.tokenize import TruncationPolicy, tokenize_records

FUZZ = settings(max_examples=int(os.environ.get("ALLO_FUZZ_EXAMPLES", 300)), deadline=None,
                suppress_health_check=list(HealthCheck), derandomize=not os.environ.get("ALLO_FUZZ_EXAMPLES"))

# ------------------------------------------------------------------------------------------------- records
odd_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\n\t", "\u200b", "\ufeffBOM", "e\u0301", "👩‍👩‍👧", "\ud800", "a\x00b", "\u202e",
                     "x" * 20000]),
)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", ""]),
                                 "content": odd_text})
odd_message = st.one_of(message, st.dictionaries(st.sampled_from(["role", "content", "name"]),
                                                 st.one_of(odd_text, st.integers(), st.none()), max_size=3),
                        st.integers(), st.none())
text_value = st.one_of(odd_text, st.lists(message, min_size=1, max_size=3))
wrong_value = st.one_of(st.integers(), st.floats(allow_nan=True), st.booleans(), st.none(),
                        st.lists(odd_message, max_size=3), st.dictionaries(st.text(max_size=5), st.integers(),
                                                                          max_size=2))
field_value = st.one_of(text_value, text_value, wrong_value)


@st.composite
def record(draw) -> object:
    if draw(st.integers(0, 19)) == 0:  # not an object at all
        return draw(st.one_of(st.integers(), st.text(max_size=10), st.lists(st.integers(), max_size=3), st.none()))
    rec = {}
    for f in PREFERENCE:
        if draw(st.integers(0, 9)):  # a missing field now and then
            rec[f] = draw(field_value)
    for extra in draw(st.lists(st.sampled_from(["id", "score", "meta", "chosen_model"]), max_size=2, unique=True)):
        rec[extra] = draw(st.one_of(st.integers(), odd_text, st.none()))
    return rec


def _is_text(v: object) -> bool:
    if isinstance(v, str):
        return _encodable(v)
    return isinstance(v, list) and bool(v) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        and _encodable(m["role"]) and _encodable(m["content"]) for m in v)


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _expected_bad(raw: object) -> bool:
    """The oracle: malformed means not an object, a missing field, or a field that is not text."""
    return not isinstance(raw, dict) or any(f not in raw or not _is_text(raw[f]) for f in PREFERENCE)


def _place_named(msg: str, path: Path) -> bool:
    return msg.startswith(str(path)) and (msg[len(str(path))] in ":[")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tiny import make_tokenizer

    tok = make_tokenizer(tmp_path_factory.mktemp("tok"))
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
                         "{{ raise_exception('system message must come first') }}{% endif %}<|{{ m['role'] }}|>"
                         "{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return tok


def _check_read(path: Path, raws: list, broken_lines: int, tokenizer) -> None:
    try:
        records, _ = read_records(str(path), PREFERENCE)
    except DataError as e:
        assert _place_named(str(e), path), f"error without a place: {e}"
    else:
        assert not broken_lines and not any(_expected_bad(r) for r in raws)
        for template in ("alpaca", "chat", "raw"):
            try:
                tokenize_records(records, tokenizer, template, TruncationPolicy(64, 32), ("chosen", "rejected"))
            except DataError as e:
                assert _place_named(str(e), path), f"error without a place: {e}"
    records, stats = read_records(str(path), PREFERENCE, on_bad_record="skip")
    assert stats.skipped["malformed"] == broken_lines + sum(_expected_bad(r) for r in raws)
    assert stats.read == len(raws) + broken_lines
    assert stats.kept + sum(stats.skipped.values()) == stats.read


@FUZZ
@given(raws=st.lists(record(), max_size=6), broken=st.lists(
    st.sampled_from([b"{not json", b"\xff\xfe{}", b"[1, 2", b'{"prompt": "a\xc3"}', b"\x00"]), max_size=2))
def test_jsonl_records_are_read_or_rejected_with_their_line(raws, broken, tokenizer) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.jsonl"
        lines = [json.dumps(r).encode() for r in raws] + list(broken)
        path.write_bytes(b"\n".join(lines) + b"\n")
        _check_read(path, raws, len(broken), tokenizer)


@FUZZ
@given(raws=st.lists(record(), max_size=6), wrap=st.booleans())
def test_json_records_are_read_or_rejected_with_their_index(raws, wrap, tokenizer) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.json"
        path.write_text(json.dumps({"data": raws} if wrap else raws), encoding="utf-8", errors="surrogatepass")
        _check_read(path, raws, 0, tokenizer)


@FUZZ
@given(raws=st.lists(st.fixed_dictionaries({f: st.one_of(odd_text, st.none()) for f in PREFERENCE}), max_size=5))
def test_parquet_records_are_read_or_rejected_with_their_row(raws, tokenizer) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    assume(all(_encodable(v) for r in raws for v in r.values() if isinstance(v, str)))  # Arrow stores UTF-8 only
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.parquet"
        pq.write_table(pa.Table.from_pylist(raws, schema=pa.schema([(f, pa.string()) for f in PREFERENCE])), path)
        _check_read(path, raws, 0, tokenizer)


def test_broken_files_name_themselves(tmp_path) -> None:
    """Whole files that cannot be read: not UTF-8 JSON, not Parquet, a directory, unreadable."""
    cases = {"data.json": b'[{"prompt": "\xff"}]', "data.parquet": b"PAR1 not really", "x.jsonl": b"\xff\n"}
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(DataError) as e:
            read_records(str(path), PREFERENCE)
        assert _place_named(str(e.value), path), e.value
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DataError) as e:
        read_records(str(tmp_path / "dir.jsonl"), PREFERENCE)
    assert "is a directory" in str(e.value)


# ------------------------------------------------------------------------------------------------- recipes
KNOWN = ["train.lr", "train.epochs", "train.micro_batch_size", "data.max_length", "data.template", "model.dtype",
         "locate.ratios", "forget.beta", "improve.drop_percentile", "seed", "output_dir", "data.columns",
         "dpo.train", "reward.teacher", "generation.backend", "distributed.timeout_minutes", "nope", "train.nope"]
yaml_value = st.one_of(st.integers(-10**20, 10**20), st.floats(), st.booleans(), st.none(), st.text(max_size=12),
                       st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=6), st.integers(),
                                                                            max_size=2))


@st.composite
def recipe_data(draw) -> object:
    data: dict = {}
    for key in draw(st.lists(st.sampled_from(KNOWN), max_size=4)):
        *sections, leaf = key.split(".")
        node = data
        for s in sections:
            node = node.setdefault(s, {}) if isinstance(node.get(s, {}), dict) else {}
        node[leaf] = draw(yaml_value)
    return data


YAML_ODDITIES = ["train: [1, 2", "\t train:\n  lr: 1", "a: &x {b: 1}\nc: *x", "train: {lr: 1}\ntrain: {lr: 2}",
                 "!!python/object:os.system {}", "- 1\n- 2", "just text", "train:\n  lr: .inf", "data: !!binary aGk=",
                 "? [a, b]\n: 1", "model: {path: ~}", "%YAML 1.1\n---\nseed: 1", "seed: 0x10", "seed: 1_000",
                 "---\nseed: 1\n---\nseed: 2", "train: {lr: 1e-6, epochs: -1}", "\ufeffseed: 1", "seed: '1'"]


def _check_recipe(text: str, overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "recipe.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_recipe(str(path), overrides)
        except ConfigError as e:
            msg = str(e)
            assert msg.startswith(str(path)) or msg.startswith("--set "), f"error without a place: {msg}"


@FUZZ
@given(data=recipe_data(), oddity=st.one_of(st.none(), st.sampled_from(YAML_ODDITIES), st.text(max_size=30)))
def test_recipes_load_or_fail_with_their_line(data, oddity) -> None:
    _check_recipe(oddity if oddity is not None else yaml.safe_dump(data), [])


@FUZZ
@given(key=st.one_of(st.sampled_from(KNOWN), st.text(max_size=15)),
       value=st.one_of(st.text(max_size=15), yaml_value.map(lambda v: yaml.safe_dump(v, default_flow_style=True)
                                                            .strip().removesuffix("...").strip())),
       sep=st.sampled_from(["=", "=", " = ", ":", ""]), base=st.sampled_from(["", "- 1\n", "seed: 3\n", "7\n"]))
def test_set_strings_apply_or_fail_naming_the_set(key, value, sep, base) -> None:
    _check_recipe(base, [f"{key}{sep}{value}"])
