"""nima-edge eval: loss and bits/char on the same windows for a checkpoint and its exports, and the
text-completion protocol behind BLEU / chrF."""
import json
import subprocess
import sys

import pytest

from nima_edge.evaluate import COMPLETION_CONTEXT_LINES, completion_pairs, completion_scores, evaluate_path

TEXT = ("KING HENRY:\nOnce more unto the breach, dear friends, once more;\nOr close the wall up with our dead.\n"
        "In peace there's nothing so becomes a man\nAs modest stillness and humility:\nYes.\n"
        "But when the blast of war blows in our ears,\n")


def test_completion_pairs_follow_the_protocol():
    pairs = completion_pairs(TEXT, lines=100)
    lines = TEXT.split("\n")
    eligible = [i for i, line in enumerate(lines) if i >= COMPLETION_CONTEXT_LINES and len(line.split()) >= 6]
    # "KING HENRY:", "As modest stillness and humility:" and "Yes." are too short; line 1 lacks context
    assert len(pairs) == len(eligible) == 3
    prompt, ref = pairs[0]
    assert prompt == "KING HENRY:\nOnce more unto the breach, dear friends, once more;\nOr close the wall "
    assert ref == "up with our dead."
    assert completion_pairs(TEXT, lines=2) == [pairs[0], pairs[-1]]  # evenly spaced, ends included


def test_a_trained_model_completes_lines_better_than_an_untrained_one(tiny_ckpt, char_data):
    from nima_edge import checkpoint
    from nima_edge.config import ModelConfig
    from nima_edge.data import TokenData
    from nima_edge.model import NimaForCausalLM
    from nima_edge.runtimes.torch_reference import TorchRuntime
    import torch
    data = TokenData(char_data)
    model, tok = checkpoint.load(tiny_ckpt)
    torch.manual_seed(0)
    untrained = NimaForCausalLM(ModelConfig(**{**model.config.to_dict()}))
    trained = completion_scores(TorchRuntime(model=model, tokenizer=tok), data, lines=20, context=64)
    fresh = completion_scores(TorchRuntime(model=untrained, tokenizer=tok), data, lines=20, context=64)
    assert trained["lines"] == fresh["lines"] == 20
    assert trained["chrf"] > fresh["chrf"] + 5, (trained, fresh)
    assert 0 <= fresh["bleu"] <= trained["bleu"] <= 100


def test_an_export_is_scored_on_the_same_windows_and_lines(tmp_path, tiny_ckpt, char_data):
    pytest.importorskip("llama_cpp", reason="the gguf extra (llama-cpp-python) is not installed")
    from nima_edge.export import export
    art = export(tiny_ckpt, "gguf", tmp_path / "m.gguf", "f32")
    assert json.loads((tmp_path / "m.gguf.manifest.json").read_text())["trained_context"] == 64
    ckpt = evaluate_path(tiny_ckpt, char_data, max_windows=4, lines=10)
    gguf = evaluate_path(art, char_data, max_windows=4, lines=10)
    assert gguf["target"] == "gguf" and ckpt["target"] == "torch"
    assert gguf["context"] == ckpt["context"] == 64  # the trained window, read from the source checkpoint
    assert gguf["tokens"] == ckpt["tokens"] == 4 * 64
    assert gguf["loss"] == pytest.approx(ckpt["loss"], abs=1e-4)
    assert gguf["completion"]["bleu"] == pytest.approx(ckpt["completion"]["bleu"], abs=1e-6)
    assert gguf["completion"]["chrf"] == pytest.approx(ckpt["completion"]["chrf"], abs=1e-6)


def test_eval_command_prints_bleu_and_chrf(tmp_path, tiny_ckpt, char_data):
    out = subprocess.run([sys.executable, "-m", "nima_edge", "eval", str(tiny_ckpt), "--data", str(char_data),
                          "--lines", "5", "--json", str(tmp_path / "r.json")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "bits/char" in out.stdout and "BLEU" in out.stdout and "chrF" in out.stdout
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["completion"]["lines"] == 5 and "nrefs:1" in r["completion"]["signature"]["bleu"]


def test_eval_refuses_data_from_another_tokenizer(tiny_ckpt, bpe_data):
    out = subprocess.run([sys.executable, "-m", "nima_edge", "eval", str(tiny_ckpt), "--data", str(bpe_data)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "different tokenizer" in out.stderr and "Traceback" not in out.stderr
