"""A client for any OpenAI-compatible chat endpoint (hosted API, vLLM server, ...), shared by the rewrite teacher
and the eval judges.

What a long teacher or judge job needs and the plain SDK does not give in one place:
- an on-disk cache keyed by the request (model, messages, sampling settings), so a crash or a rerun never pays
  for the same call twice; entries are written atomically, so a killed job leaves no half-written entry;
- bounded concurrency (`concurrency` requests in flight) with a progress bar;
- retries with exponential backoff (and the server's Retry-After) on 429, 5xx, timeouts, dropped connections and
  malformed JSON; other 4xx fail at once, with the server's message;
- token counts and cost (`price_in` / `price_out` per million tokens) logged at the end.
The API key is read from the environment variable the config names and never logged or cached.
Standard library only (urllib), so it runs wherever allo runs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from allo.config import EndpointConfig
from allo.io import atomic_write_text

log = logging.getLogger(__name__)
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class EndpointError(RuntimeError):
    """A request failed for good (non-retryable status, or retries exhausted); the message never holds the key."""


Endpoint = EndpointConfig  # where and how to call: the recipe's endpoint settings (allo.config), one type


@dataclass
class Usage:
    calls: int = 0
    cache_hits: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def cost(self, ep: Endpoint) -> float:
        return (self.prompt_tokens * ep.price_in + self.completion_tokens * ep.price_out) / 1e6

    def summary(self, ep: Endpoint) -> dict:
        return {"calls": self.calls, "cache_hits": self.cache_hits, "retries": self.retries,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "cost_usd": round(self.cost(ep), 4)}


class ChatClient:
    """`chat(messages, **params)` returns the response JSON of one /chat/completions call, from cache if seen."""

    def __init__(self, endpoint: Endpoint, cache_dir: Optional[str] = None):
        self.ep = endpoint
        self.cache = Path(cache_dir) if cache_dir else None
        self.usage = Usage()
        self._key = os.environ.get(endpoint.api_key_env) if endpoint.api_key_env else None
        if endpoint.api_key_env and not self._key and not _is_local(endpoint.base_url):
            raise EndpointError(f"environment variable {endpoint.api_key_env} is not set (the API key for "
                                f"{endpoint.base_url}); set it, or set api_key_env to null for a keyless server")

    # ------------------------------------------------------------------------------------------- one call
    def request_body(self, messages: Sequence[dict], **params) -> dict:
        return {"model": self.ep.model, "messages": list(messages), **params}

    def cache_key(self, body: dict) -> str:
        return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def chat(self, messages: Sequence[dict], **params) -> dict:
        body = self.request_body(messages, **params)
        path = self._cache_path(body)
        if path is not None and path.exists():
            try:
                cached = json.loads(path.read_text())
                self.usage.add(cache_hits=1)
                return cached
            except ValueError:  # unreadable entry (should not happen: writes are atomic): ask again
                log.warning("cache entry %s unreadable; calling the endpoint again", path)
        response = self._post(body)
        u = response.get("usage") or {}
        self.usage.add(calls=1, prompt_tokens=int(u.get("prompt_tokens") or 0),
                       completion_tokens=int(u.get("completion_tokens") or 0))
        if path is not None:
            atomic_write_text(path, json.dumps(response))
        return response

    def _cache_path(self, body: dict) -> Optional[Path]:
        if self.cache is None:
            return None
        key = self.cache_key(body)
        return self.cache / key[:2] / f"{key}.json"

    def _post(self, body: dict) -> dict:
        url = self.ep.base_url.rstrip("/") + "/chat/completions"
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        last = ""
        for attempt in range(self.ep.max_retries + 1):
            wait = self.ep.backoff * (2 ** attempt) * (0.5 + random.random() / 2)
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.ep.timeout) as resp:
                    raw = resp.read()
                try:
                    out = json.loads(raw)
                    if not isinstance(out, dict) or not out.get("choices"):
                        raise ValueError("no 'choices' in the response")
                    return out
                except ValueError as e:
                    last = f"malformed response ({e}): {raw[:200]!r}"
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode(errors="replace")
                last = f"HTTP {e.code}: {detail}"
                if e.code not in RETRY_STATUS:
                    raise EndpointError(f"{url}: {last}") from None
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    wait = max(wait, float(retry_after))
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt < self.ep.max_retries:
                self.usage.add(retries=1)
                log.debug("%s: %s; retry %d in %.1fs", url, last, attempt + 1, wait)
                time.sleep(wait)
        raise EndpointError(f"{url}: gave up after {self.ep.max_retries + 1} attempts; last error: {last}")

    # ------------------------------------------------------------------------------------------ many calls
    def map(self, requests: Sequence[dict], desc: str = "requests") -> list[dict]:
        """Run `chat(**request)` for every request ({messages, **params}), `concurrency` at a time, in order."""
        from tqdm import tqdm

        with ThreadPoolExecutor(max_workers=max(1, self.ep.concurrency)) as pool:
            futures = [pool.submit(self.chat, **req) for req in requests]
            out = [f.result() for f in tqdm(futures, desc=desc, disable=len(futures) < 2)]
        log.info("%s: %s", desc, self.usage.summary(self.ep))
        return out


def content(response: dict) -> str:
    """The first choice's message text."""
    return (response["choices"][0].get("message") or {}).get("content") or ""


def _is_local(url: str) -> bool:
    from urllib.parse import urlparse

    return (urlparse(url).hostname or "") in {"localhost", "127.0.0.1", "::1"}
