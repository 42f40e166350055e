"""Train the ~1M preset on tinyshakespeare for a fixed wall-clock budget and compare it with a
character-level nanoGPT-style baseline trained for the same time on the same machine and data.

    python benchmarks/train_shakespeare.py --minutes 5 [--recipe nima-1m] [--threads 1] [--json out.json]

Both models see the same prepared data (the char tokenizer: one token per byte; tinyshakespeare is
ASCII, so per byte = per character) and are scored the same way: mean cross-entropy over every
non-overlapping window of the validation split at their own training context, in bits per character.
Wall clock includes each model's periodic evaluations; the final full-split evaluation is outside it.
The machine's load average is recorded before and after, since other jobs change the figures.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console

from nima_edge import checkpoint
from nima_edge.data import TokenData, prepare
from nima_edge.evaluate import evaluate
from nima_edge.train import recipe
from nima_edge.train.trainer import train

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
console = Console()


# --- the baseline: nanoGPT's model (LayerNorm, GELU MLP, learned positions, tied head) -----------------
# Settings of nanoGPT's README CPU run of shakespeare_char: 4 layers, 4 heads, 128 wide, context 64,
# batch 12, no dropout, AdamW lr 1e-3 (betas 0.9/0.99, wd 0.1, clip 1.0), warmup 100, min lr 1e-4.
class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.heads = heads

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int, context: int = 64, d: int = 128, layers: int = 4, heads: int = 4):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def _pairs(tokens: np.ndarray, starts, context: int):
    rows = np.stack([tokens[s:s + context + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])


@torch.no_grad()
def baseline_val(model: NanoGPT, data: TokenData, context: int, max_windows: int | None = None) -> dict:
    tokens = data.tokens("val")
    starts = np.arange(0, len(tokens) - context - 1, context)
    if max_windows and len(starts) > max_windows:
        starts = starts[np.linspace(0, len(starts) - 1, max_windows).astype(int)]
    model.eval()
    total = 0.0
    for i in range(0, len(starts), 64):
        x, y = _pairs(tokens, starts[i:i + 64], context)
        total += model(x, y).item() * y.numel()
    model.train()
    loss = total / (len(starts) * context)
    return {"loss": loss, "bits_per_char": loss / math.log(2) / data.chars_per_token("val")}


def run_baseline(data: TokenData, seconds: float, context=64, batch=12, lr=1e-3, min_lr=1e-4, warmup=100) -> dict:
    torch.manual_seed(1337)
    model = NanoGPT(data.tokenizer.vocab_size, context)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.99))
    tokens, rng = data.tokens("train"), np.random.default_rng(1337)
    start, step, curve = time.monotonic(), 0, []
    while (elapsed := time.monotonic() - start) < seconds:
        # warmup, then cosine decay over the wall-clock budget (the same time-clock schedule ours uses)
        cur = lr * (step + 1) / warmup if step < warmup else \
            min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, elapsed / seconds)))
        for g in opt.param_groups:
            g["lr"] = cur
        x, y = _pairs(tokens, rng.integers(0, len(tokens) - context - 1, batch), context)
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 250 == 0:
            v = baseline_val(model, data, context, max_windows=64)
            curve.append((step, round(time.monotonic() - start, 1), round(v["loss"], 4)))
            console.print(f"  baseline step {step}: {curve[-1][1]} s, val loss {v['loss']:.4f}")
    train_s = time.monotonic() - start
    final = baseline_val(model, data, context)
    return {"model": "nanoGPT baseline (4x128, ctx 64, batch 12)",
            "parameters": sum(p.numel() for p in model.parameters()), "steps": step, "seconds": round(train_s, 1),
            "tokens_per_second": round(step * batch * context / train_s), "val_loss": round(final["loss"], 4),
            "val_bits_per_char": round(final["bits_per_char"], 4), "curve": curve}


def run_ours(data_dir: Path, out: Path, recipe_name: str, seconds: float) -> dict:
    cfg = recipe.build_config(recipe_name, {"max_seconds": seconds, "max_steps": 10 ** 9, "schedule_clock": "time"})
    summary = train(data_dir, out, cfg, log=lambda m: console.print(f"  {m}"))
    model, _ = checkpoint.load(out)
    final = evaluate(model, TokenData(data_dir), context=cfg.context)
    return {"model": f"{cfg.preset} ({recipe_name})", "parameters": model.num_parameters(), "steps": summary["steps"],
            "seconds": summary["seconds"], "tokens_per_second": summary["tokens_per_second"],
            "val_loss": round(final["loss"], 4), "val_bits_per_char": round(final["bits_per_char"], 4),
            "best_step": summary["best"]["step"], "recipe": cfg.to_dict()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--recipe", default="nima-1m", help="recipe file or bundled name")
    ap.add_argument("--corpus", type=Path, default=SHAKESPEARE)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--record", type=Path, help="write the recipe with these figures under [measured] to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seconds = args.minutes * 60
    results = {"budget_seconds": seconds, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
               "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="nima-bench-") as tmp:
        data_dir = Path(tmp) / "char"
        prepare(str(args.corpus), data_dir, "char")
        data = TokenData(data_dir)
        if not args.skip_baseline:
            console.print(f"[bold]baseline[/] for {seconds:.0f} s")
            results["baseline"] = run_baseline(data, seconds)
            results["load_after_baseline"] = os.getloadavg()
        if not args.skip_ours:
            console.print(f"[bold]{args.recipe}[/] for {seconds:.0f} s")
            results["ours"] = run_ours(data_dir, Path(tmp) / "run", args.recipe, seconds)
            results["load_after"] = os.getloadavg()
    for key in ("baseline", "ours"):
        if key in results:
            r = results[key]
            console.print(f"{r['model']:<42} {r['parameters']:>9,} params  {r['steps']:>6} steps  "
                          f"{r['tokens_per_second']:>7,} tok/s  val {r['val_loss']:.4f} nats/char  "
                          f"{r['val_bits_per_char']:.4f} bits/char")
    console.print(f"load average before {results['load_before']}, after {results.get('load_after')}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.record and "ours" in results:
        record(args.record, args.recipe, results)
    return 0


def record(path: Path, recipe_name: str, results: dict) -> None:
    """Write the recipe that was run, with what it reached under [measured]."""
    ours = results["ours"]
    load = [results[k][0] for k in ("load_before", "load_after_baseline", "load_after") if k in results]
    measured = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{results['cpus']} CPU cores shared with other jobs (1-minute load average "
                   f"{min(load):.1f}-{max(load):.1f}), {results['threads']} torch thread(s)",
        "benchmark": "python benchmarks/train_shakespeare.py (tinyshakespeare, char tokenizer, 90/10 split)",
        "budget_seconds": results["budget_seconds"], "steps": ours["steps"],
        "train_tokens_per_second": ours["tokens_per_second"],
        "val_loss_nats_per_char": ours["val_loss"], "val_bits_per_char": ours["val_bits_per_char"],
    }
    if "baseline" in results:
        b = results["baseline"]
        measured["baseline"] = {"model": b["model"], "steps": b["steps"],
                                "train_tokens_per_second": b["tokens_per_second"],
                                "val_loss_nats_per_char": b["val_loss"], "val_bits_per_char": b["val_bits_per_char"]}
    cfg = recipe.build_config(recipe_name, {})
    header = (f"{cfg.preset}: the settings that reached the best validation loss measured in a "
              f"{results['budget_seconds'] / 60:g}-minute CPU budget.\nFigures under [measured]; "
              f"val = every window of the validation split at the training context.")
    path.write_text(recipe.dumps(cfg, measured=measured, header=header))


if __name__ == "__main__":
    sys.exit(main())
