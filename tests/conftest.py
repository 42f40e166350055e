"""Shared fixtures: a prepared Shakespeare data set and a briefly trained tiny checkpoint.

Built once per test session in a temp dir from the corpus shipped in tests/data (about 15 s); no
network, no hub downloads, nothing read from outside the checkout.

Under CI=true a skip is a failure unless it names missing hardware (an NVIDIA GPU / CUDA, an ARM
board): a package that is missing belongs in the `all`/`test` extras, not in a skip.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "tests" / "data" / "tinyshakespeare-300k.txt"
# The only reasons a CI run may skip: hardware this machine lacks.
HARDWARE_SKIP = re.compile(r"NVIDIA GPU|CUDA|ARM board", re.I)


def _unexpected_skip(report) -> str | None:
    """The skip reason when `report` is a skip CI does not allow, else None."""
    if os.environ.get("CI", "").lower() != "true" or not report.skipped or hasattr(report, "wasxfail"):
        return None
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return None if HARDWARE_SKIP.search(reason) else reason.removeprefix("Skipped: ")


def _fail_unexpected_skip(report) -> None:
    reason = _unexpected_skip(report)
    if reason is not None:
        report.outcome = "failed"
        report.longrepr = f"unexpected skip under CI=true (only missing hardware may skip): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_unexpected_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield  # a module-level importorskip skips the whole module at collection
    _fail_unexpected_skip(outcome.get_result())


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    return SHAKESPEARE


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, shakespeare_path) -> Path:
    from nima_edge.data import prepare
    out = tmp_path_factory.mktemp("data") / "char"
    prepare(str(shakespeare_path), out, "char")
    return out


@pytest.fixture(scope="session")
def bpe_data(tmp_path_factory, shakespeare_path) -> Path:
    from nima_edge.data import prepare
    out = tmp_path_factory.mktemp("data") / "bpe"
    prepare(str(shakespeare_path), out, "bpe", vocab_size=512)
    return out


def _train(data: Path, out: Path, preset: str, steps: int) -> Path:
    import torch
    from nima_edge.train.trainer import TrainConfig, train
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is as fast alone and far faster on a busy machine
    try:
        train(data, out, TrainConfig(preset=preset, max_steps=steps, batch_size=16, context=64, lr=3e-3,
                                     warmup_steps=20, eval_every=10_000, eval_windows=8), log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, char_data) -> Path:
    """nima-0.5m, char tokenizer, trained 200 steps: peaked enough logits for greedy-agreement tests."""
    return _train(char_data, tmp_path_factory.mktemp("ckpt") / "tiny-char", "nima-0.5m", 200)


@pytest.fixture(scope="session")
def tiny_ref(tiny_ckpt):
    """The PyTorch reference runtime of tiny_ckpt, loaded once; every use starts with a reset/prefill."""
    from nima_edge.runtimes.torch_reference import TorchRuntime
    return TorchRuntime(tiny_ckpt)


def one_layer_cut(ckpt: Path, out: Path) -> Path:
    """`ckpt` cut to its first decoder layer (embedding, layer 0, final norm, head: all trained). ExecuTorch's
    lowering costs per layer, so an export test on it takes about a third of the time."""
    import dataclasses

    from nima_edge import checkpoint
    from nima_edge.model import NimaForCausalLM
    model, tok = checkpoint.load(ckpt)
    cut = NimaForCausalLM(dataclasses.replace(model.config, num_hidden_layers=1))
    cut.load_state_dict({k: v for k, v in model.state_dict().items()
                         if not k.startswith("model.layers.") or k.startswith("model.layers.0.")})
    return checkpoint.save(out, cut, tok)


@pytest.fixture(scope="session")
def tiny_et_ckpt(tmp_path_factory, tiny_ckpt) -> Path:
    """tiny_ckpt's one-layer cut: the model the ExecuTorch exports in the default suite are made from."""
    return one_layer_cut(tiny_ckpt, tmp_path_factory.mktemp("cut") / "tiny-1layer")


@pytest.fixture(scope="session")
def tiny_pte(tmp_path_factory, tiny_et_ckpt) -> Path:
    """The fp32 ExecuTorch export of tiny_et_ckpt (a directory: model.pte + tokenizer.json), about 25 s."""
    pytest.importorskip("executorch", reason="the executorch extra is not installed")
    from nima_edge.export import export
    return export(tiny_et_ckpt, "executorch", tmp_path_factory.mktemp("pte") / "tiny-et", "fp32")


class CliExport(NamedTuple):
    float_ckpt: Path  # the float checkpoint
    quantized: Path  # its quantization result, the one exported
    out: Path  # the export directory
    process: subprocess.CompletedProcess  # the finished command, with its output


@pytest.fixture(scope="session")
def et_8da4w_cli(tmp_path_factory, tiny_et_ckpt) -> CliExport:
    """`nima-edge export --target executorch --quant 8da4w` of an RTN int4 g32 result of tiny_et_ckpt, run
    as a user runs it. The ExecuTorch quantization test and the quiet-terminal test share this one export."""
    pytest.importorskip("executorch", reason="the executorch extra is not installed")
    import sys
    from nima_edge.export.quantize import quantize_checkpoint
    root = tmp_path_factory.mktemp("et8da4w")
    rtn4 = quantize_checkpoint(tiny_et_ckpt, root / "rtn4", bits=4, group_size=32, method="rtn")
    out = root / "8da4w"
    p = subprocess.run([sys.executable, "-m", "nima_edge", "export", str(rtn4), "--target", "executorch",
                        "--quant", "8da4w", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    return CliExport(tiny_et_ckpt, rtn4, out, p)


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `nima-edge ARGS` in this process (no interpreter start-up); returns (exit code, stdout, stderr)."""
    import sys

    from nima_edge.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["nima-edge", *map(str, args)])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture
def small_ckpt(tmp_path):
    """An untrained one-layer, 32-wide char checkpoint: enough for checks of files and refusals."""
    import torch
    from nima_edge import checkpoint
    from nima_edge.config import ModelConfig
    from nima_edge.model import NimaForCausalLM
    from nima_edge.tokenizer import train_tokenizer
    torch.manual_seed(0)
    model = NimaForCausalLM(ModelConfig(vocab_size=262, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    return checkpoint.save(tmp_path / "ckpt", model, train_tokenizer("char"), meta={"preset": "test"})


@pytest.fixture
def group_plan_model():
    """A random model whose widths no 128-group divides: 192 (q/k/v/o/gate/up inputs: group 64 does) and 80
    (down_proj: no supported group does, it stays float). The quantize and QAT group-plan tests share it."""
    import torch
    from nima_edge.config import ModelConfig
    from nima_edge.model import NimaForCausalLM
    torch.manual_seed(0)
    return NimaForCausalLM(ModelConfig(vocab_size=262, hidden_size=192, intermediate_size=80, num_hidden_layers=2,
                                       num_attention_heads=3, num_key_value_heads=1))
