"""Bring-your-own-model benchmark: a full-depth SmolLM2-135M-shaped model through the whole toolchain.

No hub download: the model is a random-weight transformers LlamaForCausalLM with SmolLM2-135M's shape
(30 layers, width 576, 9 / 3 heads, head_dim 64, FFN 1536, tied, 49152 embedding rows, 8192 positions)
and a SmolLM-style byte-level BPE trained on the corpus (tests/byo_models.py builds it, as the tests do).
Random weights time the same as trained ones; quality figures would mean nothing and are not reported.

Each step runs the real `nima-edge` command in a child process, timed, with the child's peak memory
(VmHWM): import, data prepare with the model's tokenizer, GPTQ int4 (group 32, the GGUF Q4_0 block),
one export per target and scheme, then `nima-edge bench` (50 tokens after a 16-token prompt).

    .venv/bin/python benchmarks/experiments/byo_smollm2.py --corpus PATH/TO/tinyshakespeare.txt \
        --work runs/byo-smollm2 --out benchmarks/reports/byo-smollm2-135m

The steps are logged to WORK/steps.json as they finish; `--no-bench` stops before the bench and
`--bench-only` runs it (and writes the report) from that log later, so the untimed steps can share the
machine and the timed one need not.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# run the CLI in a child and report its peak resident memory (VmHWM: this process only, not the parent)
CHILD = ("import atexit, sys\n"
         "def _peak():\n"
         "    for line in open('/proc/self/status'):\n"
         "        if line.startswith('VmHWM:'):\n"
         "            print('PEAK_MB', int(line.split()[1]) / 1024, file=sys.stderr)\n"
         "atexit.register(_peak)\n"
         "from nima_edge.cli import main\n"
         "sys.argv = ['nima-edge', *sys.argv[1:]]\n"
         "main()\n")
EXPORTS = [  # (target, quant, artifact name): float and the GPTQ int4 result where the target packs it
    ("gguf", "f16", "gguf-f16.gguf"),
    ("gguf", "q4_0", "gguf-q4_0.gguf"),
    ("gguf", "q4_k_m", "gguf-q4_k_m.gguf"),
    ("onnx", "int4", "onnx-int4"),
    ("onnx-portable", "int4", "onnx-portable-int4.onnx"),
    ("executorch", "8da4w", "executorch-8da4w"),
]


def step(name: str, args: list[str], log: list[dict], timeout: float = 3600) -> dict:
    print(f"[{time.strftime('%H:%M:%S')}] {name}: nima-edge {' '.join(args)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    seconds = time.perf_counter() - start
    peak = [float(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_MB")]
    row = {"step": name, "command": "nima-edge " + " ".join(args), "seconds": round(seconds, 1),
           "peak_rss_mb": round(peak[-1]) if peak else None, "exit": proc.returncode}
    if proc.returncode not in (0, 1):  # bench exits 1 over budget: a result, not a failure
        row["error"] = (proc.stderr.strip() or proc.stdout.strip())[-1500:]
    print(f"    {seconds:.1f} s, peak {row['peak_rss_mb']} MB, exit {proc.returncode}"
          + (f"\n    {row['error']}" if "error" in row else ""), flush=True)
    log.append(row)
    return row


def versions() -> dict:
    out = {}
    for name in ("torch", "transformers", "tokenizers", "gguf", "llama_cpp_python", "onnxruntime",
                 "onnxruntime-genai", "executorch", "torchao"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, required=True, help="text for the tokenizer and GPTQ calibration")
    ap.add_argument("--work", type=Path, default=Path("runs/byo-smollm2"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/reports/byo-smollm2-135m")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--skip", nargs="*", default=[], help="targets to leave out")
    stage = ap.add_mutually_exclusive_group()
    stage.add_argument("--no-bench", action="store_true", help="stop after the exports")
    stage.add_argument("--bench-only", action="store_true", help="bench the artifacts a --no-bench run left")
    args = ap.parse_args()
    work, out = args.work.resolve(), args.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    steps_file = work / "steps.json"
    if args.bench_only:
        saved = json.loads(steps_file.read_text())
        report(work, out, args.layers, saved["steps"], saved["artifacts"])
        return
    log: list[dict] = []

    sys.path.insert(0, str(REPO / "tests"))
    from byo_models import write_model  # the same SmolLM2-style builder the tests use
    hf = work / "hf"
    if not (hf / "config.json").is_file():
        start = time.perf_counter()
        lines = args.corpus.read_text(encoding="utf-8").splitlines(keepends=True)
        write_model("smollm2", lines, hf, vocab=16384, layers=args.layers, context=8192, rows=49152)
        log.append({"step": "write the Hugging Face model (transformers, random weights)",
                    "seconds": round(time.perf_counter() - start, 1)})
    ckpt, data, q4 = work / "ckpt", work / "data", work / "ckpt-gptq-int4"
    step("import", ["import", str(hf), "--out", str(ckpt), "--force"], log)
    step("data prepare (model's tokenizer)", ["data", "prepare", "--corpus", str(args.corpus), "--tokenizer",
                                              str(ckpt), "--out", str(data), "--force"], log)
    step("GPTQ int4 (group 32)", ["quantize", str(ckpt), "--bits", "4", "--group", "32", "--method", "gptq",
                                  "--data", str(data), "--out", str(q4), "--force"], log)
    artifacts = []
    for target, quant, name in EXPORTS:
        if target in args.skip:
            continue
        src = q4 if quant in ("q4_0", "int4", "8da4w") else ckpt
        row = step(f"export {target} {quant}", ["export", str(src), "--target", target, "--quant", quant,
                                                "--out", str(work / "artifacts" / name), "--force"], log)
        if row["exit"] == 0:
            artifacts.append(str(work / "artifacts" / name))
        steps_file.write_text(json.dumps({"steps": log, "artifacts": artifacts}, indent=2))
    if args.no_bench:
        return
    report(work, out, args.layers, log, artifacts)


def report(work: Path, out: Path, layers: int, log: list[dict], artifacts: list[str]) -> None:
    """Bench the artifacts, then write results.json (every step's time and memory) and bench.md."""
    bench_dir = work / "bench"
    step("bench", ["bench", *artifacts, "--profile", "desktop-cpu", "--out", str(bench_dir), "--force"], log,
         timeout=7200)

    out.mkdir(parents=True, exist_ok=True)
    bench = json.loads((bench_dir / "bench.json").read_text()) if (bench_dir / "bench.json").is_file() else {}
    per_artifact = [{k: r.get(k) for k in ("name", "target", "bytes", "gen_ms_median", "gen_ms_p90",
                                           "ttft_ms_median", "tokens_per_s", "peak_rss_mb", "error")}
                    for r in bench.get("results", [])]
    results = {"model": "SmolLM2-135M-shaped, random weights", "layers": layers, "steps": log,
               "bench": per_artifact, "versions": versions(), "machine": {
                   "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                   "load_avg_1m_at_end": os.getloadavg()[0]}}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if (bench_dir / "bench.md").is_file():
        (out / "bench.md").write_text((bench_dir / "bench.md").read_text())
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
