"""Nothing runs code the user did not ask for: checkpoints and artifact configs are data."""
import json

import pytest
import torch

from nima_edge import checkpoint
from nima_edge.config import ModelConfig
from nima_edge.errors import NimaError
from nima_edge.model import NimaForCausalLM
from nima_edge.tokenizer import train_tokenizer

pytest.importorskip("onnxruntime_genai", reason="the onnx extra is not installed")

AUTO_MAP = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
# transformers runs shipped code from a copy in its module cache, so the marker path is absolute
EVIL = "open({marker!r}, 'w').write('remote code ran')\nfrom transformers import LlamaConfig as EvilConfig\n"


@pytest.fixture
def ckpt_with_code(tmp_path):
    torch.manual_seed(0)
    model = NimaForCausalLM(ModelConfig(vocab_size=262, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    ckpt = checkpoint.save(tmp_path / "ckpt", model, train_tokenizer("char"))
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "auto_map": AUTO_MAP}))
    (ckpt / "evil.py").write_text(EVIL.format(marker=str(tmp_path / "EXECUTED")))
    return ckpt


def test_onnx_export_refuses_a_checkpoint_that_ships_code(ckpt_with_code, tmp_path):
    from nima_edge.export import export
    with pytest.raises(NimaError, match="auto_map"):
        export(ckpt_with_code, "onnx", tmp_path / "out", "f32")
    assert not (tmp_path / "EXECUTED").exists() and not (tmp_path / "out").exists()


def test_the_builder_itself_runs_with_remote_code_off(ckpt_with_code, tmp_path, monkeypatch):
    """Second line of defence: even past our auto_map check, the pinned builder is told hf_remote=false
    (and runs offline), so transformers reads the config as a plain Llama one and never imports the
    checkpoint's evil.py (with hf_remote=true it would)."""
    from nima_edge.export import onnx as onnx_export
    monkeypatch.setattr(onnx_export, "refuse_remote_code", lambda ckpt: None)
    (tmp_path / "out").mkdir()
    try:
        onnx_export.run_builder(ckpt_with_code, tmp_path / "out")
    except NimaError:
        pass  # failing is fine too; running the shipped code is not
    assert not (tmp_path / "EXECUTED").exists()


def test_a_genai_config_naming_a_native_library_is_refused_unless_allowed(tmp_path):
    from nima_edge.runtimes import load_runtime
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"context_length": 32, "decoder": {
        "filename": "model.onnx", "session_options": {"custom_ops_library": str(tmp_path / "libevil.so")}}}}))
    with pytest.raises(NimaError, match=r"asks to load native code \(custom_ops_library="):
        load_runtime(tmp_path, "onnx")
    with pytest.raises(NimaError) as e:  # allowed: it gets as far as ORT GenAI, which fails on the bare folder
        load_runtime(tmp_path, "onnx", allow_custom_ops=True)
    assert "native code" not in e.value.problem


def test_the_onnx_builder_is_the_pinned_version():
    from importlib import metadata

    from nima_edge.export.onnx import BUILDER_VERSION
    assert metadata.version("onnxruntime-genai") == BUILDER_VERSION


def test_the_cli_refuses_a_named_library_and_allow_custom_ops_lets_it_through(cli, tmp_path, char_data):
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"context_length": 32, "decoder": {
        "filename": "model.onnx", "session_options": {"custom_ops_library": str(tmp_path / "libevil.so")}}}}))
    for verb, *more in (("generate",), ("eval", "--data", char_data)):
        code, _, err = cli(verb, tmp_path, "--target", "onnx", *more)
        assert code == 2 and "native code" in err and "--allow-custom-ops" in err, err
        code, _, err = cli(verb, tmp_path, "--target", "onnx", "--allow-custom-ops", *more)
        assert "native code" not in err  # past our check (ORT GenAI then fails on the bare folder)


def test_allow_custom_ops_is_ignored_by_runtimes_that_load_no_native_code(tiny_ckpt):
    from nima_edge.runtimes import load_runtime
    rt = load_runtime(tiny_ckpt, "torch", allow_custom_ops=True)
    assert rt.tokenize("To be")
    rt.close()
