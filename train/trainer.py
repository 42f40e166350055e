"""Training loop: AdamW, warmup + cosine learning rate, periodic evaluation, atomic checkpoints."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from nima_edge import checkpoint
from nima_edge.config import preset
from nima_edge.data import TokenData
from nima_edge.evaluate import evaluate, windows
from nima_edge.model import NimaForCausalLM


@dataclass
class TrainConfig:
    preset: str = "nima-1m"
    context: int = 128
    batch_size: int = 16
    max_steps: int = 2000
    max_seconds: float | None = None  # wall-clock budget; stops at whichever limit comes first
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dropout: float = 0.0
    eval_every: int = 250
    eval_windows: int = 64
    seed: int = 1337


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def train(data_dir: str | Path, out_dir: str | Path, cfg: TrainConfig, log=print) -> dict:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    data = TokenData(data_dir)
    tok = data.tokenizer
    model_cfg = preset(cfg.preset, vocab_size=tok.vocab_size, dropout=cfg.dropout)
    model = NimaForCausalLM(model_cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    train_tokens = data.tokens("train")
    log(f"{cfg.preset}: {model.num_parameters():,} parameters, {len(train_tokens):,} training tokens")
    start, last_eval = time.monotonic(), {}
    with Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total} {task.fields[info]}"),
                  TimeRemainingColumn()) as progress:
        task = progress.add_task("train", total=cfg.max_steps, info="")
        for step in range(cfg.max_steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            x, y = windows(train_tokens, tok.bos_id, cfg.context,
                           rng.integers(0, len(train_tokens) - cfg.context, cfg.batch_size))
            _, loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            out_of_time = cfg.max_seconds is not None and time.monotonic() - start > cfg.max_seconds
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps or out_of_time:
                last_eval = evaluate(model, data, context=cfg.context, max_windows=cfg.eval_windows)
                log(f"step {step + 1}: train loss {loss.item():.4f}, val loss {last_eval['loss']:.4f}, "
                    f"val bpc {last_eval['bits_per_char']:.3f}")
            progress.update(task, advance=1, info=f"loss {loss.item():.3f}")
            if out_of_time:
                break
    summary = {"preset": cfg.preset, "steps": step + 1, "seconds": round(time.monotonic() - start, 1),
               "val": last_eval, "train_config": cfg.__dict__}
    checkpoint.save(out_dir, model, tok, meta={"preset": cfg.preset, "training": summary})
    return summary
