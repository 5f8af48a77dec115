"""The training stages: which records, which objective, which mask. Everything else is the shared loop.

One table instead of one module per stage (the house plan's ``stages/*.py``): each entry is five facts, and
a table shows at a glance how the stages differ, which five near-empty modules would hide.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from allo.config import Recipe
from allo.stages import objectives


@dataclass(frozen=True)
class StageDef:
    fields: tuple[str, ...]            # record fields read (prompt first)
    responses: tuple[str, ...]         # response slots, in collator order
    objective: Callable[[Recipe], Callable]
    needs_reference: bool
    mask: Optional[str] = None         # which locate mask the stage uses by default (n1 / n2)
    token_arrays: tuple[str, ...] = ()
    section: str = ""                  # recipe section holding the stage's knobs and train overrides


STAGES: dict[str, StageDef] = {
    "sft": StageDef(("prompt", "response"), ("response",), lambda r: objectives.sft, False, section="sft"),
    "warmup": StageDef(("prompt", "chosen", "rejected"), ("chosen", "rejected"),
                       lambda r: objectives.preference(r.warmup), True, section="warmup"),
    "dpo": StageDef(("prompt", "chosen", "rejected"), ("chosen", "rejected"),
                    lambda r: objectives.preference(r.dpo), True, section="dpo"),
    "npo": StageDef(("prompt", "rejected"), ("rejected",), lambda r: objectives.npo(r.npo), True, section="npo"),
    "simpo": StageDef(("prompt", "chosen", "rejected"), ("chosen", "rejected"), lambda r: objectives.simpo(r.simpo),
                      False, section="simpo"),
    "forget": StageDef(("prompt", "rejected"), ("rejected",), lambda r: objectives.forget(r.forget), True,
                       mask="n1", token_arrays=("keep_probs",), section="forget"),
    "improve": StageDef(("prompt", "chosen", "rejected"), ("chosen", "rejected"),
                        lambda r: objectives.improve(r.improve), True, mask="n2", section="improve"),
}
