"""nima-edge export."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console


def register(app: typer.Typer) -> None:
    @app.command()
    def export(
        ckpt: Path = typer.Argument(..., help="checkpoint directory (optionally quantized with nima-edge quantize)"),
        target: str = typer.Option(..., help="gguf | onnx | onnx-portable | executorch | tensorrt"),
        quant: str = typer.Option("f32", help="quantization scheme; the valid names depend on the target"),
        out: Path = typer.Option(..., help="artifact path to write"),
    ):
        """Compile a checkpoint into a target's artifact and write its manifest."""
        from nima_edge.export import export as run_export
        with Console().status(f"exporting {ckpt} to {target} ({quant})"):
            path = run_export(ckpt, target, out, quant)
        Console().print(f"wrote {path}")
