"""One worker thread per loaded model: runtimes are not thread-safe, so generations run one at a time
and the others wait in a bounded queue (full -> the caller answers 429). Each job has its own cancel
flag, checked after every token, so a client that goes away stops only its own generation.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from nima_edge.errors import NimaError
from nima_edge.runtime import Runtime
from nima_edge.sampling import Sampling

log = logging.getLogger("nima_edge.serve")


class QueueFull(Exception):
    pass


@dataclass
class Event:
    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # done: "stop" | "length" | "cancelled"
    usage: dict | None = None
    timings: dict | None = None


@dataclass
class Job:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancel()


class StopScanner:
    """Finds stop strings across streamed pieces; holds back a tail that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """-> (text safe to send, whether a stop string was reached: generation ends there)."""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[:min(hits)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


class ModelWorker:
    def __init__(self, name: str, runtime: Runtime, queue_size: int = 8):
        self.name, self.runtime, self.queue_size = name, runtime, queue_size
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self.waiting = 0  # submitted, not yet started
        self.busy = False
        # cancelled: stopped while generating; left_queue: its client left before it started (never ran)
        self.stats = {"completed": 0, "cancelled": 0, "left_queue": 0, "rejected": 0, "failed": 0}
        self._seconds_per_job = 1.0  # running mean, for Retry-After
        self._thread = threading.Thread(target=self._run, name=f"nima-serve:{name}", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.waiting >= self.queue_size:
                self.stats["rejected"] += 1
                raise QueueFull()
            self.waiting += 1
        self._jobs.put(job)

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free (at least 1): one job's mean duration."""
        return max(1, round(self._seconds_per_job))

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)
        self.runtime.close()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                self.waiting -= 1
                self.busy = not job.cancelled.is_set()
            if not self.busy:  # its client left while it waited
                self.stats["left_queue"] += 1
                job.emit(Event("done", finish_reason="cancelled"))
                continue
            started = time.perf_counter()
            try:
                reason = self._generate(job)
                self.stats["cancelled" if reason == "cancelled" else "completed"] += 1
            except NimaError as e:
                self.stats["failed"] += 1
                job.emit(Event("error", e.problem))
            except Exception as e:  # a runtime crash must not kill the worker: report it to this client only
                log.exception("generation failed on %s", self.name)
                self.stats["failed"] += 1
                job.emit(Event("error", f"{type(e).__name__}: {e}"))
            finally:
                self.busy = False
                self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * (time.perf_counter() - started)

    def _generate(self, job: Job) -> str:
        rt = self.runtime
        stream, stops = rt.tokenizer.stream(), StopScanner(job.stop)
        # generate_ids caps the reply at the context; the same cap tells EOS from "length" afterwards
        limit = min(job.max_new_tokens, rt.context_length - len(job.prompt_ids))
        t0 = time.perf_counter()
        t_first = t_last = t0
        n, reason = 0, None
        for tok in rt.generate_ids(job.prompt_ids, limit, job.sampling, stop_at_eos=not job.ignore_eos):
            t_last = time.perf_counter()
            if n == 0:
                t_first = t_last
            n += 1
            if job.cancelled.is_set():
                reason = "cancelled"
                break
            text, hit = stops.feed(stream.step(tok))
            if text:
                job.emit(Event("text", text))
            if hit:
                reason = "stop"
                break
        if reason is None:
            if tail := stops.flush():
                job.emit(Event("text", tail))
            reason = "length" if n >= limit else "stop"
        usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": n,
                 "total_tokens": len(job.prompt_ids) + n}
        # llama.cpp server's names; prompt_ms includes the first sampled token, predicted_* the rest
        decode_ms = (t_last - t_first) * 1e3
        timings = {"prompt_n": len(job.prompt_ids), "prompt_ms": (t_first - t0) * 1e3,
                   "predicted_n": n, "predicted_ms": decode_ms,
                   "predicted_per_second": (n - 1) / decode_ms * 1e3 if n > 1 and decode_ms > 0 else None}
        job.emit(Event("done", finish_reason=reason, usage=usage, timings=timings))
        return reason
