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
        force: Force = False,
    ):
        """Time each artifact against the profile's budget; exit 1 on a miss or regression."""
        from nima_edge.benchmarks.harness import load_profile, run_bench
        from nima_edge.outputs import check_out
        check_out(out, "bench", artifacts, force=force)
        prof = load_profile(profile)
        console = Console()
        report = run_bench(artifacts, prof, out, baseline,
                           progress=lambda r: console.print(f"  {r['name']}: " + (
                               f"{r['gen_ms_median']:.1f} ms" if "error" not in r else f"[red]{r['error'][-200:]}")))
        print((out / "bench.md").read_text())  # plain: a Markdown table must not be re-wrapped
        console.print(f"wrote {out}/bench.json, bench.md, bench.png")
        raise typer.Exit(0 if report["passed"] else 1)
