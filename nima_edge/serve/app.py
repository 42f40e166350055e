"""The Starlette app: OpenAI-compatible routes over loaded runtimes, the chat page, /health.

Prompts go through the common runtime protocol: chat messages are rendered and fitted to the context
by nima_edge.chat.Conversation (the model's chat template; with `fit_context` the oldest turns are
dropped, as the terminal chat does), raw completions are tokenized by the runtime.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from nima_edge.chat import Conversation
from nima_edge.errors import NimaError
from nima_edge.runtime import Runtime
from nima_edge.serve.errors import ApiError, bad_request
from nima_edge.serve.guards import ApiKey, HostCheck, SecurityHeaders
from nima_edge.serve.responses import EventStream, Reply, collect, server_error
from nima_edge.serve.schema import ChatRequest, CompletionRequest, parse
from nima_edge.serve.worker import Job, ModelWorker, QueueFull

STATIC = Path(__file__).parent / "static"


@dataclass
class Limits:
    queue_size: int = 8             # requests waiting per model (besides the one generating)
    max_body_bytes: int = 1 << 20   # request body
    max_tokens: int = 1024          # the largest max_tokens a request may ask for (also the default)
    max_prompt_tokens: int | None = None  # None: the model's context


@dataclass
class Settings:
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    allowed_hosts: set[str] | None = None  # None: any Host header
    limits: Limits = field(default_factory=Limits)
    budget: dict = field(default_factory=lambda: {"tokens": 50, "ms": 100.0, "profile": None})


def create_app(runtimes: dict[str, Runtime], settings: Settings | None = None) -> Starlette:
    """`runtimes`: model id -> loaded runtime. The app owns them from here (closed at shutdown)."""
    settings = settings or Settings()
    limits = settings.limits
    workers = {name: ModelWorker(name, rt, limits.queue_size) for name, rt in runtimes.items()}

    def worker_for(model: str | None) -> ModelWorker:
        if model is None and len(workers) == 1:
            return next(iter(workers.values()))
        if model not in workers:
            raise ApiError(404, f"model {model!r} is not served here; models: {', '.join(workers)}",
                           param="model", code="model_not_found")
        return workers[model]

    def model_card(w: ModelWorker) -> dict:
        rt = w.runtime
        return {"id": w.name, "object": "model", "created": 0, "owned_by": "nima-edge", "target": rt.target,
                "context_length": rt.context_length, "max_tokens": limits.max_tokens, "budget": settings.budget,
                "queue": {"size": w.queue_size, "waiting": w.waiting, "busy": w.busy}}

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise _too_large(limits.max_body_bytes)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise _too_large(limits.max_body_bytes)
        return bytes(body)

    def reply_tokens(req) -> int:
        asked = req.reply_limit
        if asked is not None and asked > limits.max_tokens:
            param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
            raise bad_request(f"{param}: {asked} is more than this server allows ({limits.max_tokens})", param)
        return asked or limits.max_tokens

    def check_prompt(rt: Runtime, ids: list[int], param: str) -> None:
        if len(ids) >= rt.context_length:
            raise bad_request(f"the prompt is {len(ids)} tokens; this model's context is {rt.context_length} "
                              f"tokens, and the reply needs at least one", param, "context_length_exceeded")
        if limits.max_prompt_tokens and len(ids) > limits.max_prompt_tokens:
            raise bad_request(f"the prompt is {len(ids)} tokens; this server allows {limits.max_prompt_tokens}",
                              param, "prompt_too_long")

    def chat_prompt(rt: Runtime, req: ChatRequest, max_new: int) -> tuple[list[int], dict]:
        messages = [m.as_template_message() for m in req.messages]
        system = messages.pop(0)["content"] if messages[0]["role"] == "system" else ""
        # strict (the API's default): the whole conversation must fit; fit_context: room for the reply,
        # dropping the oldest turns (the system prompt stays), as the terminal chat does
        convo = Conversation(rt, system=system, max_new_tokens=max_new if req.fit_context else 1, history=messages)
        ids = convo.prompt_ids()
        if not req.fit_context and (convo.dropped or convo.truncated):
            raise bad_request(f"the conversation is longer than this model's context of {rt.context_length} "
                              "tokens (send fewer messages, or set \"fit_context\": true to drop the oldest)",
                              "messages", "context_length_exceeded")
        check_prompt(rt, ids, "messages")
        return ids, {"prompt_tokens": len(ids), "context_length": rt.context_length,
                     "dropped_messages": convo.dropped, "truncated": convo.truncated}

    def completion_prompt(rt: Runtime, req: CompletionRequest) -> tuple[list[int], dict]:
        prompt = req.prompt[0] if isinstance(req.prompt, list) and isinstance(req.prompt[0], str) else req.prompt
        if isinstance(prompt, str):
            ids = rt.tokenize(prompt)
        else:
            vocab = rt.tokenizer.vocab_size
            if bad := [i for i in prompt if not 0 <= i < vocab]:
                raise bad_request(f"prompt: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "prompt")
            ids = list(prompt)
        check_prompt(rt, ids, "prompt")
        return ids, {"prompt_tokens": len(ids), "context_length": rt.context_length, "dropped_messages": 0,
                     "truncated": False}

    async def generate(request: Request, kind: str):
        req = parse(await read_body(request), ChatRequest if kind == "chat" else CompletionRequest)
        worker = worker_for(req.model)
        max_new = reply_tokens(req)
        stops = req.stop_strings()
        if kind == "chat":
            ids, context = await run_in_threadpool(chat_prompt, worker.runtime, req, max_new)
        else:
            ids, context = await run_in_threadpool(completion_prompt, worker.runtime, req)
        job = Job(ids, max_new, req.sampling(), stops, req.ignore_eos)
        try:
            worker.submit(job)
        except QueueFull:
            raise ApiError(429, f"{worker.name} is busy: its {worker.queue_size} queue places are taken; retry later",
                           type="requests", code="queue_full",
                           headers={"Retry-After": str(worker.retry_after())}) from None
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        reply = Reply(kind, worker.name, req.stream, include_usage, context)
        if req.stream:
            return EventStream(job, reply.sse(job))
        text, done = await collect(request.receive, job)
        if done.kind == "error":
            return server_error(done.text).response()
        return JSONResponse(reply.body(text, done))

    async def chat_completions(request: Request):
        return await generate(request, "chat")

    async def completions(request: Request):
        return await generate(request, "completion")

    async def list_models(request: Request):
        return JSONResponse({"object": "list", "data": [model_card(w) for w in workers.values()]})

    async def get_model(request: Request):
        return JSONResponse(model_card(worker_for(request.path_params["model"])))

    async def health(request: Request):
        return JSONResponse({"status": "ok"})

    async def page(request: Request):
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    async def user_error(request: Request, exc: NimaError):  # e.g. a runtime refusing a prompt
        return bad_request(exc.problem).response()

    async def http_error(request: Request, exc: HTTPException):  # unknown route, wrong method
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                        code="not_found" if exc.status_code == 404 else None, headers=exc.headers).response()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        for w in workers.values():
            w.close()

    middleware = [Middleware(HostCheck, allowed=settings.allowed_hosts)]
    if settings.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                                     allow_methods=["GET", "POST"], allow_headers=["authorization", "content-type"],
                                     allow_credentials=False, max_age=600))
    middleware += [Middleware(ApiKey, key=settings.api_key), Middleware(SecurityHeaders)]
    app = Starlette(
        routes=[Route("/", page), Route("/health", health),
                Route("/v1/models", list_models), Route("/v1/models/{model:path}", get_model),
                Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                Route("/v1/completions", completions, methods=["POST"]),
                Mount("/static", StaticFiles(directory=STATIC), name="static")],
        middleware=middleware, lifespan=lifespan,
        exception_handlers={ApiError: api_error, NimaError: user_error, HTTPException: http_error})
    app.state.workers = workers  # for tests and the load benchmark's checks
    return app


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than this server accepts ({limit} bytes)",
                    code="request_too_large")
