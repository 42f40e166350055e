"""Validation loss, perplexity and bits per character of a model on a prepared split, and BLEU / chrF
of greedy line completions: for a PyTorch model directly, for any artifact through the runtime protocol.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from nima_edge.data import TokenData
from nima_edge.errors import NimaError
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


def window_starts(n_tokens: int, context: int, max_windows: int | None) -> np.ndarray:
    """Starts of non-overlapping windows over the split; `max_windows` of them evenly spaced."""
    starts = np.arange(0, n_tokens - context + 1, context)
    if not len(starts):  # scoring nothing would report a loss of 0.0
        raise NimaError(f"the split has {n_tokens} tokens, fewer than one window of {context}",
                        "prepare the data with a larger --val-fraction, or use a shorter context")
    if max_windows is not None and len(starts) > max_windows:  # evenly spaced, still deterministic
        starts = starts[np.linspace(0, len(starts) - 1, max_windows).astype(int)]
    return starts


@torch.no_grad()
def evaluate(model: NimaForCausalLM, data: TokenData, split: str = "val", context: int | None = None,
             batch_size: int = 16, max_windows: int | None = None) -> dict:
    """Mean loss over non-overlapping windows covering the split (deterministic)."""
    context = context or model.config.max_position_embeddings
    tokens = data.tokens(split)
    starts = window_starts(len(tokens), context, max_windows)
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


# --- any artifact, through the runtime protocol ------------------------------------------------------
#
# The same windows as evaluate(max_windows=N) above, scored one decode step at a time, so a checkpoint
# and each of its exports are measured on identical text and their difference is the export's cost.

def evaluate_runtime(rt, data: TokenData, split: str = "val", context: int | None = None,
                     max_windows: int = 16) -> dict:
    """evaluate() for any Runtime: mean loss over `max_windows` evenly spaced windows of the split."""
    context = min(context or rt.context_length, rt.context_length)
    tokens = data.tokens(split)
    total, count = 0.0, 0
    for s in window_starts(len(tokens), context, max_windows):
        x, y = windows(tokens, data.tokenizer.bos_id, context, np.array([s]))
        lp = rt.logprobs(x[0].tolist() + [int(y[0, -1])])  # log p(y_t | BOS, y_<t) for every t
        total -= float(np.sum(lp))
        count += len(lp)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count,
            "bits_per_char": loss / math.log(2) / data.chars_per_token(split)}


# --- text completion: BLEU and chrF ------------------------------------------------------------------
#
# The protocol (fixed, so figures compare across models, tokenizers and exports):
# - text: the split, decoded with the data's tokenizer (lossless for char and bpe; `word` maps unknown
#   words to <|unk|>), cut into lines;
# - lines: those with at least COMPLETION_MIN_WORDS words (speaker names and stage directions are
#   shorter), COMPLETION_LINES of them evenly spaced over the split;
# - prompt: the COMPLETION_CONTEXT_LINES lines before it and the first half of its words (rounded
#   down), then a space; reference: the rest of the line. BOS first; when the prompt does not fit the
#   model's trained context with room for the answer, its oldest tokens are dropped;
# - answer: greedy decoding, stopped at a newline, EOS, or as many tokens as the reference has plus
#   COMPLETION_SLACK_TOKENS;
# - scores: sacrebleu's corpus BLEU (13a tokenization, default exp smoothing) and chrF (character
#   6-grams, beta 2), both on sacrebleu's 0-100 scale, over all lines.
COMPLETION_LINES = 100
COMPLETION_MIN_WORDS = 6
COMPLETION_CONTEXT_LINES = 2
COMPLETION_SLACK_TOKENS = 8


def completion_pairs(text: str, lines: int = COMPLETION_LINES) -> list[tuple[str, str]]:
    """(prompt, reference) pairs of the protocol above, from `text`."""
    all_lines = text.split("\n")
    eligible = [i for i, line in enumerate(all_lines)
                if i >= COMPLETION_CONTEXT_LINES and len(line.split()) >= COMPLETION_MIN_WORDS]
    if not eligible:
        return []
    picks = sorted({eligible[j] for j in np.linspace(0, len(eligible) - 1, min(lines, len(eligible))).astype(int)})
    pairs = []
    for i in picks:
        words = all_lines[i].split()
        half = len(words) // 2
        context = "".join(line + "\n" for line in all_lines[i - COMPLETION_CONTEXT_LINES:i])
        pairs.append((context + " ".join(words[:half]) + " ", " ".join(words[half:])))
    return pairs


def complete(rt, prompt: str, reference: str, context: int) -> str:
    """The greedy answer to `prompt`, up to the first newline (see the protocol above)."""
    max_new = len(rt.tokenize(reference, add_bos=False)) + COMPLETION_SLACK_TOKENS
    keep = max(1, context - max_new - 1)
    ids = [rt.tokenizer.bos_id] + rt.tokenize(prompt, add_bos=False)[-keep:]
    out, text = [], ""
    for t in rt.generate_ids(ids, max_new):  # stops at EOS and at a full context
        out.append(t)
        text = rt.detokenize(out)
        if "\n" in text:
            break
    return text.split("\n", 1)[0].strip()


def completion_scores(rt, data: TokenData, split: str = "val", context: int | None = None,
                      lines: int = COMPLETION_LINES) -> dict:
    """BLEU and chrF of greedy line completions on the split, through any Runtime."""
    import sacrebleu
    context = min(context or rt.context_length, rt.context_length)
    text = data.tokenizer.decode(data.tokens(split).tolist())
    pairs = completion_pairs(text, lines)
    if not pairs:
        raise NimaError(f"the {split} split has no line of {COMPLETION_MIN_WORDS} or more words to complete",
                        "evaluate on a corpus of ordinary lines of text")
    hyps = [complete(rt, p, r, context) for p, r in pairs]
    refs = [r for _, r in pairs]
    bleu, chrf = sacrebleu.BLEU(), sacrebleu.CHRF()
    scores = {"bleu": bleu.corpus_score(hyps, [refs]).score, "chrf": chrf.corpus_score(hyps, [refs]).score}
    return {**scores, "lines": len(pairs), "context": context,
            "signature": {"bleu": str(bleu.get_signature()), "chrf": str(chrf.get_signature())},
            "examples": [{"prompt": p.rsplit("\n", 1)[-1], "reference": r, "answer": h}
                         for (p, r), h in list(zip(pairs, hyps))[:5]]}


# --- `nima-edge eval`: a checkpoint or any artifact ------------------------------------------------

def trained_context_of(path: str | Path, rt) -> int:
    """The window length the model behind an artifact was trained on: the manifest's record, else
    the source checkpoint's, else the runtime's context."""
    from nima_edge.checkpoint import read_meta
    from nima_edge.manifest import read_manifest
    try:
        manifest = read_manifest(path)
    except NimaError:
        manifest = {}
    if manifest.get("trained_context"):
        return int(manifest["trained_context"])
    source = Path(manifest.get("source", {}).get("checkpoint", ""))
    trained = read_meta(source).get("training", {}).get("train_config", {}).get("context") if source.is_dir() else None
    return min(int(trained or rt.context_length), rt.context_length)


def evaluate_path(path: str | Path, data_dir: str | Path, split: str = "val", max_windows: int | None = None,
                  lines: int = COMPLETION_LINES, target: str | None = None, threads: int | None = None,
                  allow_custom_ops: bool = False) -> dict:
    """Loss, perplexity, bits/char and (lines > 0) completion BLEU / chrF of a checkpoint or artifact.

    A checkpoint is scored by the batched PyTorch model (every window unless `max_windows`), an
    artifact through its runtime (16 windows unless `max_windows`); the same `max_windows` picks the
    same windows for both, so the figures compare."""
    from nima_edge.runtimes import detect_target, load_runtime
    target = target or detect_target(path)
    data = TokenData(data_dir)
    quant = None
    if target == "torch":
        from nima_edge.checkpoint import load_model, trained_context
        from nima_edge import targets
        model, tok, quant = load_model(path)  # a quantized checkpoint is evaluated as its fake-quant model
        rt = targets.get("torch").load("runtime")(model=model, tokenizer=tok)
        context = trained_context(path, model)
    else:
        rt = load_runtime(path, target, threads=threads, allow_custom_ops=allow_custom_ops)
        context = trained_context_of(path, rt)
    try:
        data.check_tokenizer(rt.tokenizer, path)
        if target == "torch":
            r = evaluate(model, data, split, context, max_windows=max_windows)
        else:
            r = evaluate_runtime(rt, data, split, context, max_windows or 16)
        r.update(target=target, quant=quant, context=context, split=split)
        if lines > 0:
            r["completion"] = completion_scores(rt, data, split, context, lines)
    finally:
        rt.close()
    return r
