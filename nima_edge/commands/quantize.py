"""nima-edge quantize: GPTQ or round-to-nearest, once, into a checkpoint every exporter packs from."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from nima_edge.commands.options import DEFAULT_DATA, Force


def register(app: typer.Typer) -> None:
    @app.command()
    def quantize(
        ckpt: Path = typer.Argument(..., help="float checkpoint directory"),
        out: Path = typer.Option(..., help="checkpoint directory to write (float weights + quantization result)"),
        bits: int = typer.Option(4, help="4 or 8"),
        group: int = typer.Option(32, help="group size along the input dimension: 32, 64 or 128"),
        method: str = typer.Option("gptq", help="gptq | rtn | qat (the codes a --qat fine-tune trained, in its "
                                                "own scheme: --bits/--group do not apply)"),
        data: Path = typer.Option(DEFAULT_DATA, help="prepared data for GPTQ calibration"),
        asymmetric: bool = typer.Option(False, "--asymmetric", help="per-group zero points (not for gguf)"),
        samples: int = typer.Option(64, help="calibration windows drawn from the train split"),
        calib_length: int = typer.Option(256, help="tokens per calibration window (capped at the training context)"),
        damp: float = typer.Option(0.01, help="GPTQ damping, as a fraction of the mean Hessian diagonal"),
        act_order: bool = typer.Option(False, "--act-order", help="GPTQ: visit columns by decreasing Hessian"),
        seed: int = typer.Option(0, help="which calibration windows are drawn"),
        force: Force = False,
    ):
        """Quantize the decoder linears once (embeddings and lm_head stay float)."""
        if method == "qat":
            from nima_edge.outputs import check_out
            from nima_edge.quantization import describe, load_quant
            from nima_edge.train.qat import quantize_checkpoint as quantize_qat
            check_out(out, "checkpoint", [ckpt], force=force)
            path = quantize_qat(ckpt, out)
            result = load_quant(path)
            Console().print(f"wrote {path}: {len(result)} linear layers, {describe(result)} (the trained codes)")
            return
        from nima_edge.export.quantize import quantize_checkpoint
        from nima_edge.outputs import check_out
        check_out(out, "checkpoint", [ckpt, data if method == "gptq" else None], force=force)
        from nima_edge.quantization import describe, load_quant
        path = quantize_checkpoint(ckpt, out, bits, group, method, data if method == "gptq" else None,
                                   symmetric=not asymmetric, samples=samples, length=calib_length, damp=damp,
                                   act_order=act_order, seed=seed)
        result = load_quant(path)
        Console().print(f"wrote {path}: {len(result)} linear layers, {describe(result)}")
