"""Teachers that rewrite wrong responses with minimum edits (docs/method.md §2): the programmatic one for checkable
arithmetic, and any LLM behind an OpenAI-compatible endpoint (cached, retried, concurrent: `allo.openai_client`).

The LLM teacher sees the problem, a reference (the reference solution, or for instruction following the chosen
response) and the wrong response, and is asked for the corrected response only. Its reply is used verbatim
except for a surrounding code fence or a leading "Rewrite:" label, which models add despite being told not to.
"""
from __future__ import annotations

import logging
import re
from typing import Optional, Sequence

log = logging.getLogger(__name__)

SYSTEM = ("You correct wrong responses with minimum edits. Keep every word, number and step of the wrong response "
          "that is already right; change only what is wrong, so that the result is correct. Reply with the "
          "corrected response only, with no preamble and no explanation.")
USER = ("Problem:\n{problem}\n\nReference response (correct):\n{reference}\n\nWrong response:\n{wrong}\n\n"
        "Rewrite the wrong response into a correct one, changing as few words as possible.")
_FENCE = re.compile(r"^```[a-zA-Z]*\n(.*)\n```$", re.S)
_LABEL = re.compile(r"^(?:corrected response|rewrite|rewritten response)\s*:\s*", re.I)


def messages(problem: str, wrong: str, reference: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": USER.format(problem=problem, reference=reference.strip(), wrong=wrong.strip())}]


def clean(reply: str) -> str:
    text = reply.strip()
    m = _FENCE.match(text)
    text = m.group(1).strip() if m else text
    return _LABEL.sub("", text)


def llm_rewrites(client, items: Sequence[dict], max_tokens: int = 2048) -> list[Optional[str]]:
    """One rewrite per item {prompt, wrong, reference}, greedy; None where the endpoint failed for good (counted)."""
    from allo.openai_client import EndpointError, content

    def one(it: dict) -> Optional[str]:
        try:
            return clean(content(client.chat(messages(it["prompt"], it["wrong"], it["reference"]), temperature=0,
                                             max_tokens=max_tokens)))
        except EndpointError as e:
            log.warning("teacher failed on one item: %s", e)
            return None

    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=client.ep.concurrency) as pool:
        out = list(tqdm(pool.map(one, items), total=len(items), desc="teacher rewrites"))
    log.info("teacher: %s", client.usage.summary(client.ep))
    return out


def programmatic_rewrites(items: Sequence[dict]) -> list[Optional[str]]:
    from allo.reward.programmatic import rewrite

    return [rewrite(it["prompt"], it["wrong"], it["reference"]) for it in items]


def check_programmatic(items: Sequence[dict]) -> None:
    """The programmatic teacher knows one task (allo/tasks/arith.py); on any other it would "fix" every response
    into nonsense that is then dropped as wrong, and the run would quietly forget nothing. Refuse up front."""
    from allo.reward.programmatic import TASK, understands

    alien = [it["prompt"] for it in items if not understands(it["prompt"])]
    if alien:
        raise ValueError(f"reward.teacher: programmatic only understands {TASK}, and {len(alien)} of {len(items)} "
                         f"problems are not of that kind (e.g. {alien[0][:80]!r}); use reward.teacher: openai with a "
                         "teacher_endpoint, or python:MODULE:FUNCTION with your own rewrite function")


def python_rewrites(spec: str):
    """`python:MODULE:FUNCTION` -> a teacher over items, calling FUNCTION(problem, wrong, reference) for each; its
    None (or an exception, logged) counts as a teacher failure."""
    import importlib

    module, _, name = spec.removeprefix("python:").rpartition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward.teacher: cannot import {name} from {module} ({type(e).__name__}: {e}); the module "
                         "must be importable from the job's environment (installed, or on PYTHONPATH)") from None

    def rewrites(items: Sequence[dict]) -> list[Optional[str]]:
        out = []
        for it in items:
            try:
                fixed = fn(it["prompt"], it["wrong"], it["reference"])
            except Exception as e:  # one bad item must not end a long job: counted as teacher_failed
                log.warning("reward.teacher %s raised on one item (%s: %s); counted as a teacher failure", spec,
                            type(e).__name__, e)
                fixed = None
            out.append(fixed if isinstance(fixed, str) else None)
        return out
    return rewrites
