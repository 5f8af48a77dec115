"""A client for any OpenAI-compatible chat endpoint (hosted API, Azure OpenAI, a vLLM server, ...), shared by the
rewrite teacher and the eval judges.

The transport is the `openai` SDK: its retries (429, 408/409, 5xx, timeouts, dropped connections; exponential
backoff; the server's Retry-After honoured), timeouts, typed errors and Azure / base-URL settings. What is ours on
top, because a long teacher or judge job needs it and the SDK does not give it:
- an on-disk cache keyed by the request (model, messages, sampling settings), so a crash or a rerun never pays
  for the same call twice; entries are written atomically, so a killed job leaves no half-written entry;
- bounded concurrency (`concurrency` requests in flight) with a progress bar;
- a malformed reply (no JSON, no `choices`) asked again, which the SDK would hand back as it is;
- token counts, HTTP retries and cost (`price_in` / `price_out` per million tokens) logged at the end.
The API key is read from the environment variable the config names and never logged or cached.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from allo.config import EndpointConfig
from allo.io import atomic_write_text

log = logging.getLogger(__name__)


class EndpointError(RuntimeError):
    """A request failed for good (non-retryable status, or retries exhausted); the message never holds the key.
    `status` is the HTTP status when there was one."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


Endpoint = EndpointConfig  # where and how to call: the recipe's endpoint settings (allo.config), one type


@dataclass
class Usage:
    calls: int = 0
    cache_hits: int = 0
    requests: int = 0  # HTTP requests sent, retries included
    prompt_tokens: int = 0
    completion_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    @property
    def retries(self) -> int:
        return max(0, self.requests - self.calls)

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
        key = os.environ.get(endpoint.api_key_env) if endpoint.api_key_env else None
        if endpoint.api_key_env and not key and not is_local(endpoint.base_url):
            raise EndpointError(f"environment variable {endpoint.api_key_env} is not set (the API key for "
                                f"{endpoint.base_url}); set it, or set api_key_env to null for a keyless server")
        self._sdk = _sdk_client(endpoint, key, lambda _request: self.usage.add(requests=1))

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
        """One call through the SDK (which retries HTTP failures); a malformed reply is asked again."""
        import openai

        url = self.ep.base_url.rstrip("/")
        last = ""
        for _ in range(self.ep.max_retries + 1):
            try:
                raw = self._sdk.chat.completions.with_raw_response.create(**body)
                out = json.loads(raw.http_response.text)
                if isinstance(out, dict) and out.get("choices"):
                    return out
                last = f"malformed response (no 'choices'): {raw.http_response.text[:200]!r}"
            except ValueError as e:
                last = f"malformed response ({e})"
            except openai.APIStatusError as e:
                failed = f"HTTP {e.status_code}: {(e.response.text or '')[:300]}"
                raise EndpointError(f"{url}: gave up after {self.ep.max_retries + 1} attempts; last error: {failed}"
                                    if _retryable(e.status_code) else f"{url}: {failed}", e.status_code) from None
            except openai.APIConnectionError as e:  # timeouts included, after the SDK's retries
                raise EndpointError(f"{url}: gave up after {self.ep.max_retries + 1} attempts; last error: "
                                    f"{type(e).__name__}: {e}") from None
            log.debug("%s: %s; asking again", url, last)
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


def _sdk_client(ep: Endpoint, key: Optional[str], on_request):
    """The SDK's client for the endpoint: Azure OpenAI when `api_version` is set, else any base URL."""
    import openai

    for name in ("httpx", "httpx2"):  # one INFO line per HTTP request otherwise; the usage summary says it all
        logging.getLogger(name).setLevel(logging.WARNING)
    http = openai.DefaultHttpxClient(event_hooks={"request": [on_request]})
    common = dict(api_key=key or "none", timeout=ep.timeout, max_retries=ep.max_retries, http_client=http)
    if ep.api_version:
        return openai.AzureOpenAI(azure_endpoint=ep.base_url, api_version=ep.api_version, **common)
    return openai.OpenAI(base_url=ep.base_url, **common)


def _retryable(status: int) -> bool:
    return status in (408, 409, 429) or status >= 500


def is_local(url: str) -> bool:
    from urllib.parse import urlparse

    return (urlparse(url).hostname or "") in {"localhost", "127.0.0.1", "::1"}
