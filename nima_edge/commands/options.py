"""Options several verbs share, declared once (each verb picks its own defaults)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from nima_edge import targets

DEFAULT_DATA = Path("data/shakespeare-char")  # where `data prepare` writes by default, and the others read

Temperature = Annotated[float, typer.Option(help="sampling temperature; 0 = greedy")]
TopK = Annotated[int, typer.Option(help="sample among the k most likely tokens; 0 = all")]
TopP = Annotated[float, typer.Option(help="nucleus sampling: the smallest set with this probability mass")]
Seed = Annotated[Optional[int], typer.Option(help="random seed, for repeatable sampling")]
Threads = Annotated[Optional[int], typer.Option(help="CPU threads (default: the runtime's choice)")]
Target = Annotated[Optional[str], typer.Option(
    help="runtime to use (default: from the artifact's manifest or file type): "
         + " | ".join(targets.names("runtime")))]
AllowCustomOps = Annotated[bool, typer.Option(
    "--allow-custom-ops", help="let the artifact load native libraries its config names (ONNX GenAI "
                               "custom_ops_library); only for libraries you built or trust")]
Force = Annotated[bool, typer.Option("--force", help="replace an existing --out even though nima-edge did not write it")]
# Quantization-aware training, for train and finetune alike (the loop's qat / qat_fraction settings)
Qat = Annotated[Optional[str], typer.Option(
    help="quantization-aware training for the last part of the run: int4-g32 | int4-g128 | 8da4w ...; "
         "then nima-edge quantize --method qat")]
QatFraction = Annotated[Optional[float], typer.Option(help="the last part of the run trained with QAT (default 0.5)")]
