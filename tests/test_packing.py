"""Padding-free batches (`train.packing`): a micro batch's rows as one sequence with position ids restarting per row.
The packed log-probs equal the padded ones on ragged rows (sdpa and eager attention), so the DPO loss of a policy
packed against a reference computed padded is ln 2 when both are the same weights; and a packed `allo dpo` run starts
at ln 2 and follows the padded run."""
from __future__ import annotations

import json
import math

import pytest
import torch

from allo.data.tokenize import collate, pack
from allo.logprobs import token_logps
from allo.losses import dpo_loss, masked_sum
from conftest import torchrun, write_recipe


def _examples() -> list[dict]:
    """Two pairs of ragged lengths: prompts of 3 and 6 tokens, responses of 2 to 9."""
    return [{"index": 0, "prompt_ids": [1, 17, 40], "responses": [[5, 9, 33, 2], [7, 2]]},
            {"index": 1, "prompt_ids": [1, 60, 61, 62, 63, 64], "responses": [[80, 81, 82, 83, 84, 85, 86, 87, 2],
                                                                             [90, 91, 92, 2]]}]


def test_pack_lays_rows_end_to_end():
    batch = collate(_examples(), pad_id=0)
    packed = pack(batch)
    lengths = batch["attention_mask"].sum(1).tolist()  # slot-major: chosen rows, then rejected rows
    assert lengths == [7, 15, 5, 10]
    assert packed["packed_ids"].shape == (1, sum(lengths))
    assert packed["packed_positions"][0].tolist() == [p for n in lengths for p in range(n)]
    rows = [batch["input_ids"][r, :n].tolist() for r, n in enumerate(lengths)]
    assert packed["packed_ids"][0].tolist() == [t for row in rows for t in row]
    flat = torch.zeros(batch["labels"].numel(), dtype=torch.long).index_copy(0, packed["packed_index"],
                                                                            packed["packed_labels"][0])
    assert torch.equal(flat.view_as(batch["labels"]), torch.where(batch["attention_mask"].bool(), batch["labels"], 0))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logps_equal_padded_and_dpo_starts_at_ln2(tiny_model, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32, attn_implementation=attn)
    batch = pack(collate(_examples(), pad_id=0))
    with torch.no_grad():
        padded = token_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   use_cache=False).logits, batch["labels"])
        # without a cache (as the trainer calls it): transformers reads packed rows from the position ids only then
        flat = token_logps(model(input_ids=batch["packed_ids"], position_ids=batch["packed_positions"],
                                 use_cache=False).logits, batch["packed_labels"])[0]
    packed = flat.new_zeros(padded.numel()).index_copy(0, batch["packed_index"], flat).view_as(padded)
    # attention over a packed row and over padded rows sums the same terms in another order: a few float32 ulp of
    # logits of magnitude ~10 (ulp 9.5e-7), through the log-softmax
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    assert padded.abs().sum() > 1  # real log-probs, not zeros on both sides
    mask = batch["labels"] != -100
    sums = [masked_sum(x[r], mask[r]) for x in (packed, padded) for r in (slice(0, 2), slice(2, 4))]
    loss = dpo_loss(*sums, beta=0.1).losses  # policy packed, reference padded: the same weights
    # the two sums differ by the log-probs' rounding (above, < 1e-5 over a row), scaled by β 0.1 and logsigmoid's
    # slope 1/2: < 5e-7
    torch.testing.assert_close(loss, torch.full_like(loss, math.log(2)), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_packed_dpo_run_starts_at_ln2_and_follows_the_padded_run(tmp_path, tiny_model, pairs_file):
    losses = {}
    for packing in ("true", "false"):
        recipe = write_recipe(tmp_path / f"{packing}.yaml", tiny_model, pairs_file, tmp_path / packing,
                              "dpo: {train: {lr: 1.0e-3}}")
        torchrun(["dpo", str(recipe), "--set", f"train.packing={packing}", "--set", "train.max_steps=3"], nproc=1)
        rows = [json.loads(x) for x in (tmp_path / packing / "dpo" / "metrics.jsonl").read_text().splitlines()]
        losses[packing] = [r["loss"] for r in rows]
    assert abs(losses["true"][0] - math.log(2)) < 1e-6, losses
    for a, b in zip(losses["true"], losses["false"]):
        assert abs(a - b) < 1e-4, losses
    assert max(abs(x - math.log(2)) for x in losses["true"][1:]) > 1e-3, losses  # the policy moved off the reference


# ------------------------------------------------------------------------------------ packing where it is used
def test_packing_is_refused_where_it_would_be_slow():
    """On a GPU only flash attention takes the rows' boundaries without a mask over the whole packed row."""
    from allo.data.tokenize import packing_problem

    for attn in ("sdpa", "eager", "flex_attention"):
        why = packing_problem(attn, "cuda")
        assert why and why.startswith("train.packing with model.attn_implementation " + attn) and "false" in why
    assert packing_problem("flash_attention_2", "cuda") is None and packing_problem("flash_attention_3", "cuda") is None
    assert packing_problem("sdpa", "cpu") is None and packing_problem("eager", "cpu") is None


def _trainer_over(model, attn: str, precision: str = "fp32"):
    """The parts of a Trainer that `_logps` and `check_packing` use, around a plain Hugging Face model."""
    import types

    from allo.train import Trainer

    calls: list[dict] = []

    class Engine(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = model

        def forward(self, **kw):
            calls.append(kw)
            return model(**{k: v for k, v in kw.items() if not k.startswith(("cu_seq", "max_length"))})

    t = types.SimpleNamespace(engine=Engine(), model=model, strategy=types.SimpleNamespace(
        device=torch.device("cpu"), precision=precision, is_rank0=True, all_reduce=lambda x, op: x),
        _attention=lambda: attn)  # as the trainer reads it from the model's config (no flash kernel on the CPU)
    for name in ("_logps", "check_packing"):
        setattr(t, name, types.MethodType(getattr(Trainer, name), t))
    return t, calls


def test_flash_attention_gets_the_row_boundaries_from_pack(tiny_model):
    from transformers import AutoModelForCausalLM

    batch = pack(collate(_examples(), pad_id=0))
    assert batch["packed_cu_seq_lens"].tolist() == [0, 7, 22, 27, 37] and batch["packed_max_length"] == 15
    assert batch["packed_cu_seq_lens"].dtype == torch.int32  # what the varlen kernel takes
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32, attn_implementation="sdpa")
    for attn, varlen in (("flash_attention_2", True), ("sdpa", False)):
        t, calls = _trainer_over(model, attn)
        with torch.no_grad():
            t._logps(batch)
        kw = calls[-1]
        assert ("cu_seq_lens_q" in kw) == varlen, attn
        if varlen:
            assert kw["cu_seq_lens_q"].tolist() == kw["cu_seq_lens_k"].tolist() == [0, 7, 22, 27, 37]
            assert kw["max_length_q"] == kw["max_length_k"] == 15


def test_the_first_packed_batch_is_checked_and_a_leaking_model_stops(tiny_model, monkeypatch, caplog):
    """A model whose attention reads the packed row's boundaries passes the start-up check; the same model with the
    boundaries ignored (rows attending to the rows before them, as a model outside transformers' masking would)
    stops with one sentence."""
    import logging

    import transformers.masking_utils as mu
    from transformers import AutoModelForCausalLM

    batch = pack(collate(_examples(), pad_id=0))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32, attn_implementation="eager")
    t, _ = _trainer_over(model, "eager")
    with caplog.at_level(logging.INFO, logger="allo.train"):
        t.check_packing(batch)
    assert "rows isolated" in caplog.text
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(RuntimeError, match="rows of a packed micro-batch see each other .*another row's tokens "
                                           "change a row's log-probs; set train.packing to false"):
        t.check_packing(batch)
