"""A bounded loopback load test of `nima-edge serve` (a benchmark, not a unit test).

For each artifact: start `nima-edge serve ARTIFACT --port 0` in its own process, run C concurrent
clients that each send R streamed chat requests one after another (fixed length: `ignore_eos`, seeded
sampling), and record per request the time to first token (from sending, so queueing counts) and the
total time. A 429 is the intended answer of a full queue: the client waits its Retry-After and sends
the same request again (counted, not an error). Anything else (another status, a stream error, a
missing [DONE], a wrong token count) is an error. Peak RSS is the server process's VmHWM.

    python -m nima_edge.benchmarks.serve_load ART1 ART2 ... --out benchmarks/reports/serve-load
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from nima_edge.errors import NimaError

MESSAGES = [{"role": "system", "content": "You are a player."},
            {"role": "user", "content": "Speak the first lines of the play, good sir."}]


def start_server(artifact: Path, queue_size: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "nima_edge", "serve", str(artifact), "--port", "0", "--queue-size", str(queue_size)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "serving on http://" in line:
            return proc, "http://" + line.split("http://", 1)[1].split("/", 1)[0]
    raise NimaError(f"the server for {artifact} did not start: {''.join(lines)[-500:]}", "run nima-edge serve by hand")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def one_request(client, url: str, body: dict, out: dict, deadline: float) -> None:
    """Send until answered (retrying 429s); fills out[ttft_s, total_s, retries_429] or out[error]."""
    out["retries_429"] = 0
    while True:
        if time.monotonic() > deadline:
            out["error"] = "deadline passed"
            return
        sent = time.perf_counter()
        ttft, pieces, done, usage = None, 0, False, None
        async with client.stream("POST", url, json=body) as r:
            if r.status_code == 429:
                out["retries_429"] += 1
                await r.aread()
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                continue
            if r.status_code != 200:
                out["error"] = f"status {r.status_code}: {(await r.aread())[:200]!r}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    out["error"] = chunk["error"]["message"]
                    return
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    pieces += 1
                    if ttft is None:
                        ttft = time.perf_counter() - sent
                if chunk.get("usage"):
                    usage = chunk["usage"]
        total = time.perf_counter() - sent
        if not done or usage is None or usage["completion_tokens"] != body["max_tokens"] or ttft is None:
            out["error"] = f"incomplete stream (done={done}, usage={usage}, pieces={pieces})"
            return
        out.update(ttft_s=ttft, total_s=total, tokens=usage["completion_tokens"])
        return


async def load(base: str, clients: int, requests: int, max_tokens: int, timeout_s: float) -> tuple[list[dict], float]:
    import httpx
    url = f"{base}/v1/chat/completions"
    deadline = time.monotonic() + timeout_s
    results: list[dict] = []

    async def client_loop(c: int, http) -> None:
        for i in range(requests):
            body = {"messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0.8, "top_k": 40,
                    "seed": c * 1000 + i, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            out = {"client": c, "request": i}
            try:
                await one_request(http, url, body, out, deadline)
            except httpx.HTTPError as e:
                out["error"] = f"{type(e).__name__}: {e}"
            results.append(out)

    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(c, http) for c in range(clients)))
        return results, time.perf_counter() - t0


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def run_one(artifact: Path, args) -> dict:
    loadavg = [round(x, 2) for x in os.getloadavg()]  # the machine may be shared: say how busy it was
    proc, base = start_server(artifact, args.queue_size, args.threads)
    try:
        results, wall = asyncio.run(load(base, args.clients, args.requests, args.max_tokens, args.timeout))
        rss = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ok = [r for r in results if "error" not in r]
    errors = [r for r in results if "error" in r]
    ttft = [r["ttft_s"] * 1e3 for r in ok]
    total = [r["total_s"] * 1e3 for r in ok]
    manifest = (artifact.with_name(artifact.name + ".manifest.json") if artifact.is_file()
                else artifact / "manifest.json")
    meta = json.loads(manifest.read_text()) if manifest.is_file() else {}
    return {"artifact": artifact.name, "target": meta.get("target"), "quant": meta.get("quant"),
            "requests": len(results), "ok": len(ok), "errors": len(errors),
            "error_samples": sorted({r["error"] for r in errors})[:5],
            "retries_429": sum(r.get("retries_429", 0) for r in results),
            "ttft_ms_p50": pct(ttft, 0.5), "ttft_ms_p99": pct(ttft, 0.99),
            "total_ms_p50": pct(total, 0.5), "total_ms_p99": pct(total, 0.99),
            "wall_s": wall, "tokens_per_s": sum(r["tokens"] for r in ok) / wall if wall else None,
            "peak_rss_mb": rss, "loadavg_before": loadavg}


def markdown(report: dict) -> str:
    s = report["setup"]
    lines = [f"# nima-edge serve load test ({s['clients']} clients x {s['requests']} streamed requests, "
             f"{s['max_tokens']} tokens each, queue {s['queue_size']})", "",
             f"Machine: {s['machine']}, {s['cpus']} CPUs. Loopback; the clients run on the same CPUs as the server.",
             "", "| artifact | target | quant | ok | errors | 429 retries | TTFT p50 ms | TTFT p99 ms | total p50 ms "
             "| total p99 ms | tokens/s | peak RSS MB | load avg (1 min) before |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    f = lambda v, d=0: "-" if v is None else f"{v:.{d}f}"
    for r in report["results"]:
        lines.append(f"| {r['artifact']} | {r['target']} | {r['quant']} | {r['ok']}/{r['requests']} | {r['errors']} "
                     f"| {r['retries_429']} | {f(r['ttft_ms_p50'])} | {f(r['ttft_ms_p99'])} | {f(r['total_ms_p50'])} "
                     f"| {f(r['total_ms_p99'])} | {f(r['tokens_per_s'])} | {f(r['peak_rss_mb'])} "
                     f"| {r['loadavg_before'][0]:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", nargs="+", type=Path)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=8, help="streamed requests per client, one after another")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--queue-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="bound on one artifact's whole run, seconds")
    p.add_argument("--out", type=Path, default=None, help="folder for serve_load.json and serve_load.md")
    args = p.parse_args(argv)
    setup = {"clients": args.clients, "requests": args.requests, "max_tokens": args.max_tokens,
             "queue_size": args.queue_size, "threads": args.threads, "machine": platform.processor() or
             platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    results = []
    for artifact in args.artifacts:
        r = run_one(artifact, args)
        print(f"{r['artifact']}: {r['ok']}/{r['requests']} ok, {r['errors']} errors, {r['retries_429']} 429 retries, "
              f"TTFT p50/p99 {r['ttft_ms_p50']}/{r['ttft_ms_p99']} ms, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        results.append(r)
    report = {"setup": setup, "results": results}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "serve_load.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "serve_load.md").write_text(markdown(report))
    return 0 if all(r["errors"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
