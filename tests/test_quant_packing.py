"""Every packed layout round-trips exactly and is read back by the target's own library as the reference."""
import numpy as np
import pytest
import torch

from nima_edge.errors import NimaError
from nima_edge.export import packing
from nima_edge.export.gptq import Hessian, gptq
from nima_edge.quantization import rtn

SCHEMES = [(bits, group, sym) for bits in (4, 8) for group in (32, 64, 128) for sym in (True, False)]


def weight(out=48, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, k, generator=g) * 0.05
    w[3, :32] = 0.0  # an all-zero group
    w[5, 7] = 0.9    # an outlier
    return w


def same(a, b):
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
    assert (a.bits, a.group_size) == (b.bits, b.group_size)


@pytest.fixture(scope="module")
def gptq_weights():
    """GPTQ results (not just RTN) so packing is checked on codes that error feedback moved."""
    w = weight()
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(1)) @ torch.randn(256, 256) / 16
    h = Hessian(256)
    h.add(x)
    return {(bits, sym): gptq(w, h.H, bits, 32, sym) for bits in (4, 8) for sym in (True, False)}


@pytest.mark.parametrize("bits,group,sym", SCHEMES)
def test_matmul_nbits_and_intx_round_trip(bits, group, sym):
    q = rtn(weight(), bits, group, sym)
    B, scales, zp = packing.pack_matmul_nbits(q)
    assert B.dtype == np.uint8 and B.shape == (48, 256 // group, group * bits // 8)
    assert scales.shape == (48, 256 // group) and (zp is None) == sym
    same(packing.unpack_matmul_nbits(B, scales, zp, bits, group), q)
    same(packing.unpack_intx(*packing.pack_intx(q), bits), q)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (8, 32), (8, 128)])
def test_gguf_round_trip_and_gguf_py_dequantizes_to_the_reference(bits, group):
    from gguf.quants import dequantize
    q = rtn(weight(), bits, group)
    data = packing.pack_gguf(q)
    assert data.shape == (48, 256 // 32 * (18 if bits == 4 else 34))
    back = packing.unpack_gguf(data, bits, q.shape)
    assert torch.equal(back.dequantize(), q.dequantize())  # groups of 64/128 become blocks of 32
    assert np.array_equal(dequantize(data, packing.gguf_type(q)), q.dequantize().numpy())


@pytest.mark.parametrize("bits", [4, 8])
def test_gguf_blocks_from_gptq_codes_equal_gguf_py_dequantization(gptq_weights, bits):
    from gguf.quants import dequantize
    q = gptq_weights[(bits, True)]
    data = packing.pack_gguf(q)
    same(packing.unpack_gguf(data, bits, q.shape), q)
    assert np.array_equal(dequantize(data, packing.gguf_type(q)), q.dequantize().numpy())


def test_gguf_refuses_asymmetric_results():
    with pytest.raises(NimaError, match="symmetric"):
        packing.pack_gguf(rtn(weight(), 4, 32, symmetric=False))


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, True), (8, False)])
@pytest.mark.parametrize("k", [256, 96])  # 96 / 32 = 3 blocks: an odd count of packed 4-bit zero points
def test_onnxruntime_matmul_nbits_computes_with_the_reference_weights(gptq_weights, bits, sym, k):
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper
    q = gptq_weights[(bits, sym)] if k == 256 else rtn(weight(k=k), bits, 32, sym)
    n = q.shape[0]
    B, scales, zp = packing.pack_matmul_nbits(q)
    inits = [numpy_helper.from_array(B, "B"), numpy_helper.from_array(scales, "scales")]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "zp"))
    node = helper.make_node("MatMulNBits", ["x", "B", "scales"] + (["zp"] if zp is not None else []), ["y"],
                            domain="com.microsoft", K=k, N=n, bits=bits, block_size=32)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((4, k)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ q.dequantize().numpy().T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, True)])
def test_torchao_tensor_dequantizes_to_the_reference(gptq_weights, bits, sym):
    pytest.importorskip("torchao")
    q = gptq_weights[(bits, sym)]
    t = packing.to_torchao(q)
    assert t.qdata.dtype == torch.int8 and int(t.qdata.min()) >= -(2 ** (bits - 1))
    assert torch.equal(t.dequantize(), q.dequantize())
