"""`nima-edge import`: bring a published or fine-tuned Llama-family model in as an ordinary checkpoint.

Sources: a local Hugging Face LlamaForCausalLM directory (hf.py) or a llama-architecture .gguf file
(gguf.py). Both end in nima_edge.checkpoint.save, with where the model came from recorded in nima.json
("origin"), so every command (eval, generate, chat, quantize, export, verify, bench, serve) takes it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from nima_edge.errors import NimaError


def import_model(src: str | Path, out: str | Path, log: Callable[[str], None] = print) -> Path:
    src, out = Path(src), Path(out)
    if not src.exists():
        raise NimaError(f"{src} does not exist", "pass a Hugging Face model directory or a .gguf file")
    if out.resolve() == src.resolve():
        raise NimaError(f"--out {out} is the source itself", "write the checkpoint to a new directory")
    if src.is_file() and src.suffix == ".gguf":
        from nima_edge.importer.gguf import import_gguf
        return import_gguf(src, out, log)
    if src.is_dir():
        from nima_edge.importer.hf import import_hf
        return import_hf(src, out, log)
    raise NimaError(f"{src} is neither a directory nor a .gguf file",
                    "pass a Hugging Face model directory (config.json, *.safetensors, tokenizer.json) or a .gguf file")
