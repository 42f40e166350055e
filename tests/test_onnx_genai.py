"""onnx (ONNX Runtime GenAI): builder graph + our MatMulNBits weights, checked against PyTorch and fake-quant."""
from __future__ import annotations

import json
import shutil

import onnx
import onnxruntime_genai as og
import pytest
import torch
from onnx import helper, numpy_helper
from onnx_parity import INT8_ACTIVATION_TOL, PROMPT, greedy_path, max_diff

from nima_edge.errors import NimaError
from nima_edge.export import export
from nima_edge.export.onnx import hf_names
from nima_edge.export.onnx_weights import concat_rows
from nima_edge.export.packing import unpack_matmul_nbits
from nima_edge.checkpoint import fake_quant_model
from nima_edge.export.quantize import quantize_checkpoint
from nima_edge.quantization import load_quant
from nima_edge.manifest import read_manifest
from nima_edge.runtimes import detect_target, load_runtime
from nima_edge.runtimes.onnx import OnnxGenaiRuntime
from nima_edge.runtimes.torch_reference import TorchRuntime

STEPS = 50


@pytest.fixture(scope="module")
def ref(tiny_ref):
    return tiny_ref


@pytest.fixture(scope="module")
def f32_dir(tiny_ckpt, tmp_path_factory):
    return export(tiny_ckpt, "onnx", tmp_path_factory.mktemp("genai") / "f32", "f32")


@pytest.fixture(scope="module")
def gptq_int4(tiny_ckpt, char_data, tmp_path_factory):
    return quantize_checkpoint(tiny_ckpt, tmp_path_factory.mktemp("q") / "gptq4", bits=4, group_size=32,
                               method="gptq", data_dir=char_data, samples=8, length=64)


def test_f32_matches_torch_and_greedy_is_identical(f32_dir, ref):
    assert detect_target(f32_dir) == "onnx"
    assert read_manifest(f32_dir)["target"] == "onnx"
    proto = onnx.load(str(f32_dir / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "GroupQueryAttention" for n in proto.graph.node) == 3  # fused attention
    rt = load_runtime(f32_dir, threads=2)
    ids = ref.tokenize(PROMPT)
    path = greedy_path(ref, ids, STEPS)
    assert list(rt.generate_ids(ids, STEPS, stop_at_eos=False)) == path
    assert max_diff(rt, ref, ids, path) < 1e-4


def test_generator_api_runs_the_artifact_on_its_own(f32_dir, ref):
    """What a user of onnxruntime-genai does: its own tokenizer and greedy search, no nima-edge code."""
    model = og.Model(str(f32_dir))
    ids = ref.tokenize(PROMPT)
    assert list(og.Tokenizer(model).encode(PROMPT)) == ids[1:]  # ours prepends BOS, genai's does not
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 10, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    generated = list(gen.get_sequence(0))[len(ids):]  # stops early at EOS, which greedy_path walks past
    assert generated and generated == greedy_path(ref, ids, 10)[:len(generated)]


def _nbits_weights(path):
    proto = onnx.load(str(path / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            zp = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
            yield node, attrs, unpack_matmul_nbits(inits[node.input[1]], inits[node.input[2]], zp,
                                                   attrs["bits"], attrs["block_size"])


def test_gptq_int4_file_holds_our_codes_and_tracks_fake_quant(gptq_int4, tmp_path):
    out = export(gptq_int4, "onnx", tmp_path / "int4", "int4")
    result = load_quant(gptq_int4)
    seen = 0
    for node, attrs, q in _nbits_weights(out):
        names = hf_names(node.input[1].removesuffix(".B") + ".weight")
        ours = concat_rows([result[n] for n in names])
        assert torch.equal(q.codes, ours.codes) and torch.equal(q.scales, ours.scales)
        assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (4, 32, 4)
        seen += len(names)
    assert seen == len(result) == 21
    model, tok = fake_quant_model(gptq_int4)
    fq = TorchRuntime(model=model, tokenizer=tok)
    ids = fq.tokenize(PROMPT)
    assert max_diff(load_runtime(out, threads=2), fq, ids, greedy_path(fq, ids, STEPS)) < INT8_ACTIVATION_TOL


def test_int8_with_fp32_activations_is_exact(tiny_ckpt, tmp_path):
    """An unquantized checkpoint gets RTN on the fly; accuracy_level 1 reproduces fake-quant exactly."""
    ckpt = quantize_checkpoint(tiny_ckpt, tmp_path / "rtn8", bits=8, group_size=32, method="rtn")
    out = export(ckpt, "onnx", tmp_path / "int8", "int8", accuracy_level=1)
    assert {(a["bits"], a["accuracy_level"]) for _, a, _ in _nbits_weights(out)} == {(8, 1)}
    model, tok = fake_quant_model(ckpt)
    fq = TorchRuntime(model=model, tokenizer=tok)
    rt = OnnxGenaiRuntime(out, threads=2)
    ids = fq.tokenize(PROMPT)
    path = greedy_path(fq, ids, STEPS)
    assert max_diff(rt, fq, ids, path) < 1e-4
    assert list(rt.generate_ids(ids, STEPS, stop_at_eos=False)) == path


def test_corrupt_or_foreign_directories_give_clear_errors(f32_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(f32_dir, bad)
    data = bad / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(NimaError, match="corrupt"):
        OnnxGenaiRuntime(bad)
    (bad / "genai_config.json").write_text("{not json")
    with pytest.raises(NimaError, match="corrupt"):
        OnnxGenaiRuntime(bad)
    with pytest.raises(NimaError, match="genai_config"):
        OnnxGenaiRuntime(tmp_path)
    assert json.loads((f32_dir / "genai_config.json").read_text())["model"]["context_length"] == 256
