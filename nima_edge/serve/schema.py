"""Request bodies of /v1/chat/completions and /v1/completions (OpenAI's fields), validated strictly.

Types are strict (a string is not a number); unknown fields are ignored, as llama.cpp's and vLLM's
servers do; fields we know but cannot honour (n > 1, logprobs, penalties, tools ...) are refused with a
400 naming the field rather than silently ignored. Extensions (as in vLLM / llama.cpp): `top_k`,
`ignore_eos`, and for chat `fit_context` (drop the oldest turns instead of refusing a long conversation).
"""
from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nima_edge.sampling import Sampling
from nima_edge.serve.errors import bad_request

MAX_STOP_STRINGS = 4  # OpenAI's limit


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_template_message(self) -> dict:
        """{"role", "content"} as the chat template takes it (OpenAI's "developer" is the system role)."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampled(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's defaults and ranges
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=-1)  # -1: random, as llama.cpp
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    # known, not supported beyond their defaults
    n: int = 1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict | None = None

    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_k, self.top_p, None if self.seed in (None, -1) else self.seed)

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise bad_request(f"stop: at most {MAX_STOP_STRINGS} sequences, got {len(stops)}", "stop")
        if any(not s for s in stops):
            raise bad_request("stop: sequences must not be empty", "stop")
        return stops

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise bad_request("n: only n=1 is supported", "n")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) != 0.0:
                raise bad_request(f"{name}: not supported (only 0)", name)
        if self.logit_bias:
            raise bad_request("logit_bias: not supported", "logit_bias")


class ChatRequest(_Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    fit_context: bool = False
    logprobs: bool | None = None
    tools: list | None = None
    response_format: dict | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs:
            raise bad_request("logprobs: not supported", "logprobs")
        if self.tools:
            raise bad_request("tools: not supported by this server", "tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise bad_request("response_format: only text is supported", "response_format")
        for i, m in enumerate(self.messages):
            if m.content is None and m.role != "assistant":
                raise bad_request(f"messages[{i}].content: required for role {m.role}", f"messages[{i}].content")

    @property
    def reply_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampled):
    prompt: str | list[str] | list[int]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) != 1:
            raise bad_request("prompt: only one prompt per request is supported", "prompt")
        if not self.prompt:
            raise bad_request("prompt: must not be empty", "prompt")
        for name in ("logprobs", "suffix"):
            if getattr(self, name):
                raise bad_request(f"{name}: not supported", name)
        if self.echo:
            raise bad_request("echo: not supported", "echo")
        if self.best_of not in (None, 1):
            raise bad_request("best_of: only 1 is supported", "best_of")

    @property
    def reply_limit(self) -> int | None:
        return self.max_tokens


def parse(raw: bytes, model: type[ChatRequest] | type[CompletionRequest]):
    """Bytes of a request body -> a validated request, or an ApiError (400) naming the bad field."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object")
    try:
        request = model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = _param(first["loc"])
        raise bad_request(f"{param}: {first['msg']}" if param else first["msg"], param or None) from None
    request.refuse_unsupported()
    return request


def _param(loc: tuple) -> str:
    """('messages', 0, 'role') -> 'messages[0].role' (pydantic adds union branch names: skip those)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "list[int]", "list[TextPart]", "TextPart", "none", "int", "bool",
                      "function-after[...]") or "[" in str(part):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out
