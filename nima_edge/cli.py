"""The `nima-edge` command. Thin: each command module parses, calls the library, prints."""
from __future__ import annotations

import logging
import os
import sys
import warnings

import typer
from rich.console import Console

from nima_edge.commands import (bench, chat, data, evaluate, export, finetune, generate, import_model, quantize,
                                quickstart, serve, train, tune, verify)
from nima_edge import native_log
from nima_edge.errors import NimaError

app = typer.Typer(help="Train, quantize, export, verify and benchmark small Llama-family language models.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console(stderr=True, soft_wrap=True)  # no hard wraps: error lines stay greppable

# The verbs, in the order `--help` lists them: each module in nima_edge/commands is named after the
# verbs it holds and adds them to `app` in register().
VERBS = [data, train, finetune, import_model, evaluate, generate, quantize, export, verify, bench, chat, serve,
         quickstart, tune]
for _module in VERBS:
    _module.register(app)


@app.callback()
def _options(verbose: bool = typer.Option(False, "--verbose", "-v", help="show third-party warnings and logs")):
    if not verbose:
        quiet()


def quiet() -> None:
    """Silence third-party warnings and library logging: the user asked nima-edge, not torch, torchao,
    onnxruntime or llama.cpp, to speak (their errors still surface as exceptions)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # Libraries set their own loggers' levels when imported (torch, executorch), after this runs, so
    # levels would not hold: disable WARNING and below everywhere. nima-edge's own notes are printed.
    logging.disable(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("ORT_LOG_SEVERITY_LEVEL", "3")
    native_log.QUIET = True


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
