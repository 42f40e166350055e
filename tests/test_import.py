"""Bring your own model: import Hugging Face and GGUF Llama models, then ship them (issue 13).

Random-weight transformers models shaped like SmolLM2-135M, TinyLlama and Llama-3.2 (tests/byo_models.py),
each with a tokenizer of its kind trained on the test corpus; no downloads. The default suite imports all
three, checks logits against transformers, tokenization and chat templates against transformers and
llama.cpp, the GGUF f32 export with verify, and the GGUF round trip; every other target is `slow`.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from byo_models import SPECS, write_model
from nima_edge import checkpoint
from nima_edge.errors import NimaError
from nima_edge.importer import import_model
from nima_edge.verify import TOKENIZER_STRINGS

pytest.importorskip("transformers", reason="the test extra is not installed")

KINDS = list(SPECS)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Good morrow, my lord"},
            {"role": "assistant", "content": "Good morrow."}, {"role": "user", "content": "What news?"}]
CHAT_TEXTS = ["ROMEO: But soft! what light?", "  two  spaces\tand 42 digits\n", "héllo 日本 🤖"]


@pytest.fixture(scope="module")
def corpus(shakespeare_path) -> list[str]:
    text = shakespeare_path.read_text(encoding="utf-8")[:200_000]
    return text.splitlines(keepends=True)


@pytest.fixture(scope="module", params=KINDS)
def byo(request, corpus, tmp_path_factory) -> tuple[str, Path, Path]:
    """(kind, the Hugging Face directory, the imported checkpoint)."""
    base = tmp_path_factory.mktemp(request.param)
    src = write_model(request.param, corpus, base / "hf")
    torch.set_num_threads(1)
    return request.param, src, import_model(src, base / "ckpt", log=lambda *_: None)


def test_logits_equal_transformers(byo):
    from transformers import AutoModelForCausalLM
    kind, src, ckpt = byo
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    model, tok = checkpoint.load(ckpt)
    ids = torch.tensor([tok.encode("KING RICHARD III:\nNow is the winter of our discontent 1234")])
    with torch.no_grad():
        ours, theirs = model(ids), ref(ids).logits
    assert ours.shape == theirs.shape
    assert torch.max(torch.abs(ours - theirs)).item() <= 1e-5
    meta = checkpoint.read_meta(ckpt)
    assert meta["origin"]["format"] == "huggingface" and meta["origin"]["path"] == str(src.resolve())
    expected = {"smollm2": "bpe", "tinyllama": "sentencepiece", "llama32": "bpe"}[kind]
    assert meta["tokenizer"] == expected


def test_tokenizer_and_chat_template_match_transformers(byo):
    """Our tokenizer (specials, BOS rule, end ids) and chat rendering equal transformers' on the checkpoint."""
    from transformers import AutoTokenizer

    from nima_edge.chat import Conversation
    from nima_edge.runtimes.torch_reference import TorchRuntime
    kind, src, ckpt = byo
    hf = AutoTokenizer.from_pretrained(src)
    rt = TorchRuntime(ckpt)
    for text in TOKENIZER_STRINGS + CHAT_TEXTS:
        assert rt.tokenize(text) == hf(text)["input_ids"], text
    convo = Conversation(rt, system=MESSAGES[0]["content"], max_new_tokens=16, history=list(MESSAGES[1:]))
    expected = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert convo.prompt_ids() == expected
    if kind == "llama32":  # ends at <|eot_id|> (its eos_token) and at <|end_of_text|> (generation_config)
        assert set(rt.tokenizer.eos_ids) == {hf.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>")}
    reply = "".join(convo.reply("Speak!"))  # random weights: any bytes, invalid UTF-8 included, must stream
    assert isinstance(reply, str) and convo.history[-1]["role"] == "assistant"


@pytest.fixture(scope="module")
def gguf_f32(byo, tmp_path_factory) -> Path:
    pytest.importorskip("llama_cpp", reason="the gguf extra is not installed")
    from nima_edge.export import export
    kind, _, ckpt = byo
    return export(ckpt, "gguf", tmp_path_factory.mktemp("gguf") / f"{kind}.gguf", "f32")


def test_gguf_f32_verifies(byo, gguf_f32):
    """llama.cpp's own tokenizer agrees on verify's strings (gpt2 pre-tokenizers smollm / llama-bpe, SPM with
    scores), and logits, greedy tokens and perplexity match the PyTorch model."""
    import gguf

    from nima_edge.verify import verify_artifact
    kind = byo[0]
    fields = gguf.GGUFReader(gguf_f32).fields
    model = fields["tokenizer.ggml.model"].contents()
    assert model == {"smollm2": "gpt2", "tinyllama": "llama", "llama32": "gpt2"}[kind]
    if model == "gpt2":
        assert fields["tokenizer.ggml.pre"].contents() == {"smollm2": "smollm", "llama32": "llama-bpe"}[kind]
    if kind == "llama32":
        assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(gguf_f32).tensors}
    report = verify_artifact(gguf_f32, byo[2])
    assert report["tokenizer"]["mismatches"] == []
    assert report["passed"], report["checks"]


def test_the_board_demo_writes_what_our_runtime_writes(byo, gguf_f32):
    assert device_text(gguf_f32) == our_text(gguf_f32)


def test_chat_on_gguf_uses_the_checkpoints_template(byo, gguf_f32):
    """llama-cpp-python's Jinja formatter, reading the GGUF's template, renders what our chat renders."""
    import gguf
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from nima_edge.chat import Conversation, render
    from nima_edge.runtimes.gguf import LlamaCppRuntime
    rt = LlamaCppRuntime(gguf_f32)
    try:
        template = gguf.GGUFReader(gguf_f32).fields["tokenizer.chat_template"].contents()
        tok = rt.tokenizer
        formatted = Jinja2ChatFormatter(template, eos_token=tok.eos_token, bos_token=tok.bos_token or "")(
            messages=MESSAGES)
        assert formatted.prompt == render(MESSAGES, tokenizer=tok)
        convo = Conversation(rt, system="Be brief.", max_new_tokens=8)
        assert isinstance("".join(convo.reply("Good morrow")), str) and len(convo.history) == 2
    finally:
        rt.close()


def test_gguf_imports_back_to_the_same_weights_and_tokenizer(byo, gguf_f32, tmp_path):
    kind, _, ckpt = byo
    again = import_model(gguf_f32, tmp_path / "again", log=lambda *_: None)
    a, tok_a = checkpoint.load(ckpt)
    b, tok_b = checkpoint.load(again)
    ids = ("bos_token_id", "eos_token_id", "pad_token_id")  # compared through the tokenizers below
    assert {k: v for k, v in a.config.to_hf().items() if k not in ids} == \
        {k: v for k, v in b.config.to_hf().items() if k not in ids}
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    for text in TOKENIZER_STRINGS + CHAT_TEXTS:
        assert tok_b.encode(text) == tok_a.encode(text), text
        assert tok_b.decode(tok_b.encode(text)) == tok_a.decode(tok_a.encode(text))
    assert tok_b.vocab_size == tok_a.vocab_size
    assert (tok_b.bos_token, tok_b.eos_token, tok_b.eos_ids, tok_b.chat_template) == \
        (tok_a.bos_token, tok_a.eos_token, tok_a.eos_ids, tok_a.chat_template)
    assert checkpoint.read_meta(again)["origin"]["format"] == "gguf"


@pytest.mark.parametrize("byo", ["smollm2"], indirect=True)  # one K-quant import is enough by default
def test_k_quant_gguf_imports_as_its_dequantized_weights(byo, tmp_path):
    """A llama.cpp Q4_K_M file (with its per-tensor fallbacks at width 576/512) dequantizes with gguf-py to
    weights near the float ones, and the Q/K rows come back in Hugging Face order."""
    pytest.importorskip("llama_cpp", reason="the gguf extra is not installed")
    from nima_edge.export import export
    kind, _, ckpt = byo
    q = export(ckpt, "gguf", tmp_path / "q.gguf", "q4_k_m")
    back = import_model(q, tmp_path / "back", log=lambda *_: None)
    a, b = checkpoint.load(ckpt)[0].state_dict(), checkpoint.load(back)[0].state_dict()
    for name in a:
        rel = (torch.linalg.norm(a[name] - b[name]) / torch.linalg.norm(a[name])).item()
        assert rel < 0.15, (name, rel)  # 4-6 bit blocks; a wrong row order would be ~1.4


NEEDS_GPU = pytest.mark.skipif(not (importlib.util.find_spec("tensorrt") and torch.cuda.is_available()),
                               reason="TensorRT needs an NVIDIA GPU and the tensorrt package; this machine has no GPU")


@pytest.mark.slow
@pytest.mark.parametrize("target,quant", [("onnx", "f32"), ("onnx-portable", "f32"), ("executorch", "fp32"),
                                          ("gguf", "q8_0"), ("gguf", "q4_k_m"),
                                          pytest.param("tensorrt", "f32", marks=NEEDS_GPU)])
def test_every_target_exports_and_verifies(byo, target, quant, tmp_path):
    from nima_edge.export import export
    from nima_edge.verify import verify_artifact
    if target == "executorch":
        pytest.importorskip("executorch", reason="the executorch extra is not installed")
    kind, _, ckpt = byo
    out = tmp_path / (f"{kind}.{'gguf' if target == 'gguf' else 'onnx' if target == 'onnx-portable' else 'd'}")
    artifact = export(ckpt, target, out, quant)
    report = verify_artifact(artifact, ckpt)
    assert report["tokenizer"]["mismatches"] == []
    if quant in ("f32", "fp32"):
        assert report["passed"], report["checks"]
        # the board-side demo writes what our runtime writes (BOS, end tokens: the model's), also for
        # byte-level pieces that are not whole UTF-8, which random weights emit at once
        if target not in ("onnx", "tensorrt"):  # no board demo for these
            assert device_text(artifact) == our_text(artifact)
    else:  # random weights give flat distributions: quantization flips their near-ties, so top-1/KL
        assert report["checks"]["logits"], report  # agreement says nothing here; trained models are verified


def device_text(artifact: Path, prompt: str = "ROMEO:", tokens: int = 12) -> str:
    demo = Path(__file__).resolve().parents[1] / "android_demo" / "pi_demo.py"
    proc = subprocess.run([sys.executable, str(demo), str(artifact), "--prompt", prompt, "--tokens", str(tokens),
                           "--runs", "1", "--threads", "2", "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["text"]


def our_text(artifact: Path, prompt: str = "ROMEO:", tokens: int = 12) -> str:
    from nima_edge.runtimes import load_runtime
    from nima_edge.sampling import Sampling
    rt = load_runtime(artifact)
    try:
        return "".join(rt.generate(prompt, tokens, Sampling(0.0, 0, 1.0, None)))
    finally:
        rt.close()


@pytest.mark.parametrize("byo", ["tinyllama"], indirect=True)  # the command itself once is enough
def test_cli_import(byo, tmp_path):
    kind, src, _ = byo
    done = subprocess.run([sys.executable, "-m", "nima_edge", "import", str(src), "--out", str(tmp_path / "ckpt")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ckpt" / "model.safetensors").is_file() and "saved" in done.stdout


@pytest.mark.parametrize("byo", ["smollm2"], indirect=True)
def test_remote_code_is_refused(byo, tmp_path):
    kind, src, _ = byo
    config = json.loads((src / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    with pytest.raises(NimaError, match="trust_remote_code"):
        import_model(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("change,match", [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "LlamaForCausalLM only"),
    ({"quantization_config": {"quant_method": "gptq"}}, "pre-quantized"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
])
def test_unsupported_configs_are_refused(tmp_path, change, match):
    from nima_edge.importer.hf import import_hf
    base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
            "max_position_embeddings": 64}
    (tmp_path / "config.json").write_text(json.dumps({**base, **change}))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(NimaError, match=match):
        import_hf(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("byo", ["smollm2"], indirect=True)
def test_missing_files_are_clear_errors(byo, tmp_path):
    from nima_edge.importer.hf import import_hf
    kind, src, _ = byo
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(NimaError, match="pickled"):
        import_hf(tmp_path, tmp_path / "out")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "missing.safetensors"}}))
    with pytest.raises(NimaError, match="incomplete"):
        import_hf(tmp_path, tmp_path / "out")
    with pytest.raises(NimaError, match="neither"):
        import_model(tmp_path / "pytorch_model.bin", tmp_path / "out")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(NimaError, match="not a readable GGUF"):
        import_model(tmp_path / "bad.gguf", tmp_path / "out2")


def test_tokenizers_llama_cpp_would_split_differently_are_refused():
    """A byte-level BPE whose pre-tokenizer matches none of llama.cpp's known ones is refused for GGUF
    (rather than written with a pre-tokenizer that splits text differently), and so is a GGUF whose
    pre-tokenizer name nima-edge cannot rebuild as a tokenizer.json."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from nima_edge.importer.gguf_vocab import to_gguf_vocab, tokenizer_from_gguf
    from nima_edge.tokenizer import Tokenizer
    hf = HFTokenizer(models.BPE(vocab={"a": 0, "b": 1, "<e>": 2}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(NimaError, match="no pre-tokenizer known"):
        to_gguf_vocab(Tokenizer(hf, {"eos_token": "<e>"}), 3)
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": ["a", "b"],
            "tokenizer.ggml.merges": []}
    with pytest.raises(NimaError, match="qwen2"):
        tokenizer_from_gguf(meta)
