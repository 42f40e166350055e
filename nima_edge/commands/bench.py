"""nima-edge bench."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from nima_edge.commands.options import Force


def register(app: typer.Typer) -> None:
    @app.command()
    def bench(
        artifacts: list[Path] = typer.Argument(..., help="artifacts to time"),
        profile: str = typer.Option("desktop-cpu", help="profile name in benchmarks/profiles or a TOML path"),
        out: Path = typer.Option(Path("artifacts/bench"), help="folder for bench.json, bench.md, bench.png"),
        baseline: Path = typer.Option(None, help="earlier bench.json to flag regressions against"),
        compare_peers: bool = typer.Option(False, "--compare-peers", help="time each runtime's own tool on the same "
                                           "artifact (llama-bench, ORT GenAI's loop, ExecuTorch's runner) and fail "
                                           "when ours is more than the profile's peer_ratio_limit slower"),
        force: Force = False,
    ):
        """Time each artifact against the profile's budget and its floor; exit 1 on a miss or regression.
        A device profile on another machine (raspberry-pi-5 on x86) prints projections, labelled as such."""
        from nima_edge.benchmarks.harness import load_profile, run_bench
        from nima_edge.outputs import check_out
        check_out(out, "bench", artifacts, force=force)
        prof = load_profile(profile)
        console = Console()
        if prof.projects_here():
            console.print(f"[yellow]{prof.name} is not this machine: timings here are projected to it, not measured")
        report = run_bench(artifacts, prof, out, baseline, compare_peers=compare_peers,
                           progress=lambda r: console.print(f"  {r['name']}: " + (
                               f"{r['gen_ms_median']:.1f} ms" if "error" not in r else f"[red]{r['error'][-200:]}")
                               + (f", {r['peer']} {r['peer_ms_median']:.1f} ms" if "peer_ms_median" in r else "")
                               + (f", peer not run: {r['peer_error'][:120]}" if "peer_error" in r else "")))
        print((out / "bench.md").read_text())  # plain: a Markdown table must not be re-wrapped
        console.print(f"wrote {out}/bench.json, bench.md, bench.png")
        raise typer.Exit(0 if report["passed"] else 1)
