"""Helpers for the serve tests: a real uvicorn server in a thread on a loopback port, HTTP helpers, and a
runtime slowed on purpose so that a disconnect or a full queue lands while a generation is running."""
from __future__ import annotations

import http.client
import json
import threading
import time

from nima_edge.serve.app import Settings, create_app


class LiveServer:
    """create_app(runtimes, settings) served by uvicorn on 127.0.0.1:<free port> until stop()."""

    def __init__(self, runtimes: dict, settings: Settings | None = None):
        import uvicorn

        from nima_edge.serve.launch import bind
        self.app = create_app(runtimes, settings or Settings(allowed_hosts={"127.0.0.1", "localhost", "::1"}))
        self.workers = self.app.state.workers
        sock = bind("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def request(self, method: str, path: str, body=None, headers: dict | None = None,
                timeout: float = 120) -> tuple[int, dict, bytes]:
        """-> (status, headers, body bytes). `body`: a dict (sent as JSON) or raw bytes."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            conn.request(method, path, body=data, headers=hdrs)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def post(self, path: str, body, headers: dict | None = None) -> tuple[int, dict]:
        status, _, raw = self.request("POST", path, body, headers)
        return status, json.loads(raw)

    def open_stream(self, path: str, body: dict, headers: dict | None = None) -> "SSE":
        return SSE(self.port, path, body, headers)


class SSE:
    """A streamed request whose events can be read one by one, and whose connection can be dropped."""

    def __init__(self, port: int, path: str, body: dict, headers: dict | None = None):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.conn.request("POST", path, json.dumps({**body, "stream": True}).encode(),
                          {"Content-Type": "application/json", **(headers or {})})
        self.response = self.conn.getresponse()
        self.status = self.response.status

    def events(self):
        """Yields each `data:` payload (parsed JSON, or the string "[DONE]")."""
        for line in self.response:
            line = line.decode().strip()
            if line.startswith("data: "):
                payload = line[len("data: "):]
                yield payload if payload == "[DONE]" else json.loads(payload)

    def drop(self) -> None:
        """Close the socket as a browser tab or a killed client would."""
        self.response.close()
        self.conn.sock and self.conn.sock.close()
        self.conn.close()


def chat_text(events) -> tuple[str, list]:
    """Concatenated delta content of chat chunks, and the list of all payloads."""
    seen = list(events)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in seen
                   if isinstance(c, dict) and c.get("choices"))
    return text, seen


def slowed(runtime_cls, prefill_s: float = 0.0, decode_s: float = 0.0):
    """A subclass of a real runtime that sleeps in prefill/decode: the same outputs, only later, so a test
    can act while a generation is known to be in progress (a tiny model otherwise finishes in ms)."""

    class Slowed(runtime_cls):
        def _prefill(self, ids):
            time.sleep(prefill_s)
            return super()._prefill(ids)

        def _decode(self, token_id):
            time.sleep(decode_s)
            return super()._decode(token_id)

    Slowed.__name__ = f"Slowed{runtime_cls.__name__}"
    return Slowed


def wait_for(predicate, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
