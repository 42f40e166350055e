"""nima-edge train / eval / generate: the PyTorch side."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from nima_edge.sampling import Sampling


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        data: Path = typer.Option(Path("data/shakespeare-char"), help="prepared data directory"),
        out: Path = typer.Option(Path("runs/nima-1m"), help="checkpoint directory to write"),
        preset: str = typer.Option("nima-1m", help="nima-0.5m | nima-1m | nima-5m | nima-10m"),
        steps: int = typer.Option(2000, help="optimizer steps"),
        minutes: float = typer.Option(None, help="wall-clock budget; stops early when reached"),
        batch_size: int = typer.Option(16),
        context: int = typer.Option(128, help="training window length in tokens"),
        lr: float = typer.Option(3e-3),
    ):
        """Train a model from a preset on prepared data."""
        from nima_edge.train.trainer import TrainConfig, train as run_train
        cfg = TrainConfig(preset=preset, max_steps=steps, batch_size=batch_size, context=context, lr=lr,
                          max_seconds=minutes * 60 if minutes else None)
        summary = run_train(data, out, cfg, log=Console().print)
        Console().print(f"saved {out} after {summary['steps']} steps ({summary['seconds']} s)")

    @app.command("eval")
    def eval_(ckpt: Path = typer.Argument(..., help="checkpoint directory"),
              data: Path = typer.Option(Path("data/shakespeare-char"), help="prepared data directory"),
              split: str = typer.Option("val")):
        """Print validation loss, perplexity and bits per character."""
        from nima_edge.data import TokenData
        from nima_edge.evaluate import evaluate
        from nima_edge.export.quantize import load_model
        model, _, quant = load_model(ckpt)  # a quantized checkpoint is evaluated as its fake-quant model
        r = evaluate(model, TokenData(data), split)
        if quant:
            Console().print(f"fake-quant model ({quant})")
        Console().print(f"{split} loss {r['loss']:.4f}  perplexity {r['perplexity']:.3f}  "
                        f"bits/char {r['bits_per_char']:.4f}  ({r['tokens']:,} tokens)")

    @app.command()
    def generate(
        model: Path = typer.Argument(..., help="checkpoint directory or exported artifact"),
        prompt: str = typer.Option("", help="text to continue (BOS is prepended)"),
        max_new_tokens: int = typer.Option(50),
        temperature: float = typer.Option(0.0, help="0 = greedy"),
        top_k: int = typer.Option(0),
        top_p: float = typer.Option(1.0),
        seed: int = typer.Option(None),
        target: str = typer.Option(None, help="runtime to use (default: from the artifact)"),
        threads: int = typer.Option(None),
    ):
        """Stream a continuation of the prompt through any runtime."""
        from nima_edge.runtimes import load_runtime
        rt = load_runtime(model, target, threads=threads)
        out = Console(highlight=False)
        out.print(prompt, end="")
        for piece in rt.generate(prompt, max_new_tokens, Sampling(temperature, top_k, top_p, seed)):
            out.print(piece, end="", markup=False)
        out.print()
        rt.close()
