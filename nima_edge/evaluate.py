"""Validation loss, perplexity and bits per character of a model on a prepared split."""
from __future__ import annotations

import math

import numpy as np
import torch

from nima_edge.data import TokenData
from nima_edge.model import NimaForCausalLM


def windows(tokens: np.ndarray, bos_id: int, context: int, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs start with BOS then context-1 corpus tokens; targets are those tokens and the next one.

    Every training and evaluation window starts with BOS, so a prompt that starts with BOS (as
    generation does) is in distribution wherever in the text the model is asked to continue.
    """
    rows = np.stack([tokens[s:s + context] for s in starts]).astype(np.int64)
    y = torch.from_numpy(rows)
    x = torch.cat([torch.full((len(starts), 1), bos_id, dtype=torch.long), y[:, :-1]], dim=1)
    return x, y


@torch.no_grad()
def evaluate(model: NimaForCausalLM, data: TokenData, split: str = "val", context: int | None = None,
             batch_size: int = 16, max_windows: int | None = None) -> dict:
    """Mean loss over non-overlapping windows covering the split (deterministic)."""
    context = context or model.config.max_position_embeddings
    tokens = data.tokens(split)
    starts = np.arange(0, len(tokens) - context + 1, context)
    if max_windows is not None and len(starts) > max_windows:  # evenly spaced, still deterministic
        starts = starts[np.linspace(0, len(starts) - 1, max_windows).astype(int)]
    device = next(model.parameters()).device  # windows are built on the CPU
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        x, y = windows(tokens, data.tokenizer.bos_id, context, starts[i:i + batch_size])
        _, loss = model(x.to(device), y.to(device))
        total += loss.item() * y.numel()
        count += y.numel()
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count,
            "bits_per_char": loss / math.log(2) / data.chars_per_token(split)}
