"""The OpenAI-compatible client against a real HTTP server on loopback: retries, errors, cache, concurrency, key."""
import time

import pytest

from allo.openai_client import ChatClient, Endpoint, EndpointError, content
from tests.chat_server import ChatServer, ok


def reply(body, n):
    text = body["messages"][-1]["content"]
    if text == "429, wait 1 s":
        return (429, {"Retry-After": "1"}, b'{"error": "slow down"}') if n == 1 else ok("fine after waiting")
    if text == "429 then ok":
        return (429, {"Retry-After": "0"}, b'{"error": "rate limited"}') if n == 1 else ok("fine after 429")
    if text == "500 twice":
        return (500, {}, b"oops") if n <= 2 else ok("fine after 500s")
    if text == "always 500":
        return 500, {}, b"server down"
    if text == "malformed once":
        return (200, {}, b"{not json") if n == 1 else ok("fine after malformed")
    if text == "slow once":
        if n == 1:
            time.sleep(1.0)
        return ok("fine after timeout")
    if text == "bad request":
        return 400, {}, b'{"error": "context too long"}'
    return ok("echo: " + text)


@pytest.fixture()
def server():
    s = ChatServer(reply)
    yield s
    s.close()


def client(server, tmp_path, **kw):
    ep = Endpoint(base_url=server.url, model="judge-1", api_key_env="ALLO_TEST_KEY", timeout=0.5, max_retries=3,
                  price_in=2.0, price_out=10.0, **kw)
    return ChatClient(ep, cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("prompt,expected", [("429 then ok", "fine after 429"), ("500 twice", "fine after 500s"),
                                             ("malformed once", "fine after malformed"),
                                             ("slow once", "fine after timeout")])
def test_retries_until_success(server, tmp_path, monkeypatch, prompt, expected):
    monkeypatch.setenv("ALLO_TEST_KEY", "sk-secret")
    c = client(server, tmp_path)
    assert content(c.chat([{"role": "user", "content": prompt}])) == expected
    assert c.usage.retries >= 1 and c.usage.calls == 1


def test_gives_up_and_fails_fast_without_leaking_the_key(server, tmp_path, monkeypatch):
    monkeypatch.setenv("ALLO_TEST_KEY", "sk-secret")
    c = client(server, tmp_path)
    with pytest.raises(EndpointError, match="gave up after 4 attempts.*HTTP 500") as e:
        c.chat([{"role": "user", "content": "always 500"}])
    assert "sk-secret" not in str(e.value)
    assert server.seen["always 500"] == 4
    with pytest.raises(EndpointError, match="HTTP 400.*context too long") as bad:
        c.chat([{"role": "user", "content": "bad request"}])
    assert bad.value.status == 400
    assert server.seen["bad request"] == 1  # a 4xx other than 429 is not retried
    assert e.value.status == 500
    assert server.paths[-1] == "/v1/chat/completions"
    assert {k.lower(): v for k, v in server.headers[0].items()}["authorization"] == "Bearer sk-secret"


def test_cache_hit_on_rerun_and_usage(server, tmp_path, monkeypatch):
    monkeypatch.setenv("ALLO_TEST_KEY", "sk-secret")
    reqs = [{"messages": [{"role": "user", "content": f"q{i}"}], "temperature": 0} for i in range(20)]
    first = client(server, tmp_path, concurrency=4)
    out = first.map(reqs)
    assert [content(r) for r in out] == [f"echo: q{i}" for i in range(20)]  # order kept under concurrency
    assert first.usage.summary(first.ep) == {"calls": 20, "cache_hits": 0, "retries": 0, "prompt_tokens": 200,
                                             "completion_tokens": 40, "cost_usd": round((200 * 2 + 40 * 10) / 1e6, 4)}
    again = client(server, tmp_path, concurrency=4)
    assert [content(r) for r in again.map(reqs)] == [content(r) for r in out]
    assert again.usage.cache_hits == 20 and again.usage.calls == 0 and len(server.bodies) == 20
    # a different sampling setting is a different request
    again.chat(reqs[0]["messages"], temperature=1.0)
    assert len(server.bodies) == 21
    cached = list((tmp_path / "cache").rglob("*.json"))
    assert len(cached) == 21 and not any("sk-secret" in p.read_text() for p in cached)
    assert server.bodies[0]["model"] == "judge-1"


def test_missing_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("ALLO_TEST_KEY", raising=False)
    with pytest.raises(EndpointError, match="ALLO_TEST_KEY is not set"):
        ChatClient(Endpoint(base_url="https://api.example.com/v1", model="m", api_key_env="ALLO_TEST_KEY"))
    # a keyless local server (vLLM) is fine
    ChatClient(Endpoint(base_url="http://127.0.0.1:8000/v1", model="m", api_key_env="ALLO_TEST_KEY"))


def test_retry_after_is_honoured(server, tmp_path, monkeypatch):
    monkeypatch.setenv("ALLO_TEST_KEY", "sk-secret")
    c = client(server, tmp_path)
    start = time.monotonic()
    assert content(c.chat([{"role": "user", "content": "429, wait 1 s"}])) == "fine after waiting"
    assert time.monotonic() - start >= 1.0 and server.seen["429, wait 1 s"] == 2 and c.usage.retries == 1


def test_azure_settings_reach_the_deployment_url(server, tmp_path, monkeypatch):
    """`api_version` set: the SDK's Azure client, which calls /openai/deployments/MODEL/chat/completions with the
    version in the query and the key in the api-key header."""
    monkeypatch.setenv("ALLO_TEST_KEY", "azure-secret")
    c = ChatClient(Endpoint(base_url=server.url.removesuffix("/v1"), model="gpt-4o-judge", api_key_env="ALLO_TEST_KEY",
                            api_version="2024-10-21"), cache_dir=str(tmp_path / "cache"))
    assert content(c.chat([{"role": "user", "content": "hi"}])) == "echo: hi"
    assert server.paths[-1] == "/openai/deployments/gpt-4o-judge/chat/completions?api-version=2024-10-21"
    assert {k.lower(): v for k, v in server.headers[-1].items()}["api-key"] == "azure-secret"
