"""Resumable checkpoints and the published best model, all written atomically, nothing pickled.

A run directory `OUT` holds:
  OUT/{config.json, model.safetensors, tokenizer*.json, generation_config.json, nima.json}
        the model to ship: the best on validation so far (an ordinary HF checkpoint directory)
  OUT/last/   the latest resumable checkpoint: an HF checkpoint plus
        optimizer.safetensors  optimizer moments (tensors) ...
        trainer_state.json     ... and everything scalar: step, elapsed time, best loss, patience,
                               optimizer param groups, AMP scaler, the config it was trained with
        rng.safetensors        torch CPU/CUDA generator states of every process (dropout)
  OUT/metrics.jsonl, OUT/loss.png, OUT/recipe.toml  tracking (see tracking.py)

Training batches are a pure function of (seed, step) (see trainer.batch_starts), so the step is the
data position and no sampler state needs saving.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from nima_edge import checkpoint
from nima_edge.atomic import fsync_dir, write_text
from nima_edge.errors import NimaError
from nima_edge.model import NimaForCausalLM
from nima_edge.tokenizer import Tokenizer

LAST = "last"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
# Published per file; nima.json last, so its metadata never describes weights that are not there yet.
PUBLISHED = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
             "model.safetensors", "nima.json")


def optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON scalars."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_last(run_dir: Path, model: NimaForCausalLM, tok: Tokenizer, opt: torch.optim.Optimizer,
              state: dict, rng: dict[str, torch.Tensor], meta: dict, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write OUT/last as one unit (checkpoint.save swaps the whole directory in when complete);
    `extra_files` are a job's own (e.g. a fine-tune's adapter tensors)."""
    tensors, opt_meta = optimizer_to_files(opt)
    extra = {**(extra_files or {}), OPTIMIZER: save(tensors), RNG: save(rng),
             STATE: (json.dumps({**state, "optimizer": opt_meta}, indent=1) + "\n").encode()}
    return checkpoint.save(run_dir / LAST, model, tok, meta=meta, extra_files=extra)


def last_dir(run_dir: Path) -> Path | None:
    """The resumable checkpoint, if any. A kill between atomic_dir's two renames leaves only the
    complete previous copy under its `.last.old` name; that one is as good."""
    for d in (run_dir / LAST, run_dir / f".{LAST}.old"):
        if (d / STATE).is_file():
            return d
    return None


def read_state(last: Path) -> dict:
    try:
        return json.loads((last / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise NimaError(f"resumable checkpoint {last} is unreadable: {e}",
                        "start the run again without --resume") from e


def load_last(run_dir: Path, device: str) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor], Path]:
    """(trainer state, optimizer tensors, rng tensors, directory) of the last checkpoint."""
    d = last_dir(run_dir)
    if d is None:
        raise NimaError(f"{run_dir} has no resumable checkpoint ({run_dir / LAST} is missing)",
                        "start without --resume, or point --out at the run directory to continue")
    try:
        state = json.loads((d / STATE).read_text())
        opt_tensors = load_file(str(d / OPTIMIZER), device=device)
        rng = load_file(str(d / RNG))
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise NimaError(f"resumable checkpoint {d} is unreadable: {e}",
                        "it was not written by this trainer or was edited; start the run again") from e
    return state, opt_tensors, rng, d


def publish(run_dir: Path, model: NimaForCausalLM, tok: Tokenizer, meta: dict,
            extra_files: dict[str, bytes] | None = None) -> None:
    """Make OUT itself an HF checkpoint of `model`. Each file is swapped in atomically (os.replace),
    so a reader sees complete files at every moment; subdirectories (last/) are left alone.
    `extra_files` (relative paths, e.g. a fine-tune's adapter/...) are swapped in before nima.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".publish.", dir=run_dir))
    try:
        checkpoint.save(staging / "ckpt", model, tok, meta=meta)
        for name, data in sorted((extra_files or {}).items()):
            (staging / "extra").write_bytes(data)
            (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / "extra", run_dir / name)
        for name in PUBLISHED:
            os.replace(staging / "ckpt" / name, run_dir / name)
        fsync_dir(run_dir)  # the renames survive a power cut
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def update_meta(run_dir: Path, extra: dict) -> None:
    """Add keys to the published nima.json (e.g. the final training summary)."""
    meta = checkpoint.read_meta(run_dir)
    write_text(run_dir / "nima.json", json.dumps({**meta, **extra}, indent=2) + "\n")
