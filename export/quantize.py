"""The quantize stage: drive round-to-nearest or GPTQ over a float checkpoint and write the result.

The result format, the grids and the fake-quant application live in the neutral core
(nima_edge/quantization.py); saving and loading quantized checkpoints in nima_edge/checkpoint.py.
This module only calibrates and drives (export/gptq.py does the GPTQ maths).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from nima_edge import checkpoint
from nima_edge.errors import NimaError
from nima_edge.export.gptq import gptq_model
from nima_edge.model import NimaForCausalLM
from nima_edge.quantization import (QuantizedWeight, apply_quant, check_params, describe_substitutions, group_plan,
                                    rtn_model, substitutions)


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread inside the block. Quantizing these small models is thousands of small
    tensor ops where intra-op thread hand-offs cost more than the work: on a busy 2-core machine two
    threads made RTN 60x and GPTQ 9x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def calibration_windows(data, samples: int, length: int, seed: int = 0) -> torch.Tensor:
    """`samples` windows of `length` tokens from the train split, BOS first like training (deterministic)."""
    from nima_edge.evaluate import windows
    tokens = data.tokens("train")
    if len(tokens) <= length:
        raise NimaError(f"the train split holds {len(tokens)} tokens, fewer than one {length}-token window",
                        "prepare a larger corpus, or lower --calib-length")
    starts = np.sort(np.random.default_rng(seed).integers(0, len(tokens) - length, samples))
    x, _ = windows(tokens, data.tokenizer.bos_id, length, starts)
    return x


def quantize_model(model: NimaForCausalLM, method: str, bits: int, group_size: int, symmetric: bool = True,
                   calib: torch.Tensor | None = None, damp: float = 0.01,
                   act_order: bool = False) -> dict[str, QuantizedWeight]:
    """Quantize every decoder linear along the group plan (nima_edge/quantization.py group_plan: a width the
    group does not divide gets a smaller group, or stays float); the model's weights become their
    dequantized values."""
    check_params(bits, group_size, method)
    with single_thread():
        if method == "gptq":
            if calib is None:
                raise NimaError("GPTQ needs calibration text", "pass --data DIR (a prepared data directory)")
            return gptq_model(model, calib, bits, group_plan(model, group_size), symmetric, damp, act_order)
        result = rtn_model(model, bits, group_size, symmetric)
        apply_quant(model, result)
    return result


def quantize_checkpoint(ckpt: str | Path, out: str | Path, bits: int = 4, group_size: int = 32,
                        method: str = "gptq", data_dir: str | Path | None = None, symmetric: bool = True,
                        samples: int = 64, length: int = 256, damp: float = 0.01, act_order: bool = False,
                        seed: int = 0, log=print) -> Path:
    """Read a float checkpoint, quantize it, write `out`: the same float weights plus the result.
    Tensors that do not get the requested group (see group_plan) are printed through `log` and recorded."""
    from nima_edge.data import TokenData
    check_params(bits, group_size, method)
    model, tok = checkpoint.load(ckpt)
    if Path(out).resolve() == Path(ckpt).resolve():
        raise NimaError(f"--out {out} is the input checkpoint", "write the quantized checkpoint to a new directory")
    info = {"source": str(ckpt), "source_sha256": checkpoint.checkpoint_hash(ckpt)}
    calib = None
    if method == "gptq":
        if data_dir is None:
            raise NimaError("GPTQ needs calibration text", "pass --data DIR (a prepared data directory)")
        if samples < 1 or length < 2:
            raise NimaError(f"cannot calibrate on {samples} windows of {length} tokens",
                            "use e.g. --samples 64 --calib-length 256")
        data = TokenData(data_dir)
        data.check_tokenizer(tok, ckpt)
        length = min(length, checkpoint.trained_context(ckpt, model))
        calib = calibration_windows(data, samples, length, seed)
        info.update(calibration={"data": str(data_dir), "samples": samples, "length": length, "seed": seed,
                                 "damp": damp, "act_order": act_order})
    subs = substitutions(group_plan(model, group_size), group_size)
    info.update(group_size=group_size, substitutions=subs)  # the requested group; each layer has its own
    for line in describe_substitutions(subs):
        log(f"quantization plan: {line}")
    float_sd = {k: v.clone() for k, v in model.state_dict().items()}
    result = quantize_model(model, method, bits, group_size, symmetric, calib, damp, act_order)
    model.load_state_dict(float_sd)  # the checkpoint keeps the float weights; the result rides beside them
    meta = {k: v for k, v in checkpoint.read_meta(ckpt).items() if k != "quantization"}
    return checkpoint.save_quantized(out, model, tok, result, meta, info)
