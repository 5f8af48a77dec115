"""LLM judges behind any OpenAI-compatible endpoint (`allo.openai_client`: cached, resumable, retried, costed).

AlpacaEval 2.0 (`alpaca_pairs`): the judge prompt is the one `alpaca_eval` ships for its default annotator
(`weighted_alpaca_eval_gpt4_turbo`: alpaca_eval_clf.txt, read from the installed package, not copied), asked for
one token with top-5 logprobs; the preference is P("M") / (P("m") + P("M")) as in alpaca_eval's logprob parser
(the letter alone when the server returns no logprobs). Two protocols:
- `official`: the baseline is AlpacaEval's reference outputs, the order of the two outputs is randomised per
  instruction (seeded), and the annotations are written in alpaca_eval's format so its length-controlled win
  rate applies (`allo eval alpaca-score`);
- `swap`: the paper's protocol (win rate against the SFT model's own outputs): every pair is judged in both
  orders and the two preferences averaged, which cancels the judge's position bias.

Arena-Hard (`arena_games`): each question is judged twice, baseline first then model first, with the verdict
labels [[A>>B]] .. [[B>>A]]; a game without exactly one distinct verdict is asked again (`attempts`), then left
out and counted. `battles` turns games into weighted battles (a strong verdict weighs 3, as Arena-Hard does),
scored by Bradley–Terry with bootstrap intervals (`allo.eval.bradley_terry`). The default system prompt is our
own wording of the same rubric; for numbers comparable with the public leaderboard pass Arena-Hard-Auto's own
judge prompt (its `utils/judge_utils.py`) with `--system-prompt FILE`, and name the version (v0.1 / v2.0).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
from pathlib import Path
from unittest import mock
from typing import Callable, Optional, Sequence

from allo.io import hub_offline
from allo.openai_client import ChatClient, content

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------- AlpacaEval
ALPACA_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"


def alpaca_template() -> str:
    import alpaca_eval

    path = Path(alpaca_eval.__file__).parent / "evaluators_configs" / "alpaca_eval_clf_gpt4_turbo" / "alpaca_eval_clf.txt"
    return path.read_text()


def alpaca_messages(instruction: str, output_1: str, output_2: str, template: Optional[str] = None) -> list[dict]:
    text = (template or alpaca_template())
    for key, value in (("instruction", instruction), ("output_1", output_1), ("output_2", output_2)):
        text = text.replace("{" + key + "}", value)
    messages = []
    for part in text.strip().split("<|im_start|>")[1:]:
        role, body = part.split("\n", 1)
        messages.append({"role": role.strip(), "content": body.split("<|im_end|>", 1)[0].strip()})
    return messages


def prob_second(response: dict) -> Optional[float]:
    """P(the second output, "M", is better) from the first token's top logprobs; else from the text; None if the
    judge named neither."""
    choice = response["choices"][0]
    tops = (((choice.get("logprobs") or {}).get("content") or [{}])[0]).get("top_logprobs") or []
    probs = {"m": 0.0, "M": 0.0}
    for t in tops:
        tok = str(t.get("token", "")).strip()
        if tok in probs:
            probs[tok] += math.exp(t["logprob"])
    if probs["m"] + probs["M"] > 0:
        return probs["M"] / (probs["m"] + probs["M"])
    text = content(response).strip()
    return {"m": 0.0, "M": 1.0}.get(text[:1]) if text else None


def _swapped(instruction: str, seed: int) -> bool:
    return hashlib.sha256(f"{seed}:{instruction}".encode()).digest()[0] % 2 == 1


def alpaca_pairs(client: ChatClient, instructions: Sequence[str], baseline: Sequence[str], model: Sequence[str],
                 generator_baseline: str, generator_model: str, protocol: str = "official", seed: int = 0,
                 template: Optional[str] = None) -> list[dict]:
    """Annotations in alpaca_eval's format: output_1 = baseline, output_2 = model, preference in [1, 2]
    (2 = the model is better); None where the judge gave no usable answer."""
    if not len(instructions) == len(baseline) == len(model):
        raise ValueError(f"{len(instructions)} instructions, {len(baseline)} baseline and {len(model)} model outputs")
    params = dict(max_tokens=1, temperature=0, logprobs=True, top_logprobs=5)
    orders = []  # per request: (item index, whether the model is shown first)
    requests = []
    decided = _empty_decided(baseline, model, "alpaca judge")
    for i, (ins, b, m) in enumerate(zip(instructions, baseline, model)):
        if i in decided:
            continue
        shown = [_swapped(ins, seed)] if protocol == "official" else [False, True] if protocol == "swap" else None
        if shown is None:
            raise ValueError(f"unknown protocol {protocol!r} (official, swap)")
        for model_first in shown:
            first, second = (m, b) if model_first else (b, m)
            requests.append({"messages": alpaca_messages(ins, first, second, template), **params})
            orders.append((i, model_first))
    responses = client.map(requests, desc="alpaca judge")
    per_item: dict[int, list[float]] = {}
    for (i, model_first), resp in zip(orders, responses):
        p = prob_second(resp)
        if p is not None:
            per_item.setdefault(i, []).append(1 - p if model_first else p)
    out = []
    for i, (ins, b, m) in enumerate(zip(instructions, baseline, model)):
        ps = [decided[i]] if i in decided else per_item.get(i)
        out.append({"instruction": ins, "output_1": b, "output_2": m, "generator_1": generator_baseline,
                    "generator_2": generator_model, "annotator": f"allo:{ALPACA_ANNOTATOR}:{client.ep.model}",
                    "preference": 1 + sum(ps) / len(ps) if ps else None, "protocol": protocol})
    return out


def alpaca_score(annotations: Sequence[dict], difficulty: Optional[str] = None) -> tuple[dict, Optional[str]]:
    """Win rate (alpaca_eval's `get_winrate`) and the length-controlled win rate. The LC GLM reads alpaca_eval's
    `df_gamed.csv` (per-instruction difficulty, plus the gamed baselines it regularises towards) from the hub
    dataset tatsu-lab/alpaca_eval: from the local cache only when HF_HUB_OFFLINE is set, or from `difficulty`
    (default: $ALLO_ALPACA_DIFFICULTY), a local copy of that file or a directory holding it. Annotations are in
    alpaca_eval's instruction order. Returns (metrics, a one-line note when LC is unavailable)."""
    import warnings

    with warnings.catch_warnings():  # pkg_resources (alpaca_eval's import) and sklearn deprecations: not the user's
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return _alpaca_score(annotations, difficulty)


def _alpaca_score(annotations: Sequence[dict], difficulty: Optional[str]) -> tuple[dict, Optional[str]]:
    from alpaca_eval.metrics import get_winrate, glm_winrate

    rows = [a for a in annotations if a.get("preference") is not None]
    metrics = {k: float(v) for k, v in get_winrate(rows).items()}
    metrics["n_annotations"] = len(annotations)
    metrics["n_unusable"] = len(annotations) - len(rows)
    difficulty = difficulty or os.environ.get("ALLO_ALPACA_DIFFICULTY")
    try:
        # alpaca_eval fetches its data with a fixed hf_hub_download call: a local copy is served in its place
        local = mock.patch.object(glm_winrate, "hf_hub_download", _local_hub_file(Path(difficulty))) \
            if difficulty else contextlib.nullcontext()
        with local:
            lc = glm_winrate.get_length_controlled_winrate(rows, save_weights_dir=None, is_warn_extreme_changes=False)
        metrics["length_controlled_winrate"] = float(lc["length_controlled_winrate"])
        metrics["lc_standard_error"] = float(lc["lc_standard_error"])
        return metrics, None
    except Exception as e:  # no difficulty data: the plain win rate stands, and the note says how to get LC
        where = (f"{difficulty} ({type(e).__name__}: {e})" if difficulty else
                 f"the Hugging Face hub ({type(e).__name__}{'; HF_HUB_OFFLINE is set' if hub_offline() else ''})")
        return metrics, (f"length-controlled win rate unavailable: alpaca_eval's df_gamed.csv could not be loaded "
                         f"from {where}; plain win rate only. Offline, pass --difficulty FILE (or set "
                         "ALLO_ALPACA_DIFFICULTY) with a copy of df_gamed.csv from the tatsu-lab/alpaca_eval dataset, "
                         "or put it in the hub cache: hf download tatsu-lab/alpaca_eval df_gamed.csv "
                         "--repo-type dataset")


def _local_hub_file(path: Path):
    """An hf_hub_download stand-in answering from `path`: the file itself for df_gamed.csv, or a directory's file."""
    def download(repo_id: str = "", filename: str = "", **_) -> str:
        found = path / filename if path.is_dir() else path if filename == "df_gamed.csv" else path.parent / filename
        if not found.is_file():
            raise FileNotFoundError(f"{found}: no such file ({repo_id} {filename})")
        return str(found)
    return download


# ----------------------------------------------------------------------------------------------- Arena-Hard
ARENA_TEMPLATE = ("<|User Prompt|>\n{question}\n\n<|The Start of Assistant A's Answer|>\n{answer_a}\n"
                  "<|The End of Assistant A's Answer|>\n\n<|The Start of Assistant B's Answer|>\n{answer_b}\n"
                  "<|The End of Assistant B's Answer|>")
ARENA_SYSTEM = (
    "You are an impartial judge comparing two AI assistants' answers to the user prompt below. First write your "
    "own answer to the prompt. Then compare both answers with yours: point out mistakes and inaccurate "
    "information, and judge whether each answer is helpful (it responds to the prompt or asks for clarification "
    "when the prompt is ambiguous), relevant and concise, creative where that matters, and what important "
    "information it leaves out. Finish with exactly one verdict label:\n"
    "1. Assistant A is significantly better: [[A>>B]]\n2. Assistant A is slightly better: [[A>B]]\n"
    "3. Tie, relatively the same: [[A=B]]\n4. Assistant B is slightly better: [[B>A]]\n"
    "5. Assistant B is significantly better: [[B>>A]]\n"
    "Example: \"My final verdict is tie: [[A=B]]\".")
VERDICT = re.compile(r"\[\[([AB<>=]+)\]\]")
LABELS = {"A>>B", "A>B", "A=B", "B>A", "B>>A"}

# The leaderboard's judge prompts, verbatim from arena-hard-auto (lmarena/arena-hard-auto @ 196f6b8,
# utils/judge_utils.py, Apache-2.0): one for v0.1 and for v2.0's hard_prompt, coding and math questions; v2.0's
# creative_writing questions drop "generate your own answer". Scores compare with the leaderboard only with these.
_OWN = ("Begin your evaluation by generating your own answer to the prompt. You must provide your answers before "
        "judging any answers.\n\n")
_RUBRIC = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the "
    "user prompt displayed below. You will be given assistant A's answer and assistant B's answer. Your job is to "
    "evaluate which assistant's answer is better.\n\n{own}When evaluating the assistants' answers, compare both "
    "assistants' answers{yours}. You must identify and correct any mistakes or inaccurate information.\n\nThen "
    "consider if the assistant's answers are helpful, relevant, and concise. Helpful means the answer correctly "
    "responds to the prompt or follows the instructions. Note when user prompt has any ambiguity or more than one "
    "interpretation, it is more helpful and appropriate to ask for clarifications or more information from the user "
    "than providing an answer based on assumptions. Relevant means all parts of the response closely connect or are "
    "appropriate to what is being asked. Concise means the response is clear and not verbose or excessive.\n\nThen "
    "consider the creativity and novelty of the assistant's answers when needed. Finally, identify any missing "
    "important information in the assistants' answers that would be beneficial to include when responding to the "
    "user prompt.\n\nAfter providing your explanation, you must output only one of the following choices as your "
    "final verdict with a label:\n\n1. Assistant A is significantly better: [[A>>B]]\n2. Assistant A is slightly "
    "better: [[A>B]]\n3. Tie, relatively the same: [[A=B]]\n4. Assistant B is slightly better: [[B>A]]\n5. "
    "Assistant B is significantly better: [[B>>A]]\n\nExample output: \"My final verdict is tie: [[A=B]]\".")
ARENA_OFFICIAL = _RUBRIC.format(own=_OWN, yours=" with your answer")
ARENA_OFFICIAL_CREATIVE = _RUBRIC.format(own="", yours="")
# Each version's judge, baselines (by question category) and token budget, as its config/arena-hard-*.yaml sets them.
ARENA_VERSIONS = {
    "v0.1": {"judge": "gpt-4-1106-preview", "max_tokens": 4096, "baseline": {"arena-hard-v0.1": "gpt-4-0314"}},
    "v2.0": {"judge": "gpt-4.1", "max_tokens": 16000,
             "baseline": {"hard_prompt": "o3-mini-2025-01-31", "coding": "o3-mini-2025-01-31",
                          "math": "o3-mini-2025-01-31", "creative_writing": "gemini-2.0-flash-001"}},
}
_OFFICIAL_PATTERNS = (re.compile(r"\[\[([AB<>=]+)\]\]"), re.compile(r"\[([AB<>=]+)\]"))


def official_system_prompt(question: dict) -> str:
    """The leaderboard's judge prompt for this question (by its category)."""
    return ARENA_OFFICIAL_CREATIVE if question.get("category") == "creative_writing" else ARENA_OFFICIAL


def official_verdict(text: str) -> Optional[str]:
    """arena-hard-auto's get_score: the last match of the first pattern that matches the upper-cased judgment."""
    for pattern in _OFFICIAL_PATTERNS:
        found = [m for m in pattern.findall(text.upper()) if m]
        if found:
            return found[-1] if found[-1] in LABELS else None
    return None


def parse_verdict(text: str) -> Optional[str]:
    """The verdict label when the judgment names exactly one distinct label, else None."""
    found = {m for m in VERDICT.findall(text) if m in LABELS}
    return found.pop() if len(found) == 1 else None


def _empty_decided(baseline: Sequence[str], model: Sequence[str], what: str) -> dict[int, float]:
    """Items where an answer is empty, decided without asking the judge: P(model better) is 0 when only the model's
    is empty, 1 when only the baseline's, 0.5 when both are (an empty answer answers nothing)."""
    decided = {i: 0.5 if not b.strip() and not m.strip() else float(not b.strip())
               for i, (b, m) in enumerate(zip(baseline, model)) if not b.strip() or not m.strip()}
    if decided:
        log.info("%s: %d of %d items have an empty answer; decided without a judge call (an empty answer loses, two "
                 "tie)", what, len(decided), len(model))
    return decided


def arena_games(client: ChatClient, questions: Sequence[dict], baseline: dict[str, str], model: dict[str, str],
                system_prompt: str | Callable[[dict], str] = official_system_prompt, attempts: int = 2,
                max_tokens: int = 4096, verdict: Callable[[str], Optional[str]] = official_verdict) -> list[dict]:
    """Per question two games: game 1 shows the baseline as A, game 2 the model as A. Returns rows
    {uid, game, verdict, judgment}; verdict None when the judge gave no label after `attempts` tries.
    `system_prompt`: a prompt, or one per question (default: the leaderboard's, by category); `verdict`: how a
    judgment is read (default: the leaderboard's; `parse_verdict` wants exactly one distinct label)."""
    prompt_of = system_prompt if callable(system_prompt) else (lambda q: system_prompt)
    games = []
    for q in questions:
        uid = q["uid"]
        if uid not in baseline or uid not in model:
            raise ValueError(f"question {uid}: missing {'baseline' if uid not in baseline else 'model'} answer")
        games.append((uid, 1, baseline[uid], model[uid], q["prompt"], prompt_of(q)))
        games.append((uid, 2, model[uid], baseline[uid], q["prompt"], prompt_of(q)))
    rows = [{"uid": uid, "game": g, "verdict": None, "judgment": ""} for uid, g, *_ in games]
    uids = [q["uid"] for q in questions]
    decided = _empty_decided([baseline[u] for u in uids], [model[u] for u in uids], "arena judge")
    for i, (uid, g, a, b, *_) in enumerate(games):
        if uids.index(uid) in decided:  # A is the baseline in game 1; an empty answer loses, strongly
            rows[i]["verdict"] = "A=B" if not a.strip() and not b.strip() else "B>>A" if not a.strip() else "A>>B"
            rows[i]["judgment"] = "(not judged: an empty answer)"
    pending = [i for i, row in enumerate(rows) if row["verdict"] is None]
    for attempt in range(attempts):
        if not pending:
            break
        requests = [{"messages": [{"role": "system", "content": games[i][5]},
                                  {"role": "user", "content": ARENA_TEMPLATE.format(
                                      question=games[i][4], answer_a=games[i][2], answer_b=games[i][3])}],
                     "temperature": 0, "max_tokens": max_tokens, **({"seed": attempt} if attempt else {})}
                    for i in pending]
        responses = client.map(requests, desc=f"arena judge (attempt {attempt + 1})")
        still = []
        for i, resp in zip(pending, responses):
            rows[i]["judgment"] = content(resp)
            rows[i]["verdict"] = verdict(rows[i]["judgment"])
            if rows[i]["verdict"] is None:
                still.append(i)
        pending = still
    return rows


def battles(games: Sequence[dict], model_name: str, baseline_name: str,
            strong_weight: float = 3.0) -> tuple[list[tuple], list[str], int]:
    """(battles, their question ids, games without a verdict). Game 1 has the baseline as A, game 2 the model."""
    out, groups, missing = [], [], 0
    for g in games:
        v = g["verdict"]
        if v is None:
            missing += 1
            continue
        a, b = (baseline_name, model_name) if g["game"] == 1 else (model_name, baseline_name)
        outcome = {"A>>B": 1.0, "A>B": 1.0, "A=B": 0.5, "B>A": 0.0, "B>>A": 0.0}[v]
        weight = strong_weight if v in ("A>>B", "B>>A") else 1.0
        out.append((a, b, outcome, weight))
        groups.append(g["uid"])
    return out, groups, missing
