"""A small OpenAI-compatible chat server on loopback for client tests; a test passes `reply(body, n)` that decides
the status, headers and payload of the n-th request (n counts from 1 per distinct user message)."""
from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


def ok(text: str, prompt_tokens: int = 10, completion_tokens: int = 2, logprobs: dict | None = None) -> tuple:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if logprobs is not None:
        choice["logprobs"] = logprobs
    return 200, {}, json.dumps({"choices": [choice], "usage": {"prompt_tokens": prompt_tokens,
                                                                "completion_tokens": completion_tokens}}).encode()


class ChatServer:
    def __init__(self, reply: Callable[[dict, int], tuple]):
        self.reply, self.seen, self.bodies, self.headers, self.paths = reply, Counter(), [], [], []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = body["messages"][-1]["content"]
                with threading.Lock():
                    server.seen[key] += 1
                    server.bodies.append(body)
                    server.headers.append(dict(self.headers))
                    server.paths.append(self.path)
                status, headers, payload = server.reply(body, server.seen[key])
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
