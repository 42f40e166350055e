"""verify must pass good artifacts and catch broken ones: a wrong Q/K permutation, a wrong
tokenizer, a wrong quantization packing (all built as GGUF files, the quickest target to write)."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="the gguf extra (llama-cpp-python) is not installed")

from nima_edge.export import export  # noqa: E402
from nima_edge.verify import verify_artifact  # noqa: E402


@pytest.fixture(scope="module")
def q4_ckpt(tmp_path_factory, tiny_ckpt):
    from nima_edge.export.quantize import quantize_checkpoint
    return quantize_checkpoint(tiny_ckpt, tmp_path_factory.mktemp("q") / "tiny-q4", bits=4, group_size=32,
                               method="rtn")


def test_good_float_artifact_passes_and_is_recorded(tmp_path, tiny_ckpt, char_data):
    art = export(tiny_ckpt, "gguf", tmp_path / "m.gguf", "f32")
    out = subprocess.run([sys.executable, "-m", "nima_edge", "verify", art, "--data", char_data,
                          "--json", tmp_path / "r.json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and report["reference"] == "float" and report["logits_max_abs"] < 1e-4
    manifest = json.loads((tmp_path / "m.gguf.manifest.json").read_text())
    assert manifest["verify"]["passed"] and manifest["verify"]["reference_checkpoint"]["is_source"]


def test_good_quantized_artifact_passes_against_the_fake_quant_reference(tmp_path, q4_ckpt):
    report = verify_artifact(export(q4_ckpt, "gguf", tmp_path / "q4.gguf", "q4_0"))
    assert report["passed"], report["checks"]
    assert report["reference"] == "fake-quant"


def test_wrong_qk_permutation_is_caught(tmp_path, tiny_ckpt, monkeypatch):
    from nima_edge.export import gguf_export
    monkeypatch.setattr(gguf_export, "permute_rows", lambda n_rows, n_head: np.arange(n_rows))
    art = export(tiny_ckpt, "gguf", tmp_path / "noperm.gguf", "f32")
    out = subprocess.run([sys.executable, "-m", "nima_edge", "verify", art], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 1
    report = json.loads((tmp_path / "noperm.gguf.manifest.json").read_text())["verify"]
    assert not report["checks"]["logits"] and report["logits_max_abs"] > 0.1


def test_wrong_tokenizer_is_caught(tmp_path, tiny_ckpt):
    # the same weights shipped with a tokenizer whose ids for 'a' and 'e' are swapped
    wrong = tmp_path / "wrong-tok"
    shutil.copytree(tiny_ckpt, wrong)
    tok = json.loads((wrong / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["e"] = vocab["e"], vocab["a"]
    (wrong / "tokenizer.json").write_text(json.dumps(tok))
    report = verify_artifact(export(wrong, "gguf", tmp_path / "wrongtok.gguf", "f32"), ckpt=tiny_ckpt)
    assert not report["passed"] and not report["checks"]["tokenizer"]
    assert "ROMEO: But soft! what light?" in report["tokenizer"]["mismatches"]


def test_wrong_quant_packing_is_caught(tmp_path, q4_ckpt, monkeypatch):
    from nima_edge.export import gguf_export
    pack = gguf_export.pack_gguf

    def swapped_nibbles(q):  # Q4_0 block = fp16 scale + 16 bytes of nibbles: swap high and low nibbles
        blocks = pack(q).reshape(-1, 18).copy()
        blocks[:, 2:] = (blocks[:, 2:] << 4) | (blocks[:, 2:] >> 4)
        return blocks.reshape(q.shape[0], -1)

    monkeypatch.setattr(gguf_export, "pack_gguf", swapped_nibbles)
    report = verify_artifact(export(q4_ckpt, "gguf", tmp_path / "badpack.gguf", "q4_0"))
    assert not report["passed"] and not report["checks"]["logits"]
