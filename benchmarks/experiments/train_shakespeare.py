"""Train a nima preset on tinyshakespeare for a fixed wall-clock budget beside two baselines trained
for the same time on the same machine and text:

- nanoGPT: the real code (vendored unmodified in benchmarks/experiments/nanogpt at a pinned commit),
  its README's CPU shakespeare_char recipe (4 layers x 128, 4 heads, context 64, batch 12, lr 1e-3,
  no dropout) run as `python train.py config/train_shakespeare_char.py --device=cpu ...`, with
  max_iters stretched to fill the budget (its speed is measured by a short probe run first; with
  --parallel the probe runs beside a training run of ours on the other cores, since a busy sibling core
  slows it by about a quarter on a 2-vCPU VM and a probe on a quiet machine overran 600 s by 18%);
- GPT-2-style: nanoGPT's model class (LayerNorm, learned positions, GELU MLP, full multi-head
  attention, biases) at the nima preset's width and heads, with the layer count that brings its
  parameters closest to the preset's, trained by the same loop settings as the nima recipe (context,
  batch, optimizer, warmup and time-clock cosine).

    python benchmarks/experiments/train_shakespeare.py --minutes 5 [--recipe nima-1m] [--threads 1] \
        [--parallel] [--json out.json] [--record recipe.toml] [--keep runs/ours]

All three see the same 90/10 split (nima-edge's: the cut falls at the line start before 90% of the
cleaned text; nanoGPT's bins are written from that same train and validation text with its own
65-character vocabulary) and are scored the same way: mean cross-entropy over every non-overlapping
window of the validation text at their own training context, in bits per character (one token is
one character for both vocabularies). Wall clock includes periodic evaluations; the final scoring is
outside it. --parallel runs the three side by side (one process each) instead of one after another.
The machine's load average is recorded, since other jobs change the figures.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from nima_edge import checkpoint
from nima_edge.data import TokenData, prepare
from nima_edge.evaluate import completion_scores, evaluate, window_starts, windows
from nima_edge.runtimes.torch_reference import TorchRuntime
from nima_edge.train import recipe
from nima_edge.train.schedules import lr_at
from nima_edge.train.trainer import batch_starts, train

NANOGPT = Path(__file__).resolve().parent / "nanogpt"
NANOGPT_FILES = ("model.py", "train.py", "configurator.py", "config/train_shakespeare_char.py", "LICENSE")
# nanoGPT README's CPU run of shakespeare_char (max_iters / lr_decay_iters are set from the budget)
NANOGPT_CPU_ARGS = ["--device=cpu", "--compile=False", "--dtype=float32", "--eval_iters=20", "--log_interval=1",
                    "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
                    "--dropout=0.0"]
console = Console()


def nanogpt_module():
    """nanoGPT's model.py (GPT, GPTConfig), imported from the vendored copy."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", NANOGPT / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- the real nanoGPT ----------------------------------------------------------------------------

def nanogpt_workdir(work: Path, data: TokenData) -> tuple[Path, dict]:
    """nanoGPT's files plus data/shakespeare_char/{train,val}.bin and meta.pkl from our split."""
    for name in NANOGPT_FILES:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(NANOGPT / name, work / name)
    text = {split: data.tokenizer.decode(data.tokens(split).tolist()) for split in ("train", "val")}
    chars = sorted(set(text["train"] + text["val"]))
    stoi = {c: i for i, c in enumerate(chars)}
    out = work / "data" / "shakespeare_char"
    out.mkdir(parents=True, exist_ok=True)
    for split, t in text.items():
        np.array([stoi[c] for c in t], dtype=np.uint16).tofile(out / f"{split}.bin")
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
    (out / "meta.pkl").write_bytes(pickle.dumps(meta))
    return work, meta


def _nanogpt(work: Path, iters: int, eval_interval: int, threads: int) -> tuple[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "train.py", "config/train_shakespeare_char.py", *NANOGPT_CPU_ARGS,
                          f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--eval_interval={eval_interval}",
                          "--out_dir=out"], cwd=work, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"nanoGPT failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out.stdout, time.monotonic() - t0


def nanogpt_iterations(seconds: float, per_iter: float) -> tuple[int, int]:
    """(max_iters, eval_interval) that fill `seconds` at `per_iter` seconds per iteration. Every 250
    iterations nanoGPT evaluates 2 x 20 batches (about 13 iterations' worth of forwards), and it saves
    ckpt.pt only at evaluations, so the last one must fall on max_iters: an interval near the config's
    250 that divides the run (flooring to a multiple of 250 cut up to 11% of the budget: 2,130 -> 2,000
    iterations at 5 minutes)."""
    iters = max(20, int(seconds / per_iter / (1 + 13 / 250)))
    evals = max(1, round(iters / 250))
    return iters // evals * evals, iters // evals


def _median_iteration(log: str) -> float:
    """Median seconds per iteration in a nanoGPT log (its own per-iteration timer, first 5 skipped)."""
    ms = [float(t) for it, t in re.findall(r"^iter (\d+): .*time ([\d.]+)ms", log, re.M) if int(it) >= 5]
    return float(np.median(ms)) / 1000


def nanogpt_probe(work: Path, threads: int) -> float:
    """Seconds per nanoGPT iteration: the median of a 90-iteration run (one evaluation, at iter 0;
    under the config's 100 warm-up iterations, where its schedule divides by lr_decay_iters - warmup_iters)."""
    return _median_iteration(_nanogpt(work, 90, 10 ** 6, threads)[0])


def run_nanogpt(data: TokenData, seconds: float, threads: int, per_iter: float | None = None) -> dict:
    """The real nanoGPT for `seconds`; `per_iter` (seconds per iteration) from a probe made under the
    same load as this run, or probed here, alone, when not given."""
    with tempfile.TemporaryDirectory(prefix="nanogpt-") as tmp:
        work, meta = nanogpt_workdir(Path(tmp), data)
        probed_here = per_iter is None
        per_iter = nanogpt_probe(work, threads) if probed_here else per_iter
        iters, every = nanogpt_iterations(seconds, per_iter)
        console.print(f"  nanoGPT: {per_iter * 1000:.1f} ms/iteration in the probe"
                      f"{'' if probed_here else ' beside the other models'} -> max_iters {iters}")
        log, wall = _nanogpt(work, iters, every, threads)
        if abs(wall - seconds) > 0.05 * seconds:  # the budget comparison is only fair if nanoGPT used it
            console.print(f"[yellow]  nanoGPT ran {wall:.0f} s of a {seconds:.0f} s budget: its speed changed "
                          f"after the probe; compare with care")
        ckpt = torch.load(work / "out" / "ckpt.pt", map_location="cpu", weights_only=False)
        nano = nanogpt_module()
        model = nano.GPT(nano.GPTConfig(**ckpt["model_args"]))
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
        text = data.tokenizer.decode(data.tokens("val").tolist())
        val = np.array([meta["stoi"][c] for c in text], dtype=np.int64)
        loss = _gpt_val_loss(model, val, ckpt["model_args"]["block_size"])
    evals = re.findall(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)", log, re.M)
    return {"model": "nanoGPT (real code, README CPU shakespeare_char recipe: 4x128, ctx 64, batch 12)",
            "parameters": sum(p.numel() for p in model.parameters()), "steps": iters, "seconds": round(wall, 1),
            "probe_ms_per_iteration": round(per_iter * 1000, 1),
            "run_ms_per_iteration": round(_median_iteration(log) * 1000, 1),
            "tokens_per_second": round(iters * 12 * 64 / wall), "best_step": ckpt["iter_num"],
            "val_loss": round(loss, 4), "val_bits_per_char": round(loss / math.log(2), 4),
            "curve": [(int(s), float(v)) for s, _, v in evals]}


@torch.no_grad()
def _gpt_val_loss(model, val: np.ndarray, block: int) -> float:
    """nanoGPT's model on every non-overlapping window of `val` (its own ids): x = ids[s:s+block],
    y = ids[s+1:s+block+1]."""
    model.eval()
    starts = np.arange(0, len(val) - block - 1, block)
    total = 0.0
    for i in range(0, len(starts), 64):
        rows = np.stack([val[s:s + block + 1] for s in starts[i:i + 64]])
        x, y = (torch.from_numpy(np.ascontiguousarray(a)) for a in (rows[:, :-1], rows[:, 1:]))
        _, loss = model(x, y)
        total += loss.item() * rows[:, 1:].size
    return total / (len(starts) * block)


# --- the GPT-2-style baseline at the preset's size -------------------------------------------------

def gpt2_style(cfg: recipe.TrainConfig, vocab: int, target_params: int):
    """nanoGPT's GPT at the preset's width and heads, the layer count closest in parameters."""
    from nima_edge.config import PRESETS
    nano = nanogpt_module()
    p = PRESETS[cfg.preset]
    best = None
    for layers in range(1, 13):
        torch.manual_seed(cfg.seed)
        with contextlib.redirect_stdout(io.StringIO()):  # nanoGPT prints every model's size
            m = nano.GPT(nano.GPTConfig(block_size=cfg.context, vocab_size=vocab, n_layer=layers,
                                        n_head=p["num_attention_heads"], n_embd=p["hidden_size"], dropout=0.0,
                                        bias=True))
        n = sum(q.numel() for q in m.parameters())
        if best is None or abs(n - target_params) < abs(best[1] - target_params):
            best = (m, n, layers)
    return best


def run_gpt2_style(data_dir: Path, recipe_name: str, seconds: float, target_params: int) -> dict:
    cfg = recipe.build_config(recipe_name, {"max_seconds": seconds, "max_steps": 10 ** 9, "schedule_clock": "time"})
    data = TokenData(data_dir)
    model, n_params, layers = gpt2_style(cfg, data.tokenizer.vocab_size, target_params)
    opt = model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), "cpu")
    tokens = data.tokens("train")
    start, step, curve = time.monotonic(), 0, []
    model.train()
    while (elapsed := time.monotonic() - start) < seconds:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg, elapsed / seconds)
        x, y = windows(tokens, data.tokenizer.bos_id, cfg.context,
                       batch_starts(cfg.seed, step, len(tokens), cfg.context, cfg.batch_size))
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        if step % cfg.eval_every == 0:
            curve.append((step, round(time.monotonic() - start, 1), round(_nima_windows_loss(model, data, cfg.context, 32), 4)))
            model.train()
    train_s = time.monotonic() - start
    loss = _nima_windows_loss(model, data, cfg.context, None)
    return {"model": f"GPT-2-style ({layers}x{model.config.n_embd}, {model.config.n_head} heads, LayerNorm, "
                     f"learned positions, GELU, biases; ctx {cfg.context}, batch {cfg.batch_size})",
            "parameters": n_params, "steps": step, "seconds": round(train_s, 1),
            "tokens_per_second": round(step * cfg.batch_size * cfg.context / train_s),
            "val_loss": round(loss, 4), "val_bits_per_char": round(loss / math.log(2) / data.chars_per_token("val"), 4),
            "curve": curve}


@torch.no_grad()
def _nima_windows_loss(model, data: TokenData, context: int, max_windows: int | None) -> float:
    """The nima evaluation windows (BOS first) scored by a nanoGPT-class model."""
    model.eval()
    tokens = data.tokens("val")
    starts = window_starts(len(tokens), context, max_windows)
    total, count = 0.0, 0
    for i in range(0, len(starts), 32):
        x, y = windows(tokens, data.tokenizer.bos_id, context, starts[i:i + 32])
        _, loss = model(x, y)
        total += loss.item() * y.numel()
        count += y.numel()
    return total / count


def run_ours(data_dir: Path, out: Path, recipe_name: str, seconds: float) -> dict:
    cfg = recipe.build_config(recipe_name, {"max_seconds": seconds, "max_steps": 10 ** 9, "schedule_clock": "time"})
    summary = train(data_dir, out, cfg, log=lambda m: console.print(f"  {m}"))
    model, tok = checkpoint.load(out)
    data = TokenData(data_dir)
    final = evaluate(model, data, context=cfg.context)
    rt = TorchRuntime(model=model, tokenizer=tok)
    completion = completion_scores(rt, data, context=cfg.context)
    sample = "".join(rt.generate("ROMEO:\n", 200))
    return {"model": f"{cfg.preset} ({recipe_name})", "parameters": model.num_parameters(), "steps": summary["steps"],
            "seconds": summary["seconds"], "tokens_per_second": summary["tokens_per_second"],
            "val_loss": round(final["loss"], 4), "val_bits_per_char": round(final["bits_per_char"], 4),
            "perplexity": round(final["perplexity"], 3), "bleu": round(completion["bleu"], 2),
            "chrf": round(completion["chrf"], 2), "greedy_sample": "ROMEO:\n" + sample,
            "best_step": summary["best"]["step"], "recipe": cfg.to_dict()}


def _job(kind: str, data_dir: Path, work: Path, recipe_name: str, seconds: float, threads: int,
         target_params: int, nanogpt_per_iter: float | None = None) -> dict:
    """One model's run (in its own process with --parallel)."""
    torch.set_num_threads(threads)
    if kind == "ours":
        return run_ours(data_dir, work / "run", recipe_name, seconds)
    if kind == "gpt2_style":
        return run_gpt2_style(data_dir, recipe_name, seconds, target_params)
    return run_nanogpt(TokenData(data_dir), seconds, threads, nanogpt_per_iter)


def _background_training(data_dir: Path, out: Path, recipe_name: str, threads: int) -> None:
    """Load for the side-by-side probe: our trainer on this recipe until terminated."""
    torch.set_num_threads(threads)
    cfg = recipe.build_config(recipe_name, {"max_seconds": 3600, "max_steps": 10 ** 9})
    from nima_edge.train.trainer import TrainingInterrupted
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(TrainingInterrupted):
        train(data_dir, out, cfg, log=lambda m: None)  # until the probe is done and terminates it


def probe_nanogpt_beside(data_dir: Path, work: Path, recipe_name: str, threads: int, others: int) -> float:
    """nanoGPT's seconds per iteration while `others` processes train ours beside it, as they will
    during a --parallel run."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    load = [ctx.Process(target=_background_training, args=(data_dir, work / f"probe-load-{i}", recipe_name, threads),
                        daemon=True) for i in range(others)]
    for p in load:
        p.start()
    try:
        time.sleep(5)  # past the trainer's start-up, into steady steps
        with tempfile.TemporaryDirectory(prefix="nanogpt-probe-") as tmp:
            return nanogpt_probe(nanogpt_workdir(Path(tmp), TokenData(data_dir))[0], threads)
    finally:
        for p in load:
            p.terminate()
            p.join()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--recipe", default="nima-1m", help="recipe file or bundled name")
    ap.add_argument("--corpus", type=Path, required=True, help="tinyshakespeare.txt (char-rnn's corpus)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per model")
    ap.add_argument("--models", default="ours,gpt2_style,nanogpt", help="which of ours, gpt2_style, nanogpt to run")
    ap.add_argument("--parallel", action="store_true", help="run the models side by side, one process each")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--record", type=Path, help="write the recipe with these figures under [measured] to this file")
    ap.add_argument("--keep", type=Path, help="copy our model's run directory (checkpoint, curves) here")
    args = ap.parse_args(argv)
    seconds = args.minutes * 60
    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    if args.keep and (args.keep.exists() or "ours" not in kinds):  # checked now, not after an hour of training
        ap.error(f"--keep {args.keep}: needs a new directory and 'ours' among --models")
    results = {"budget_seconds": seconds, "threads": args.threads, "cpus": os.cpu_count(), "parallel": args.parallel,
               "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="nima-bench-") as tmp:
        data_dir = Path(tmp) / "char"
        prepare(str(args.corpus), data_dir, "char")
        from nima_edge.config import preset
        cfg = recipe.build_config(args.recipe, {})
        from nima_edge.model import NimaForCausalLM
        target_params = NimaForCausalLM(preset(cfg.preset, TokenData(data_dir).tokenizer.vocab_size)).num_parameters()
        per_iter = None
        if args.parallel and "nanogpt" in kinds and len(kinds) > 1:
            per_iter = probe_nanogpt_beside(data_dir, Path(tmp), args.recipe, args.threads, len(kinds) - 1)
        jobs = {k: (k, data_dir, Path(tmp), args.recipe, seconds, args.threads, target_params, per_iter)
                for k in kinds}
        if args.parallel:
            with ProcessPoolExecutor(len(jobs)) as pool:
                futures = {k: pool.submit(_job, *a) for k, a in jobs.items()}
                for k, f in futures.items():
                    try:
                        results[k] = f.result()
                    except Exception as e:  # one model's failure must not lose the others' figures
                        results[f"{k}_error"] = repr(e)
                        console.print(f"[red]{k} failed: {e!r}")
        else:
            for k, a in jobs.items():
                console.print(f"[bold]{k}[/] for {seconds:.0f} s")
                results[k] = _job(*a)
                results[f"load_after_{k}"] = os.getloadavg()
        if args.keep and (Path(tmp) / "run").is_dir():  # the run lives in the temporary directory
            shutil.copytree(Path(tmp) / "run", args.keep, dirs_exist_ok=False)
    results["load_after"] = os.getloadavg()
    for key in ("ours", "gpt2_style", "nanogpt"):
        if key in results:
            r = results[key]
            console.print(f"{r['model'][:60]:<60} {r['parameters']:>9,} params  {r['steps']:>6} steps  "
                          f"{r['tokens_per_second']:>7,} tok/s  val {r['val_loss']:.4f} nats/char  "
                          f"{r['val_bits_per_char']:.4f} bits/char", markup=False)
    console.print(f"load average before {results['load_before']}, after {results['load_after']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.record and "ours" in results:
        record(args.record, args.recipe, results)
    return 0


def record(path: Path, recipe_name: str, results: dict) -> None:
    """Write the recipe that was run, with what it reached under [measured]."""
    ours = results["ours"]
    load = [v[0] for k, v in results.items() if k.startswith("load_")]
    measured = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{results['cpus']} CPU cores shared with other jobs (1-minute load average "
                   f"{min(load):.1f}-{max(load):.1f}), {results['threads']} torch thread(s) per model, "
                   + ("models side by side" if results["parallel"] else "models one after another"),
        "benchmark": "python benchmarks/experiments/train_shakespeare.py (tinyshakespeare, char tokenizer, 90/10 split)",
        "budget_seconds": results["budget_seconds"], "steps": ours["steps"],
        "train_tokens_per_second": ours["tokens_per_second"],
        "val_loss_nats_per_char": ours["val_loss"], "val_bits_per_char": ours["val_bits_per_char"],
    }
    for key in ("nanogpt", "gpt2_style"):
        if key in results:
            b = results[key]
            measured[key] = {"model": b["model"], "parameters": b["parameters"], "steps": b["steps"],
                             "train_tokens_per_second": b["tokens_per_second"],
                             "val_loss_nats_per_char": b["val_loss"], "val_bits_per_char": b["val_bits_per_char"]}
    cfg = recipe.build_config(recipe_name, {})
    header = (f"{cfg.preset}: the settings that reached the best validation loss measured in a "
              f"{results['budget_seconds'] / 60:g}-minute CPU budget.\nFigures under [measured]; "
              f"val = every window of the validation split at the training context.")
    path.write_text(recipe.dumps(cfg, measured=measured, header=header))


if __name__ == "__main__":
    sys.exit(main())
