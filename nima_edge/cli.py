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
        # messages are plain text: markup=False keeps "[tensorrt]"-style brackets from being eaten
        console.print("[bold red]error:[/] ", end="")
        console.print(e.problem, markup=False)
        if e.fix:
            console.print("[yellow]fix:[/] ", end="")
            console.print(e.fix, markup=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
