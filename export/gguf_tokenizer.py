"""The tokenizer inside a GGUF: llama.cpp's vocabulary equivalent to the checkpoint's tokenizer.json.

Byte-level BPE (our char and bpe tokenizers, GPT-2, SmolLM, Llama-3) is written as llama.cpp's `gpt2`
vocabulary with the pre-tokenizer name whose regex matches (gpt-2, smollm, llama-bpe);
SentencePiece-style BPE with byte fallback (Llama-2, TinyLlama) as the `llama` vocabulary with merge
priorities as scores and byte tokens typed BYTE. The mapping lives in nima_edge/importer/gguf_vocab.py,
shared with the GGUF importer. The word tokenizer (WordLevel with a custom split and <|unk|>) and
anything else without a llama.cpp equivalent is refused with a clear error.
"""
from __future__ import annotations

import gguf

from nima_edge.errors import NimaError
from nima_edge.importer.gguf_vocab import to_gguf_vocab
from nima_edge.runtimes.gguf_format import TOKENIZER_JSON_KEY, TOKENIZER_SETTINGS_KEY
from nima_edge.tokenizer import Tokenizer

class Writer(gguf.GGUFWriter):
    """gguf-py refuses empty arrays, but GGUF allows them and llama.cpp's gpt2 vocab *requires* a merges
    key: the char tokenizer (bytes only) has zero merges."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type or gguf.GGUFValueType.STRING) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def add_tokenizer(writer: Writer, tok: Tokenizer, n_vocab: int) -> None:
    """Write tokens, types, scores or merges, special ids and the chat template (llama.cpp's layout), plus
    the exact tokenizer.json and its settings, which llama.cpp ignores and our runtime reads."""
    if tok.kind == "word":
        raise NimaError("llama.cpp has no word-level tokenizer (its vocabularies are SPM, BPE, WordPiece, "
                        "Unigram, RWKV), so a --tokenizer word model cannot be written as GGUF",
                        "prepare data with --tokenizer bpe or char and retrain, or export this model to onnx "
                        "or executorch")
    vocab = to_gguf_vocab(tok, n_vocab)
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
        writer.add_add_space_prefix(vocab.add_space_prefix)
    else:  # llama.cpp's gpt2 vocabulary requires the key, even empty (the char tokenizer has no merges)
        writer.add_key_value(gguf.Keys.Tokenizer.MERGES, vocab.merges, gguf.GGUFValueType.ARRAY,
                             sub_type=gguf.GGUFValueType.STRING)
    ids = vocab.special_ids
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id),
                     ("eot", writer.add_eot_token_id)):
        if ids.get(key) is not None:
            add(ids[key])
    writer.add_add_bos_token(vocab.add_bos)  # as the tokenizer.json's post-processor does
    writer.add_add_eos_token(False)
    if vocab.chat_template:  # llama.cpp's and llama-cpp-python's chat formatting use it
        writer.add_chat_template(vocab.chat_template)
    writer.add_string(TOKENIZER_JSON_KEY, tok.hf.to_str())
    writer.add_string(TOKENIZER_SETTINGS_KEY, tok.settings_json())
