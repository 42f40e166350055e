"""onnx-portable: standard-op graph with explicit KV cache, checked against PyTorch and the fake-quant reference."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from onnx_parity import INT8_ACTIVATION_TOL, PROMPT, greedy_path, max_diff

from nima_edge.errors import NimaError
from nima_edge.export import export
from nima_edge.checkpoint import fake_quant_model
from nima_edge.export.quantize import quantize_checkpoint
from nima_edge.quantization import load_quant
from nima_edge.runtimes import detect_target, load_runtime
from nima_edge.runtimes.onnx_portable import OnnxPortableRuntime
from nima_edge.runtimes.torch_reference import TorchRuntime

STEPS = 50


@pytest.fixture(scope="module")
def ref(tiny_ref):
    return tiny_ref


@pytest.fixture(scope="module")
def f32_onnx(tiny_ckpt, tmp_path_factory):
    return export(tiny_ckpt, "onnx-portable", tmp_path_factory.mktemp("portable") / "model.onnx", "f32")


@pytest.fixture(scope="module")
def quant_ckpts(tiny_ckpt, tmp_path_factory):
    """RTN results: symmetric int4/int8 at group 128 (TensorRT's block) and an asymmetric int4 at group 32."""
    root = tmp_path_factory.mktemp("quant")
    return {name: quantize_checkpoint(tiny_ckpt, root / name, bits=bits, group_size=g, method="rtn", symmetric=sym)
            for name, bits, g, sym in [("int4", 4, 128, True), ("int8", 8, 128, True), ("int4-asym", 4, 32, False)]}


def test_f32_graph_is_standard_and_named_like_optimum(f32_onnx):
    onnx.checker.check_model(str(f32_onnx), full_check=True)
    proto = onnx.load(str(f32_onnx))
    assert {n.domain for n in proto.graph.node} <= {""}, "portable graphs use standard ONNX ops only"
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.2.value" in inputs and "present.2.value" in outputs and outputs[0] == "logits"
    assert detect_target(f32_onnx) == "onnx-portable"


def test_f32_matches_torch_and_greedy_is_identical(f32_onnx, ref):
    rt = load_runtime(f32_onnx, threads=2)
    ids = ref.tokenize(PROMPT)
    path = greedy_path(ref, ids, STEPS)
    assert list(rt.generate_ids(ids, STEPS, stop_at_eos=False)) == path
    assert max_diff(rt, ref, ids, path) < 1e-4


def test_f32_all_position_logits_match_torch(f32_onnx, ref):
    """One 12-token prefill on top of a 5-token cache: every position, not only the last."""
    rt = OnnxPortableRuntime(f32_onnx, threads=2)
    ids = ref.tokenize(PROMPT)[:17]
    rt.reset()
    rt.prefill(ids[:5])
    feed = {"input_ids": np.asarray([ids[5:]]), "attention_mask": np.ones((1, 17), np.int64),
            "position_ids": np.arange(5, 17)[None], **dict(zip(rt.inputs[3:], rt.past))}
    logits = rt.session.run(["logits"], feed)[0][0]
    with torch.no_grad():
        expected = ref.model(torch.tensor([ids]))[0, 5:].numpy()
    assert np.abs(logits - expected).max() < 1e-4


@pytest.mark.parametrize("name", ["int4", "int8", "int4-asym"])
def test_quantized_matches_fake_quant_and_carries_our_codes(name, quant_ckpts, tmp_path):
    ckpt = quant_ckpts[name]
    out = export(ckpt, "onnx-portable", tmp_path / "model.onnx", name.split("-")[0])
    onnx.checker.check_model(str(out), full_check=True)
    proto = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    result = load_quant(ckpt)
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == len(result) == 3 * 7
    for weight, q in result.items():  # the file holds our codes and scales, not a re-quantization
        base = weight.removesuffix(".weight")
        codes = q.codes.numpy().astype(np.int16)
        if q.symmetric:  # signed codes, no zero point (TensorRT's form)
            assert np.array_equal(inits[f"{base}.qweight"].astype(np.int16).T, codes - 2 ** (q.bits - 1))
            assert f"{base}.zero_points" not in inits
        else:
            assert np.array_equal(inits[f"{base}.qweight"].astype(np.int16).T, codes)
            assert np.array_equal(inits[f"{base}.zero_points"].T, q.zeros.numpy())
        assert np.array_equal(inits[f"{base}.scales"].T, q.scales.numpy())
    model, tok = fake_quant_model(ckpt)
    ref = TorchRuntime(model=model, tokenizer=tok)
    rt = OnnxPortableRuntime(out, threads=2, accuracy_level=1)  # fp32 activations: parity is exact
    ids = ref.tokenize(PROMPT)
    path = greedy_path(ref, ids, STEPS)
    assert max_diff(rt, ref, ids, path) < 1e-4
    assert list(rt.generate_ids(ids, STEPS, stop_at_eos=False)) == path
    # the default (int8 activations, ORT's fast kernel) stays close
    assert max_diff(OnnxPortableRuntime(out, threads=2), ref, ids, path) < INT8_ACTIVATION_TOL


def test_unquantized_checkpoint_gets_rtn_on_the_fly(tiny_ckpt, tmp_path):
    out = export(tiny_ckpt, "onnx-portable", tmp_path / "m.onnx", "int4")
    blocks = {a.i for n in onnx.load(str(out)).graph.node if n.op_type == "DequantizeLinear" for a in n.attribute
              if a.name == "block_size"}
    assert blocks == {128}


def test_bad_requests_and_corrupt_files_give_clear_errors(tiny_ckpt, quant_ckpts, f32_onnx, tmp_path):
    with pytest.raises(NimaError, match="int4"):
        export(quant_ckpts["int8"], "onnx-portable", tmp_path / "m.onnx", "int4")
    with pytest.raises(NimaError, match="--quant"):
        export(tiny_ckpt, "onnx-portable", tmp_path / "m.onnx", "q5_k")
    with pytest.raises(NimaError, match=".onnx"):
        export(tiny_ckpt, "onnx-portable", tmp_path / "m.bin", "f32")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(f32_onnx.read_bytes()[:4096])
    with pytest.raises(NimaError, match="corrupt"):
        OnnxPortableRuntime(truncated)
    foreign = tmp_path / "foreign.onnx"
    proto = onnx.load(str(f32_onnx))
    del proto.metadata_props[:]
    onnx.save(proto, str(foreign))
    with pytest.raises(NimaError, match="metadata"):
        OnnxPortableRuntime(foreign)
