"""verify passes good artifacts and records its report; its distribution measures (KL divergence,
top-1 agreement, perplexity) are exact where they must be. The defect classes it must catch are in
tests/test_verify_defects.py."""
import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="the gguf extra (llama-cpp-python) is not installed")

from nima_edge.export import export  # noqa: E402
from nima_edge.verify import TOLERANCES, distribution_check, scored_logprobs, verify_artifact  # noqa: E402


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
    assert "KL divergence" in out.stdout and "top-1 agreement" in out.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and report["reference"] == "float" and report["logits_max_abs"] < 1e-4
    assert report["kl_mean"] < 1e-9 and report["top1_agreement"] == 1.0
    assert report["perplexity"]["scored"] == 32  # the second half of the trained 64-token window
    manifest = json.loads((tmp_path / "m.gguf.manifest.json").read_text())
    assert manifest["verify"]["passed"] and manifest["verify"]["reference_checkpoint"]["is_source"]


def test_good_quantized_artifact_passes_against_the_fake_quant_reference(tmp_path, q4_ckpt):
    report = verify_artifact(export(q4_ckpt, "gguf", tmp_path / "q4.gguf", "q4_0"), record=False)
    assert report["passed"], report["checks"]
    assert report["reference"] == "fake-quant"
    assert 0 < report["kl_mean"] <= TOLERANCES["int4"].kl_mean  # llama.cpp's int8 activations: small, not zero


def test_distribution_check_matches_a_direct_computation(tiny_ref):
    ids = tiny_ref.tokenize("ROMEO:\nBut soft! what light through yonder window breaks?")
    same = distribution_check(tiny_ref, tiny_ref, ids)
    assert same["kl_mean"] == same["kl_max"] == 0.0 and same["top1_agreement"] == 1.0
    lp = scored_logprobs(tiny_ref, ids)
    half = len(ids) // 2
    assert lp.shape == (len(ids) - half, tiny_ref.model.config.vocab_size)
    # the prefill + decode path gives the same distributions as one full forward pass
    import torch
    with torch.no_grad():
        full = torch.log_softmax(tiny_ref.model(torch.tensor([ids]))[0].double(), -1).numpy()
    np.testing.assert_allclose(lp, full[half - 1:-1], atol=1e-4)
    ppl = np.exp(-np.mean(full[np.arange(half - 1, len(ids) - 1), ids[half:]]))
    assert same["perplexity"]["reference"] == pytest.approx(ppl, rel=1e-4)
