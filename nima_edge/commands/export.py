"""nima-edge export."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from nima_edge.commands.options import Force

from nima_edge import targets


def _targets_help() -> str:
    return "; ".join(f"{t.name}: {t.summary} ({', '.join(t.schemes)})" for t in targets.TARGETS.values()
                     if t.exporter)


def register(app: typer.Typer) -> None:
    @app.command(help="Compile a checkpoint into a target's artifact and write its manifest.\n\n"
                      "Targets and their --quant schemes: " + _targets_help())
    def export(
        ckpt: Path = typer.Argument(..., help="checkpoint directory (optionally quantized with nima-edge quantize)"),
        target: str = typer.Option(..., help=" | ".join(targets.names())),
        quant: str = typer.Option(None, help="quantization scheme (default: the target's float one)"),
        out: Path = typer.Option(..., help="artifact path to write"),
        lora: Path = typer.Option(None, help="gguf only: write this LoRA adapter (a fine-tune's OUT/adapter) as a "
                                             "llama.cpp adapter GGUF that loads beside CKPT's own GGUF"),
        context: int = typer.Option(None, help="onnx-portable, executorch: positions the artifact is built for "
                                               "(its KV cache; default: the model's context, capped at 2048)"),
        force: Force = False,
    ):
        from nima_edge.export import export as run_export
        from nima_edge.outputs import check_out
        check_out(out, "artifact", [ckpt], force=force)
        quant = quant or targets.get(target, "exporter").default_quant
        if lora is not None and target != "gguf":
            from nima_edge.errors import NimaError
            raise NimaError(f"--lora writes a llama.cpp adapter; {target} has no adapter format",
                            "use --target gguf, or export the fine-tune's merged checkpoint (its OUT) instead")
        options = {k: v for k, v in (("lora", lora), ("context", context)) if v is not None}
        if context is not None:
            import inspect
            if "context" not in inspect.signature(targets.get(target, "exporter").load("exporter")).parameters:
                from nima_edge.errors import NimaError
                raise NimaError(f"--context sizes a KV cache built into the artifact; {target} sizes it at run time",
                                "drop --context for this target")
        with Console().status(f"exporting {ckpt} to {target} ({quant})"):
            path = run_export(ckpt, target, out, quant, **options)
        Console().print(f"wrote {path}")
