"""nima-edge import: a Hugging Face LlamaForCausalLM directory or a llama .gguf file -> a nima-edge checkpoint."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from nima_edge.commands.options import Force


def register(app: typer.Typer) -> None:
    @app.command("import")
    def import_(
        src: Path = typer.Argument(..., help="a local Hugging Face model directory (config.json, *.safetensors, "
                                             "tokenizer.json) or a .gguf file"),
        out: Path = typer.Option(..., help="checkpoint directory to write"),
        force: Force = False,
    ):
        """Bring your own Llama-family model in (Hugging Face or GGUF): the result is a checkpoint every command takes."""
        from nima_edge.importer import import_model
        from nima_edge.outputs import check_out
        check_out(out, "checkpoint", [src], force=force)
        console = Console(stderr=True, highlight=False)
        path = import_model(src, out, log=lambda msg: console.print(msg, markup=False))
        Console(highlight=False).print(f"saved {path}")
