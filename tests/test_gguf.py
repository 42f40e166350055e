"""GGUF export and the llama.cpp runtime, checked against the PyTorch reference."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[gguf]')")
gguf = pytest.importorskip("gguf")

from nima_edge.atomic import sha256_file  # noqa: E402
from nima_edge.errors import NimaError  # noqa: E402
from nima_edge.export import export  # noqa: E402
from nima_edge.runtimes import detect_target, load_runtime  # noqa: E402
from nima_edge.runtimes.gguf import LlamaCppRuntime  # noqa: E402
from nima_edge.runtimes.torch_reference import TorchRuntime  # noqa: E402

STRINGS = ["", " ", "   ", "hello", " leading space", "trailing  ", "two\nlines\n\n", "crlf\r\nline", "\t tab",
           "1234567890 3.14", "naïve café Zürich", "日本語のテキスト", "emoji 😀🎉👍🏽", "mixed 😀 text\r\n42",
           "<|user|>hi<|eos|><|assistant|>", "First Citizen:\nBefore we proceed any further, hear me speak."]
PROMPTS = ["First Citizen:\n", "ROMEO: What light", "x"]


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory, tiny_ckpt) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    return {q: export(tiny_ckpt, "gguf", out / f"tiny-{q}.gguf", q) for q in ("f32", "f16", "q8_0", "q4_0")}


@pytest.fixture(scope="module")
def torch_rt(tiny_ref) -> TorchRuntime:
    return tiny_ref


def _untrained(tmp_path: Path, tokenizer_dir: Path) -> Path:
    """A checkpoint with random weights around a prepared tokenizer (tokenization needs no training)."""
    from nima_edge import checkpoint
    from nima_edge.config import preset
    from nima_edge.model import NimaForCausalLM
    from nima_edge.tokenizer import Tokenizer
    tok = Tokenizer.from_file(tokenizer_dir)
    return checkpoint.save(tmp_path / f"untrained-{tok.kind}", NimaForCausalLM(preset("nima-0.5m", tok.vocab_size)), tok)


def test_tokenization_matches_checkpoint_tokenizer(ggufs, tiny_ckpt, bpe_data, tmp_path):
    """llama.cpp, reading the vocabulary from the GGUF, splits text exactly as our tokenizers do."""
    bpe_ckpt = _untrained(tmp_path, bpe_data)
    for ckpt, path in ((tiny_ckpt, ggufs["f32"]), (bpe_ckpt, export(bpe_ckpt, "gguf", tmp_path / "b.gguf", "f32"))):
        ref = TorchRuntime(ckpt).tokenizer
        rt = LlamaCppRuntime(path)
        assert rt.tokenizer.kind == ref.kind
        for s in STRINGS:
            assert rt.tokenize(s) == ref.encode(s), (ref.kind, s)
            assert rt.tokenize(s, add_bos=False) == ref.encode(s, add_bos=False), (ref.kind, s)
            assert rt.detokenize(ref.encode(s)) == ref.decode(ref.encode(s)), (ref.kind, s)
        rt.close()


def test_char_vocab_writes_empty_merges(ggufs):
    reader = gguf.GGUFReader(ggufs["f32"])
    merges = reader.fields["tokenizer.ggml.merges"]
    assert merges.types[0] == gguf.GGUFValueType.ARRAY and merges.contents() == []  # present, and empty
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names  # tied embeddings


def test_f32_logits_match_torch(ggufs, torch_rt):
    rt = LlamaCppRuntime(ggufs["f32"], kv_type="f32")
    worst = 0.0
    for prompt in PROMPTS:
        ids = torch_rt.tokenize(prompt)
        rt.reset(), torch_rt.reset()
        worst = max(worst, np.abs(rt.prefill(ids) - torch_rt.prefill(ids)).max())
        for tok in torch_rt.tokenize("the king", add_bos=False):  # decode steps exercise the KV cache
            worst = max(worst, np.abs(rt.decode(tok) - torch_rt.decode(tok)).max())
    rt.close()
    assert worst < 1e-4


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_greedy_50_tokens_match_torch(ggufs, torch_rt, quant):
    rt = LlamaCppRuntime(ggufs[quant])
    ids = torch_rt.tokenize(PROMPTS[0])
    ours = list(rt.generate_ids(ids, 50, stop_at_eos=False))
    ref = list(torch_rt.generate_ids(ids, 50, stop_at_eos=False))
    rt.close()
    assert len(ours) == 50 and ours == ref


Q4_0_PPL_BOUND = 1.05  # Q4_0 perplexity at most 5% above F32 on the validation slice (measured: +0.2%)


def test_q4_0_perplexity_within_bound_of_f32(ggufs, char_data):
    from nima_edge.data import TokenData
    data = TokenData(char_data)
    val = data.tokens("val")
    windows = [[data.tokenizer.bos_id, *val[s:s + 127].tolist()] for s in (0, 10_000, 30_000)]

    def ppl(path):
        rt = load_runtime(path)
        lp = np.concatenate([rt.logprobs(w) for w in windows])
        rt.close()
        return float(np.exp(-lp.mean()))

    f32, q4 = ppl(ggufs["f32"]), ppl(ggufs["q4_0"])
    assert q4 <= Q4_0_PPL_BOUND * f32, (f32, q4)


def test_quantization_result_packed_block_for_block(tiny_ckpt, char_data, tmp_path):
    """A quantized checkpoint's codes and scales land in Q4_0 blocks exactly; llama.cpp then tracks the
    fake-quant PyTorch reference (up to its int8 activations)."""
    from nima_edge.checkpoint import fake_quant_model
    from nima_edge.export.quantize import quantize_checkpoint
    from nima_edge.quantization import load_quant
    qckpt = quantize_checkpoint(tiny_ckpt, tmp_path / "q4", bits=4, group_size=32, method="rtn")
    path = export(qckpt, "gguf", tmp_path / "q4.gguf", "q4_0")
    assert "packed from the checkpoint's rtn result" in json.loads(
        path.with_name(path.name + ".manifest.json").read_text())["gguf"]["weights"]
    result = load_quant(qckpt)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for hf, name in (("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight"),
                     ("model.layers.1.self_attn.v_proj.weight", "blk.1.attn_v.weight")):
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(result[hf].shape)
        assert np.array_equal(got, result[hf].dequantize().numpy())
    model, tok = fake_quant_model(qckpt)
    ref, rt = TorchRuntime(model=model, tokenizer=tok), LlamaCppRuntime(path, kv_type="f32")
    ids = ref.tokenize(PROMPTS[0])
    assert np.abs(rt.prefill(ids) - ref.prefill(ids)).max() < 0.1
    rt.close()


def test_bad_quant_mismatch_is_a_clear_error(tiny_ckpt, tmp_path):
    from nima_edge.export.quantize import quantize_checkpoint
    qckpt = quantize_checkpoint(tiny_ckpt, tmp_path / "q4", bits=4, group_size=32, method="rtn")
    with pytest.raises(NimaError, match="4-bit .* needs 8-bit"):
        export(qckpt, "gguf", tmp_path / "x.gguf", "q8_0")


def test_llama_cpp_quantizer_reports_fallbacks(tiny_ckpt, tmp_path):
    """nima-0.5m is 128 wide, not a multiple of the 256-weight K-quant super-block: llama.cpp falls back."""
    path = export(tiny_ckpt, "gguf", tmp_path / "km.gguf", "q4_k_m")
    manifest = json.loads(path.with_name(path.name + ".manifest.json").read_text())
    fallbacks = manifest["gguf"]["fallbacks"]
    assert fallbacks and all(f["wanted"] in ("q4_K", "q6_K") and "256" in f["reason"] for f in fallbacks)
    types = manifest["gguf"]["tensor_types"]
    assert all(types[f["tensor"]] == f["used"].upper() for f in fallbacks)  # the file holds what was reported
    rt = load_runtime(path)
    assert len(list(rt.generate_ids(rt.tokenize("ROMEO:"), 10, stop_at_eos=False))) == 10
    rt.close()


def test_unknown_quant_and_bad_out_are_clear_errors(tiny_ckpt, tmp_path):
    with pytest.raises(NimaError, match="unknown GGUF quant 'q3_0'"):
        export(tiny_ckpt, "gguf", tmp_path / "m.gguf", "q3_0")
    with pytest.raises(NimaError, match="does not end in .gguf"):
        export(tiny_ckpt, "gguf", tmp_path / "m.bin", "f32")


def test_word_tokenizer_is_refused(tmp_path):
    from nima_edge.tokenizer import train_tokenizer
    train_tokenizer("word", ["the king and the queen"] * 5).save(tmp_path / "tokenizer.json")
    ckpt = _untrained(tmp_path, tmp_path / "tokenizer.json")
    with pytest.raises(NimaError, match="no word-level tokenizer"):
        export(ckpt, "gguf", tmp_path / "w.gguf", "f32")


def test_corrupt_and_truncated_gguf_are_clear_errors(ggufs, tmp_path):
    data = ggufs["q4_0"].read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 100)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(data[:64])
    for path in (truncated, garbage, header_only):
        with pytest.raises(NimaError, match="corrupt or truncated"):
            load_runtime(path)


def test_export_is_deterministic_and_has_manifest(ggufs, tiny_ckpt, tmp_path):
    for quant in ("f32", "q4_0"):
        again = export(tiny_ckpt, "gguf", tmp_path / f"again-{quant}.gguf", quant)
        assert sha256_file(again) == sha256_file(ggufs[quant])
        manifest = json.loads(ggufs[quant].with_name(ggufs[quant].name + ".manifest.json").read_text())
        assert manifest["target"] == "gguf" and manifest["quant"] == quant
        assert manifest["files"][0]["sha256"] == sha256_file(ggufs[quant])
    # without its manifest a .gguf is still recognised by its suffix
    bare = tmp_path / "bare.gguf"
    bare.write_bytes(ggufs["f32"].read_bytes())
    assert detect_target(bare) == "gguf"


def test_k_quants_need_no_fallback_at_256_multiple_widths(char_data, tmp_path):
    """nima-5m is 256 wide (768 for the MLP): llama.cpp's Q4_K_M applies without any fallback."""
    from nima_edge import checkpoint
    from nima_edge.config import preset
    from nima_edge.model import NimaForCausalLM
    from nima_edge.tokenizer import Tokenizer
    tok = Tokenizer.from_file(char_data)
    ckpt = checkpoint.save(tmp_path / "n5m", NimaForCausalLM(preset("nima-5m", tok.vocab_size)), tok)
    path = export(ckpt, "gguf", tmp_path / "n5m.gguf", "q4_k_m")
    manifest = json.loads(path.with_name(path.name + ".manifest.json").read_text())["gguf"]
    assert manifest["fallbacks"] == []
    assert manifest["tensor_types"]["blk.0.attn_q.weight"] == "Q4_K"
    rt = load_runtime(path)
    assert len(list(rt.generate_ids(rt.tokenize("ROMEO:"), 5, stop_at_eos=False))) == 5
    rt.close()
