"""Guard rails between steps: a run that has quietly become a no-op stops (or warns) here, saying which number
fell below which knob (`guards.*`) and what to change.

A wrong teacher, a reward model that flags nothing or a stage whose gradients are all zero do not crash anything:
each step completes, and the table at the end compares the SFT model with copies of itself. These checks turn
that into a sentence at the step where it happens. Pure functions over a step's counts; the steps call them.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

from allo.config import GuardsConfig

log = logging.getLogger(__name__)


class GuardStop(RuntimeError):
    """A step's output makes the rest of the run meaningless; the message names the knob that lowers the bar."""


def check_pairs(stats: dict, g: GuardsConfig) -> None:
    """After `pairs`: enough (correct, wrong) pairs to train on."""
    pairs, problems = stats.get("pairs", 0), stats.get("problems")
    if pairs < g.min_pairs:
        found = "no problem" if pairs == 0 else "too few problems"
        raise GuardStop(f"pairs: {pairs} preference pairs{f' from {problems} problems' if problems else ''}, fewer "
                        f"than guards.min_pairs {g.min_pairs}: sampling found {found} with both a right and a "
                        "wrong response (raise sample.n or sample.temperature, check task.family's answer checker, "
                        "or lower guards.min_pairs to go on)")
    if problems:
        without = stats.get("problems_without_pair", {})  # make_pairs' counts: all_correct, all_wrong
        share = 1 - sum(without.values()) / problems
        if share < g.warn_pair_share:
            log.warning("pairs: only %.1f%% of %d problems yield a pair (guards.warn_pair_share %.1f%%): the SFT "
                        "model is right (or wrong) on almost every sample; preference training sees few problems",
                        100 * share, problems, 100 * g.warn_pair_share)


def check_rewrites(counts: dict, g: GuardsConfig) -> None:
    """After `reward-data`: the teacher's rewrites were right often enough to teach the reward model edits."""
    items, kept = counts.get("items", 0), counts.get("kept", 0)
    if items and kept / items < g.min_rewrite_share:
        raise GuardStop(f"reward-data: {kept} of {items} teacher rewrites are right ({100 * kept / items:.1f}% < "
                        f"guards.min_rewrite_share {100 * g.min_rewrite_share:.0f}%; {counts.get('rewrite_wrong', 0)} "
                        f"wrong, {counts.get('teacher_failed', 0)} failed): the token reward model would learn only "
                        "\"keep\" and forget would train on nothing (check reward.teacher suits this task, or lower "
                        "guards.min_rewrite_share)")


def check_flagged(keep_probs: Sequence[float], weights: Sequence[float], g: GuardsConfig) -> dict:
    """After `reward-score`: the reward model flags some tokens (p < 0.5), and some get a nonzero forget weight
    (`weights`, the forget objective's weights of the same tokens). Returns the two shares."""
    n = max(1, len(keep_probs))
    flagged = sum(p < 0.5 for p in keep_probs) / n
    weighted = sum(w != 0 for w in weights) / n
    if min(flagged, weighted) < g.min_flagged_share:
        raise GuardStop(f"reward-score: the token reward model flags {100 * flagged:.2f}% of {len(keep_probs)} tokens "
                        f"of the wrong responses and {100 * weighted:.2f}% get a nonzero forget weight (< "
                        f"guards.min_flagged_share {100 * g.min_flagged_share:.2f}%): forget would train on nothing "
                        "(check reward-data's counts and the reward model's training, or lower "
                        "guards.min_flagged_share)")
    if flagged > g.warn_flagged_share:
        log.warning("reward-score: the reward model flags %.1f%% of the wrong responses' tokens (> guards."
                    "warn_flagged_share %.0f%%): token-weighted forgetting is then close to plain NPO",
                    100 * flagged, 100 * g.warn_flagged_share)
    return {"flagged_share": round(flagged, 4), "weighted_share": round(weighted, 4)}


def check_nonfinite(stage: str, norms: Sequence[float], g: GuardsConfig) -> int:
    """During a training stage (`norms`: the gradient norm of every step so far): how many of the last steps in a
    row had a norm that is not finite (each was skipped: no weight moved). Stops at guards.max_nonfinite_steps."""
    run = 0
    for norm in reversed(norms):
        if math.isfinite(norm):
            break
        run += 1
    if g.max_nonfinite_steps and run >= g.max_nonfinite_steps:
        raise GuardStop(f"{stage}: the gradient norm was NaN or Inf at the last {run} steps (each skipped, no weight "
                        f"moved): the loss or the data produce non-finite gradients (check the learning rate, the "
                        f"inputs' lengths and the logged losses; guards.max_nonfinite_steps {g.max_nonfinite_steps} "
                        "sets how many in a row stop the stage, 0 never)")
    return run


def check_stalled(stage: str, trace: Sequence[tuple[float, float]], g: GuardsConfig) -> None:
    """After a training stage (`trace`: (loss, grad norm) per step of this process, the same on every rank): its
    weights moved (a zero gradient norm at every step, or a loss identical at every step, says they did not; the
    norm is NaN where DeepSpeed does not compute it), and its loss moved by more than `min_loss_change`."""
    if not g.stalled or len(trace) < 2:
        return
    losses = [loss for loss, _ in trace]
    if all(norm == 0 for _, norm in trace) or max(losses) == min(losses):
        why = ("the gradient norm was 0" if all(norm == 0 for _, norm in trace) else
               f"the loss was {losses[0]:.6g}, unchanged to the last bit over different batches,")
        raise GuardStop(f"{stage}: {why} at all {len(trace)} steps, so the weights did not move (an empty mask, no "
                        "weighted token, a learning rate below the weights' precision, or a loss that does not depend "
                        "on the weights; set guards.stalled: false to keep the model anyway)")
    tenth = max(1, len(trace) // 10)
    first = sum(loss for loss, _ in trace[:tenth]) / tenth
    last = sum(loss for loss, _ in trace[-tenth:]) / tenth
    if abs(last - first) < g.min_loss_change:
        log.warning("%s: the loss barely moved over %d steps (%.6f -> %.6f, less than guards.min_loss_change %g): "
                    "the stage left the model almost as it found it (raise its learning rate or steps)", stage,
                    len(trace), first, last, g.min_loss_change)
