"""A tokenizer.json and llama.cpp's vocabulary (the tokenizer.ggml.* keys of a GGUF), both directions.

llama.cpp reads two kinds of vocabulary for the llama architecture Hugging Face models use:
- `gpt2`: byte-level BPE (GPT-2, Llama-3, SmolLM). Tokens are in the byte-to-unicode alphabet, merges
  are "left right" strings, and the pre-tokenizer is chosen by name (tokenizer.ggml.pre): llama.cpp
  runs its own copy of that regex, so the name must match the tokenizer.json's pre-tokenizer exactly.
- `llama`: SentencePiece (Llama-2, TinyLlama). Pieces use "▁" for spaces, byte tokens <0xXX> give byte
  fallback, and each merged piece's score is its merge priority (llama.cpp merges the adjacent pair
  whose concatenation scores highest). A tokenizer.json of this kind is BPE with byte_fallback.
`to_gguf_vocab` is what the GGUF exporter writes; `tokenizer_from_gguf` rebuilds the tokenizer.json
(and its settings) from a GGUF's metadata for the importer. Anything else is refused with the reason.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from nima_edge.errors import NimaError

# gguf.TokenType (kept as numbers so the exporter and importer share one table without importing gguf here)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "▁"  # SentencePiece's visible space

# Llama-3's split regex (tokenizer.json of Llama-3.x; llama.cpp's LLAMA_VOCAB_PRE_TYPE_LLAMA3)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizers() -> dict[str, pre_tokenizers.PreTokenizer]:
    """llama.cpp pre-tokenizer name -> the tokenizer.json pre-tokenizer that splits text the same way."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return {
        "gpt-2": byte_level,  # GPT-2's regex (also our own char and bpe tokenizers)
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "llama-bpe": pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
    }


def _signature(obj):
    """A pre-tokenizer's JSON without the keys that never change token ids (offsets only)."""
    if isinstance(obj, dict):
        return {k: _signature(v) for k, v in obj.items() if k != "trim_offsets"}
    if isinstance(obj, list):
        return [_signature(v) for v in obj]
    return obj


def _json_of(pre: pre_tokenizers.PreTokenizer) -> dict:
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre
    return json.loads(tk.to_str())["pre_tokenizer"]


def pre_tokenizer_name(tokenizer_json: dict) -> str | None:
    """The llama.cpp pre-tokenizer name whose splitting equals this tokenizer.json's, or None."""
    mine = _signature(tokenizer_json.get("pre_tokenizer"))
    for name, pre in _pre_tokenizers().items():
        if _signature(_json_of(pre)) == mine:
            return name
    return None


@dataclass
class GGUFVocab:
    """What the tokenizer.ggml.* keys hold (llama.cpp's names)."""
    model: str                      # "gpt2" | "llama"
    pre: str | None                 # gpt2 only: the pre-tokenizer name
    tokens: list[str]
    types: list[int]
    scores: list[float] | None      # llama only
    merges: list[str] = field(default_factory=list)  # gpt2 only
    add_space_prefix: bool = False  # llama only: SentencePiece's "▁" before the text
    special_ids: dict[str, int | None] = field(default_factory=dict)  # bos, eos, pad, unk, eot
    add_bos: bool = False
    chat_template: str | None = None


def _spm_space_prefix(tj: dict) -> bool | None:
    """SentencePiece-style whitespace handling: True/False = prepends "▁" or not; None = not SentencePiece-like."""
    norm, pre = tj.get("normalizer") or {}, tj.get("pre_tokenizer") or {}
    steps = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    kinds = [s.get("type") for s in steps if s]
    replaces = [s for s in steps if s and s.get("type") == "Replace" and s.get("content") == SPACE
                and s.get("pattern", {}).get("String") == " "]
    if replaces and not pre and set(kinds) <= {"Prepend", "Replace"}:
        return any(s.get("type") == "Prepend" and s.get("prepend") == SPACE for s in steps)
    if not norm and pre.get("type") == "Metaspace" and pre.get("replacement") == SPACE and not pre.get("split", False):
        return pre.get("prepend_scheme", "always") != "never"
    return None


def to_gguf_vocab(tok, n_vocab: int) -> GGUFVocab:
    """The llama.cpp vocabulary equivalent to `tok` (a nima_edge Tokenizer), padded to the model's rows."""
    tj = json.loads(tok.hf.to_str())
    model = tj["model"]
    if model["type"] != "BPE":
        raise NimaError(f"llama.cpp has no equivalent of this {model['type']} tokenizer for the llama architecture "
                        "(it reads byte-level BPE as `gpt2` and SentencePiece-style BPE as `llama`)",
                        "export this model to onnx, onnx-portable or executorch, which carry the tokenizer.json")
    by_id = {i: t for t, i in tok.hf.get_vocab(with_added_tokens=True).items()}
    if len(by_id) > n_vocab:
        raise NimaError(f"the tokenizer has {len(by_id)} tokens but the model only {n_vocab}",
                        "the tokenizer.json belongs to another model")
    added = {a["content"]: a for a in tj.get("added_tokens", [])}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if model.get("byte_fallback"):
        space_prefix = _spm_space_prefix(tj)
        if space_prefix is None:
            raise NimaError("this byte-fallback BPE tokenizer does not handle spaces the SentencePiece way "
                            "(normalizer Replace ' ' -> '▁', optional Prepend, or a Metaspace pre-tokenizer), "
                            "so llama.cpp's `llama` vocabulary would split text differently",
                            "export to onnx, onnx-portable or executorch instead")
        kind, pre = "llama", None
        # a merged piece's score is its merge priority: the earlier the merge, the higher the score
        rank = {m.replace(" ", ""): -float(r) for r, m in reversed(list(enumerate(merges)))}
    else:
        pre = pre_tokenizer_name(tj)
        if pre is None or tj.get("normalizer"):
            raise NimaError("llama.cpp has no pre-tokenizer known to split text like this tokenizer.json "
                            f"(pre_tokenizer {json.dumps(tj.get('pre_tokenizer'))[:200]}, normalizer "
                            f"{json.dumps(tj.get('normalizer'))[:80]}); nima-edge maps {', '.join(_pre_tokenizers())}",
                            "export to onnx, onnx-portable or executorch, which carry the tokenizer.json itself")
        kind, space_prefix, rank = "gpt2", False, {}
    tokens, types, scores = [], [], []
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:  # embedding rows past the tokenizer: placeholders, as llama.cpp's converter pads them
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            scores.append(-1000.0)
            continue
        tokens.append(text)
        if kind == "llama" and text == model.get("unk_token"):  # as llama.cpp's converter types <unk>
            types.append(UNKNOWN)
        elif text in added:
            types.append(CONTROL if added[text].get("special") else USER_DEFINED)
        elif kind == "llama" and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(BYTE)
        else:
            types.append(NORMAL)
        scores.append(rank.get(text, 0.0))
    unk = model.get("unk_token")
    specials = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id,
                "unk": tok.hf.token_to_id(unk) if unk else None}
    eot = [i for i in tok.eos_ids if i != tok.eos_id]
    if eot:
        specials["eot"] = eot[0]  # llama.cpp stops at EOS and EOT (end of turn)
    return GGUFVocab(model=kind, pre=pre, tokens=tokens, types=types, scores=scores if kind == "llama" else None,
                     merges=merges if kind == "gpt2" else [], add_space_prefix=space_prefix, special_ids=specials,
                     add_bos=tok.adds_bos, chat_template=tok.chat_template)


# --- GGUF metadata -> tokenizer.json ---------------------------------------------------------------------

def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Merges equivalent to SentencePiece's score order, as transformers derives them from a
    SentencePiece model: every split of a piece into two pieces, the highest-scoring piece first."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    found = []
    for piece, i in vocab.items():
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        found.extend((scores[i], n, lr) for n, lr in enumerate(local))
    found.sort(key=lambda x: -x[0])  # stable: pieces of equal score keep vocab order
    return [lr for _, _, lr in found]


def tokenizer_from_gguf(meta: dict) -> tuple[HFTokenizer, dict]:
    """A tokenizers.Tokenizer and its settings (for nima_edge.tokenizer.Tokenizer) from GGUF key/values."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise NimaError("the GGUF carries no tokenizer (tokenizer.ggml.tokens)",
                        "import the Hugging Face model directory instead")
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    keep = [i for i, t in enumerate(types) if t != UNUSED]  # padding rows are not tokens
    vocab = {tokens[i]: i for i in keep}
    specials = [tokens[i] for i in keep if types[i] in (CONTROL, UNKNOWN)]
    user = [tokens[i] for i in keep if types[i] == USER_DEFINED]
    ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "pad", "unknown", "eot", "eom")}
    name = {k: (tokens[v] if v is not None and 0 <= v < len(tokens) else None) for k, v in ids.items()}
    if kind == "gpt2":
        pre_name = meta.get("tokenizer.ggml.pre", "gpt-2")
        pre = _pre_tokenizers().get(pre_name)
        if pre is None:
            raise NimaError(f"the GGUF's pre-tokenizer {pre_name!r} has no tokenizer.json equivalent in nima-edge "
                            f"(known: {', '.join(_pre_tokenizers())})",
                            "import the Hugging Face model directory instead: its tokenizer.json is exact")
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre_name == "llama-bpe"))
        hf.pre_tokenizer = pre
        hf.decoder = decoders.ByteLevel()
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    elif kind == "llama":
        scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
        merges = _spm_merges(tokens, scores, types)
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=name["unknown"], byte_fallback=True,
                                    fuse_unk=True))
        space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        replace = normalizers.Replace(" ", SPACE)
        hf.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), replace]) if space_prefix else replace
        steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        hf.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
    else:
        raise NimaError(f"the GGUF's tokenizer model {kind!r} is not one nima-edge rebuilds (gpt2, llama)",
                        "import the Hugging Face model directory instead")
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    hf.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    if add_bos and name["bos"] is not None:
        bos = name["bos"]
        hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, ids["bos"])])
    eos_ids = [i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None]
    settings = {"bos_token": name["bos"], "eos_token": name["eos"], "pad_token": name["pad"],
                "eos_token_ids": list(dict.fromkeys(eos_ids)), "chat_template": meta.get("tokenizer.chat_template")}
    return hf, settings
