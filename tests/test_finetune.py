"""Fine-tuning: chat data (loss on assistant tokens only, packing), LoRA through PEFT (merge, adapter
layout, transformers + PEFT load, llama.cpp adapter), bit-exact resume, quantization-aware training
whose codes `quantize --method qat` reads off and every target packs losslessly, and training a
quantization result itself (scales and codes)."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import crash
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nima_edge import chat_data, checkpoint
from nima_edge.errors import NimaError
from nima_edge.tokenizer import Tokenizer

pytest.importorskip("peft", reason="the train extra (peft) is not installed")

from nima_edge.train import finetune as ft  # noqa: E402  (needs peft at use)
from nima_edge.train import qat  # noqa: E402

QUIET = dict(log=lambda *_: None, progress_bar=False)
CONV = [{"role": "system", "content": "You are Juliet."},
        {"role": "user", "content": "Wherefore art thou?"},
        {"role": "assistant", "content": "Here, my love."},
        {"role": "user", "content": "Speak again."},
        {"role": "assistant", "content": "O Romeo!"}]


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory, shakespeare_path) -> Path:
    """A few hundred conversations of the bundled instruction set, built from the test corpus."""
    from nima_edge.instructions import conversations
    text = shakespeare_path.read_text(encoding="utf-8")[:200_000]
    path = tmp_path_factory.mktemp("chat") / "instruct.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in conversations(text, max_chars=40, limit=300)))
    return path


def tiny_cfg(ckpt: Path, **kw):
    base = dict(max_steps=12, batch_size=8, context=64, eval_every=4, eval_windows=4, warmup_steps=2, lr=3e-3)
    return ft.build_config(ckpt, None, {**base, **kw})


@pytest.fixture(scope="module")
def lora_run(tiny_ckpt, chat_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft") / "lora"
    torch.set_num_threads(1)
    ft.finetune(tiny_ckpt, chat_file, out, tiny_cfg(tiny_ckpt, patience=0),
                ft.FinetuneConfig(lora_rank=4, lora_alpha=8.0, lora_dropout=0.0), **QUIET)
    return out


# --- chat data ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("data_fixture", ["char_data", "bpe_data"])
def test_only_assistant_tokens_carry_loss(data_fixture, request):
    tok = Tokenizer.from_file(request.getfixturevalue(data_fixture))
    ids, mask = chat_data.encode(CONV, tok)
    labelled = tok.decode([t for t, m in zip(ids, mask) if m], skip_special=False)
    assert labelled == "Here, my love.<|eos|>O Romeo!<|eos|>"  # both replies and their end-of-turn, nothing else
    rows = chat_data.pack([CONV, CONV[:3]], tok, context=256)
    assert len(rows) == 1  # both conversations packed into one row
    y = rows.labels[0]
    x = rows.inputs[0]
    carried = tok.decode([int(t) for t in y[y != chat_data.IGNORE]], skip_special=False)
    assert carried == "Here, my love.<|eos|>O Romeo!<|eos|>Here, my love.<|eos|>"
    n = len(ids) - 1
    nxt = torch.tensor(ids[1:])
    assert ((y[:n] == chat_data.IGNORE) | (y[:n] == nxt)).all()  # a label is the next token or nothing
    assert x[n] == tok.bos_id  # the second conversation starts with its own BOS
    used = n + len(chat_data.encode(CONV[:3], tok)[0]) - 1
    assert (x[used:] == tok.pad_id).all() and (y[used:] == chat_data.IGNORE).all()  # padding carries no loss


def test_loss_ignores_everything_but_the_assistant(tiny_ckpt):
    """Changing the user's text changes no label, and the loss equals the mean over assistant tokens."""
    model, tok = checkpoint.load(tiny_ckpt)
    rows = chat_data.pack([CONV], tok, context=128)
    logits, loss = model(rows.inputs, rows.labels)
    keep = rows.labels != chat_data.IGNORE
    manual = torch.nn.functional.cross_entropy(logits[keep], rows.labels[keep])
    assert torch.allclose(loss, manual, atol=1e-6)
    other = [CONV[0], {"role": "user", "content": "Who is there?"}, *CONV[2:]]
    assert chat_data.pack([other], tok, 128).label_tokens == rows.label_tokens


def test_bad_chat_data_is_named(tmp_path, tiny_ckpt):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "narrator", "content": "x"}]}\n')
    with pytest.raises(NimaError, match="bad.jsonl:2"):
        chat_data.read_jsonl(bad)
    bad.write_text('{"messages": [{"role": "user", "content": "no reply"}]}\n')
    with pytest.raises(NimaError, match="no assistant message"):
        chat_data.read_jsonl(bad)


# --- LoRA ----------------------------------------------------------------------------------------------

def test_merged_lora_equals_unmerged_forward(tiny_ckpt):
    model, _ = checkpoint.load(tiny_ckpt)
    torch.manual_seed(0)
    peft_model = ft.add_lora(model, ft.FinetuneConfig(lora_rank=4, lora_alpha=8.0, lora_dropout=0.0))
    with torch.no_grad():  # PEFT starts B at zero (a no-op adapter); give it a real update
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.eval()
    x = torch.randint(0, 262, (2, 48))
    merged = ft.merged(peft_model).eval()
    assert type(merged).__name__ == "NimaForCausalLM"
    with torch.no_grad():
        unmerged_logits, merged_logits, base_logits = peft_model(x), merged(x), checkpoint.load(tiny_ckpt)[0](x)
    assert (unmerged_logits - base_logits).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(merged_logits, unmerged_logits, atol=1e-5, rtol=0)


def test_lora_run_writes_merged_model_and_peft_adapter(lora_run, tiny_ckpt):
    meta = checkpoint.read_meta(lora_run)
    assert meta["finetune"]["data_kind"] == "chat" and meta["finetune"]["lora_rank"] == 4
    config = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert Path(config["base_model_name_or_path"]) == tiny_ckpt.resolve()
    tensors = load_file(str(lora_run / "adapter" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.layers.") for k in tensors)
    assert len(tensors) == 2 * 7 * 3  # A and B of 7 linears in 3 layers
    assert any(t.abs().max() > 0 for k, t in tensors.items() if "lora_B" in k)  # it trained
    # the merged checkpoint is an ordinary one, and equals base + adapter
    merged, _ = checkpoint.load(lora_run)
    unmerged, _ = ft.load_adapter(tiny_ckpt, lora_run / "adapter")
    x = torch.randint(0, 262, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), unmerged(x), atol=1e-5, rtol=0)


def test_adapter_loads_in_transformers_with_peft(lora_run, tiny_ckpt):
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_ckpt), dtype=torch.float32)
    hf = PeftModel.from_pretrained(hf, str(lora_run / "adapter")).eval()
    ours, _ = checkpoint.load(lora_run)
    x = torch.randint(0, 262, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, ours(x), atol=1e-4, rtol=0)


def test_llama_cpp_adapter_changes_logits_like_ours(lora_run, tiny_ckpt, tmp_path):
    pytest.importorskip("llama_cpp", reason="the gguf extra is not installed")
    from nima_edge.export import export
    from nima_edge.runtimes import load_runtime
    from nima_edge.runtimes.torch_reference import TorchRuntime
    from nima_edge.verify import TOLERANCES
    base_gguf = export(tiny_ckpt, "gguf", tmp_path / "base.gguf", "f32")
    adapter_gguf = export(tiny_ckpt, "gguf", tmp_path / "adapter.gguf", "f32", lora=lora_run / "adapter")
    import gguf
    meta = {f.name: f.contents() for f in gguf.GGUFReader(adapter_gguf).fields.values()}
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    ids = [0, *TorchRuntime(tiny_ckpt).tokenize("ROMEO:\nWhat light", add_bos=False)]
    logits = {}
    for name, rt in (("base", load_runtime(base_gguf)), ("lora", load_runtime(base_gguf, lora=adapter_gguf)),
                     ("torch_base", TorchRuntime(tiny_ckpt)), ("torch_lora", TorchRuntime(lora_run))):
        logits[name] = rt.prefill(ids)
        rt.close()
    ours = logits["torch_lora"] - logits["torch_base"]
    theirs = logits["lora"] - logits["base"]
    assert np.abs(ours).max() > 1e-3  # the adapter changes the logits ...
    assert np.abs(theirs - ours).max() <= TOLERANCES["float32"].logits_max_abs  # ... the same way in llama.cpp


def assert_resume_is_bit_exact(ckpt: Path, data: Path, tmp_path: Path, cfg, settings, crash_at: int,
                               files: tuple[str, ...]) -> None:
    """finetune == finetune, crash at the evaluation of step `crash_at` (after its last checkpoint), resume:
    the resumable `files` (trained tensors, optimizer state) are equal bit for bit."""
    ft.finetune(ckpt, data, tmp_path / "straight", cfg, settings, **QUIET)
    with pytest.raises(crash.Crash):
        ft.finetune(ckpt, data, tmp_path / "resumed", cfg, settings, on_eval=crash.at(crash_at), **QUIET)
    assert ft.finetune(None, None, tmp_path / "resumed", resume=True, **QUIET)["steps"] == cfg.max_steps
    for name in files:
        a = load_file(str(tmp_path / "straight" / "last" / name))
        b = load_file(str(tmp_path / "resumed" / "last" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_finetune_resume_is_bit_exact(tiny_ckpt, chat_file, tmp_path):
    """finetune 12 == finetune, crash at 9 (last checkpoint at 8), resume to 12; LoRA dropout makes RNG matter."""
    assert_resume_is_bit_exact(tiny_ckpt, chat_file, tmp_path, tiny_cfg(tiny_ckpt, checkpoint_every=4, eval_every=3),
                               ft.FinetuneConfig(lora_rank=4, lora_dropout=0.1), 9,
                               ("adapter_model.safetensors", "optimizer.safetensors"))


def _finetuned_weights(run: Path) -> dict:
    return load_file(str(run / "last" / "model.safetensors"))


@pytest.fixture(scope="module")
def one_batch_run(tiny_ckpt, chat_file, tmp_path_factory) -> Path:
    """3 full fine-tuning steps of 8 chat rows in one micro-batch: the reference for the splits below."""
    out = tmp_path_factory.mktemp("ft") / "one-batch"
    ft.finetune(tiny_ckpt, chat_file, out, tiny_cfg(tiny_ckpt, max_steps=3), ft.FinetuneConfig(full=True), **QUIET)
    return out


def test_chat_loss_is_the_token_mean_of_the_global_batch(tiny_ckpt, chat_file, one_batch_run, tmp_path):
    """Chat rows differ in how many tokens carry loss: 2 accumulation steps train exactly like one micro-batch
    of all 8 rows (the step's loss is the mean over all its assistant tokens, not a mean of means)."""
    ft.finetune(tiny_ckpt, chat_file, tmp_path / "accum", tiny_cfg(tiny_ckpt, max_steps=3, grad_accum=2),
                ft.FinetuneConfig(full=True), **QUIET)
    one, got = _finetuned_weights(one_batch_run), _finetuned_weights(tmp_path / "accum")
    assert max((got[k] - one[k]).abs().max().item() for k in one) < 2e-5  # 1.5e-2 before the fix


@pytest.mark.slow  # two torchrun processes: ~40 s
def test_chat_finetune_two_processes_equal_one(tiny_ckpt, chat_file, one_batch_run, tmp_path):
    import os
    import subprocess
    import sys

    from nima_edge.train import recipe
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text(recipe.dumps(tiny_cfg(tiny_ckpt, max_steps=3)) + "\n[finetune]\nfull = true\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "nima_edge", "finetune", str(tiny_ckpt), "--data", str(chat_file), "--out",
                           str(tmp_path / "ddp"), "--recipe", str(recipe_file)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("saved ") == 1  # one report, from rank 0
    one, got = _finetuned_weights(one_batch_run), _finetuned_weights(tmp_path / "ddp")
    assert max((got[k] - one[k]).abs().max().item() for k in one) < 2e-5


def test_text_finetune_full(tiny_ckpt, shakespeare_path, tmp_path):
    """Plain text with the checkpoint's tokenizer, every weight trained; resume refuses a changed base."""
    corpus = tmp_path / "domain.txt"
    corpus.write_text(shakespeare_path.read_text(encoding="utf-8")[-60_000:])
    out = tmp_path / "full"
    summary = ft.finetune(tiny_ckpt, corpus, out, tiny_cfg(tiny_ckpt, max_steps=4), ft.FinetuneConfig(full=True),
                          **QUIET)
    assert summary["steps"] == 4
    assert checkpoint.read_meta(out)["finetune"]["data_kind"] == "text"
    assert not (out / "adapter").exists()
    before, after = checkpoint.load(tiny_ckpt)[0].state_dict(), checkpoint.load(out)[0].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_finetune_settings_are_checked(tiny_ckpt, chat_file, tmp_path):
    with pytest.raises(NimaError, match="LoRA keeps them frozen"):
        ft.finetune(tiny_ckpt, chat_file, tmp_path / "lora-qat", tiny_cfg(tiny_ckpt, qat="int4-g32"), **QUIET)
    with pytest.raises(NimaError, match="qat_fraction = 0 must be in"):
        tiny_cfg(tiny_ckpt, qat="int4-g32", qat_fraction=0)
    with pytest.raises(NimaError, match="not linears"):
        ft.FinetuneConfig(lora_targets=["embed_tokens"]).validate()
    with pytest.raises(NimaError, match="unknown QAT scheme"):
        qat.parse("int3-g32")
    with pytest.raises(NimaError, match="context = 100000 exceeds"):
        ft.finetune(tiny_ckpt, chat_file, tmp_path / "x", tiny_cfg(tiny_ckpt, context=100_000), **QUIET)


def test_self_distillation_loss_is_the_kl_to_the_starting_model(tiny_ckpt, chat_file, tmp_path):
    """--distill: zero while the student is its float starting self, positive once fake-quantized, and
    only over the tokens that carry loss; refused without QAT, where it could change nothing."""
    cfg = tiny_cfg(tiny_ckpt, qat="int4-g32")
    job = ft.FinetuneJob(tiny_ckpt, chat_file, tmp_path / "o", ft.FinetuneConfig(full=True, distill=True), seed=0)
    job.check(cfg)  # packs the conversations
    model = job.build_model(cfg, torch.device("cpu"))
    x, y = next(r for r in (job.rows(cfg, job.draw(cfg, step)) for step in range(100)) if (r[1] != -100).any())
    assert (y == -100).any()
    assert job.loss(model, x, y).item() < 1e-6
    qat.enable(model, qat.parse("int4-g32"))
    kl = job.loss(model, x, y)
    keep = y != -100
    with torch.no_grad():
        p_t = job.teacher(x).log_softmax(-1)[keep]
        p_s = model(x).log_softmax(-1)[keep]
    assert kl.item() > 1e-4
    torch.testing.assert_close(kl, (p_t.exp() * (p_t - p_s)).sum(-1).mean(), rtol=1e-4, atol=1e-6)
    with pytest.raises(NimaError, match="changes nothing without fake quantization"):
        ft.finetune(tiny_ckpt, chat_file, tmp_path / "x", tiny_cfg(tiny_ckpt),
                    ft.FinetuneConfig(full=True, distill=True), **QUIET)


def test_fine_tune_recipes_set_qat_in_its_own_section(tiny_ckpt, tmp_path):
    """QAT is a loop setting ([qat], as in training recipes); under [finetune] the error says where it went."""
    old = tmp_path / "old.toml"
    old.write_text('[finetune]\nfull = true\nqat = "int4-g32"\n')
    with pytest.raises(NimaError, match=r"belong in the \[qat\] section"):
        ft.load_recipe(old)
    new = tmp_path / "new.toml"
    new.write_text('[finetune]\nfull = true\n[qat]\nqat = "int4-g32"\nqat_fraction = 0.25\n')
    doc, settings = ft.load_recipe(new)
    cfg = ft.build_config(tiny_ckpt, doc, {})
    assert settings.full and (cfg.qat, cfg.qat_fraction) == ("int4-g32", 0.25)


# --- QAT -----------------------------------------------------------------------------------------------

def test_fake_quant_weight_is_the_quantize_grid():
    from nima_edge.quantization import rtn
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    for bits, group in ((4, 32), (4, 128), (8, 32)):
        assert torch.equal(qat.quantized_weight(w, bits, group), rtn(w, bits, group).dequantize())


def test_straight_through_gradient():
    lin = torch.nn.Linear(64, 16, bias=False)
    model = torch.nn.Module()
    model.q_proj = lin
    qat.enable(model, qat.parse("8da4w"))
    assert isinstance(lin, qat.FakeQuantLinear) and "weight" in dict(lin.named_parameters())
    x = torch.randn(3, 64, requires_grad=True)
    lin(x).sum().backward()
    # straight through both roundings: the gradients of sum(xq @ Wq^T), passed to the float x and W
    xq, wq = qat.quantized_activations(x.detach()), qat.quantized_weight(lin.weight, 4, 32)
    torch.testing.assert_close(lin.weight.grad, xq.sum(0).expand(16, 64))
    torch.testing.assert_close(x.grad, wq.sum(0).expand(3, 64))
    qat.disable(model)
    assert type(lin) is torch.nn.Linear


def test_activation_fake_quant_is_xnnpacks_per_token_rule():
    """8da4w's activations: equal to torch's reference ops for ExecuTorch's dynamic per-token int8."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
    ops = torch.ops.quantized_decomposed
    torch.manual_seed(0)
    for x in (torch.randn(4, 7, 128) * 3 + 0.5, torch.rand(2, 64) + 1.0, -torch.rand(3, 32), torch.zeros(1, 32)):
        scale, zero = ops.choose_qparams_per_token_asymmetric(x, torch.int8)
        q = ops.quantize_per_token(x, scale, zero, -128, 127, torch.int8)
        ref = ops.dequantize_per_token(q, scale, zero, -128, 127, torch.int8, torch.float32)
        assert torch.equal(qat.quantized_activations(x), ref)


@pytest.fixture(scope="module")
def qat_run(tiny_ckpt, chat_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft") / "qat"
    ft.finetune(tiny_ckpt, chat_file, out, tiny_cfg(tiny_ckpt, max_steps=8, eval_every=4, qat="int4-g32",
                                                     qat_fraction=0.5), ft.FinetuneConfig(full=True), **QUIET)
    return out


def test_qat_result_holds_the_trained_codes(qat_run, tiny_ckpt, tmp_path):
    from nima_edge.quantization import load_quant
    meta = checkpoint.read_meta(qat_run)
    assert meta["qat"]["name"] == "int4-g32" and meta["training"]["best"]["step"] >= 4  # chosen among QAT evals
    quantized = qat.quantize_checkpoint(qat_run, tmp_path / "q")
    result = load_quant(quantized)
    assert {q.method for q in result.values()} == {"qat"} and {q.group_size for q in result.values()} == {32}
    # the fake-quant reference of the result IS the QAT forward, bit for bit
    trained, _ = checkpoint.load(qat_run)
    qat.enable(trained, qat.parse("int4-g32"))
    reference, _ = checkpoint.fake_quant_model(quantized)
    x = torch.randint(0, 262, (2, 40))
    with torch.no_grad():
        assert torch.equal(trained(x), reference(x))
    with pytest.raises(NimaError, match="not trained with quantization-aware"):
        qat.quantize_checkpoint(tiny_ckpt, tmp_path / "again")


@pytest.mark.parametrize("run", ["qat_run", "trained_run"])
def test_qat_result_packs_losslessly(run, request, tmp_path):
    """Q4_0 (GGUF), MatMulNBits (ONNX Runtime) and 8da4w (torchao / ExecuTorch) all carry the trained codes
    (of --qat, read off by quantize --method qat, and of --train-quantized, the run's own result)."""
    from nima_edge.export import packing
    from nima_edge.quantization import load_quant
    path = request.getfixturevalue(run)
    result = load_quant(qat.quantize_checkpoint(path, tmp_path / "q") if run == "qat_run" else path)
    assert {q.method for q in result.values()} == ({"qat"} if run == "qat_run" else {"rtn+qat"})
    for name, q in result.items():
        g = packing.unpack_gguf(packing.pack_gguf(q), 4, q.shape)
        assert torch.equal(g.codes, q.codes) and torch.equal(g.dequantize(), q.dequantize()), name
        m = packing.unpack_matmul_nbits(*packing.pack_matmul_nbits(q), bits=4, block_size=q.group_size)
        assert torch.equal(m.codes, q.codes) and torch.equal(m.dequantize(), q.dequantize()), name
        i = packing.unpack_intx(*packing.pack_intx(q), bits=4)
        assert torch.equal(i.codes, q.codes) and torch.equal(i.dequantize(), q.dequantize()), name


def test_qat_gguf_q4_0_is_the_result(qat_run, tmp_path):
    """Through the real exporter: the Q4_0 tensors llama.cpp reads are the trained codes, block for block."""
    pytest.importorskip("gguf", reason="the gguf extra is not installed")
    import gguf
    from nima_edge.export import export
    from nima_edge.export.gguf import permute_rows
    from nima_edge.export.packing import unpack_gguf
    from nima_edge.quantization import load_quant
    quantized = qat.quantize_checkpoint(qat_run, tmp_path / "q")
    result = load_quant(quantized)
    path = export(quantized, "gguf", tmp_path / "m.gguf", "q4_0")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    q = result["model.layers.0.self_attn.q_proj.weight"]
    data = tensors["blk.0.attn_q.weight"].data
    cfg = checkpoint.load(quantized)[0].config
    order = permute_rows(q.shape[0], cfg.num_attention_heads)
    assert torch.equal(unpack_gguf(np.asarray(data), 4, q.shape).codes, q.codes[order])
    down = result["model.layers.2.mlp.down_proj.weight"]
    assert torch.equal(unpack_gguf(np.asarray(tensors["blk.2.ffn_down.weight"].data), 4, down.shape).codes, down.codes)


# --- training a quantization result ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def rtn_ckpt(tiny_ckpt, tmp_path_factory) -> Path:
    """tiny_ckpt with an int4 g32 round-to-nearest result: the result trained below."""
    from nima_edge.export.quantize import quantize_checkpoint
    return quantize_checkpoint(tiny_ckpt, tmp_path_factory.mktemp("q") / "rtn", 4, 32, "rtn", log=lambda *_: None)


@pytest.fixture(scope="module")
def trained_run(rtn_ckpt, chat_file, tmp_path_factory) -> Path:
    """The default: scales and codes trained."""
    out = tmp_path_factory.mktemp("ft") / "trained"
    ft.finetune(rtn_ckpt, chat_file, out, tiny_cfg(rtn_ckpt, max_steps=8, eval_every=4, lr=1e-3),
                ft.FinetuneConfig(train_quantized=True), **QUIET)
    return out


@pytest.mark.parametrize("codes", [False, True], ids=["fixed-codes", "trained-codes"])
def test_quant_trained_linear_is_its_result(rtn_ckpt, codes):
    """Before training the forward is the result's own fake-quant reference; once the scales (and latent
    weights) move, the result it reports (fp16 scales) is again exactly its forward."""
    from nima_edge.quantization import apply_quant, load_quant
    result = load_quant(rtn_ckpt)
    model, _ = checkpoint.load(rtn_ckpt)
    qat.attach_result(model, result, codes=codes)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == ({"scales", "latent"} if codes else {"scales"})
    reference, _ = checkpoint.fake_quant_model(rtn_ckpt)
    x = torch.randint(0, 262, (2, 40))
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
        for m in model.modules():
            if isinstance(m, qat.QuantTrainedLinear):
                m.scales.mul_(1 + 0.05 * torch.randn_like(m.scales))  # not fp16 values any more
                if codes:
                    m.latent.add_(0.3 * m.scales.unsqueeze(-1) * torch.randn_like(m.latent))
    trained = qat.trained_result(model)
    assert trained.keys() == result.keys()
    for name, q in trained.items():
        assert q.method == ("rtn+qat" if codes else "rtn+scales")
        assert torch.equal(q.scales.half().float(), q.scales) and not torch.equal(q.scales, result[name].scales)
        assert torch.equal(q.codes, result[name].codes) != codes
    again = apply_quant(checkpoint.load(rtn_ckpt)[0], trained)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_train_quantized_writes_a_quantized_checkpoint(trained_run, rtn_ckpt):
    """OUT: the same float weights beside the trained result (new scales, some new codes)."""
    from nima_edge.quantization import load_quant
    before, after = load_quant(rtn_ckpt), load_quant(trained_run)
    assert after.keys() == before.keys()
    assert any(not torch.equal(after[n].scales, before[n].scales) for n in before)
    assert any(not torch.equal(after[n].codes, before[n].codes) for n in before)
    meta = checkpoint.read_meta(trained_run)
    assert meta["quantization"]["method"] == "rtn+qat" and meta["quantization"]["source"]
    assert meta["finetune"]["train_quantized"] and meta["finetune"]["distill"]  # KL by default
    float_before, float_after = checkpoint.load(rtn_ckpt)[0].state_dict(), checkpoint.load(trained_run)[0].state_dict()
    assert all(torch.equal(float_before[k], float_after[k]) for k in float_before)


def test_trained_scales_move_towards_the_float_model(rtn_ckpt, chat_file, tmp_path):
    """The KL to the float model on held-out conversations, which training lowers. With the codes fixed this
    shows within 8 steps; trained codes first lose ground (the scales' gradient is zero while the latent
    weights sit on the grid) and win over hundreds of steps (docs/quantization.md).
    The rate is small because Adam's first steps move every scale by about lr whatever its size: this
    model's scales are ~1e-2 and its RTN result starts at a KL of ~2e-3, so a constant 1e-4 overshot on an
    AVX-512 VM (ratio 1.08; 0.84 on the AVX2 one it was written on). At 3e-5 decaying to 3e-6: 0.44."""
    out = tmp_path / "scales"
    ft.finetune(rtn_ckpt, chat_file, out, tiny_cfg(rtn_ckpt, max_steps=8, eval_every=4, lr=3e-5, min_lr=3e-6),
                ft.FinetuneConfig(train_quantized=True, fixed_codes=True), **QUIET)
    job = ft.FinetuneJob(rtn_ckpt, chat_file, tmp_path / "o", ft.FinetuneConfig(train_quantized=True).validate(),
                         seed=0)
    job.check(tiny_cfg(rtn_ckpt))
    rows = job.source.val_rows
    x, y = rows.inputs[:32], rows.labels[:32]
    keep = y != chat_data.IGNORE
    with torch.no_grad():
        p_t = checkpoint.load(rtn_ckpt)[0](x).log_softmax(-1)[keep]

        def kl(ckpt):
            p_s = checkpoint.fake_quant_model(ckpt)[0](x).log_softmax(-1)[keep]
            return (p_t.exp() * (p_t - p_s)).sum(-1).mean().item()
        assert kl(out) < 0.95 * kl(rtn_ckpt)


def test_trained_result_packs_losslessly_into_gguf(trained_run, tmp_path):
    """Through the real exporter: llama.cpp's Q4_0 blocks hold the trained codes and (fp16) scales."""
    pytest.importorskip("gguf", reason="the gguf extra is not installed")
    import gguf
    from nima_edge.export import export
    from nima_edge.export.packing import unpack_gguf
    from nima_edge.quantization import load_quant
    down = load_quant(trained_run)["model.layers.1.mlp.down_proj.weight"]
    path = export(trained_run, "gguf", tmp_path / "m.gguf", "q4_0")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    packed = unpack_gguf(np.asarray(tensors["blk.1.ffn_down.weight"].data), 4, down.shape)
    assert torch.equal(packed.codes, down.codes) and torch.equal(packed.dequantize(), down.dequantize())


def test_train_quantized_resume_is_bit_exact(rtn_ckpt, chat_file, tmp_path):
    assert_resume_is_bit_exact(rtn_ckpt, chat_file, tmp_path,
                               tiny_cfg(rtn_ckpt, max_steps=8, checkpoint_every=4, eval_every=3, lr=1e-3),
                               ft.FinetuneConfig(train_quantized=True), 6,
                               (ft.QUANT_STATE_FILE, "optimizer.safetensors"))


def test_train_quantized_resume_refuses_a_changed_result(rtn_ckpt, chat_file, tmp_path):
    """Q quantized again in place (same shapes, other codes) between the crash and the resume."""
    from safetensors.torch import save_file

    from nima_edge.quantization import QUANT_TENSORS
    q, out = tmp_path / "q", tmp_path / "run"
    shutil.copytree(rtn_ckpt, q)
    ft.finetune(q, chat_file, out, tiny_cfg(q, max_steps=2, eval_every=1), ft.FinetuneConfig(train_quantized=True),
                **QUIET)
    tensors = load_file(str(q / QUANT_TENSORS))
    name = next(k for k in tensors if k.endswith(".codes"))
    tensors[name] = 15 - tensors[name]
    save_file(tensors, str(q / QUANT_TENSORS), metadata={"format": "nima-quant"})
    with pytest.raises(NimaError, match="quantization result in .* changed since this fine-tune started"):
        ft.finetune(None, None, out, resume=True, overrides={"max_steps": 3}, **QUIET)


def test_train_quantized_settings_are_checked(tiny_ckpt, rtn_ckpt, chat_file, tmp_path, cli):
    with pytest.raises(NimaError, match="carries no quantization result"):
        ft.finetune(tiny_ckpt, chat_file, tmp_path / "x", tiny_cfg(tiny_ckpt),
                    ft.FinetuneConfig(train_quantized=True), **QUIET)
    with pytest.raises(NimaError, match="do not combine"):
        ft.finetune(rtn_ckpt, chat_file, tmp_path / "x", tiny_cfg(rtn_ckpt, qat="int4-g32"),
                    ft.FinetuneConfig(train_quantized=True), **QUIET)
    with pytest.raises(NimaError, match="not every float weight"):
        ft.FinetuneConfig(train_quantized=True, full=True).validate()
    with pytest.raises(NimaError, match="add --train-quantized"):
        ft.FinetuneConfig(fixed_codes=True).validate()
    assert ft.FinetuneConfig(train_quantized=True, distill=False).validate().distill is False
    assert ft.build_config(rtn_ckpt, None, {}, train_quantized=True).lr == ft.QUANT_DEFAULTS["lr"]
    code, out, err = cli("finetune", tiny_ckpt, "--data", chat_file, "--out", tmp_path / "y", "--train-quantized")
    assert code == 2 and "nima-edge quantize" in err
    code, out, err = cli("finetune", rtn_ckpt, "--data", chat_file, "--out", tmp_path / "z", "--train-quantized",
                         "--fixed-codes", "--steps", 2, "--eval-every", 2, "--context", 64, "--batch-size", 4)
    assert code == 0, err
    assert "trained result" in out
    from nima_edge.quantization import load_quant
    before, after = load_quant(rtn_ckpt), load_quant(tmp_path / "z")
    assert all(torch.equal(after[n].codes, before[n].codes) and after[n].method == "rtn+scales" for n in before)


# --- the command line ----------------------------------------------------------------------------------

def cli(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "nima_edge", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_cli_finetune_then_quantize_qat(tiny_ckpt, chat_file, qat_run, tmp_path):
    bad = cli("finetune", tiny_ckpt, "--data", tmp_path / "missing.jsonl", "--out", tmp_path / "x")
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
    bad = cli("finetune", tiny_ckpt, "--data", chat_file, "--out", tmp_path / "x", "--qat", "int4-g32")
    assert bad.returncode == 2 and "--full" in bad.stderr
    bad = cli("finetune", tiny_ckpt, "--data", chat_file, "--out", tmp_path / "x", "--full", "--distill")
    assert bad.returncode == 2 and "without fake quantization" in bad.stderr
    run = cli("finetune", tiny_ckpt, "--data", chat_file, "--out", tmp_path / "ft", "--steps", 2, "--context", 64,
              "--batch-size", 4, "--eval-every", 2, "--lora-rank", 2, "--threads", 1)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "ft" / "adapter" / "adapter_config.json").is_file() and "adapter" in run.stdout
    if importlib.util.find_spec("llama_cpp") is not None:  # the gguf extra
        lora = cli("export", tiny_ckpt, "--target", "gguf", "--lora", tmp_path / "ft" / "adapter",
                   "--out", tmp_path / "adapter.gguf")
        assert lora.returncode == 0, lora.stderr
        assert (tmp_path / "adapter.gguf").is_file() and (tmp_path / "adapter.gguf.manifest.json").is_file()
    q = cli("quantize", qat_run, "--method", "qat", "--out", tmp_path / "q4")
    assert q.returncode == 0, q.stderr
    assert "4-bit qat, group 32" in q.stdout


def test_qat_follows_the_quantize_group_plan(tmp_path, group_plan_model):
    """int4-g128 on widths 128 does not divide: the linears train (and quantize) at group 64, and the one no
    group divides stays float in both; the result is still the trained forward, bit for bit."""
    from nima_edge.quantization import load_quant
    from nima_edge.tokenizer import train_tokenizer
    model = group_plan_model
    scheme = qat.parse("int4-g128")
    ckpt = checkpoint.save(tmp_path / "ck", model, train_tokenizer("char"), meta={"qat": scheme.to_dict()})
    qat.enable(model, scheme)
    fake = {n: m.qat.group_size for n, m in model.named_modules() if isinstance(m, qat.FakeQuantLinear)}
    assert set(fake.values()) == {64} and len(fake) == 12 and not any("down_proj" in n for n in fake)
    quantized = qat.quantize_checkpoint(ckpt, tmp_path / "q")
    result = load_quant(quantized)
    assert {q.group_size for q in result.values()} == {64} and len(result) == 12
    doc = json.loads((quantized / "quantization.json").read_text())
    assert doc["group_size"] == 128 and len(doc["substitutions"]) == 14
    reference, _ = checkpoint.fake_quant_model(quantized)
    x = torch.randint(0, 262, (2, 40))
    with torch.no_grad():
        assert torch.equal(model(x)[0], reference(x)[0])
