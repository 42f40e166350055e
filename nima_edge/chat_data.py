"""Chat JSONL for fine-tuning: conversations rendered with the chat template (nima_edge.chat.render),
loss on the assistant's tokens only, packed into fixed-length rows, split into train and validation.

One conversation per line: {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}]}.

Which tokens carry loss: the template renders a conversation turn by turn, so the text of
`messages[:i]` with the generation prompt (it ends in `<|assistant|>`) is a prefix of the text of
`messages[:i + 1]`; what lies between the two is assistant message i (its content and end-of-turn
token). Tokens whose characters fall there are labelled; every other label is -100 (ignored by the
model's cross-entropy). Character offsets come from the tokenizer itself, so this holds for any
tokenizer kind.

Packing: whole conversations (each starts with BOS) are laid end to end into rows of `context`
tokens and the rest of a row is padding (label -100). A conversation longer than a row is cut.
Conversations in one row can attend to each other; each starts with BOS and carries only its own
labels (the usual packing trade: no padding waste, a little cross-talk).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nima_edge.chat import render
from nima_edge.errors import NimaError
from nima_edge.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
IGNORE = -100  # the label the model's cross-entropy skips


def is_chat_file(path: str | Path) -> bool:
    return Path(path).is_file() and Path(path).suffix.lower() == ".jsonl"


def read_jsonl(path: str | Path) -> list[list[dict]]:
    """The conversations of a chat JSONL file, validated (a bad line is named with its number)."""
    path = Path(path)
    convs = []
    fix = 'each line must be {"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}'
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise NimaError(f"{path}:{n} is not valid JSON: {e}", fix) from e
        msgs = doc.get("messages") if isinstance(doc, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise NimaError(f"{path}:{n} has no non-empty \"messages\" list", fix)
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise NimaError(f"{path}:{n}: message {m!r:.80} needs a role in {ROLES} and a string content", fix)
        if not any(m["role"] == "assistant" for m in msgs):
            raise NimaError(f"{path}:{n} has no assistant message, so nothing to learn from",
                            "add the assistant's reply, or drop the line")
        convs.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    if not convs:
        raise NimaError(f"{path} holds no conversations", fix)
    return convs


def encode(messages: list[dict], tok: Tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it belongs to an assistant turn."""
    text = render(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], add_generation_prompt=True)
        upto = render(messages[:i + 1], add_generation_prompt=False)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise NimaError("the chat template does not render a conversation turn by turn (a shorter "
                            "conversation is not a prefix of a longer one), so assistant tokens cannot be located",
                            "use a checkpoint whose chat template appends each message in order")
        spans.append((len(before), len(upto)))
    enc = tok.hf.encode(text, add_special_tokens=False)  # the template writes BOS itself
    mask = [any(lo <= start < hi for lo, hi in spans) for start, _ in enc.offsets]
    return list(enc.ids), mask


@dataclass
class Rows:
    """Packed rows: inputs and labels [rows, context] (labels are the next token, or -100)."""
    inputs: torch.Tensor
    labels: torch.Tensor
    chars: int  # characters of assistant text behind the labelled tokens (for bits per character)
    truncated: int  # conversations cut to fit one row

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def label_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def pack(convs: list[list[dict]], tok: Tokenizer, context: int) -> Rows:
    """Encode and pack conversations, in the given order, into rows of `context` tokens."""
    rows_x, rows_y, cur_x, cur_y = [], [], [], []
    truncated = chars = 0

    def close():
        if cur_x:
            pad = context - len(cur_x)
            rows_x.append(cur_x + [tok.pad_id] * pad)
            rows_y.append(cur_y + [IGNORE] * pad)
        return [], []

    for messages in convs:
        ids, mask = encode(messages, tok)
        x = ids[:-1]
        y = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]  # y[t] is the token after x[t]
        if len(x) > context:
            x, y = x[:context], y[:context]
            truncated += 1
        if len(cur_x) + len(x) > context:
            cur_x, cur_y = close()
        cur_x, cur_y = cur_x + x, cur_y + y
        chars += len(tok.decode([t for t in y if t != IGNORE], skip_special=True))
    close()
    if not rows_x:
        raise NimaError("no conversation produced a training row", "check the chat data")
    return Rows(torch.tensor(rows_x, dtype=torch.long), torch.tensor(rows_y, dtype=torch.long), chars, truncated)


def split(convs: list[list[dict]], val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle, then the last `val_fraction` (at least one conversation) is validation."""
    if not 0.0 < val_fraction < 1.0:
        raise NimaError(f"val fraction {val_fraction} is not between 0 and 1", "use e.g. --val-fraction 0.1")
    if len(convs) < 2:
        raise NimaError(f"{len(convs)} conversation(s) cannot be split into train and validation",
                        "give at least two conversations (a few hundred for a useful fine-tune)")
    order = np.random.default_rng(seed).permutation(len(convs))
    n_val = max(1, int(round(len(convs) * val_fraction)))
    return [convs[i] for i in order[:-n_val]], [convs[i] for i in order[-n_val:]]
