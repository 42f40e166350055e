"""nima-edge verify."""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from nima_edge.commands.options import AllowCustomOps


def register(app: typer.Typer) -> None:
    @app.command()
    def verify(
        artifact: Path = typer.Argument(..., help="exported artifact (its manifest names target and quant)"),
        reference: Path = typer.Option(None, help="checkpoint to compare with (default: the manifest's source)"),
        data: Path = typer.Option(None, help="prepared data directory for the perplexity check"),
        threads: int = typer.Option(None),
        json_out: Path = typer.Option(None, "--json", help="also write the report here"),
        allow_custom_ops: AllowCustomOps = False,
    ):
        """Compare an artifact with its PyTorch reference; exit 1 when a check fails."""
        from nima_edge.verify import verify_artifact
        with Console(stderr=True).status(f"verifying {artifact}"):
            report = verify_artifact(artifact, reference, data, threads, allow_custom_ops=allow_custom_ops)
        if json_out:
            json_out.write_text(json.dumps(report, indent=2) + "\n")
        print_report(artifact, report)
        raise typer.Exit(0 if report["passed"] else 1)


def print_report(artifact: Path, r: dict) -> None:
    t = Table(title=f"verify {artifact} ({r['target']}, {r['quant']}, vs {r['reference']} reference)")
    for col in ("check", "measured", "allowed", "result"):
        t.add_column(col)
    tol, ok = r["tolerance"], r["checks"]
    mark = lambda b: "[green]pass" if b else "[red]FAIL"
    t.add_row("token ids", f"{len(r['tokenizer']['mismatches'])} of {r['tokenizer']['strings']} differ", "0",
              mark(ok["tokenizer"]))
    t.add_row("logits max |diff|", f"{r['logits_max_abs']:.3g}", f"{tol['logits_max_abs']:.3g}", mark(ok["logits"]))
    t.add_row("greedy agreement (50)", f"{r['greedy_agreement']:.2f}", f">= {tol['greedy_agreement']:.2f}",
              mark(ok["greedy"]))
    p = r["perplexity"]
    t.add_row(f"KL divergence, mean / max ({p['scored']} tokens)", f"{r['kl_mean']:.2g} / {r['kl_max']:.2g}",
              f"{tol['kl_mean']:.2g} / {tol['kl_max']:.2g}", mark(ok["kl_divergence"]))
    t.add_row("top-1 agreement", f"{r['top1_agreement']:.3f}", f">= {tol['top1_agreement']:.3f}", mark(ok["top1"]))
    t.add_row("perplexity", f"{p['artifact']:.3f} vs {p['reference']:.3f} ({p['rel_delta']:.2%})",
              f"{tol['ppl_rel_delta']:.2%}", mark(ok["perplexity"]))
    Console().print(t)
