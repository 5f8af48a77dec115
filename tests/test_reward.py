"""Token reward model: training data from the teacher, and keep-probabilities aligned token by token."""
from __future__ import annotations

import torch

from allo.data.templates import render
from allo.data.tokenize import encode_response
from allo.reward.model import keep_probs, reward_data, rewrite_prompt
from allo.reward.programmatic import rewrite
from allo.tasks import is_correct


def test_reward_data_keeps_right_rewrites_and_adds_keep_examples():
    problem = "Tom has 12 apples. He buys 7 more. How many apples does Tom have now?"
    items = [{"prompt": problem, "wrong": " 12 + 7 = 18. The answer is 18.", "reference": " 12 + 7 = 19. The "
              "answer is 19.", "answer": "19"},
             {"prompt": problem, "wrong": "garbage", "reference": " The answer is 20.", "answer": "19"}]
    recs, counts = reward_data(items, [rewrite(it["prompt"], it["wrong"], it["reference"]) for it in items],
                               is_correct)
    assert counts == {"items": 2, "kept": 1, "rewrite_wrong": 1, "teacher_failed": 0}
    assert recs[0]["response"] == " 12 + 7 = 19. The answer is 19."
    assert recs[1]["prompt"].endswith("Wrong solution: 12 + 7 = 19. The answer is 19.\n\n### Rewrite:")


def test_keep_probs_align_with_policy_tokens(tiny_model):
    """p_j must be the probability of the j-th token of the policy's tokenisation of the wrong response, from the
    logits one position earlier (BOS counted), i.e. no off-by-one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    item = {"prompt": "Tom has 3 apples.", "wrong": " 3 + 1 = 5. The answer is 5.", "reference": " The answer is 4."}
    (probs,) = keep_probs(model, tok, [item, {**item, "wrong": " 1"}][:1], "alpaca_cot")
    response = encode_response(tok, render(item["prompt"], item["wrong"], "alpaca_cot")[1])
    assert len(probs) == len(response) and response[-1] == tok.eos_token_id
    prompt = [tok.bos_token_id] + tok(rewrite_prompt(item["prompt"], item["reference"], item["wrong"]),
                                      add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    for j, token in enumerate(response):
        want = logits[len(prompt) + j - 1].softmax(-1)[token].item()
        assert abs(probs[j] - want) < 1e-5, (j, probs[j], want)  # a probability in [0, 1]: a few float32 ulp
    batched = keep_probs(model, tok, [item, {**item, "wrong": " 1"}], "alpaca_cot", batch_size=2)
    assert torch.allclose(torch.tensor(batched[0]), torch.tensor(probs), atol=1e-5)  # padded batch: another order
