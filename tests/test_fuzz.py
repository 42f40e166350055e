"""Property tests (hypothesis, bounded time): tokenizer round trips for char/bpe/word and the packers'
round trips for every layout, on inputs nobody thought of."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nima_edge.export import packing
from nima_edge.quantization import QuantizedWeight
from nima_edge.tokenizer import SPECIAL_TOKENS, UNK, train_tokenizer

# Bounded: a fixed number of examples, each fast, no per-example deadline on a loaded 2-core machine.
BOUNDED = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
CORPUS = ["First Citizen:\nBefore we proceed any further, hear me speak.\n", "All:\nSpeak, speak.\n",
          "ROMEO:\nBut, soft! what light through yonder window breaks?\n"] * 40
# Any text, minus our six special-token strings (typed by a user they are text, but the tokenizer
# deliberately reads them as the specials; that behaviour has its own tests).
TEXT = st.text(max_size=200).filter(lambda t: not any(s in t for s in SPECIAL_TOKENS + [UNK]))


@pytest.fixture(scope="module")
def tokenizers():
    return {"char": train_tokenizer("char"), "bpe": train_tokenizer("bpe", CORPUS, vocab_size=300),
            "word": train_tokenizer("word", CORPUS)}


@BOUNDED
@given(text=TEXT)
def test_byte_level_tokenizers_round_trip_any_text(tokenizers, text):
    for kind in ("char", "bpe"):
        tok = tokenizers[kind]
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and tok.decode(ids) == text, kind
        assert all(0 <= i < tok.vocab_size for i in ids)


@BOUNDED
@given(text=TEXT)
def test_word_tokenizer_keeps_known_words_and_marks_unknown_ones(tokenizers, text):
    tok = tokenizers["word"]
    vocab = tok.hf.get_vocab()
    pieces = [p for p, _ in tok.hf.pre_tokenizer.pre_tokenize_str(text)]
    ids = tok.encode(text, add_bos=False)
    assert ids == [vocab.get(p, vocab[UNK]) for p in pieces]
    # unknown words decode to nothing (the unk token is special); every known word comes back in place
    assert tok.decode(ids) == "".join(p for p in pieces if p in vocab)


@BOUNDED
@given(words=st.lists(st.sampled_from(["First", "Citizen", "speak", "Speak", "hear", "me", "ROMEO", "light"]),
                      max_size=30),
       seps=st.lists(st.sampled_from([" ", "\n", ", ", ":\n", "! ", "?"]), max_size=30))
def test_word_tokenizer_round_trips_in_vocabulary_text(tokenizers, words, seps):
    text = "".join(w + s for w, s in zip(words, seps))
    tok = tokenizers["word"]
    assert tok.decode(tok.encode(text)) == text


@st.composite
def quantized(draw, symmetric=None, group=None, fp16_scales=True):
    bits = draw(st.sampled_from([4, 8]))
    group = group or draw(st.sampled_from([32, 64, 128]))
    sym = draw(st.booleans()) if symmetric is None else symmetric
    out, blocks = draw(st.integers(1, 9)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    codes = rng.integers(0, 2**bits, (out, blocks * group), dtype=np.uint8)
    scales = rng.uniform(1e-4, 2.0, (out, blocks)).astype(np.float16 if fp16_scales else np.float32)
    zeros = (np.full((out, blocks), 2 ** (bits - 1), np.uint8) if sym
             else rng.integers(0, 2**bits, (out, blocks), dtype=np.uint8))
    return QuantizedWeight(codes=torch.from_numpy(codes), scales=torch.from_numpy(scales.astype(np.float32)),
                           zeros=torch.from_numpy(zeros), bits=bits, group_size=group, symmetric=sym, method="rtn")


def same(a: QuantizedWeight, b: QuantizedWeight):
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
    assert (a.bits, a.group_size, a.symmetric) == (b.bits, b.group_size, b.symmetric)


@BOUNDED
@given(q=quantized())
def test_matmul_nbits_round_trip(q):
    same(packing.unpack_matmul_nbits(*packing.pack_matmul_nbits(q), q.bits, q.group_size), q)


@BOUNDED
@given(q=quantized())
def test_intx_round_trip(q):
    back = packing.unpack_intx(*packing.pack_intx(q), q.bits)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.zeros, q.zeros) and torch.equal(back.scales, q.scales)
    # an asymmetric result whose zero points all happen to be the midpoint reads back as symmetric
    assert back.symmetric == bool((q.zeros == 2 ** (q.bits - 1)).all())


@BOUNDED
@given(q=quantized(symmetric=True, group=32))
def test_gguf_round_trip(q):
    same(packing.unpack_gguf(packing.pack_gguf(q), q.bits, q.shape), q)


@BOUNDED
@given(q=quantized(symmetric=True))
def test_gguf_blocks_of_larger_groups_dequantize_the_same(q):
    back = packing.unpack_gguf(packing.pack_gguf(q), q.bits, q.shape)
    assert torch.equal(back.dequantize(), q.dequantize())
