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
