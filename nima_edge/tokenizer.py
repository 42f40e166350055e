"""Tokenizers, all built with Hugging Face `tokenizers` and saved as a standard `tokenizer.json`.

- char: byte-level with no merges (every UTF-8 byte is one token), so any string round-trips.
- bpe:  byte-level BPE trained on the corpus (GPT-2 pre-tokenization, as llama.cpp's `gpt-2`).
- word: word-level; words and single characters seen in the corpus, anything else -> <|unk|>.
All three start with the same special tokens, so ids 0..5 mean the same thing everywhere.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from tokenizers.decoders import DecodeStream

from nima_edge.errors import NimaError

BOS, EOS, PAD, SYSTEM, USER, ASSISTANT = (
    "<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT]
UNK = "<|unk|>"
KINDS = ("char", "bpe", "word")
CHAR_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256

# Jinja chat template (transformers / llama.cpp style): roles as special tokens, turns end with eos.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Words, or any single non-word character (so whitespace runs and punctuation are exact pieces).
WORD_PATTERN = r"\w+|[^\w]"


def _byte_level(tk: HFTokenizer) -> HFTokenizer:
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    return tk


def _bos_template(tk: HFTokenizer) -> HFTokenizer:
    """Encoding with special tokens prepends BOS: what llama.cpp (add_bos_token) and runners expect."""
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)])
    return tk


def train_tokenizer(kind: str, texts: Iterable[str] = (), vocab_size: int | None = None) -> "Tokenizer":
    if kind == "char":
        tk = _byte_level(HFTokenizer(models.BPE()))
        trainer = trainers.BpeTrainer(vocab_size=CHAR_VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tk.train_from_iterator([], trainer=trainer)  # alphabet only: vocab == specials + 256 bytes, no merges
    elif kind == "bpe":
        vocab_size = vocab_size or 1024
        if vocab_size <= CHAR_VOCAB_SIZE:
            raise NimaError(f"bpe vocab size {vocab_size} leaves no room for merges",
                            f"use --vocab-size above {CHAR_VOCAB_SIZE}, or --tokenizer char")
        tk = _byte_level(HFTokenizer(models.BPE()))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tk.train_from_iterator(texts, trainer=trainer)
    elif kind == "word":
        tk = HFTokenizer(models.WordLevel(unk_token=UNK))
        tk.pre_tokenizer = pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated")
        tk.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size or 8192, special_tokens=SPECIAL_TOKENS + [UNK],
                                            show_progress=False)
        tk.train_from_iterator(texts, trainer=trainer)
    else:
        raise NimaError(f"unknown tokenizer {kind!r}", f"choose one of: {', '.join(KINDS)}")
    tk.add_special_tokens(SPECIAL_TOKENS)
    return Tokenizer(_bos_template(tk))


class Tokenizer:
    """Thin wrapper: ids of the special tokens, BOS handling and streaming decode."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        for tok in SPECIAL_TOKENS:
            if hf.token_to_id(tok) is None:
                raise NimaError(f"tokenizer lacks the special token {tok}", "prepare data with nima-edge data prepare")
        self.bos_id, self.eos_id, self.pad_id = (hf.token_to_id(t) for t in (BOS, EOS, PAD))

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise NimaError(f"no tokenizer at {path}", "point at a checkpoint or data directory with tokenizer.json")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise NimaError(f"cannot read tokenizer {path}: {e}", "re-run nima-edge data prepare") from e

    @property
    def kind(self) -> str:
        model = json.loads(self.hf.to_str())["model"]
        if model["type"] == "WordLevel":
            return "word"
        return "bpe" if model.get("merges") else "char"

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_bos).ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)

    def save(self, path: str | Path) -> None:
        from nima_edge.atomic import write_text
        write_text(path, self.hf.to_str(pretty=True))


class StreamDecoder:
    """Turns generated ids into text pieces, holding back partial UTF-8 sequences (char/bpe split bytes)."""

    def __init__(self, tok: Tokenizer):
        self._tok = tok
        self._ds = DecodeStream(skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        return self._ds.step(self._tok.hf, token_id) or ""
