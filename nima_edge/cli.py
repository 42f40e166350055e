"""The `nima-edge` command. Thin: each command module parses, calls the library, prints."""
from __future__ import annotations

import importlib
import sys

import typer
from rich.console import Console

from nima_edge.errors import NimaError

app = typer.Typer(help="Train, quantize, export, verify and benchmark small Llama-family language models.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console(stderr=True, soft_wrap=True)  # no hard wraps: error lines stay greppable

# Each module under nima_edge/commands registers its commands on `app` when imported.
COMMAND_MODULES = ["data", "model", "export", "quantize", "verify", "quickstart", "tune", "chat"]

for _name in COMMAND_MODULES:
    importlib.import_module(f"nima_edge.commands.{_name}").register(app)


def main() -> None:
    try:
        app()
    except NimaError as e:
        console.print(f"[bold red]error:[/] {e.problem}")
        if e.fix:
            console.print(f"[yellow]fix:[/] {e.fix}")
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
