"""tensorrt: engine from the portable ONNX graph. Building and running need an NVIDIA GPU and the tensorrt
package; on CPU-only machines those tests skip and the checks that need neither still run."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from onnx_parity import PROMPT, greedy_path, max_diff

from nima_edge.errors import NimaError
from nima_edge.export import export
from nima_edge.export.onnx_portable import io_names
from nima_edge.checkpoint import fake_quant_model
from nima_edge.export.quantize import quantize_checkpoint
from nima_edge.export.tensorrt import profiles
from nima_edge.runtimes import detect_target, load_runtime
from nima_edge.runtimes.torch_reference import TorchRuntime

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
needs_gpu = pytest.mark.skipif(not (HAS_TRT and torch.cuda.is_available()),
                               reason="TensorRT needs an NVIDIA GPU and the tensorrt package (pip install "
                                      "tensorrt-cu12); this machine has no GPU, so the engine is not built here")


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here, so the missing-package error cannot occur")
def test_missing_tensorrt_names_the_install(tiny_ckpt, tmp_path):
    with pytest.raises(NimaError, match="tensorrt-cu12"):
        export(tiny_ckpt, "tensorrt", tmp_path / "trt", "f32")


def test_unsupported_quantizations_are_refused_before_building(tiny_ckpt, tmp_path):
    with pytest.raises(NimaError, match="per-channel"):
        export(tiny_ckpt, "tensorrt", tmp_path / "trt", "int8")
    asym = quantize_checkpoint(tiny_ckpt, tmp_path / "asym", bits=4, group_size=128, method="rtn", symmetric=False)
    with pytest.raises(NimaError, match="asymmetric"):
        export(asym, "tensorrt", tmp_path / "trt", "int4")


def test_profiles_cover_prefill_and_decode():
    cfg = {"max_position_embeddings": 256, "num_key_value_heads": 2, "head_dim": 32}
    inputs, _ = io_names(2)
    prefill, decode = profiles(cfg, inputs)
    for profile in (prefill, decode):
        assert set(profile) == set(inputs)
        for lo, opt, hi in profile.values():
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))
    assert prefill["input_ids"] == ((1, 1), (1, 16), (1, 256))
    assert decode["input_ids"] == ((1, 1), (1, 1), (1, 1))
    assert decode["past_key_values.1.value"][2] == (1, 2, 255, 32)


@needs_gpu
def test_f32_engine_matches_torch(tiny_ckpt, tmp_path):
    out = export(tiny_ckpt, "tensorrt", tmp_path / "trt", "f32")
    assert detect_target(out) == "tensorrt"
    ref, rt = TorchRuntime(tiny_ckpt), load_runtime(out)
    ids = ref.tokenize(PROMPT)
    path = greedy_path(ref, ids, 50)
    assert list(rt.generate_ids(ids, 50, stop_at_eos=False)) == path
    assert max_diff(rt, ref, ids, path) < 1e-4


@needs_gpu
def test_int4_engine_tracks_fake_quant(tiny_ckpt, tmp_path):
    ckpt = quantize_checkpoint(tiny_ckpt, tmp_path / "q4", bits=4, group_size=128, method="rtn")
    out = export(ckpt, "tensorrt", tmp_path / "trt", "int4")
    model, tok = fake_quant_model(ckpt)
    ref = TorchRuntime(model=model, tokenizer=tok)
    ids = ref.tokenize(PROMPT)
    # TensorRT's int4 weight-only GEMMs may accumulate differently from PyTorch's fp32 matmul
    assert max_diff(load_runtime(out), ref, ids, greedy_path(ref, ids, 50)) < 1e-2
