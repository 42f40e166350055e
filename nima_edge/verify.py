"""Check an artifact against the PyTorch model it came from, through the common runtime protocol.

Four checks: token ids of a fixed string set, logits on fixed prompts (prefill and every decode
step along the reference's greedy path), greedy agreement over 50 tokens, and the perplexity delta
on held-out text. What is allowed depends on the quant scheme: TOLERANCES below
is the one table, used by `nima-edge verify` and the tests alike.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from nima_edge.errors import NimaError
from nima_edge.runtime import Runtime

TOKENIZER_STRINGS = ["", " ", "  two  spaces", "\n", "line\nbreaks\n\n", "crlf\r\nline", "tab\there",
                     "0123456789", "3.14159 + 2,718", "ROMEO: But soft! what light?", "héllo wörld",
                     "Привет", "日本語", "emoji 🤖🎭", "MiXeD CaSe", "  leading", "trailing  "]
PROMPTS = ["ROMEO:\n", "First Citizen:\nBefore we proceed", "KING RICHARD III:\nNow is the winter of",
           "To be, or not to be"]
GREEDY_TOKENS = 50
SELF_CHECK_TOKENS = 16  # the artifact's first greedy ids, recorded for the device-side self-check
# Held-out text for the perplexity check when no --data is given (Sonnet 18, not in tinyshakespeare).
DEFAULT_EVAL_TEXT = (
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
    "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date:\n"
    "Sometime too hot the eye of heaven shines,\nAnd often is his gold complexion dimm'd;\n"
    "And every fair from fair sometime declines,\nBy chance or nature's changing course untrimm'd;\n")


@dataclass(frozen=True)
class Tolerance:
    logits_max_abs: float     # largest |artifact - reference| over all compared logits
    greedy_agreement: float   # share of the reference's 50 greedy steps where the artifact picks the same token
    ppl_rel_delta: float      # |ppl_artifact / ppl_reference - 1|


# Keyed by precision class. Quantized artifacts are held to the fake-quant reference built from the
# same quantization result; their remaining error is the runtime's own (activation quantization in
# llama.cpp's Q4_0/Q8_0 dot products and XNNPACK's 8da kernels, fp16 scales, fused kernels).
TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(logits_max_abs=1e-4, greedy_agreement=1.0, ppl_rel_delta=1e-4),
    "float16": Tolerance(logits_max_abs=5e-2, greedy_agreement=0.9, ppl_rel_delta=5e-3),
    "int8": Tolerance(logits_max_abs=0.25, greedy_agreement=0.5, ppl_rel_delta=0.02),
    "int4": Tolerance(logits_max_abs=1.0, greedy_agreement=0.2, ppl_rel_delta=0.05),
}
# Held to the float model instead (the artifact was quantized by its own tool, e.g. llama.cpp K-quants).
TOLERANCES_VS_FLOAT: dict[str, Tolerance] = {
    "int8": Tolerance(logits_max_abs=0.5, greedy_agreement=0.3, ppl_rel_delta=0.03),
    "int4": Tolerance(logits_max_abs=3.0, greedy_agreement=0.1, ppl_rel_delta=0.25),
}
SCHEME_CLASS = {
    "f32": "float32", "fp32": "float32", "f16": "float16", "fp16": "float16", "bf16": "float16",
    "q8_0": "int8", "int8": "int8", "8da8w": "int8",
    "q4_0": "int4", "int4": "int4", "8da4w": "int4", "q4_k_m": "int4", "q4_k_s": "int4", "q5_k_m": "int4",
    "q5_0": "int4", "q6_k": "int8",
}


def precision_class(quant: str) -> str:
    if quant.lower() not in SCHEME_CLASS:
        raise NimaError(f"verify has no tolerance for quant scheme {quant!r}",
                        f"add it to SCHEME_CLASS in nima_edge/verify.py (known: {', '.join(SCHEME_CLASS)})")
    return SCHEME_CLASS[quant.lower()]


def tolerance_for(quant: str, vs_fake_quant: bool) -> Tolerance:
    cls = precision_class(quant)
    if cls.startswith("float") or vs_fake_quant:
        return TOLERANCES[cls]
    return TOLERANCES_VS_FLOAT[cls]


def reference_runtime(ckpt: str | Path, quant: str) -> tuple[Runtime, bool]:
    """The torch runtime to compare with, and whether it is the fake-quant model.

    Float artifacts are compared with the float weights; quantized ones with the fake-quant model
    when the checkpoint carries a quantization result (the numbers the exporter packed).
    """
    from nima_edge import checkpoint
    from nima_edge.checkpoint import load_model
    from nima_edge.runtimes.torch_reference import TorchRuntime
    if precision_class(quant).startswith("float"):
        model, tok = checkpoint.load(ckpt)
        return TorchRuntime(model=model, tokenizer=tok), False
    model, tok, scheme = load_model(ckpt)
    return TorchRuntime(model=model, tokenizer=tok), scheme is not None


def _tokenizer_check(art: Runtime, ref: Runtime) -> dict:
    mismatches = [s for s in TOKENIZER_STRINGS if art.tokenize(s) != ref.tokenize(s)]
    return {"strings": len(TOKENIZER_STRINGS), "mismatches": mismatches, "ok": not mismatches}


def _logits_check(art: Runtime, ref: Runtime, steps: int) -> float:
    """Max |diff| over prefill logits and `steps` decode steps fed the reference's greedy tokens."""
    worst = 0.0
    for prompt in PROMPTS:
        ids = ref.tokenize(prompt)
        art.reset()
        ref.reset()
        a, r = art.prefill(ids), ref.prefill(ids)
        for step in range(steps + 1):
            worst = max(worst, float(np.max(np.abs(a - r))))
            if step == steps or ref.position >= ref.context_length:
                break
            tok = int(np.argmax(r))
            a, r = art.decode(tok), ref.decode(tok)
    return worst


def _greedy_agreement(art: Runtime, ref: Runtime) -> tuple[float, float, list[int], list[int]]:
    """Agreement over the reference's 50 greedy tokens: the fraction of steps at which the artifact,
    fed the same history, picks the same token (what is checked), and the matching prefix of the two
    free-running continuations (reported). The prefix alone is brittle: one near-tie flipped by a
    runtime's activation quantization ends it, however well every later step agrees."""
    ids = ref.tokenize(PROMPTS[0])
    r = list(ref.generate_ids(ids, GREEDY_TOKENS, stop_at_eos=False))
    a = list(art.generate_ids(ids, GREEDY_TOKENS, stop_at_eos=False))
    prefix = next((i for i, (x, y) in enumerate(zip(a, r)) if x != y), min(len(a), len(r)))
    art.reset()
    logits, hits = art.prefill(ids), 0
    for i, tok in enumerate(r):
        hits += int(np.argmax(logits)) == tok
        if i + 1 < len(r):
            logits = art.decode(tok)
    n = max(len(r), 1)
    return hits / n, prefix / n, a, r


def _perplexity(rt: Runtime, ids: list[int]) -> float:
    return math.exp(-float(np.mean(rt.logprobs(ids))))


def eval_ids(ref: Runtime, data_dir: str | Path | None, max_tokens: int = 256) -> list[int]:
    if data_dir is None:
        ids = ref.tokenize(DEFAULT_EVAL_TEXT)
    else:
        from nima_edge.data import TokenData
        ids = [ref.tokenizer.bos_id] + TokenData(data_dir).tokens("val")[: max_tokens - 1].tolist()
    return ids[: min(max_tokens, ref.context_length)]


def verify(artifact: Runtime, reference: Runtime, quant: str, vs_fake_quant: bool,
           data_dir: str | Path | None = None, logit_steps: int = 16, eval_tokens: int = 256) -> dict:
    tol = tolerance_for(quant, vs_fake_quant)
    tokens = _tokenizer_check(artifact, reference)
    max_abs = _logits_check(artifact, reference, logit_steps)
    agreement, prefix, art_ids, ref_ids = _greedy_agreement(artifact, reference)
    ids = eval_ids(reference, data_dir, min(eval_tokens, 256))
    ppl_ref, ppl_art = _perplexity(reference, ids), _perplexity(artifact, ids)
    rel = abs(ppl_art / ppl_ref - 1)
    checks = {
        "tokenizer": tokens["ok"],
        "logits": max_abs <= tol.logits_max_abs,
        "greedy": agreement >= tol.greedy_agreement,
        "perplexity": rel <= tol.ppl_rel_delta,
    }
    return {
        "passed": all(checks.values()),
        "checks": checks,
        "quant": quant,
        "reference": "fake-quant" if vs_fake_quant else "float",
        "tolerance": asdict(tol),
        "tokenizer": tokens,
        "logits_max_abs": max_abs,
        "greedy_agreement": agreement,
        "greedy_prefix": prefix,
        "greedy_artifact_text": artifact.detokenize(art_ids),
        "greedy_reference_text": reference.detokenize(ref_ids),
        # what a board re-derives before trusting the copy it runs (android_demo/pi_demo.py, the app)
        "self_check": {"prompt": PROMPTS[0], "prompt_ids": reference.tokenize(PROMPTS[0]),
                       "tokens": art_ids[:SELF_CHECK_TOKENS], "quant": quant,
                       "min_agreement": tol.greedy_agreement},
        "perplexity": {"reference": ppl_ref, "artifact": ppl_art, "rel_delta": rel, "tokens": len(ids)},
    }


def verify_artifact(path: str | Path, ckpt: str | Path | None = None, data_dir: str | Path | None = None,
                    threads: int | None = None, record: bool = True) -> dict:
    """Load the artifact's runtime, pick the reference from its manifest, verify, merge into the manifest."""
    from nima_edge.checkpoint import checkpoint_hash
    from nima_edge.checkpoint import trained_context
    from nima_edge.manifest import read_manifest, update_manifest
    from nima_edge.runtimes import load_runtime
    manifest = read_manifest(path)
    ckpt = ckpt or manifest["source"]["checkpoint"]
    if not Path(ckpt).is_dir():
        raise NimaError(f"reference checkpoint {ckpt} not found", "pass --reference CKPT (the exported checkpoint)")
    reference, vs_fq = reference_runtime(ckpt, manifest["quant"])
    artifact = load_runtime(path, manifest["target"], threads=threads)
    try:
        # perplexity over the positions the model was trained on (recipes may train shorter windows)
        report = verify(artifact, reference, manifest["quant"], vs_fq, data_dir,
                        eval_tokens=trained_context(ckpt, reference.model))
    finally:
        artifact.close()
    report["target"] = manifest["target"]
    sha = checkpoint_hash(ckpt)
    report["reference_checkpoint"] = {"path": str(ckpt), "sha256": sha,
                                      "is_source": sha == manifest["source"]["sha256"]}
    if record:
        update_manifest(path, "verify", report)
    return report
