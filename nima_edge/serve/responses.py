"""OpenAI response bodies and the SSE stream: chat.completion(.chunk) and text_completion objects.

Streams follow OpenAI's framing (`data: {json}\\n\\n` ... `data: [DONE]\\n\\n`; a first chat chunk with the
assistant role; the finish_reason in the last content chunk; with stream_options.include_usage a final
chunk with empty choices and the usage). An error after the stream started is sent as
`data: {"error": {...}}` (what vLLM does, and what the openai client raises as APIError). Extensions:
`timings` (llama.cpp server's names) on the last chunk and `nima_context` (prompt tokens, context size,
oldest messages dropped to fit) on the first.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from nima_edge.serve.errors import ApiError
from nima_edge.serve.worker import Event, Job


@dataclass
class Reply:
    """What the route knows about one request before generation starts."""
    kind: str  # "chat" | "completion"
    model: str
    stream: bool
    include_usage: bool
    context: dict  # the nima_context extension

    def __post_init__(self):
        self.id = f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, chunk: bool) -> dict:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def _choice(self, text: str | None, finish_reason: str | None, chunk: bool, role: bool = False) -> dict:
        if self.kind == "completion":
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        if chunk:
            delta = ({"role": "assistant", "content": text or ""} if role else
                     {"content": text} if text is not None else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}

    def body(self, text: str, done: Event) -> dict:
        return {**self._envelope(False), "choices": [self._choice(text, done.finish_reason, False)],
                "usage": done.usage, "timings": done.timings, "nima_context": self.context}

    async def sse(self, job: Job) -> AsyncIterator[bytes]:
        usage = {"usage": None} if self.include_usage else {}
        first = {**self._envelope(True), "nima_context": self.context, **usage}
        if self.kind == "chat":
            yield _data({**first, "choices": [self._choice("", None, True, role=True)]})
            first = None
        while True:
            ev = await job.events.get()
            if ev.kind == "text":
                chunk = {**(first or self._envelope(True)), "choices": [self._choice(ev.text, None, True)], **usage}
                first = None
                yield _data(chunk)
            elif ev.kind == "error":
                yield _data(server_error(ev.text).body())
                break
            elif ev.finish_reason == "cancelled":
                return  # the client is gone
            else:
                last = self._choice(None if self.kind == "chat" else "", ev.finish_reason, True)
                yield _data({**(first or self._envelope(True)), "choices": [last], "timings": ev.timings, **usage})
                if self.include_usage:
                    yield _data({**self._envelope(True), "choices": [], "usage": ev.usage})
                break
        yield b"data: [DONE]\n\n"


def server_error(message: str) -> ApiError:
    return ApiError(500, f"generation failed: {message}", type="server_error")


def _data(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def cancel_on_disconnect(receive, job: Job) -> None:
    """The request body has been read: the next ASGI message is http.disconnect when the client leaves."""
    while (await receive())["type"] != "http.disconnect":
        pass
    job.cancel()


class EventStream:
    """An ASGI response streaming `chunks`; a client that disconnects cancels `job` (even while it waits
    in the queue, when nothing is being sent that could fail)."""

    def __init__(self, job: Job, chunks: AsyncIterator[bytes]):
        self.job, self.chunks = job, chunks

    async def __call__(self, scope, receive, send) -> None:
        watcher = asyncio.create_task(cancel_on_disconnect(receive, self.job))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]})
            async for data in self.chunks:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # uvicorn raises ClientDisconnected (an OSError) on a send after a disconnect
            pass
        finally:
            watcher.cancel()
            self.job.cancel()  # no-op when it finished


async def collect(receive, job: Job) -> tuple[str, Event]:
    """Wait for a whole (non-streamed) reply; a disconnect cancels it."""
    watcher = asyncio.create_task(cancel_on_disconnect(receive, job))
    pieces = []
    try:
        while (ev := await job.events.get()).kind == "text":
            pieces.append(ev.text)
        return "".join(pieces), ev
    finally:
        watcher.cancel()
        job.cancel()
