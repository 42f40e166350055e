"""Tokenizers, all built with Hugging Face `tokenizers` and saved as a standard `tokenizer.json`.

- char: byte-level with no merges (every UTF-8 byte is one token), so any string round-trips.
- bpe:  byte-level BPE trained on the corpus (GPT-2 pre-tokenization, as llama.cpp's `gpt-2`).
- word: word-level; words and single characters seen in the corpus, anything else -> <|unk|>.
All three start with the same special tokens, so ids 0..5 mean the same thing everywhere.

An imported model keeps its own tokenizer.json (any that `tokenizers` loads: byte-level BPE as in
GPT-2/Llama-3/SmolLM, SentencePiece-style BPE with byte fallback as in Llama-2/TinyLlama) and its
own special tokens, end-of-reply ids and chat template from tokenizer_config.json /
generation_config.json / chat_template.jinja (see Tokenizer).
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


def _token_text(value) -> str | None:
    """tokenizer_config.json names a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _template_text(value) -> str | None:
    """`chat_template` is a string, or a list of named templates (the "default" one is the chat one)."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return value


# Our own tokenizers' settings: what a data directory's bare tokenizer.json means.
OWN_SETTINGS = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "chat_template": CHAT_TEMPLATE}


def read_settings(directory: Path) -> dict | None:
    """The tokenizer settings beside a tokenizer.json, in Hugging Face's files: tokenizer_config.json
    (special tokens, chat_template), chat_template.jinja (transformers 5) and generation_config.json
    (the list of ids that end a reply). None when there is no tokenizer_config.json (our data folders)."""
    config_path = directory / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    try:
        settings = json.loads(config_path.read_text(encoding="utf-8"))
        generation_path = directory / "generation_config.json"
        generation = json.loads(generation_path.read_text(encoding="utf-8")) if generation_path.is_file() else {}
    except json.JSONDecodeError as e:
        raise NimaError(f"{directory}: tokenizer_config.json or generation_config.json is not valid JSON: {e}",
                        "restore the file from the model's source") from e
    if not isinstance(settings, dict):
        raise NimaError(f"{config_path} is not a JSON object", "restore the file from the model's source")
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():  # transformers 5 keeps the template in its own file; it wins over the JSON copy
        settings["chat_template"] = jinja.read_text(encoding="utf-8")
    settings["eos_token_ids"] = _as_list(generation.get("eos_token_id"))
    return settings


class Tokenizer:
    """A `tokenizers` tokenizer plus its settings: special tokens, the ids that end a reply, whether
    encoding prepends BOS (the tokenizer.json post-processor decides, as in transformers) and the
    chat template.

    `settings` takes tokenizer_config.json's keys (bos_token, eos_token, pad_token, chat_template) and
    `eos_token_ids` (generation_config.json's eos_token_id list); None means our own tokenizers'
    (<|bos|> <|eos|> <|pad|> at ids 0-2 and CHAT_TEMPLATE).
    """

    def __init__(self, hf: HFTokenizer, settings: dict | None = None):
        self.hf = hf
        own = settings is None
        if own:
            for tok in SPECIAL_TOKENS:
                if hf.token_to_id(tok) is None:
                    raise NimaError(f"tokenizer lacks the special token {tok}",
                                    "prepare data with nima-edge data prepare, or bring a model in with "
                                    "nima-edge import (it keeps the model's own tokenizer_config.json)")
            settings = OWN_SETTINGS
        self.bos_token, self.eos_token, self.pad_token = (
            _token_text(settings.get(k)) for k in ("bos_token", "eos_token", "pad_token"))
        self.bos_id, self.eos_id, self.pad_id = (
            None if t is None else hf.token_to_id(t) for t in (self.bos_token, self.eos_token, self.pad_token))
        extra_eos = [int(i) for i in _as_list(settings.get("eos_token_ids"))]
        if self.eos_id is None and not extra_eos:
            raise NimaError(f"the tokenizer has no end-of-sequence token (eos_token {self.eos_token!r})",
                            "set eos_token in tokenizer_config.json (or eos_token_id in generation_config.json)")
        if self.eos_id is None:
            self.eos_id = extra_eos[0]
        # every id that ends a reply: Llama-3 instruct ends turns with <|eot_id|>, not its eos_token
        self.eos_ids = tuple(dict.fromkeys([self.eos_id, *extra_eos]))
        self.chat_template = _template_text(settings.get("chat_template")) or (CHAT_TEMPLATE if own else None)
        plain = hf.encode("a", add_special_tokens=False).ids
        marked = hf.encode("a", add_special_tokens=True).ids
        self.adds_bos = self.bos_id is not None and len(marked) > len(plain) and marked[0] == self.bos_id

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """tokenizer.json (or the folder holding it), with the settings files beside it (read_settings)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise NimaError(f"no tokenizer at {path}", "point at a checkpoint or data directory with tokenizer.json")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise NimaError(f"cannot read tokenizer {path}: {e}", "re-run nima-edge data prepare") from e
        return cls(hf, read_settings(path.parent))

    @classmethod
    def from_str(cls, tokenizer_json: str, settings_json: str | None = None) -> "Tokenizer":
        """From the strings an artifact embeds (tokenizer.json and settings_json()); artifacts written
        before settings were embedded hold our own tokenizers, hence None."""
        return cls(HFTokenizer.from_str(tokenizer_json), json.loads(settings_json) if settings_json else None)

    def settings(self) -> dict:
        """What __init__ needs beside tokenizer.json: embedded in single-file artifacts."""
        return {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                "eos_token_ids": list(self.eos_ids), "chat_template": self.chat_template}

    def settings_json(self) -> str:
        return json.dumps(self.settings(), sort_keys=True)

    def config_files(self, context: int | None = None) -> dict[str, dict]:
        """tokenizer_config.json and generation_config.json, as transformers and the stock runners read them."""
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                  "eos_token": self.eos_token, "pad_token": self.pad_token, "add_bos_token": self.adds_bos,
                  "add_eos_token": False, "model_max_length": context}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        eos = list(self.eos_ids)
        generation = {"bos_token_id": self.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
                      "pad_token_id": self.pad_id, "max_length": context, "do_sample": False}
        if context is None:
            del config["model_max_length"], generation["max_length"]
        return {"tokenizer_config.json": config, "generation_config.json": generation}

    @property
    def kind(self) -> str:
        """char | bpe (byte-level) | word (our three), sentencepiece (BPE with byte fallback, Llama-2 style),
        else the tokenizers model type in lower case."""
        model = json.loads(self.hf.to_str())["model"]
        if model["type"] == "WordLevel":
            return "word"
        if model["type"] != "BPE":
            return model["type"].lower()
        if model.get("byte_fallback"):
            return "sentencepiece"
        return "bpe" if model.get("merges") else "char"

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """add_bos: apply the tokenizer's post-processor (it prepends BOS where the model expects one)."""
        return self.hf.encode(text, add_special_tokens=add_bos).ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)

    def save(self, path: str | Path) -> None:
        from nima_edge.atomic import write_text
        write_text(path, self.hf.to_str(pretty=True))


class StreamDecoder:
    """Turns generated ids into text pieces, holding back partial UTF-8 sequences (char/bpe split bytes).

    tokenizers' DecodeStream does it incrementally; it refuses some sequences (SentencePiece-style
    decoders with byte fallback, after bytes that form no character), so from then on the pieces come
    from decoding the whole reply and sending what is new, a trailing U+FFFD waiting for its next byte.
    """

    def __init__(self, tok: Tokenizer):
        self._tok = tok
        self._ds: DecodeStream | None = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []
        self._sent = ""

    def step(self, token_id: int) -> str:
        self._ids.append(token_id)
        if self._ds is not None:
            try:
                piece = self._ds.step(self._tok.hf, token_id) or ""
                self._sent += piece
                return piece
            except Exception:  # tokenizers raises a bare Exception ("Invalid prefix encountered ...")
                self._ds = None
        text = self._tok.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        same = next((i for i, (a, b) in enumerate(zip(text, self._sent)) if a != b), min(len(text), len(self._sent)))
        piece, self._sent = text[same:], text
        return piece
