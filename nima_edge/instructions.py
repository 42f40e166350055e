"""A small instruction set built from a play corpus, so the fine-tuning demo runs offline.

Speeches are read from the text ("NAME:" on its own line, then the speech, as in tinyshakespeare;
or "NAME. speech" in the Gutenberg texts), and consecutive speeches become three kinds of chat:
- who:      "Who speaks next?" after a speech -> the next speaker's name;
- continue: "Continue the speech of NAME:" and its first line -> the rest of the speech;
- persona:  system "You are NAME.", a speech addressed to NAME -> NAME's reply.
Texts are cut to `max_chars` at a word boundary so a conversation fits a small model's context.
The corpus's training part gives the training conversations and its validation part (the same
split as `nima-edge data prepare`) the held-out ones, so no held-out prompt was seen in pretraining.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from nima_edge.atomic import write_text
from nima_edge.data import clean, read_corpus, split
from nima_edge.errors import NimaError

KINDS = ("who", "continue", "persona")
_COLON = re.compile(r"^([A-Z][A-Za-z'. -]{0,30}):$")  # "First Citizen:"
_DOT = re.compile(r"^([A-Z][A-Z' -]{1,30})\.\s+(\S.*)$")  # "ROMEO. But soft ..."


@dataclass
class Speech:
    speaker: str
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def speeches(text: str) -> list[Speech]:
    """Speeches in order: blank-line-separated blocks that open with a speaker tag."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.strip().split("\n") if ln.strip()]
        if not lines:
            continue
        if (m := _COLON.match(lines[0])) and len(lines) > 1:
            out.append(Speech(m[1].strip(), lines[1:]))
        elif m := _DOT.match(lines[0]):
            out.append(Speech(m[1].strip().title(), [m[2], *lines[1:]]))
    return out


def shorten(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text.rfind(" ", 0, max_chars)
    return text[:cut if cut > max_chars // 2 else max_chars].rstrip(" ,;:-")


def conversations(text: str, max_chars: int = 96, limit: int | None = None) -> list[dict]:
    """Chat examples ({"messages": [...], "kind": ...}) from consecutive speeches, kinds in turn."""
    sp = speeches(text)
    out = []
    for i in range(len(sp) - 1):
        this, nxt = sp[i], sp[i + 1]
        kind = KINDS[i % len(KINDS)]
        if kind == "who":
            msgs = [{"role": "user", "content": f"Who speaks next?\n{this.speaker}: {shorten(this.text, max_chars)}"},
                    {"role": "assistant", "content": nxt.speaker}]
        elif kind == "continue":
            if len(this.lines) < 2:
                continue
            msgs = [{"role": "user", "content": f"Continue the speech of {this.speaker}:\n"
                                                f"{shorten(this.lines[0], max_chars)}"},
                    {"role": "assistant", "content": shorten("\n".join(this.lines[1:]), max_chars)}]
        else:
            if nxt.speaker == this.speaker:
                continue
            msgs = [{"role": "system", "content": f"You are {nxt.speaker}."},
                    {"role": "user", "content": shorten(this.text, max_chars)},
                    {"role": "assistant", "content": shorten(nxt.text, max_chars)}]
        out.append({"kind": kind, "messages": msgs})
        if limit is not None and len(out) >= limit:
            break
    return out


def build(source: str, out_dir: str | Path, max_chars: int = 96, limit: int = 4000,
          val_fraction: float = 0.1) -> dict:
    """Write OUT/instruct.jsonl (from the corpus's training part) and OUT/instruct-val.jsonl (held out)."""
    text = clean(read_corpus(source))
    train_text, val_text = split(text, val_fraction)
    out_dir = Path(out_dir)
    counts = {}
    for name, part, n in (("instruct.jsonl", train_text, limit), ("instruct-val.jsonl", val_text,
                                                                   max(30, int(limit * val_fraction)))):
        convs = conversations(part, max_chars, n)
        if not convs:
            raise NimaError(f"found no speeches in {source} ({name})",
                            'the corpus needs play-style speeches: a "NAME:" line, then the speech')
        write_text(out_dir / name, "".join(json.dumps(c) + "\n" for c in convs))
        counts[name] = len(convs)
    return counts
