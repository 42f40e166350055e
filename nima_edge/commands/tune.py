"""nima-edge tune: Optuna search over learning rate, tokens per step, schedule and (optionally) the preset's
shape on a wall-clock budget; writes the best recipe."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from nima_edge.commands.options import DEFAULT_DATA, Force
from nima_edge.errors import NimaError


def register(app: typer.Typer) -> None:
    @app.command()
    def tune(
        data: Path = typer.Option(DEFAULT_DATA, help="prepared data directory"),
        out: Path = typer.Option(Path("runs/tuned.toml"), help="recipe TOML to write"),
        recipe: str = typer.Option(None, help="base recipe (default: the preset's bundled one)"),
        preset: str = typer.Option(None, help="nima-0.5m | nima-1m | nima-5m | nima-10m"),
        presets: str = typer.Option(None, help="search the shape too, among these comma-separated presets "
                                               "(e.g. nima-1m,nima-5m); each trains at its declared context"),
        minutes: float = typer.Option(10.0, help="wall-clock budget of the whole search"),
        trial_minutes: float = typer.Option(1.0, help="training time of each trial"),
        seed: int = typer.Option(0, help="sampler seed"),
        jobs: int = typer.Option(1, help="trials at once, each in its own process (e.g. one per core with "
                                         "--threads 1: an hour-long search slice per core)"),
        threads: int = typer.Option(None, help="CPU threads per trial (default: torch's choice; with --jobs, "
                                               "the cores shared out)"),
        force: Force = False,
    ):
        """Search hyper-parameters with pruning on a wall-clock budget; write the best recipe, and keep the
        best trial's trained model beside it (--out runs/tuned.toml: the model in runs/tuned).

        The first trial is the base recipe itself, so the search ends no worse than where it started."""
        from nima_edge.outputs import check_out
        from nima_edge.train.tune import model_dir_for, tune_record
        check_out(out, "recipe", [data], force=force)
        model_dir = model_dir_for(out)
        if model_dir.exists() and tune_record(model_dir) is None and not force:
            raise NimaError(f"{model_dir}, where tune keeps the best trial's model for --out {out}, holds something "
                            "tune did not write", "choose another --out, or pass --force to replace it")
        check_out(model_dir, "run", [data], force=force)
        from nima_edge.train.recipe import build_config
        from nima_edge.train.tune import tune as run_tune
        base = build_config(recipe, {"preset": preset} if preset else {})
        figures = run_tune(data, out, base, minutes * 60, trial_minutes * 60, seed=seed, log=Console().print,
                           presets=tuple(p.strip() for p in presets.split(",") if p.strip()) if presets else (),
                           jobs=jobs, threads=threads)
        Console().print(f"wrote {out} ({figures['trials']} trials) and the best trial's model {model_dir}: "
                        f"{figures['val_bits_per_char']} bits/char on the validation split")
