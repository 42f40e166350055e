"""The floor: how fast an artifact could possibly run on a machine, and what a device would do.

Per artifact, measured from the artifact itself (`analyse`):
  weight bytes read per token   every weight tensor is read once per forward pass (decode is a GEMV
                                per matrix); the embedding table is counted whole (tied: it is the LM head)
  KV bytes per position         2 (K and V) x layers x kv_heads x head_dim x the cache's element size
  FLOPs per token               2 x the matmul parameters + the attention over the positions so far
Per machine (`measure_machine`, once per bench run, on the profile's thread count):
  read bandwidth                a summing pass over a cache-resident buffer and over a DRAM-sized one
  GEMM rate                     fp32 matrix multiply, torch, the profile's threads
`floor_ms` puts them together for the harness's timing (a prompt, then new_tokens - 1 decodes): each
forward pass costs max(bytes / bandwidth, FLOPs / GEMM rate), with the cache bandwidth while the
pass's bytes fit in the last-level cache and the DRAM one otherwise. It is a lower bound: dispatch,
Python, threading barriers and the runtime's own overheads are not in it, so every bench row shows
"x times the floor". Device profiles (raspberry-pi-5, android-phone) carry published bandwidth and
compute figures with citations; on another machine `bench --profile` prints their *projections*.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Bytes per element of the KV cache each runtime keeps for an artifact's precision.
FLOAT_BYTES = {"f32": 4, "fp32": 4, "f16": 2, "bf16": 2}


@dataclass
class Shape:
    """What the roofline needs to know about the model an artifact holds."""
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    @property
    def matmul_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)  # q, o, k, v
        return self.layers * (attn + 3 * self.hidden * self.ffn) + self.vocab * self.hidden  # + LM head

    def flops(self, position: int) -> float:
        """FLOPs of one token's forward pass attending over `position` earlier positions plus itself."""
        attention = 4 * self.layers * self.heads * self.head_dim * (position + 1)  # QK^T and PV
        return 2.0 * self.matmul_params + attention


@dataclass
class ArtifactCost:
    target: str
    weight_bytes: int       # read per forward pass
    kv_bytes_per_pos: int   # read per cached position per forward pass
    shape: Shape

    def as_dict(self) -> dict:
        return {"weight_bytes": self.weight_bytes, "kv_bytes_per_pos": self.kv_bytes_per_pos,
                "flops_per_token": self.shape.flops(0), "shape": asdict(self.shape)}


# --- the artifact side ----------------------------------------------------------------------------

def analyse(path: str | Path, target: str | None = None) -> ArtifactCost:
    from nima_edge.runtimes import detect_target
    path = Path(path)
    target = target or detect_target(path)
    reader = {"gguf": _gguf, "onnx": _onnx_genai, "onnx-portable": _onnx_portable, "executorch": _executorch,
              "torch": _torch}.get(target)
    if reader is None:
        raise ValueError(f"no roofline reader for target {target}")
    weight_bytes, shape, kv_elem = reader(path)
    return ArtifactCost(target, int(weight_bytes), 2 * shape.layers * shape.kv_heads * shape.head_dim * kv_elem, shape)


def _shape_from_hf(cfg: dict) -> Shape:
    heads = cfg["num_attention_heads"]
    return Shape(cfg["num_hidden_layers"], cfg["hidden_size"], heads, cfg.get("num_key_value_heads", heads),
                 cfg.get("head_dim") or cfg["hidden_size"] // heads, cfg["intermediate_size"], cfg["vocab_size"])


def _gguf(path: Path):
    import gguf
    reader = gguf.GGUFReader(path)
    meta = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("tokenizer.")}
    heads = int(meta["llama.attention.head_count"])
    hidden = int(meta["llama.embedding_length"])
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    shape = Shape(int(meta["llama.block_count"]), hidden, heads, int(meta.get("llama.attention.head_count_kv", heads)),
                  int(meta.get("llama.attention.key_length", hidden // heads)), int(meta["llama.feed_forward_length"]),
                  vocab)
    names = {t.name for t in reader.tensors}
    weight = sum(int(t.n_bytes) for t in reader.tensors
                 if t.name != "token_embd.weight" or "output.weight" not in names)  # untied: one row is read
    # the runtime's KV cache: F32 for an all-F32 file, llama.cpp's F16 otherwise (runtimes/gguf.py)
    kv_elem = 4 if meta.get("general.file_type") == gguf.LlamaFileType.ALL_F32 else 2
    return weight, shape, kv_elem


def _onnx_initializer_bytes(model_file: Path) -> int:
    import onnx
    model = onnx.load(str(model_file), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        total += int(ext["length"]) if "length" in ext else len(t.raw_data)
    return total


def _onnx_genai(path: Path):
    from nima_edge.runtimes.onnx_format import MODEL_FILE
    return _onnx_initializer_bytes(path / MODEL_FILE), _source_shape(path), 4  # fp32 KV cache on CPU


def _onnx_portable(path: Path):
    import onnx
    from nima_edge.runtimes.onnx_portable_format import META_CONFIG
    model = onnx.load(str(path), load_external_data=False)
    cfg = json.loads({p.key: p.value for p in model.metadata_props}[META_CONFIG])
    return _onnx_initializer_bytes(path), _shape_from_hf(cfg), 4


def _executorch(path: Path):
    from nima_edge.runtimes.executorch_format import PTE_NAME
    pte = path / PTE_NAME if path.is_dir() else path
    # the program's constant segment is nearly all of the .pte (the graph is a few KB)
    return pte.stat().st_size, _source_shape(pte.parent), 4


def _torch(path: Path):
    cfg = json.loads((path / "config.json").read_text())
    weights = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return weights, _shape_from_hf(cfg), 4


def _source_shape(folder: Path) -> Shape:
    """The model's shape from a config.json in the artifact folder, else from the checkpoint its
    manifest names."""
    if (folder / "config.json").is_file():
        return _shape_from_hf(json.loads((folder / "config.json").read_text()))
    manifest = folder / "manifest.json"
    if manifest.is_file():
        src = Path(json.loads(manifest.read_text())["source"]["checkpoint"]) / "config.json"
        if src.is_file():
            return _shape_from_hf(json.loads(src.read_text()))
    raise ValueError(f"{folder}: no config.json and its source checkpoint is not on this machine")


# --- the machine side -----------------------------------------------------------------------------

@dataclass
class Machine:
    """Read bandwidth (GB/s) in and out of the last-level cache, that cache's size, and the GEMM rate."""
    cache_read_gbs: float
    dram_read_gbs: float
    cache_bytes: int
    gemm_gflops: float
    threads: int
    source: str  # "measured on this machine" or the profile's citation

    def bandwidth(self, working_set: int) -> float:
        return self.cache_read_gbs if working_set <= self.cache_bytes else self.dram_read_gbs


def last_level_cache_bytes() -> int:
    """The largest CPU cache sysfs reports (a VM may hide it: then 8 MiB, a common L3 slice)."""
    best = 0
    for size in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size.read_text().strip()
        mult = {"K": 1024, "M": 1024 ** 2}.get(text[-1], 1)
        best = max(best, int(text.rstrip("KM")) * mult)
    return best or 8 * 1024 ** 2


def _best_rate(work: float, run, seconds: float) -> float:
    """`work` units per second of the fastest single call of `run` within `seconds` of trying: on a
    shared machine the fastest pass is the one the others did not interrupt, i.e. the hardware's rate."""
    run()  # warm: fault pages in, fill caches, start the thread pool
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        run()
        best = max(best, work / (time.perf_counter() - t0))
    return best


def _read_gbs(nbytes: int, seconds: float, chunk: int = 1 << 20) -> float:
    """Read rate of summing a float32 buffer of `nbytes`, timed per `chunk` (torch, current threads).
    Short timed passes are what a shared machine leaves uninterrupted; cycling through a buffer far
    larger than the cache still makes every chunk come from DRAM."""
    import torch
    chunks = torch.ones(nbytes // 4, dtype=torch.float32).split(min(chunk, nbytes) // 4)
    state = {"i": 0}

    def one():
        chunks[state["i"] % len(chunks)].sum()
        state["i"] += 1
    return _best_rate(min(chunk, nbytes) / 1e9, one, seconds)


def _gemm_gflops(n: int = 256, seconds: float = 0.5) -> float:
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    return _best_rate(2 * n ** 3 / 1e9, lambda: a @ b, seconds)


def measure_machine(threads: int) -> Machine:
    """This machine's figures for `threads` threads (about 2.5 s). Each is the best single pass of many on
    one thread, times `threads`: on a shared machine a multi-threaded pass mostly measures how long the
    other tenants hold one of its threads at a barrier, and one core's fastest pass is what the hardware
    gives. Scaling by threads can only overstate the rate (DRAM is shared), so the floor stays a floor."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cache = last_level_cache_bytes()
        return Machine(cache_read_gbs=threads * _read_gbs(min(cache // 4, 1 << 20), 0.5),
                       dram_read_gbs=threads * _read_gbs(max(256 << 20, 8 * cache), 1.5),
                       cache_bytes=cache, gemm_gflops=threads * _gemm_gflops(), threads=threads,
                       source=f"measured on this machine (one core's best pass x {threads} threads)")
    finally:
        torch.set_num_threads(before)


def profile_machine(device: dict | None, threads: int) -> Machine | None:
    """A device profile's published figures ([device] table) at its thread count, or None without one."""
    if not device:
        return None
    return Machine(float(device["cache_read_gbs"]), float(device["dram_read_gbs"]), int(device["cache_bytes"]),
                   float(device["gemm_gflops"]), threads, source="published figures: " + device["citation"])


# --- the floor ------------------------------------------------------------------------------------

def floor_ms(cost: ArtifactCost, machine: Machine, prompt_tokens: int, new_tokens: int) -> dict:
    """Lower bound in ms for the harness's run (prefill, then new_tokens - 1 decodes), and its parts."""
    def step(first_pos: int, n: int) -> tuple[float, float]:
        kv = cost.kv_bytes_per_pos * (first_pos + n)
        nbytes = cost.weight_bytes + kv
        mem = nbytes / (machine.bandwidth(nbytes) * 1e9)
        compute = sum(cost.shape.flops(first_pos + i) for i in range(n)) / (machine.gemm_gflops * 1e9)
        return mem, compute

    mem_s = compute_s = total_s = 0.0
    passes = [(0, prompt_tokens)] + [(prompt_tokens + i, 1) for i in range(new_tokens - 1)]
    for first, n in passes:
        mem, compute = step(first, n)
        mem_s, compute_s, total_s = mem_s + mem, compute_s + compute, total_s + max(mem, compute)
    return {"floor_ms": total_s * 1e3, "memory_ms": mem_s * 1e3, "compute_ms": compute_s * 1e3,
            "bound": "memory" if mem_s >= compute_s else "compute"}


def attach_floors(results: list[dict], machine: Machine, prompt_tokens: int, new_tokens: int) -> None:
    """Add floor_ms and x_floor to every timed row (a row whose artifact cannot be read says why)."""
    from nima_edge.manifest import manifest_path
    for r in results:
        if r.get("timed_out"):  # its file may be what hung (a FIFO, a dead mount): never open it here
            continue
        try:
            cost = analyse(r["artifact"], r.get("target"))
        except Exception as e:  # noqa: BLE001 - a floor we cannot compute must not lose the timing
            r["floor_error"] = f"{type(e).__name__}: {e}"[:200]
            continue
        r["cost"] = cost.as_dict()
        if (m := manifest_path(r["artifact"])).is_file():
            r.setdefault("quant", json.loads(m.read_text()).get("quant"))
        r.update(floor_ms(cost, machine, prompt_tokens, new_tokens))
        if "gen_ms_median" in r:
            r["x_floor"] = r["gen_ms_median"] / r["floor_ms"]


# --- before building: can a precision meet the budget on this hardware at all? -----------------------

# Weight bytes per parameter of each verify precision class as our targets store it (Q8_0 / Q4_0 blocks of
# 32 with a 16-bit scale; the other int8/int4 layouts are within a few percent).
BYTES_PER_WEIGHT = {"float32": 4.0, "float16": 2.0, "int8": 34 / 32, "int4": 18 / 32}


def planned_floor_ms(config: dict, precision: str, machine: Machine, prompt_tokens: int, new_tokens: int) -> float:
    """The floor of an artifact not yet built: a checkpoint's config.json and a precision class."""
    shape = _shape_from_hf(config)
    kv_elem = 4 if precision == "float32" else 2
    cost = ArtifactCost("", int(shape.matmul_params * BYTES_PER_WEIGHT[precision]),
                        2 * shape.layers * shape.kv_heads * shape.head_dim * kv_elem, shape)
    return floor_ms(cost, machine, prompt_tokens, new_tokens)["floor_ms"]


# --- the planning model: floor + the runtime's per-pass overhead -------------------------------------

def _overhead_ms_per_pass(r: dict, passes: int) -> float:
    return max(0.0, r["gen_ms_median"] - r["floor_ms"]) / passes


def _matmul_params(r: dict) -> float:
    return Shape(**r["cost"]["shape"]).matmul_params


def overhead_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(fixed ms, ms per matmul weight) per pass through (weights, overhead) points: a least-squares line
    through two or more model sizes, a constant through one. The fixed part is dispatch, Python and
    thread barriers; the per-weight part is the runtime's kernels running below the roofline (a decode
    GEMV dequantizing its weights is compute-bound well before memory is). Measured leave-one-size-out
    (benchmarks/reports/planning-model): quantized GGUF within 2%, ExecuTorch's median error halved, ONNX
    Runtime worse than a constant (its time does not follow size)."""
    if len({w for w, _ in points}) < 2:
        return statistics.mean(o for _, o in points), 0.0
    w_mean = statistics.mean(w for w, _ in points)
    o_mean = statistics.mean(o for _, o in points)
    slope = (sum((w - w_mean) * (o - o_mean) for w, o in points)
             / sum((w - w_mean) ** 2 for w, _ in points))
    return o_mean - slope * w_mean, slope


def attach_predictions(results: list[dict], prompt_tokens: int, new_tokens: int) -> None:
    """Predict each row as its floor plus the per-pass overhead that the same runtime and quant scheme
    showed on the *other* model sizes of the run (overhead_line: fixed + per weight with two or more of
    them, a constant with one): an out-of-sample test of the model behind the projections
    (`predicted_ms`, `prediction_error` as a fraction of the measurement)."""
    passes = new_tokens  # one prefill + new_tokens - 1 decodes
    timed = [r for r in results if "floor_ms" in r and "gen_ms_median" in r]
    for r in timed:
        others = [o for o in timed if o["target"] == r["target"] and o.get("quant") == r.get("quant")
                  and o["cost"]["shape"] != r["cost"]["shape"]]
        if not others:
            continue
        fixed, per_weight = overhead_line([(_matmul_params(o), _overhead_ms_per_pass(o, passes)) for o in others])
        overhead = max(0.0, fixed + per_weight * _matmul_params(r))
        r["predicted_ms"] = r["floor_ms"] + overhead * passes
        r["prediction_error"] = r["predicted_ms"] / r["gen_ms_median"] - 1


def attach_projections(results: list[dict], here: Machine, device: Machine, prompt_tokens: int, new_tokens: int,
                       budget_ms: float) -> None:
    """Project each timed row to the device: its floor there, plus this run's per-pass overhead of the
    row scaled by per-core speed (GEMM rate per thread, here against there): runtime overhead is
    serial CPU work, which goes as the core, not the memory."""
    core_ratio = (here.gemm_gflops / here.threads) / (device.gemm_gflops / device.threads)
    for r in results:
        if "cost" not in r or "gen_ms_median" not in r:
            continue
        cost = ArtifactCost(r["target"], r["cost"]["weight_bytes"], r["cost"]["kv_bytes_per_pos"],
                            Shape(**r["cost"]["shape"]))
        there = floor_ms(cost, device, prompt_tokens, new_tokens)
        r["device_floor_ms"] = there["floor_ms"]
        r["projected_ms"] = there["floor_ms"] + _overhead_ms_per_pass(r, new_tokens) * new_tokens * core_ratio
        r["projected_within_budget"] = r["projected_ms"] < budget_ms


# --- tables -----------------------------------------------------------------------------------------

def machine_line(m: Machine) -> str:
    return (f"{m.source}: read {m.cache_read_gbs:.0f} GB/s cache-resident (up to {m.cache_bytes / 2**20:.1f} MiB), "
            f"{m.dram_read_gbs:.1f} GB/s from DRAM; fp32 GEMM {m.gemm_gflops:.0f} GFLOP/s ({m.threads} threads)")


def floor_table(results: list[dict], profile, machine: Machine, peers: bool) -> str:
    lines = [f"Floor ({machine_line(machine)}). Floor = each forward pass at max(bytes read / bandwidth, "
             f"FLOPs / GEMM rate); model = floor + the per-pass overhead (fixed + per weight) fitted to the same "
             f"runtime and scheme on the other model sizes (out of sample).", "",
             "| artifact | weights MB/pass | KV KB/pos | MFLOP/token | floor ms | bound | ours ms | x floor | model ms (err) |"
             + (" peer tool | peer ms | ours/peer | verdict |" if peers else ""),
             "|---|---:|---:|---:|---:|---|---:|---:|---:|" + ("---|---:|---:|---|" if peers else "")]
    for r in results:
        if "error" in r or "floor_ms" not in r:
            why = r.get("error", r.get("floor_error", "?")).splitlines()[-1][:80]
            lines.append(f"| {r['name']} | | | | | | | | {why} |" + (" | | | |" if peers else ""))
            continue
        c = r["cost"]
        model = f"{r['predicted_ms']:.1f} ({r['prediction_error']:+.0%})" if "predicted_ms" in r else "n/a"
        line = (f"| {r['name']} | {c['weight_bytes'] / 1e6:.2f} | {c['kv_bytes_per_pos'] / 1e3:.1f} | "
                f"{c['flops_per_token'] / 1e6:.1f} | {r['floor_ms']:.2f} | {r['bound']} | {r['gen_ms_median']:.1f} | "
                f"{r['x_floor']:.1f} | {model} |")
        if peers:
            if "peer_ms_median" in r:
                verdict = "ok" if r["peer_ok"] else f"SLOWER than {profile.peer_ratio_limit:g}x"
                line += f" {r['peer']} | {r['peer_ms_median']:.1f} | {r['peer_ratio']:.2f} | {verdict} |"
            else:
                line += f" not run: {r.get('peer_error', '?')[:90]} | | | |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def projection_table(results: list[dict], profile, device: Machine) -> str:
    lines = [f"PROJECTION, NOT A MEASUREMENT: profile `{profile.name}` ({profile.hardware}), {device.threads} threads, "
             f"from {machine_line(device)}. Projected = the device's floor + the overhead measured here, scaled by "
             f"per-core GEMM rate. Budget {profile.budget_ms:g} ms for {profile.new_tokens} tokens after "
             f"{profile.prompt_tokens}.", "",
             "| artifact | target | measured here (ms) | device floor (ms) | projected (ms) | projected verdict |",
             "|---|---|---:|---:|---:|---|"]
    for r in results:
        if "projected_ms" not in r:
            why = r.get("error", r.get("floor_error", "?")).splitlines()[-1][:80]
            lines.append(f"| {r['name']} | {r.get('target') or '?'} | | | | {why} |")
            continue
        verdict = "projected within budget" if r["projected_within_budget"] else "PROJECTED OVER BUDGET"
        lines.append(f"| {r['name']} | {r['target']} | {r['gen_ms_median']:.1f} | {r['device_floor_ms']:.2f} | "
                     f"{r['projected_ms']:.1f} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    """Project a finished bench run (its bench.json) to device profiles, without timing anything again:

        python -m nima_edge.benchmarks.roofline BENCH_JSON --profile raspberry-pi-5 --profile android-phone
    """
    import argparse
    from nima_edge.benchmarks.harness import Profile, load_profile
    ap = argparse.ArgumentParser(description=main.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench_json", type=Path)
    ap.add_argument("--profile", action="append", default=[])
    a = ap.parse_args(argv)
    report = json.loads(a.bench_json.read_text())
    here = Machine(**report["machine"]["roofline"])
    measured = Profile(**report["profile"])
    for name in a.profile:
        prof = load_profile(name)
        device = profile_machine(prof.device, prof.threads)
        rows = [dict(r) for r in report["results"]]
        attach_projections(rows, here, device, measured.prompt_tokens, measured.new_tokens, prof.budget_ms)
        print(projection_table(rows, prof, device))


if __name__ == "__main__":
    main()
