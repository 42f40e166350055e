"""The tokenizer inside a GGUF: llama.cpp's `gpt2` (byte-level BPE) vocabulary, as its converter writes it.

Our char and bpe tokenizers are byte-level BPE with GPT-2 pre-tokenization, so their vocab strings
are already in the byte-to-unicode form llama.cpp's `gpt2` model reads, and the pre-tokenizer is
llama.cpp's `gpt-2`. The word tokenizer (WordLevel with a custom split and <|unk|>) has no llama.cpp
equivalent, so it is refused with a clear error.
"""
from __future__ import annotations

import json

import gguf

from nima_edge.errors import NimaError
from nima_edge.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer

# The exact tokenizer.json rides along so the runtime can stream-decode with the checkpoint's tokenizer;
# llama.cpp itself ignores unknown keys.
TOKENIZER_JSON_KEY = "nima.tokenizer.json"


class Writer(gguf.GGUFWriter):
    """gguf-py refuses empty arrays, but GGUF allows them and llama.cpp's gpt2 vocab *requires* a merges
    key: the char tokenizer (bytes only) has zero merges."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type or gguf.GGUFValueType.STRING) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def add_tokenizer(writer: Writer, tok: Tokenizer, n_vocab: int) -> None:
    """Write tokens, types, merges, special ids and the chat template (llama.cpp's gpt2 layout)."""
    if tok.kind == "word":
        raise NimaError("llama.cpp has no word-level tokenizer (its vocabularies are SPM, BPE, WordPiece, "
                        "Unigram, RWKV), so a --tokenizer word model cannot be written as GGUF",
                        "prepare data with --tokenizer bpe or char and retrain, or export this model to onnx "
                        "or executorch")
    by_id = {i: t for t, i in tok.hf.get_vocab(with_added_tokens=True).items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise NimaError("the tokenizer's ids are not contiguous", "re-run nima-edge data prepare")
    if len(by_id) > n_vocab:
        raise NimaError(f"the tokenizer has {len(by_id)} tokens but the model only {n_vocab}",
                        "the tokenizer.json belongs to another model")
    special = set(SPECIAL_TOKENS)
    tokens, types = [], []
    for i in range(n_vocab):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if by_id[i] in special else gguf.TokenType.NORMAL)
        else:  # embedding rows past the tokenizer: placeholders, as llama.cpp's converter pads them
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = json.loads(tok.hf.to_str())["model"].get("merges", [])
    # tokenizers >= 0.20 stores a merge as a pair; GGUF wants "left right"
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_key_value(gguf.Keys.Tokenizer.MERGES, merges, gguf.GGUFValueType.ARRAY,
                         sub_type=gguf.GGUFValueType.STRING)
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_pad_token_id(tok.pad_id)
    writer.add_add_bos_token(True)  # our post-processor prepends BOS; llama.cpp should too
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)  # llama.cpp's and llama-cpp-python's chat formatting use it
    writer.add_string(TOKENIZER_JSON_KEY, tok.hf.to_str())
