"""ExecuTorch export (fp32): parity with PyTorch, the stock LLM runner, and clear errors for bad programs."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("executorch", reason="the executorch extra is not installed")

from nima_edge.errors import NimaError  # noqa: E402
from nima_edge.manifest import read_manifest  # noqa: E402

PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?"
FP32_TOL = 1e-4


def teacher_forced(rt, ids, split=8):
    """Logits after a chunked prefill of ids[:split], then one decode per remaining id."""
    rt.reset()
    return np.stack([rt.prefill(ids[:split])] + [rt.decode(t) for t in ids[split:]])


@pytest.fixture(scope="module")
def torch_rt(tiny_et_ckpt):
    from nima_edge.runtimes.torch_reference import TorchRuntime
    return TorchRuntime(tiny_et_ckpt)  # the checkpoint tiny_pte was exported from


@pytest.fixture(scope="module")
def et_rt(tiny_pte):
    from nima_edge.runtimes import load_runtime
    rt = load_runtime(tiny_pte, threads=2)
    yield rt
    rt.close()


def test_fp32_logits_match_pytorch(torch_rt, et_rt):
    ids = torch_rt.tokenize(PROMPT)
    ref, got = teacher_forced(torch_rt, ids), teacher_forced(et_rt, ids)
    assert got.shape == ref.shape == (len(ids) - 7, torch_rt.model.config.vocab_size)
    assert np.abs(got - ref).max() < FP32_TOL


def test_fp32_greedy_50_tokens_identical(torch_rt, et_rt):
    ids = torch_rt.tokenize("ROMEO:")
    ref = list(torch_rt.generate_ids(ids, 50, stop_at_eos=False))
    got = list(et_rt.generate_ids(ids, 50, stop_at_eos=False))
    assert len(ref) == 50 and got == ref


def test_long_prompt_and_full_context(torch_rt, et_rt):
    ids = (torch_rt.tokenize(PROMPT * 10))[: et_rt.context_length]
    assert len(ids) == et_rt.context_length == 256
    et_rt.reset()
    last = et_rt.prefill(ids)
    torch_rt.reset()
    assert np.abs(last - torch_rt.prefill(ids)).max() < FP32_TOL
    with pytest.raises(NimaError, match="context"):
        et_rt.decode(ids[0])


def test_native_loop_equals_the_python_bindings(tiny_pte, torch_rt, et_rt):
    """The runtime's forward goes through ExecuTorch's C++ Module (built here with the C++ compiler the
    suite's other native builds use); its logits are the bindings' bit for bit, prefill and decode."""
    from nima_edge.runtimes.executorch import ExecuTorchRuntime
    assert et_rt.loop == "native"
    bindings = ExecuTorchRuntime(tiny_pte, loop="python")
    assert bindings.loop == "python"
    ids = torch_rt.tokenize(PROMPT)
    assert np.array_equal(teacher_forced(et_rt, ids), teacher_forced(bindings, ids))
    with pytest.raises(NimaError, match="forward failed"):  # ExecuTorch's own error, not a crash
        et_rt._native(list(range(1, 40)), et_rt.context_length - 10)
    bindings.close()


def test_native_loop_falls_back_to_the_bindings(tiny_pte, monkeypatch):
    from nima_edge.runtimes import executorch_native
    from nima_edge.runtimes.executorch import ExecuTorchRuntime
    monkeypatch.setattr(executorch_native, "library", lambda: (None, "no C++ compiler (apt-get install g++)"))
    rt = ExecuTorchRuntime(tiny_pte)
    assert rt.loop == "python (no C++ compiler (apt-get install g++))"
    assert len(list(rt.generate_ids(rt.tokenize("ROMEO:"), 3, stop_at_eos=False))) == 3
    with pytest.raises(NimaError, match="native loop is unavailable: no C"):
        ExecuTorchRuntime(tiny_pte, loop="native")


def test_quiet_cli_mutes_executorchs_native_log(tiny_pte):
    """ExecuTorch's C++ log (threadpool start-up) writes to file descriptor 2 itself; the quiet CLI mutes it.
    In a fresh process: pytest's own descriptor capture would get in the way."""
    import subprocess
    import sys
    code = ("import sys\nfrom nima_edge import native_log\n"
            "from nima_edge.runtimes.executorch import ExecuTorchRuntime\n"
            "ExecuTorchRuntime(sys.argv[1], threads=2, loop='python')\n"
            "native_log.QUIET = True; print('-- quiet --', file=sys.stderr, flush=True)\n"
            "ExecuTorchRuntime(sys.argv[1], threads=1, loop='python')\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_pte)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loud, quiet = proc.stderr.split("-- quiet --")
    assert "Resetting threadpool to 2 threads" in loud and "threadpool" not in quiet, proc.stderr[-2000:]


def test_stock_runner_generates_like_pytorch(tiny_pte, torch_rt):
    """ExecuTorch's own TextLLMRunner reads the artifact; with num_bos=1 its BOS matches our tokenizer."""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
    runner = TextLLMRunner(str(tiny_pte / "model.pte"), str(tiny_pte / "tokenizer.json"))
    pieces, stats = [], []
    config = GenerationConfig(echo=False, max_new_tokens=20, temperature=0.0, num_bos=1, warming=True)
    runner.generate("ROMEO:", config, token_callback=pieces.append, stats_callback=stats.append)
    ids = torch_rt.tokenize("ROMEO:")
    assert stats[0].num_prompt_tokens == len(ids)  # BOS + the prompt, exactly as our tokenizer encodes
    expected = torch_rt.detokenize(torch_rt.generate_ids(ids, 20))
    assert expected and "".join(pieces) == expected


def test_metadata_and_manifest(tiny_pte, et_rt, tiny_et_ckpt):
    m = et_rt.metadata
    assert m["get_max_context_len"] == 256 and m["get_bos_id"] == 0 and m["get_eos_ids"] == [1]
    assert m["use_kv_cache"] and m["use_sdpa_with_kv_cache"] and m["enable_dynamic_shape"]
    manifest = read_manifest(tiny_pte)
    assert manifest["target"] == "executorch" and manifest["quant"] == "fp32"
    assert {f["name"] for f in manifest["files"]} == {"model.pte", "tokenizer.json", "tokenizer_config.json",
                                                         "generation_config.json"}  # end ids for the runner
    assert manifest["source"]["checkpoint"] == str(tiny_et_ckpt)


def test_detect_target(tiny_pte):
    from nima_edge.runtimes import detect_target
    assert detect_target(tiny_pte) == "executorch"
    assert detect_target(tiny_pte / "model.pte") == "executorch"


def _copy_tokenizer(src, dst):
    dst.mkdir(exist_ok=True)
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    return dst


def test_corrupt_pte_is_refused(tiny_pte, tmp_path):
    from nima_edge.runtimes.executorch import ExecuTorchRuntime
    d = _copy_tokenizer(tiny_pte, tmp_path / "corrupt")
    data = (tiny_pte / "model.pte").read_bytes()
    (d / "model.pte").write_bytes(data[: len(data) // 3])
    with pytest.raises(NimaError, match="not a loadable ExecuTorch program"):
        ExecuTorchRuntime(d)
    (d / "model.pte").write_bytes(b"definitely not a flatbuffer")
    with pytest.raises(NimaError, match="not a loadable ExecuTorch program"):
        ExecuTorchRuntime(d / "model.pte")


def test_program_without_llm_interface_is_refused(tiny_pte, tmp_path):
    from executorch.exir import to_edge

    from nima_edge.runtimes.executorch import ExecuTorchRuntime
    ep = torch.export.export(torch.nn.Linear(4, 4).eval(), (torch.randn(1, 4),))
    d = _copy_tokenizer(tiny_pte, tmp_path / "linear")
    (d / "model.pte").write_bytes(to_edge(ep).to_executorch().buffer)
    with pytest.raises(NimaError, match="lacks the LLM interface"):
        ExecuTorchRuntime(d)


def test_missing_pieces_are_refused(tiny_pte, tmp_path):
    from nima_edge.runtimes.executorch import ExecuTorchRuntime
    (tmp_path / "lone").mkdir()
    shutil.copy(tiny_pte / "model.pte", tmp_path / "lone" / "model.pte")
    with pytest.raises(NimaError, match="no tokenizer.json"):
        ExecuTorchRuntime(tmp_path / "lone")
    with pytest.raises(NimaError, match="no ExecuTorch program"):
        ExecuTorchRuntime(tmp_path)


def test_bad_export_options(tiny_ckpt, tmp_path):
    from nima_edge.export import export
    with pytest.raises(NimaError, match="not an ExecuTorch scheme"):
        export(tiny_ckpt, "executorch", tmp_path / "x", "q4_0")
    with pytest.raises(NimaError, match="is a directory"):
        export(tiny_ckpt, "executorch", tmp_path / "x.pte", "fp32")


def test_runner_tokenizer_streams_sentencepiece_pieces(tmp_path):
    """The runner's tokenizer (pytorch-tokenizers, which executorch ships) decodes one token at a time: with a
    Llama-2-style decoder's Strip every piece lost its space and a lone byte-fallback byte raised "invalid
    character" in C++, ending generation. The exported tokenizer.json streams them as llama.cpp prints."""
    from pytorch_tokenizers import CppHFTokenizer

    from tokenizers import Tokenizer as HFTokenizer

    from byo_models import tinyllama_tokenizer
    from nima_edge.export.executorch import runner_tokenizer_json
    from nima_edge.tokenizer import Tokenizer
    hf = tinyllama_tokenizer(["The king speaks. The queen answers: café, naïve. " * 20], 320)
    exported = runner_tokenizer_json(Tokenizer(hf, {"bos_token": "<s>", "eos_token": "</s>"}))
    (tmp_path / "tokenizer.json").write_text(exported)
    runner = CppHFTokenizer()
    runner.load(str(tmp_path / "tokenizer.json"))
    assert runner.decode(hf.token_to_id("\u2581The")) == " The"
    try:
        runner.decode(hf.token_to_id("<0xE2>"))  # one byte of a three-byte character
    except UnicodeDecodeError:
        pass  # the raw byte reached Python (pybind cannot make a str of it): the C++ decode itself succeeded
    # a whole decode still reads right (only the reply's first space is no longer stripped)
    assert HFTokenizer.from_str(exported).decode(hf.encode("The café").ids) == " The café"
