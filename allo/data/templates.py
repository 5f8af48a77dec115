"""Prompt formats: Alpaca (docs/method.md §6, as the reference code uses), the tokenizer's chat template, or raw text.

`render(prompt, response, template, tokenizer)` returns (prompt_text, response_text) such that their
concatenation is exactly the text the model is trained on, so prompt and response can be tokenised
separately and joined (the convention TRL uses) without the boundary moving.
"""
from __future__ import annotations

from typing import Any

ALPACA = "### Instruction:\n{prompt}\n\n### Response:"
ALPACA_COT = ALPACA + " Let's think step by step."


def _single_user_text(prompt: Any, template: str) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m for m in prompt if m["role"] != "system"]
    if len(users) != 1:
        raise ValueError(f"template '{template}' takes a single-turn prompt; use template: chat for "
                         f"{len(users)}-turn conversations")
    return users[0]["content"]


def _response_text(response: Any) -> str:
    if isinstance(response, str):
        return response
    return "".join(m["content"] for m in response if m["role"] == "assistant")


def render_prompt(prompt: Any, template: str, tokenizer: Any = None) -> str:
    if template == "alpaca":
        return ALPACA.format(prompt=_single_user_text(prompt, template))
    if template == "alpaca_cot":
        return ALPACA_COT.format(prompt=_single_user_text(prompt, template))
    if template == "raw":
        return _single_user_text(prompt, template)
    if template == "chat":
        return tokenizer.apply_chat_template(_messages(prompt), tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown template {template!r}")


def _messages(prompt: Any) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def render(prompt: Any, response: Any, template: str, tokenizer: Any = None) -> tuple[str, str]:
    """(prompt_text, response_text); for chat templates the response includes the end-of-turn markup."""
    prompt_text = render_prompt(prompt, template, tokenizer)
    if template != "chat":
        return prompt_text, _response_text(response)
    full = tokenizer.apply_chat_template(
        _messages(prompt) + [{"role": "assistant", "content": _response_text(response)}], tokenize=False)
    if not full.startswith(prompt_text):
        raise ValueError("the chat template renders the prompt differently with and without the reply; "
                         "use template: alpaca or raw for this tokenizer")
    return prompt_text, full[len(prompt_text):]
