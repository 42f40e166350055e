"""Quantization core: RTN grids, GPTQ, the saved result, the fake-quant reference and the CLI."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from nima_edge import checkpoint
from nima_edge.checkpoint import fake_quant_model
from nima_edge.data import TokenData
from nima_edge.errors import NimaError
from nima_edge.evaluate import evaluate
from nima_edge.export.gptq import Hessian, gptq
from nima_edge.export.quantize import quantize_checkpoint, quantize_model
from nima_edge.quantization import (LINEAR_SUFFIXES, describe_substitutions, group_plan, load_quant, rtn,
                                    substitutions)


def correlated_layer(rows=128, cols=256, n=2048, seed=0):
    """A weight and inputs with correlated features: where GPTQ's error feedback has something to use."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    x = torch.randn(n, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / cols ** 0.5)
    return w, x + 0.1 * torch.randn(n, cols, generator=g)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_grid(bits, sym):
    w, _ = correlated_layer()
    w[0, :32] = 0.0
    q = rtn(w, bits, 32, sym)
    assert q.codes.dtype == torch.uint8 and q.zeros.dtype == torch.uint8 and q.scales.dtype == torch.float32
    assert q.scales.shape == (128, 8) and int(q.codes.max()) <= 2 ** bits - 1
    assert torch.equal(q.scales.half().float(), q.scales) and bool((q.scales > 0).all())
    if sym:
        assert bool((q.zeros == 2 ** (bits - 1)).all())
        if bits == 8:
            assert int(q.codes.min()) >= 1  # Q8_0's -127..127
    # within half a step, except where the grid cannot reach: the far side of a symmetric 4-bit group
    # (codes -8..7) and the ends of an asymmetric one (its zero point is rounded): one step there
    err = (q.dequantize() - w).abs().view(128, 8, 32) / q.scales.unsqueeze(-1)
    assert float(err.max()) <= (0.5 if bits == 8 and sym else 1.0) + 1e-3
    assert float(err.median()) < 0.3
    assert bool((q.dequantize()[0, :32] == 0).all())


def test_rtn_symmetric_4bit_grid_hits_the_extreme_exactly():
    w = torch.tensor([[-1.0] + [0.1] * 31, [0.875] + [-0.2] * 31])
    q = rtn(w, 4, 32)
    assert q.codes[0, 0] == 0 and q.codes[1, 0] == 15  # -8 * amax/8 and +7 * amax/7
    assert q.dequantize()[0, 0] == -1.0 and q.dequantize()[1, 0] == 0.875


def test_hessian_accumulates_in_batches():
    _, x = correlated_layer(n=300)
    h = Hessian(256)
    h.add(x[:100])
    h.add(x[100:].view(4, 50, 256))
    torch.testing.assert_close(h.H, 2 / 300 * x.double().T @ x.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits,group,sym,act_order", [(4, 32, True, False), (4, 128, True, False),
                                                     (4, 32, False, False), (4, 32, True, True),
                                                     (8, 64, True, False)])
def test_gptq_lowers_the_layer_output_error_against_rtn(bits, group, sym, act_order):
    w, x = correlated_layer()
    h = Hessian(256)
    h.add(x)
    q = gptq(w, h.H, bits, group, sym, act_order=act_order)
    assert q.method == "gptq" and torch.equal(q.scales.half().float(), q.scales) and bool((q.scales > 0).all())
    if sym:
        assert bool((q.zeros == 2 ** (bits - 1)).all())

    def out_err(wq):
        return ((x @ (wq - w).T) ** 2).mean().item()
    assert out_err(q.dequantize()) < 0.8 * out_err(rtn(w, bits, group, sym).dequantize())


def test_gptq_with_uncorrelated_inputs_is_rtn():
    w, _ = correlated_layer()
    q = gptq(w, torch.eye(256, dtype=torch.float64), 4, 32)  # nothing to compensate with: plain rounding
    r = rtn(w, 4, 32)
    assert torch.equal(q.codes, r.codes) and torch.equal(q.scales, r.scales)


def test_gptq_lazy_block_updates_do_not_change_the_result():
    w, x = correlated_layer()
    h = Hessian(256)
    h.add(x)
    a, b = gptq(w, h.H, 4, 32, block_size=32), gptq(w, h.H, 4, 32, block_size=256)
    assert (a.codes != b.codes).float().mean() < 1e-3  # equal up to float64 rounding at ties


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_group_plan_substitutes_smaller_groups_or_float_per_tensor(method, group_plan_model):
    model = group_plan_model
    plan = group_plan(model, 128)
    assert {n: g for n, g in plan.items() if "layers.0." in n} == {
        f"model.layers.0.{n}.weight": g for n, g in [("self_attn.q_proj", 64), ("self_attn.k_proj", 64),
                                                     ("self_attn.v_proj", 64), ("self_attn.o_proj", 64),
                                                     ("mlp.gate_proj", 64), ("mlp.up_proj", 64), ("mlp.down_proj", None)]}
    down = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    calib = torch.randint(0, 262, (4, 16)) if method == "gptq" else None
    result = quantize_model(model, method, 4, 128, calib=calib)
    assert {q.group_size for q in result.values()} == {64} and len(result) == 12  # 2 layers x 6 quantized
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, down)  # float, untouched
    subs = substitutions(plan, 128)
    assert len(subs) == 14 and {s["instead"] for s in subs} == {"group 64", "float (no supported group divides its width)"}
    assert describe_substitutions(subs) == [
        "group 128 -> group 64: 12 tensors (gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj)",
        "group 128 -> float (no supported group divides its width): 2 tensors (down_proj)"]


def test_quantize_records_and_prints_the_plan(tmp_path, group_plan_model):
    from nima_edge.tokenizer import train_tokenizer
    ckpt = checkpoint.save(tmp_path / "ck", group_plan_model, train_tokenizer("char"))
    lines = []
    out = quantize_checkpoint(ckpt, tmp_path / "q", 4, 128, "rtn", log=lines.append)
    assert lines == ["quantization plan: group 128 -> group 64: 12 tensors (gate_proj, k_proj, o_proj, q_proj, "
                     "up_proj, v_proj)",
                     "quantization plan: group 128 -> float (no supported group divides its width): 2 tensors "
                     "(down_proj)"]
    doc = json.loads((out / "quantization.json").read_text())
    assert doc["group_size"] == 128 and len(doc["substitutions"]) == 14
    assert doc["layers"]["model.layers.1.self_attn.q_proj.weight"]["group_size"] == 64
    assert "model.layers.1.mlp.down_proj.weight" not in doc["layers"]
    fq, _ = fake_quant_model(out)  # the float tensor stays float in the reference too
    assert torch.equal(fq.model.layers[1].mlp.down_proj.weight, checkpoint.load(ckpt)[0].model.layers[1].mlp.down_proj.weight)


def test_bad_quantization_parameters_are_a_clear_error(group_plan_model):
    model = group_plan_model
    with pytest.raises(NimaError, match="group size 48 is not supported"):
        quantize_model(model, "rtn", 4, 48)
    with pytest.raises(NimaError, match="3-bit"):
        rtn(torch.zeros(4, 32), 3, 32)
    with pytest.raises(NimaError, match="input width 80, not a multiple of the group size 32"):
        rtn(torch.zeros(4, 80), 4, 32)


@pytest.fixture(scope="module")
def quantized(tiny_ckpt, char_data, tmp_path_factory):
    """The tiny checkpoint quantized three ways (GPTQ on a small calibration set to stay fast)."""
    root = tmp_path_factory.mktemp("quant")
    return {
        "gptq4": quantize_checkpoint(tiny_ckpt, root / "gptq4", 4, 32, "gptq", char_data, samples=8, length=64),
        "rtn4": quantize_checkpoint(tiny_ckpt, root / "rtn4", 4, 32, "rtn"),
        "gptq8": quantize_checkpoint(tiny_ckpt, root / "gptq8", 8, 128, "gptq", char_data, samples=8, length=64),
    }


def test_quantized_checkpoint_keeps_float_weights_and_carries_the_result(tiny_ckpt, quantized):
    path = quantized["gptq4"]
    assert load_file(str(path / "model.safetensors")).keys() == load_file(str(tiny_ckpt / "model.safetensors")).keys()
    assert checkpoint.checkpoint_hash(path) == checkpoint.checkpoint_hash(tiny_ckpt)
    result = load_quant(path)
    model, _ = checkpoint.load(tiny_ckpt)
    linears = {n for n, _ in model.named_parameters() if n.split(".")[-2] in LINEAR_SUFFIXES}
    assert set(result) == linears  # embeddings and lm_head stay float
    assert {(q.bits, q.group_size, q.symmetric, q.method) for q in result.values()} == {(4, 32, True, "gptq")}
    doc = json.loads((path / "quantization.json").read_text())
    assert doc["calibration"]["samples"] == 8 and doc["source_sha256"] == checkpoint.checkpoint_hash(tiny_ckpt)
    assert checkpoint.read_meta(path)["quantization"]["method"] == "gptq"
    assert load_quant(tiny_ckpt) is None


def test_fake_quant_model_uses_the_dequantized_weights(tiny_ckpt, quantized):
    fq, _ = fake_quant_model(quantized["gptq4"])
    params = dict(fq.named_parameters())
    for name, q in load_quant(quantized["gptq4"]).items():
        assert torch.equal(params[name], q.dequantize())
    float_model, _ = checkpoint.load(tiny_ckpt)
    assert torch.equal(fq.model.embed_tokens.weight, float_model.model.embed_tokens.weight)
    with pytest.raises(NimaError, match="carries no quantization result"):
        fake_quant_model(tiny_ckpt)


def test_quantized_perplexity_is_close_to_float(tiny_ckpt, char_data, quantized):
    data = TokenData(char_data)

    def ppl(model):
        return evaluate(model, data, context=64, max_windows=64)["perplexity"]
    fp = ppl(checkpoint.load(tiny_ckpt)[0])
    int8 = ppl(fake_quant_model(quantized["gptq8"])[0])
    int4 = ppl(fake_quant_model(quantized["gptq4"])[0])
    assert abs(int8 - fp) / fp < 0.01
    assert fp * 0.98 < int4 < fp * 1.25


def test_torch_runtime_runs_the_fake_quant_model(quantized):
    from nima_edge.runtimes.torch_reference import TorchRuntime
    rt = TorchRuntime(quantized["gptq4"])
    fq, tok = fake_quant_model(quantized["gptq4"])
    assert torch.equal(rt.model.model.layers[0].mlp.up_proj.weight, fq.model.layers[0].mlp.up_proj.weight)
    ids = tok.encode("ROMEO:")
    expected = fq(torch.tensor([ids]))[0, -1]
    torch.testing.assert_close(torch.from_numpy(rt.prefill(ids)), expected)


def test_corrupt_result_is_a_clear_error(quantized, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(quantized["rtn4"], bad)
    (bad / "quantization.safetensors").write_bytes(b"truncated")
    with pytest.raises(NimaError, match="unreadable"):
        load_quant(bad)


def test_gptq_needs_matching_calibration_data(tiny_ckpt, bpe_data, tmp_path):
    with pytest.raises(NimaError, match="different tokenizer"):
        quantize_checkpoint(tiny_ckpt, tmp_path / "x", 4, 32, "gptq", bpe_data, samples=2, length=32)
    with pytest.raises(NimaError, match="calibration"):
        quantize_checkpoint(tiny_ckpt, tmp_path / "x", 4, 32, "gptq", None)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "nima_edge", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_cli_quantize_then_eval(tiny_ckpt, char_data, tmp_path):
    out = cli("quantize", tiny_ckpt, "--out", tmp_path / "q", "--bits", 8, "--group", 32, "--method", "rtn")
    assert out.returncode == 0, out.stderr
    assert "4-bit" not in out.stdout and "8-bit rtn, group 32" in out.stdout
    out = cli("eval", tmp_path / "q", "--data", char_data, "--lines", 5)  # BLEU is test_evaluate.py's
    assert out.returncode == 0, out.stderr
    assert "fake-quant model (8-bit rtn, group 32, symmetric)" in out.stdout and "perplexity" in out.stdout
    out = cli("quantize", tiny_ckpt, "--out", tmp_path / "q2", "--group", 100, "--method", "rtn")
    assert out.returncode == 2 and "group size 100" in out.stderr and "Traceback" not in out.stderr
