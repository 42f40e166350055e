"""onnx-portable and ExecuTorch exports of Llama configurations beyond our presets: explicit head_dim,
llama3 RoPE scaling, untied embeddings, biases, a 128K declared context (the KV cache sized from
`context`), and widths the requested quantization group does not divide (the group plan)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx_parity import INT8_ACTIVATION_TOL, PROMPT

from nima_edge import checkpoint
from nima_edge.config import ModelConfig
from nima_edge.errors import NimaError
from nima_edge.export import export
from nima_edge.manifest import read_manifest
from nima_edge.model import NimaForCausalLM
from nima_edge.quantization import apply_quant, rtn_model
from nima_edge.runtimes import load_runtime
from nima_edge.runtimes.torch_reference import TorchRuntime
from nima_edge.tokenizer import train_tokenizer



def llama_like() -> NimaForCausalLM:
    """Llama-3.2-shaped in every way but size: head_dim 64 != 192 / 4, llama3 scaling, 128K positions,
    untied; plus HF's optional biases. Widths 192 and 320 are not multiples of 128 (the plan's job)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=262, hidden_size=192, intermediate_size=320, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=131072,
                      rope_theta=500000.0, tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
                      rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    model = NimaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.05)
    return model


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    return checkpoint.save(tmp_path_factory.mktemp("llama") / "ck", llama_like(), train_tokenizer("char"))


def reference(ckpt, qweights=None) -> TorchRuntime:
    model, tok = checkpoint.load(ckpt)
    if qweights is not None:
        apply_quant(model, qweights)
    return TorchRuntime(model=model, tokenizer=tok)


def test_onnx_portable_exports_the_model_and_records_context_and_plan(llama_ckpt, tmp_path):
    pytest.importorskip("onnxruntime")
    ref = reference(llama_ckpt)
    ids = ref.tokenize(PROMPT)
    f32 = export(llama_ckpt, "onnx-portable", tmp_path / "f32.onnx", "f32", context=512)
    assert read_manifest(f32)["max_context"] == 512
    rt = load_runtime(f32)
    assert np.abs(rt.prefill(ids) - ref.prefill(ids)).max() < 1e-4
    assert np.abs(rt.decode(7) - ref.decode(7)).max() < 1e-4  # through the past/present cache

    int4 = export(llama_ckpt, "onnx-portable", tmp_path / "int4.onnx", "int4")  # RTN group 128 on the fly
    manifest = read_manifest(int4)
    assert manifest["max_context"] == 2048  # the declared 131072, capped
    assert {s["instead"] for s in manifest["substitutions"]} == {"group 64"}  # 192 and 320 wide inputs
    assert manifest["weights"]["block_size"] == [64, 128]  # o_proj's input (4 x 64) keeps 128
    fq = reference(llama_ckpt, rtn_model(checkpoint.load(llama_ckpt)[0], 4, 128))
    rt4 = load_runtime(int4)  # ONNX Runtime fuses DequantizeLinear + MatMul into its int8-activation kernel
    assert np.abs(rt4.prefill(ids) - fq.prefill(ids)).max() < INT8_ACTIVATION_TOL


def test_onnx_genai_records_the_plan_substitutions(llama_ckpt, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    int4 = export(llama_ckpt, "onnx", tmp_path / "genai", "int4", group_size=128)
    manifest = read_manifest(int4)
    assert {s["instead"] for s in manifest["substitutions"]} == {"group 64"}  # 192 and 320 wide inputs
    assert all(s["requested_group"] == 128 for s in manifest["substitutions"])


@pytest.mark.slow  # one more XNNPACK lowering: minutes on a busy 2-core machine; test_executorch.py covers the seams
def test_executorch_exports_the_model_with_the_context_asked(llama_ckpt, tmp_path):
    pytest.importorskip("executorch")
    ref = reference(llama_ckpt)
    ids = ref.tokenize(PROMPT)
    pte = export(llama_ckpt, "executorch", tmp_path / "et", "fp32", context=96, log=lambda *_: None)
    rt = load_runtime(pte)
    assert rt.metadata["get_max_context_len"] == 96 and read_manifest(pte)["max_context"] == 96
    assert np.abs(rt.prefill(ids) - ref.prefill(ids)).max() < 1e-4
    assert np.abs(rt.decode(7) - ref.decode(7)).max() < 1e-4  # llama::update_cache + custom_sdpa
    with pytest.raises(NimaError, match="context 200000 is outside"):
        export(llama_ckpt, "executorch", tmp_path / "et2", "fp32", context=200000)
