"""Each runtime's own tool on the same artifact, for `nima-edge bench --compare-peers`.

A peer answers "how fast does the runtime's own tool run this very file here?", so that ours can be
held to it (the ratio ours / peer, gated by the profile's `peer_ratio_limit`):

  gguf           llama.cpp's llama-bench, built once (cached outside the repository) from the llama.cpp
                 vendored in the pinned llama-cpp-python sdist, with this machine's build flags
                 (nima_edge/cpu.py); one `-pg prompt,new-1` test: the prompt, then new-1 decodes (our
                 first token comes from the prefill). It excludes tokenization and sampling.
  onnx           ONNX Runtime GenAI's own Generator loop (append_tokens + generate_next_token: its
                 greedy search in C++), the loop its model_benchmark example times.
  executorch     ExecuTorch's stock C++ TextLLMRunner (what the Android app and pi_demo.py use).
  onnx-portable  optimum's ORTModelForCausalLM, in its own virtual environment (it pins an older
                 transformers), when one is given by NIMA_EDGE_OPTIMUM_PYTHON.

A peer that cannot run says why in the row ("peer_error"); it is never dropped silently.
Every peer times the same thing as the harness: prefill of the prompt, then new_tokens - 1 decodes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from importlib import metadata
from pathlib import Path

from nima_edge.cache import cache_root
from nima_edge.errors import NimaError

LLAMA_CPP_PYTHON = "llama-cpp-python"


def cache_dir() -> Path:
    """Built peer tools live here (never in the repository)."""
    return cache_root() / "peers"


class PeerUnavailable(Exception):
    """The peer tool cannot run here; the message says why."""


# --- llama.cpp: llama-bench -----------------------------------------------------------------------

def llama_bench_binary(log=print, version: str | None = None) -> Path:
    """llama-bench from the llama.cpp vendored in the installed llama-cpp-python's sdist, built once.

    Cached per (version, build flags): a second call costs nothing. The first downloads the sdist with
    pip (the same one `pip install` built from) and compiles only llama-bench (a few minutes on 2 cores).
    """
    from nima_edge.cpu import llama_cpp_cmake_args
    try:
        version = version or metadata.version(LLAMA_CPP_PYTHON)
    except metadata.PackageNotFoundError as e:
        raise PeerUnavailable("llama-cpp-python is not installed (pip install -e '.[gguf]')") from e
    flags = os.environ.get("CMAKE_ARGS") or llama_cpp_cmake_args()
    tag = hashlib.sha256(flags.encode()).hexdigest()[:8]
    root = cache_dir()
    binary = root / f"llama.cpp-{version}-{tag}" / "bin" / "llama-bench"
    if binary.is_file():
        return binary
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise PeerUnavailable(f"building llama-bench needs {tool} (apt-get install cmake g++)")
    root.mkdir(parents=True, exist_ok=True)
    src = root / f"llama_cpp_python-{version}"
    if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        sdist = root / f"llama_cpp_python-{version}.tar.gz"
        if not sdist.is_file():
            log(f"downloading the {LLAMA_CPP_PYTHON}=={version} sdist (its vendored llama.cpp)")
            _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                  f"{LLAMA_CPP_PYTHON}=={version}", "-d", str(root)], "pip download")
        with tarfile.open(sdist) as tar:
            tar.extractall(root, filter="data")
    build = root / f"build-{version}-{tag}"
    log(f"building llama-bench ({flags}); cached in {binary.parent.parent}")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(build), *generator,
          "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
          "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", *flags.split()],
         "cmake configure")
    _run(["cmake", "--build", str(build), "--target", "llama-bench", "-j", str(os.cpu_count() or 2)], "cmake build")
    binary.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(build / "bin" / "llama-bench", binary)
    shutil.rmtree(build, ignore_errors=True)
    return binary


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PeerUnavailable(f"{what} failed: {(proc.stderr or proc.stdout).strip()[-400:]}")


def time_llama_bench(path: Path, threads: int, prompt_tokens: int, new_tokens: int, runs: int) -> dict:
    """llama-bench's own `-pg` test on the file: ms for the prompt plus new_tokens - 1 decodes.

    It keeps its defaults (batch 2048, ubatch 512, flash attention auto, F16 KV cache, CPU repack on),
    except that the repack buffers stay off on AMX CPUs, as in our runtime (nima_edge/cpu.py). Its -ctk
    takes no f32, so for an all-F32 file its cache is F16 where ours is F32 (what makes that file exact).
    """
    from nima_edge.cpu import has_amx
    binary = llama_bench_binary()
    cmd = [str(binary), "-m", str(path), "-p", "0", "-n", "0", "-pg", f"{prompt_tokens},{new_tokens - 1}",
           "-t", str(threads), "-r", str(runs), "--repack", "0" if has_amx() else "1", "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise PeerUnavailable(f"llama-bench failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    test = json.loads(proc.stdout)[0]
    samples = [ns / 1e6 for ns in test["samples_ns"]]
    return {"peer": "llama-bench", "peer_version": f"llama.cpp {test.get('build_commit', '?')} "
            f"(build {test.get('build_number', '?')}) from llama-cpp-python {metadata.version(LLAMA_CPP_PYTHON)}",
            "peer_cmd": " ".join(["llama-bench", *cmd[1:]]), "peer_ms_runs": samples,
            "peer_system": test.get("cpu_info", "")}


# --- the in-process peers (run in a child process of their own) -----------------------------------

def prompt_ids(tokenizer, prompt_tokens: int) -> list[int]:
    from nima_edge.benchmarks.harness import PROMPT_TEXT
    return tokenizer.encode(PROMPT_TEXT, add_bos=True)[:prompt_tokens]


def _genai_loop(path: Path, threads: int, prompt_tokens: int, new_tokens: int, runs: int, warmup: int) -> dict:
    """ONNX Runtime GenAI's own loop: append_tokens(prompt), then generate_next_token() (its C++ greedy
    search) until new_tokens are chosen; the first comes from the prompt's logits, as in ours."""
    import onnxruntime_genai as og
    from nima_edge.tokenizer import Tokenizer
    config = og.Config(str(path))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    prompt = prompt_ids(Tokenizer.from_file(path / "tokenizer.json"), prompt_tokens)
    times = []
    for run in range(warmup + runs):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt_tokens + new_tokens, do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(prompt)
        for _ in range(new_tokens):
            generator.generate_next_token()
        elapsed = (time.perf_counter() - start) * 1e3
        if generator.token_count() != prompt_tokens + new_tokens:
            raise PeerUnavailable(f"the Generator stopped at {generator.token_count()} tokens")
        if run >= warmup:
            times.append(elapsed)
        del generator
    return {"peer": "onnxruntime-genai Generator loop", "peer_version": f"onnxruntime-genai {og.__version__}",
            "peer_ms_runs": times}


def _executorch_runner(path: Path, threads: int, prompt_tokens: int, new_tokens: int, runs: int, warmup: int) -> dict:
    """ExecuTorch's stock C++ TextLLMRunner on the folder's model.pte and tokenizer.json."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (llama::custom_sdpa, as the app links)
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from nima_edge.tokenizer import Tokenizer
    _unsafe_reset_threadpool(threads)
    tok = Tokenizer.from_file(path / "tokenizer.json")
    text = tok.decode(prompt_ids(tok, prompt_tokens)[1:])  # the runner adds the BOS (num_bos=1)
    runner = TextLLMRunner(str(path / "model.pte"), str(path / "tokenizer.json"))
    config = GenerationConfig(echo=False, max_new_tokens=new_tokens, temperature=0.0, num_bos=1, warming=False)
    times, stats = [], []
    for run in range(warmup + runs):
        runner.reset()
        start = time.perf_counter()
        runner.generate(text, config, stats_callback=stats.append)
        elapsed = (time.perf_counter() - start) * 1e3
        # the runner counts the prefill's token apart; it stops early only at EOS (no ignore_eos binding)
        got = (stats[-1].num_prompt_tokens, stats[-1].num_generated_tokens + 1)
        if got != (prompt_tokens, new_tokens):
            raise PeerUnavailable(f"the runner ran {got[1]} tokens after {got[0]}, not {new_tokens} after "
                                  f"{prompt_tokens} (an early EOS)")
        if run >= warmup:
            times.append(elapsed)
    return {"peer": "ExecuTorch TextLLMRunner", "peer_version": f"executorch {metadata.version('executorch')}",
            "peer_ms_runs": times}


IN_PROCESS = {"onnx": _genai_loop, "executorch": _executorch_runner}


def time_peer(path: Path, target: str, threads: int, prompt_tokens: int, new_tokens: int, runs: int,
              warmup: int, timeout: float = 600) -> dict:
    """The peer's timing of `path` (peer_ms_runs, peer, peer_version), or {"peer_error": why}."""
    try:
        if target == "gguf":
            return time_llama_bench(path, threads, prompt_tokens, new_tokens, runs)
        if target == "onnx-portable":
            return _optimum(path, threads, prompt_tokens, new_tokens, runs, warmup, timeout)
        if target not in IN_PROCESS:
            return {"peer_error": f"no peer tool for target {target}"}
        cmd = [sys.executable, "-m", "nima_edge.benchmarks.peers", target, str(path), str(threads),
               str(prompt_tokens), str(new_tokens), str(runs), str(warmup)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise PeerUnavailable((proc.stderr.strip() or f"exit code {proc.returncode}").splitlines()[-1][-300:])
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (PeerUnavailable, NimaError) as e:
        return {"peer_error": str(e)}
    except subprocess.TimeoutExpired:
        return {"peer_error": f"timed out after {timeout:g} s"}


# --- optimum (its own environment) ----------------------------------------------------------------

OPTIMUM_PYTHON = "NIMA_EDGE_OPTIMUM_PYTHON"  # an interpreter that has optimum-onnx, to use instead of ours
# optimum-onnx 0.1.0 pins transformers < 4.58 (ours is 5.x) and optimum ~= 2.1: its own venv, made once.
OPTIMUM_PINS = ["optimum-onnx==0.1.0", "optimum~=2.1.0"]
OPTIMUM_DEPS = ["transformers>=4.36,<4.58", "onnx", "onnxruntime", "numpy", "huggingface_hub", "packaging"]
_OPTIMUM_SCRIPT = r"""
import json, os, sys, tempfile, time
import onnx, onnxruntime as ort, torch, transformers
from optimum.onnxruntime import ORTModelForCausalLM
from importlib.metadata import version
path, threads, new_tokens, runs, warmup = sys.argv[1], *map(int, sys.argv[2:])
ids = torch.tensor([json.loads(sys.stdin.read())])
opts = ort.SessionOptions()
opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
folder = tempfile.mkdtemp()  # what from_pretrained reads: the file and an HF config.json from its metadata
os.symlink(os.path.abspath(path), os.path.join(folder, "model.onnx"))
meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **json.loads(meta["nima.config"])}
json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
model = ORTModelForCausalLM.from_pretrained(folder, use_cache=True, use_io_binding=False, session_options=opts,
                                            provider="CPUExecutionProvider")
times = []
for run in range(warmup + runs):
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    dt = (time.perf_counter() - t0) * 1e3
    assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
    if run >= warmup:
        times.append(dt)
print(json.dumps({"peer": "optimum ORTModelForCausalLM.generate", "peer_ms_runs": times, "peer_version":
                  f"optimum-onnx {version('optimum-onnx')}, transformers {transformers.__version__}, onnxruntime {ort.__version__}"}))
"""


def optimum_python(log=print) -> Path:
    """$NIMA_EDGE_OPTIMUM_PYTHON, or a venv made once in the cache with optimum-onnx and the older
    transformers it pins; torch (which optimum imports) comes from our environment through a .pth line
    placed after the venv's own packages, so the venv's transformers wins."""
    if python := os.environ.get(OPTIMUM_PYTHON):
        return Path(python)
    import torch
    venv = cache_dir() / "optimum-venv"
    python = venv / "bin" / "python"
    if (venv / ".ready").is_file():
        return python
    log(f"making optimum's environment in {venv} (once)")
    _run([sys.executable, "-m", "venv", str(venv)], "python -m venv")
    _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", *OPTIMUM_PINS], "pip install optimum-onnx")
    _run([str(python), "-m", "pip", "install", "--quiet", *OPTIMUM_DEPS], "pip install optimum's dependencies")
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "zz_nima_edge_torch.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")
    _run([str(python), "-c", "import optimum.onnxruntime"], "importing optimum.onnxruntime")
    (venv / ".ready").touch()
    return python


def _optimum(path: Path, threads: int, prompt_tokens: int, new_tokens: int, runs: int, warmup: int,
             timeout: float) -> dict:
    """optimum's ORTModelForCausalLM.generate (greedy, exactly new_tokens) on the portable file."""
    from nima_edge.runtimes.onnx_portable import OnnxPortableRuntime
    if not Path(path).is_file():
        raise PeerUnavailable(f"{path} is not a portable .onnx file")
    ids = prompt_ids(OnnxPortableRuntime(path).tokenizer, prompt_tokens)
    proc = subprocess.run([str(optimum_python()), "-c", _OPTIMUM_SCRIPT, str(path), str(threads), str(new_tokens),
                           str(runs), str(warmup)], input=json.dumps(ids), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise PeerUnavailable("optimum: " + (proc.stderr.strip() or "failed").splitlines()[-1][-300:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child_main(argv: list[str]) -> None:
    target, path, *nums = argv
    try:
        row = IN_PROCESS[target](Path(path), *map(int, nums))
    except PeerUnavailable as e:
        print(str(e), file=sys.stderr)
        sys.exit(2)
    print(json.dumps(row))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
