"""nima-edge eval."""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from nima_edge.commands.options import AllowCustomOps, DEFAULT_DATA, Target, Threads


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_(model: Path = typer.Argument(..., help="checkpoint directory or exported artifact"),
              data: Path = typer.Option(DEFAULT_DATA, help="prepared data directory"),
              split: str = typer.Option("val"),
              windows: int = typer.Option(None, help="score this many evenly spaced windows of the split "
                                                     "(default: all for a checkpoint, 16 for an artifact)"),
              lines: int = typer.Option(100, help="lines completed greedily for BLEU and chrF (0: none)"),
              target: Target = None, threads: Threads = None,
              json_out: Path = typer.Option(None, "--json", help="also write the figures here"),
              allow_custom_ops: AllowCustomOps = False):
        """Print loss, perplexity, bits per character, and BLEU / chrF of greedy line completions."""
        from nima_edge.evaluate import evaluate_path
        with Console(stderr=True).status(f"evaluating {model}"):
            r = evaluate_path(model, data, split, windows, lines, target, threads, allow_custom_ops=allow_custom_ops)
        out = Console(highlight=False)
        if r.get("quant"):
            out.print(f"fake-quant model ({r['quant']})", markup=False)
        out.print(f"{split} loss {r['loss']:.4f}  perplexity {r['perplexity']:.3f}  bits/char "
                  f"{r['bits_per_char']:.4f}  ({r['tokens']:,} tokens in windows of {r['context']}, {r['target']})",
                  markup=False)
        if "completion" in r:
            c = r["completion"]
            out.print(f"greedy completion of {c['lines']} lines: BLEU {c['bleu']:.2f}  chrF {c['chrf']:.2f}",
                      markup=False)
        if json_out:
            json_out.write_text(json.dumps(r, indent=2) + "\n")
