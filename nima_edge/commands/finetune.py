"""nima-edge finetune."""
from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console

from nima_edge.commands.options import Force, Qat, QatFraction


def register(app: typer.Typer) -> None:
    @app.command()
    def finetune(
        ckpt: Path = typer.Argument(None, help="checkpoint to fine-tune (any: trained, imported or fine-tuned)"),
        data: Path = typer.Option(None, help="chat .jsonl ({\"messages\": [...]} per line), a .txt file or folder, "
                                             "or a data directory prepared with the checkpoint's tokenizer"),
        out: Path = typer.Option(..., help="run directory: ends as the merged checkpoint, with OUT/adapter for LoRA"),
        recipe: str = typer.Option(None, help="fine-tune recipe TOML, or a bundled one by name (e.g. instruct)"),
        resume: bool = typer.Option(False, "--resume", help="continue the fine-tune in --out (CKPT and --data "
                                                             "come from the run)"),
        full: bool = typer.Option(None, "--full/--lora", help="train every weight instead of a LoRA adapter"),
        lora_rank: int = typer.Option(None, help="LoRA rank (default 8)"),
        lora_alpha: float = typer.Option(None, help="LoRA alpha; updates are scaled by alpha / rank (default 16)"),
        lora_dropout: float = typer.Option(None, help="dropout on the LoRA input (default 0.05)"),
        lora_targets: str = typer.Option(None, help="comma-separated linears (default all: q_proj,k_proj,v_proj,"
                                                    "o_proj,gate_proj,up_proj,down_proj)"),
        qat: Qat = None,
        qat_fraction: QatFraction = None,
        distill: bool = typer.Option(None, "--distill/--no-distill",
                                     help="with --qat or --train-quantized: learn the starting model's own "
                                          "distribution (KL) instead of the data's next tokens (default with "
                                          "--train-quantized)"),
        train_quantized: bool = typer.Option(None, "--train-quantized",
                                             help="CKPT carries a quantization result (nima-edge quantize): train it, "
                                                  "scales and codes; OUT is a quantized checkpoint"),
        fixed_codes: bool = typer.Option(None, "--fixed-codes", help="with --train-quantized: train the scales only"),
        val_fraction: float = typer.Option(None, help="chat data: conversations held out for validation (0.1)"),
        steps: int = typer.Option(None, help="optimizer steps (default 400)"),
        minutes: float = typer.Option(None, help="wall-clock budget; stops early when reached"),
        batch_size: int = typer.Option(None, help="global rows per optimizer step"),
        context: int = typer.Option(None, help="row / window length in tokens (default: the trained context)"),
        lr: float = typer.Option(None, help="peak learning rate (default 1e-3)"),
        patience: int = typer.Option(None, help="early stopping after this many evaluations without improvement"),
        eval_every: int = typer.Option(None, help="steps between evaluations"),
        seed: int = typer.Option(None, help="seed of the batches, the LoRA init and the validation split"),
        threads: int = typer.Option(None, help="CPU threads (default: torch's choice)"),
        overwrite: bool = typer.Option(False, "--overwrite", help="start again over a previous run in --out"),
        force: Force = False,
    ):
        """Fine-tune a checkpoint: LoRA or full, on text or chat data, optionally quantization-aware.

        Ctrl-C saves a resumable checkpoint; continue with --resume."""
        import torch

        from nima_edge.errors import NimaError
        from nima_edge.outputs import check_out, check_run_out
        from nima_edge.train import finetune as ft_lib

        if not resume and ckpt is None:
            raise NimaError("no checkpoint to fine-tune", "pass it first: nima-edge finetune CKPT --data DATA --out OUT")
        check_run_out(out, data, resume, overwrite, force)
        check_out(out, "run", [ckpt], force=force)  # never over the model being fine-tuned
        if threads:
            torch.set_num_threads(threads)
        loop = dict(max_steps=steps, max_seconds=minutes * 60 if minutes else None, batch_size=batch_size,
                    context=context, lr=lr, patience=patience, eval_every=eval_every, seed=seed, qat=qat,
                    qat_fraction=qat_fraction)
        loop = {k: v for k, v in loop.items() if v is not None}
        cfg = settings = None
        if not resume:
            doc, settings = ft_lib.load_recipe(recipe) if recipe else ({}, ft_lib.FinetuneConfig())
            given = dict(full=full, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         lora_targets=lora_targets.split(",") if lora_targets else None, val_fraction=val_fraction,
                         distill=distill, train_quantized=train_quantized, fixed_codes=fixed_codes)
            settings = ft_lib.FinetuneConfig(**{**settings.to_dict(), **{k: v for k, v in given.items()
                                                                           if v is not None}}).validate()
            from nima_edge.chat_data import is_chat_file
            cfg = ft_lib.build_config(ckpt, doc, loop, chat=data is not None and is_chat_file(data),
                                      train_quantized=settings.train_quantized)
        summary = ft_lib.finetune(ckpt, data, out, cfg, settings, resume=resume, overrides=loop if resume else None,
                                  log=Console().print)
        if os.environ.get("RANK", "0") != "0":  # under torchrun, one report
            return
        adapter = out / ft_lib.ADAPTER_DIR
        from nima_edge.quantization import QUANT_JSON
        what = "quantized checkpoint, trained result" if (out / QUANT_JSON).is_file() else "merged model"
        Console().print(f"saved {out} ({what}, best of {summary.get('steps')} steps)"
                        + (f" and the adapter in {adapter}" if adapter.is_dir() else ""))
