"""One test per known defect class: verify's report fails on the defective artifact, while the honest
artifact built the same way passes (tests/test_verify.py). Each defect is made the way it happens:
by the exporter (a patched packing or header), by the runtime (a patched position), or by the
pipeline (an artifact built from other weights than its reference).

Most are int4 (GGUF Q4_0) artifacts, the loosest precision class, so each test also shows the int4
tolerances are tight enough; the float ones show the float32 table is.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp", reason="the gguf extra (llama-cpp-python) is not installed")

from nima_edge.export import export  # noqa: E402
from nima_edge.export import gguf as gguf_export  # noqa: E402
from nima_edge.verify import verify_artifact  # noqa: E402

STALE_STEPS = 1  # one optimizer step behind is enough to fail (measured KL 0.03 nats, int4 allows 0.001)


def failed(report: dict) -> set[str]:
    return {name for name, ok in report["checks"].items() if not ok}


@pytest.fixture(scope="module")
def q4_ckpt(tmp_path_factory, tiny_ckpt):
    from nima_edge.export.quantize import quantize_checkpoint
    return quantize_checkpoint(tiny_ckpt, tmp_path_factory.mktemp("q") / "tiny-q4", bits=4, group_size=32,
                               method="rtn")


def test_wrong_qk_permutation_fails(tmp_path, q4_ckpt, monkeypatch):
    # Q/K rows left in HF's rotate_half order: llama.cpp rotates the wrong pairs of dimensions
    monkeypatch.setattr(gguf_export, "permute_rows", lambda n_rows, n_head: np.arange(n_rows))
    report = verify_artifact(export(q4_ckpt, "gguf", tmp_path / "noperm.gguf", "q4_0"), record=False)
    assert not report["passed"]
    assert {"kl_divergence", "logits"} <= failed(report), report["checks"]


def test_swapped_nibbles_fail(tmp_path, q4_ckpt, monkeypatch):
    pack = gguf_export.pack_gguf

    def swapped_nibbles(q):  # Q4_0 block = fp16 scale + 16 bytes of nibbles: high and low swapped
        blocks = pack(q).reshape(-1, 18).copy()
        blocks[:, 2:] = (blocks[:, 2:] << 4) | (blocks[:, 2:] >> 4)
        return blocks.reshape(q.shape[0], -1)

    monkeypatch.setattr(gguf_export, "pack_gguf", swapped_nibbles)
    report = verify_artifact(export(q4_ckpt, "gguf", tmp_path / "nibbles.gguf", "q4_0"), record=False)
    assert not report["passed"]
    assert {"kl_divergence", "logits"} <= failed(report), report["checks"]


def test_wrong_group_size_fails(tmp_path, q4_ckpt, monkeypatch):
    # the packer reads the group-32 result as group 64: every other scale, each spread over 64 columns
    from nima_edge.export import packing

    def per_block_as_group_64(q, block):
        scales, zeros = packing._np(q.scales)[:, ::2], packing._np(q.zeros)[:, ::2]
        return np.repeat(scales, 64 // block, axis=1), np.repeat(zeros, 64 // block, axis=1)

    monkeypatch.setattr(packing, "_per_block", per_block_as_group_64)
    report = verify_artifact(export(q4_ckpt, "gguf", tmp_path / "g64.gguf", "q4_0"), record=False)
    assert not report["passed"]
    assert "kl_divergence" in failed(report), report["checks"]


def test_wrong_scale_dtype_fails(tmp_path, q4_ckpt, monkeypatch):
    pack = gguf_export.pack_gguf

    def bf16_scales(q):  # the fp16 scale field of each Q4_0 block written with the scale's bf16 bits
        blocks = pack(q).reshape(-1, 18).copy()
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        bf16 = torch.from_numpy(d.reshape(-1)).to(torch.bfloat16).view(torch.int16).numpy()
        blocks[:, :2] = bf16.view(np.uint8).reshape(-1, 2)
        return blocks.reshape(q.shape[0], -1)

    monkeypatch.setattr(gguf_export, "pack_gguf", bf16_scales)
    report = verify_artifact(export(q4_ckpt, "gguf", tmp_path / "bf16.gguf", "q4_0"), record=False)
    assert not report["passed"]
    assert "kl_divergence" in failed(report), report["checks"]


def test_wrong_rope_theta_fails(tmp_path, q4_ckpt, monkeypatch):
    # the header says Llama 3's rope_theta (500000) instead of the model's 10000
    from nima_edge.export.gguf_tokenizer import Writer
    add = Writer.add_rope_freq_base
    monkeypatch.setattr(Writer, "add_rope_freq_base", lambda self, value: add(self, 500000.0))
    report = verify_artifact(export(q4_ckpt, "gguf", tmp_path / "theta.gguf", "q4_0"), record=False)
    assert not report["passed"]
    assert "kl_divergence" in failed(report), report["checks"]


def test_off_by_one_position_fails(tmp_path, tiny_ckpt, tiny_ref):
    # the classic decode bug: position_ids = past_length + 1 (prefill positions are right, the KV cache
    # is appended correctly; only RoPE sees every decoded token one place too far)
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from nima_edge.runtimes import load_runtime
    from nima_edge.verify import verify
    art = export(tiny_ckpt, "onnx-portable", tmp_path / "m.onnx", "f32")
    rt = load_runtime(art)
    run = rt.session.run

    def shifted(outputs, feed):
        if feed["position_ids"].shape[1] == 1:
            feed = {**feed, "position_ids": feed["position_ids"] + 1}
        return run(outputs, feed)

    honest = verify(rt, tiny_ref, "f32", False, eval_tokens=64)  # the fixture's trained window
    rt.session = type("Session", (), {"run": staticmethod(shifted)})()
    report = verify(rt, tiny_ref, "f32", False, eval_tokens=64)
    assert honest["passed"], honest["checks"]
    assert not report["passed"]
    assert "kl_divergence" in failed(report), report["checks"]


def test_tokenizer_swap_fails(tmp_path, tiny_ckpt):
    # the same weights shipped with a tokenizer whose ids for 'a' and 'e' are swapped
    wrong = tmp_path / "wrong-tok"
    shutil.copytree(tiny_ckpt, wrong)
    tok = json.loads((wrong / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["e"] = vocab["e"], vocab["a"]
    (wrong / "tokenizer.json").write_text(json.dumps(tok))
    report = verify_artifact(export(wrong, "gguf", tmp_path / "wrongtok.gguf", "f32"), ckpt=tiny_ckpt, record=False)
    assert not report["passed"] and not report["checks"]["tokenizer"]
    assert "ROMEO: But soft! what light?" in report["tokenizer"]["mismatches"]


def test_stale_weights_fail(tmp_path, tiny_ckpt, q4_ckpt, char_data):
    # the artifact was exported STALE_STEPS optimizer steps before the checkpoint it is verified against
    from nima_edge import checkpoint
    from nima_edge.data import TokenData
    from nima_edge.evaluate import windows
    from nima_edge.export.quantize import quantize_checkpoint
    from nima_edge.train.trainer import batch_starts
    model, tok = checkpoint.load(tiny_ckpt)
    data = TokenData(char_data)
    tokens = data.tokens("train")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    model.train()
    for step in range(STALE_STEPS):
        x, y = windows(tokens, tok.bos_id, 64, batch_starts(0, step, len(tokens), 64, 16))
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad()
    newer = quantize_checkpoint(checkpoint.save(tmp_path / "newer", model.eval(), tok, checkpoint.read_meta(tiny_ckpt)),
                                tmp_path / "newer-q4", bits=4, group_size=32, method="rtn")
    report = verify_artifact(export(q4_ckpt, "gguf", tmp_path / "stale.gguf", "q4_0"), ckpt=newer, record=False)
    assert not report["passed"]
    assert "kl_divergence" in failed(report), report["checks"]
    assert not report["reference_checkpoint"]["is_source"]

