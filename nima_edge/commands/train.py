"""nima-edge train."""
from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console

from nima_edge.commands.options import DEFAULT_DATA, Force, Qat, QatFraction


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        data: Path = typer.Option(None, help="prepared data directory (default data/shakespeare-char; on --resume, "
                                             "the run's own)"),
        out: Path = typer.Option(Path("runs/nima-1m"), help="run directory; it ends as the best checkpoint"),
        recipe: str = typer.Option(None, help="recipe TOML, or a bundled one by name (default: the preset's)"),
        resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
        preset: str = typer.Option(None, help="nima-0.5m | nima-1m | nima-5m | nima-10m (default nima-1m)"),
        steps: int = typer.Option(None, help="optimizer steps (max_steps)"),
        minutes: float = typer.Option(None, help="wall-clock budget; stops early when reached"),
        batch_size: int = typer.Option(None, help="global windows per optimizer step"),
        grad_accum: int = typer.Option(None, help="micro-batches per step and process"),
        context: int = typer.Option(None, help="training window length in tokens"),
        short_context: int = typer.Option(None, help="train shorter windows (same tokens per step) for the first "
                                                     "--short-fraction of the run; 0 = never"),
        short_fraction: float = typer.Option(None, help="part of the run (by the schedule's clock) on short windows"),
        lr: float = typer.Option(None, help="peak learning rate"),
        optimizer: str = typer.Option(None, help="adamw | lion"),
        dropout: float = typer.Option(None),
        precision: str = typer.Option(None, help="auto | fp32 | bf16 | fp16"),
        device: str = typer.Option(None, help="auto | cpu | cuda"),
        patience: int = typer.Option(None, help="early stopping after this many evaluations without improvement"),
        eval_every: int = typer.Option(None, help="steps between evaluations"),
        mlflow: bool = typer.Option(None, "--mlflow/--no-mlflow",
                                    help="also track to MLflow in OUT/mlflow.db (needs mlflow)"),
        qat: Qat = None,
        qat_fraction: QatFraction = None,
        threads: int = typer.Option(None, help="CPU threads per process (default: torch's choice)"),
        overwrite: bool = typer.Option(False, "--overwrite", help="start again over a previous run in --out"),
        force: Force = False,
    ):
        """Train a model from a preset and recipe on prepared data (torchrun: -m nima_edge.train).

        Ctrl-C or SIGTERM saves a resumable checkpoint before exiting; continue with --resume."""
        import torch

        from nima_edge.outputs import check_run_out
        if data is None and not resume:
            data = DEFAULT_DATA
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 decides
            check_run_out(out, data, resume, overwrite, force)
            if overwrite and not resume:
                from nima_edge.outputs import start_over
                start_over(out)
        from nima_edge.train.recipe import build_config
        from nima_edge.train.trainer import train as run_train
        if threads:
            torch.set_num_threads(threads)
        overrides = dict(preset=preset, max_steps=steps, max_seconds=minutes * 60 if minutes else None,
                         batch_size=batch_size, grad_accum=grad_accum, context=context,
                         short_context=short_context, short_fraction=short_fraction, lr=lr, optimizer=optimizer,
                         dropout=dropout, precision=precision, device=device, patience=patience,
                         eval_every=eval_every, mlflow=mlflow, qat=qat, qat_fraction=qat_fraction)
        given = {k: v for k, v in overrides.items() if v is not None}
        cfg = None if resume else build_config(recipe, given)
        summary = run_train(data, out, cfg, log=Console().print, resume=resume, overrides=given if resume else None)
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one report
            Console().print(f"saved {out} (best of {summary.get('steps')} steps, {summary.get('seconds')} s)")
