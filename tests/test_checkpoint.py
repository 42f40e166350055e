import json

import pytest
import torch

from nima_edge import checkpoint
from nima_edge.atomic import _umask, atomic_dir, write_text
from nima_edge.config import ModelConfig
from nima_edge.errors import NimaError
from nima_edge.model import NimaForCausalLM
from nima_edge.tokenizer import train_tokenizer


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = NimaForCausalLM(ModelConfig(vocab_size=262, max_position_embeddings=32))
    return checkpoint.save(tmp_path / "ckpt", model, train_tokenizer("char"), meta={"preset": "test"}), model


def test_round_trip_is_exact_and_hf_shaped(saved):
    path, model = saved
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                                 "tokenizer_config.json", "generation_config.json", "nima.json"}
    assert json.loads((path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    loaded, tok = checkpoint.load(path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert tok.vocab_size == 262 and checkpoint.read_meta(path)["preset"] == "test"


def test_interrupted_directory_write_keeps_the_old_checkpoint(saved):
    path, _ = saved
    before = checkpoint.checkpoint_hash(path)
    with pytest.raises(RuntimeError):
        with atomic_dir(path) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half written")
            raise RuntimeError("killed mid-write")
    assert checkpoint.checkpoint_hash(path) == before
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]  # no temp litter left behind
    checkpoint.load(path)


def test_interrupted_file_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "f.json"
    write_text(target, "old")
    from nima_edge.atomic import atomic_path
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("new but unfinished")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_missing_path(tmp_path):
    with pytest.raises(NimaError, match="does not exist"):
        checkpoint.load(tmp_path / "nope")


def test_missing_file(saved):
    path, _ = saved
    (path / "tokenizer.json").unlink()
    with pytest.raises(NimaError, match="no tokenizer.json"):
        checkpoint.load(path)


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"\x00" * 8 + b[8:], lambda b: b""])
def test_corrupt_safetensors(saved, damage):
    path, _ = saved
    f = path / "model.safetensors"
    f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(NimaError, match="corrupt or truncated"):
        checkpoint.load(path)


def test_weights_from_another_model(saved, tmp_path):
    path, _ = saved
    other = checkpoint.save(tmp_path / "other", NimaForCausalLM(ModelConfig(vocab_size=262, hidden_size=256)),
                            train_tokenizer("char"))
    (path / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(NimaError, match="does not match its config"):
        checkpoint.load(path)


def test_atomic_writes_have_ordinary_permissions(saved, tmp_path):
    path, _ = saved
    write_text(tmp_path / "plain.txt", "x")
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert path.stat().st_mode & 0o777 == 0o777 & ~_umask()
