"""A multi-turn conversation over any runtime: history, system prompt, the shared chat template, and
a context window that never overflows (oldest turns are dropped, an over-long message is cut).

Prompts are rendered here through CHAT_TEMPLATE (the same Jinja template the GGUF carries as
tokenizer.chat_template and llama-cpp-python's server applies), so chat works on every target.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from jinja2.sandbox import ImmutableSandboxedEnvironment

from nima_edge.errors import NimaError
from nima_edge.runtime import Runtime
from nima_edge.sampling import Sampling
from nima_edge.tokenizer import BOS, CHAT_TEMPLATE, EOS

_TEMPLATE = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(CHAT_TEMPLATE)


def render(messages: list[dict], add_generation_prompt: bool = True) -> str:
    return _TEMPLATE.render(messages=messages, bos_token=BOS, eos_token=EOS,
                            add_generation_prompt=add_generation_prompt)


@dataclass
class Conversation:
    runtime: Runtime
    system: str = ""
    max_new_tokens: int = 256
    sampling: Sampling = field(default_factory=Sampling)
    history: list[dict] = field(default_factory=list)
    dropped: int = 0  # messages dropped so far to fit the context
    truncated: bool = False  # the last prompt had to be cut inside a message

    @property
    def reply_room(self) -> int:
        """Tokens kept free for the reply: the requested length, but never more than half the context."""
        return max(1, min(self.max_new_tokens, self.runtime.context_length // 2))

    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def prompt_ids(self) -> list[int]:
        """The rendered conversation as ids, shortened to leave `reply_room` tokens of context."""
        budget = self.runtime.context_length - self.reply_room
        self.truncated = False
        while True:
            ids = self.runtime.tokenize(render(self.messages()), add_bos=False)  # the template emits BOS
            if len(ids) <= budget:
                return ids
            if len(self.history) > 1:  # forget the oldest turn, keep the system prompt and the new message
                self.history.pop(0)
                self.dropped += 1
                continue
            # one message alone is too long: keep BOS and its last tokens (the end of a prompt matters most)
            self.truncated = True
            return ids[:1] + ids[len(ids) - budget + 1:]

    def reply(self, user_text: str) -> Iterator[str]:
        """Add the user's message, stream the assistant's reply as text pieces, and record it."""
        if not user_text.strip():
            raise NimaError("empty message", "type something, or /exit to leave")
        self.history.append({"role": "user", "content": user_text})
        stream = self.runtime.tokenizer.stream()
        ids = []
        try:
            for tok in self.runtime.generate_ids(self.prompt_ids(), self.reply_room, self.sampling):
                ids.append(tok)
                if piece := stream.step(tok):
                    yield piece
        finally:  # an interrupted reply is kept as far as it got, so the turns still alternate
            self.history.append({"role": "assistant", "content": self.runtime.tokenizer.decode(ids)})

    def reset(self) -> None:
        self.history.clear()
        self.dropped = 0
