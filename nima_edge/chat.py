"""A multi-turn conversation over any runtime: history, system prompt, the checkpoint's chat template,
and a context window that never overflows (oldest turns are dropped, an over-long message is cut).

Prompts are rendered here through the tokenizer's chat template: our own checkpoints' CHAT_TEMPLATE
(the same Jinja template the GGUF carries as tokenizer.chat_template and llama-cpp-python's server
applies), or an imported model's own (tokenizer_config.json / chat_template.jinja), so chat works on
every target with the prompt format the model was tuned on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Iterator

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nima_edge.errors import NimaError
from nima_edge.runtime import Runtime
from nima_edge.sampling import Sampling
from nima_edge.tokenizer import BOS, CHAT_TEMPLATE, EOS, Tokenizer


def _raise(message: str):
    raise NimaError(f"the chat template refused the conversation: {message}",
                    "follow the model's turn rules (e.g. alternate user and assistant messages)")


@lru_cache(maxsize=8)
def _compile(template: str):
    """As transformers compiles chat templates: sandboxed, trim/lstrip blocks, raise_exception and
    strftime_now available (Llama-3 templates call both)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise NimaError(f"the checkpoint's chat template does not compile: {e}",
                        "fix chat_template in tokenizer_config.json (or chat_template.jinja)") from e


def render(messages: list[dict], add_generation_prompt: bool = True, tokenizer: Tokenizer | None = None) -> str:
    """The prompt text for `messages` in the tokenizer's chat template (ours when tokenizer is None)."""
    if tokenizer is not None and not tokenizer.chat_template:
        raise NimaError("this model has no chat template (tokenizer_config.json has no chat_template)",
                        "use nima-edge generate for plain continuation, or add a chat_template to the checkpoint")
    template = tokenizer.chat_template if tokenizer is not None else CHAT_TEMPLATE
    bos, eos = (tokenizer.bos_token or "", tokenizer.eos_token or "") if tokenizer is not None else (BOS, EOS)
    try:
        return _compile(template).render(messages=messages, bos_token=bos, eos_token=eos,
                                         add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise NimaError(f"the chat template failed: {e}", "check the checkpoint's chat_template") from e


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
            # the template writes BOS itself where the model wants one (as transformers' apply_chat_template)
            ids = self.runtime.tokenize(render(self.messages(), tokenizer=self.runtime.tokenizer), add_bos=False)
            if len(ids) <= budget:
                return ids
            if len(self.history) > 1:  # forget the oldest turn, keep the system prompt and the new message
                self.history.pop(0)
                self.dropped += 1
                continue
            # one message alone is too long: keep BOS (if any) and its last tokens (the end of a prompt matters most)
            self.truncated = True
            head = ids[:1] if ids[0] == self.runtime.tokenizer.bos_id else []
            return head + ids[len(ids) - budget + len(head):]

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
