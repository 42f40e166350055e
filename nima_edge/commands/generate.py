"""nima-edge generate."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from nima_edge.commands.options import AllowCustomOps, Seed, Target, Temperature, Threads, TopK, TopP
from nima_edge.sampling import Sampling


def register(app: typer.Typer) -> None:
    @app.command()
    def generate(
        model: Path = typer.Argument(..., help="checkpoint directory or exported artifact"),
        prompt: str = typer.Option("", help="text to continue (BOS is prepended)"),
        max_new_tokens: int = typer.Option(50),
        temperature: Temperature = 0.0,
        top_k: TopK = 0,
        top_p: TopP = 1.0,
        seed: Seed = None,
        target: Target = None,
        threads: Threads = None,
        allow_custom_ops: AllowCustomOps = False,
    ):
        """Stream a continuation of the prompt through any runtime."""
        from nima_edge.runtimes import load_runtime
        rt = load_runtime(model, target, threads=threads, allow_custom_ops=allow_custom_ops)
        out = Console(highlight=False)
        out.print(prompt, end="")
        for piece in rt.generate(prompt, max_new_tokens, Sampling(temperature, top_k, top_p, seed)):
            out.print(piece, end="", markup=False)
        out.print()
        rt.close()
