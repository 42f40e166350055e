import pytest

from nima_edge.errors import NimaError
from nima_edge.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer

HARD_STRINGS = ["", " ", "   ", "\n", "\n\n\n", "a\r\nb\r\n", "\t tab", "0123456789 3.14159",
                "héllo wörld", "Привет мир", "日本語のテキスト", "مرحبا", "emoji 🤖🎭 and 👨‍👩‍👧", "ROMEO:\nBut soft!",
                "trailing space ", "  leading", "mixed\u00a0nbsp", "a" * 300]
CORPUS = ["First Citizen:\nBefore we proceed any further, hear me speak.\n", "All:\nSpeak, speak.\n"] * 50


@pytest.fixture(scope="module", params=["char", "bpe"])
def byte_level(request):
    return train_tokenizer(request.param, CORPUS, vocab_size=300 if request.param == "bpe" else None)


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_byte_level_round_trip(byte_level, text):
    ids = byte_level.encode(text, add_bos=False)
    assert byte_level.decode(ids) == text
    assert byte_level.decode(byte_level.encode(text)) == text  # BOS is skipped on decode


def test_bos_is_prepended_and_specials_have_fixed_ids(byte_level):
    assert byte_level.encode("hi")[0] == byte_level.bos_id == 0
    assert (byte_level.eos_id, byte_level.pad_id) == (1, 2)
    assert [byte_level.hf.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(6))


def test_char_tokenizer_is_one_token_per_byte():
    tok = train_tokenizer("char")
    assert tok.vocab_size == 262 and tok.kind == "char"
    assert len(tok.encode("é🤖", add_bos=False)) == len("é🤖".encode())


def test_bpe_merges_and_vocab_size():
    tok = train_tokenizer("bpe", CORPUS, vocab_size=300)
    assert tok.kind == "bpe" and tok.vocab_size <= 300
    assert len(tok.encode("Speak, speak.", add_bos=False)) < len("Speak, speak.")


def test_word_tokenizer_round_trips_in_vocabulary_text_and_maps_unknown_words():
    tok = train_tokenizer("word", CORPUS)
    assert tok.kind == "word"
    text = "First Citizen:\nSpeak, speak.\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.hf.token_to_id("<|unk|>") in tok.encode("zyzzyva", add_bos=False)


def test_stream_decoder_holds_back_partial_utf8():
    tok = train_tokenizer("char")
    stream = tok.stream()
    pieces = [stream.step(i) for i in tok.encode("é🤖!", add_bos=False)]
    assert "".join(pieces) == "é🤖!"
    assert pieces[0] == ""  # first byte of é alone is not text yet


def test_save_load_round_trip(tmp_path, byte_level):
    byte_level.save(tmp_path / "tokenizer.json")
    again = Tokenizer.from_file(tmp_path)
    assert again.encode("Speak 🤖") == byte_level.encode("Speak 🤖")


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(NimaError, match="unknown tokenizer"):
        train_tokenizer("sentencepiece")
    with pytest.raises(NimaError, match="no tokenizer"):
        Tokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(NimaError, match="cannot read tokenizer"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    with pytest.raises(NimaError, match="no room for merges"):
        train_tokenizer("bpe", CORPUS, vocab_size=100)


def test_a_models_own_settings_are_read_from_its_files(tmp_path):
    """tokenizer_config.json (AddedToken dicts, a list of named templates), chat_template.jinja (wins) and
    generation_config.json's end ids; our own specials are not required then."""
    import json

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.add_special_tokens(["<|begin|>", "<|end|>", "<|turn_end|>"])
    hf.add_tokens(list("abc"))
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|begin|>", "special": True}, "eos_token": "<|end|>",
        "chat_template": [{"name": "default", "template": "old"}, {"name": "tool_use", "template": "tools"}]}))
    tok = Tokenizer.from_file(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.chat_template) == (0, 1, None, "old")
    assert not tok.adds_bos  # no post-processor: encoding adds nothing, as transformers would
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    tok = Tokenizer.from_file(tmp_path)
    assert tok.chat_template == "{{ messages[0]['content'] }}" and tok.eos_ids == (1, 2)
    again = Tokenizer.from_str(tok.hf.to_str(), tok.settings_json())
    assert (again.bos_id, again.eos_ids, again.chat_template) == (tok.bos_id, tok.eos_ids, tok.chat_template)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|missing|>"}))
    (tmp_path / "generation_config.json").unlink()
    with pytest.raises(NimaError, match="no end-of-sequence token"):
        Tokenizer.from_file(tmp_path)


def test_own_tokenizer_settings_are_unchanged(byte_level):
    """Our checkpoints keep <|bos|>/<|eos|>/<|pad|> at 0-2, BOS prepended and the shared CHAT_TEMPLATE."""
    from nima_edge.tokenizer import CHAT_TEMPLATE
    files = byte_level.config_files(256)
    assert files["tokenizer_config.json"]["chat_template"] == CHAT_TEMPLATE
    assert files["tokenizer_config.json"]["add_bos_token"] is True
    assert files["generation_config.json"]["eos_token_id"] == 1 and byte_level.eos_ids == (1,)
