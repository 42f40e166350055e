"""Helpers shared by the ONNX/TensorRT tests: step a runtime along a fixed token path and compare logits."""
from __future__ import annotations

import numpy as np

from nima_edge.runtime import Runtime

PROMPT = "ROMEO: But soft, what light"
# ONNX Runtime's accuracy level 4 (the default, the fast kernel) quantizes activations to int8 per block:
# measured over 50 steps on a trained nima-0.5m, max |logit diff| vs fake-quant 0.03-0.04 (docs/onnx.md).
INT8_ACTIVATION_TOL = 0.1


def greedy_path(ref: Runtime, prompt_ids: list[int], steps: int) -> list[int]:
    """The reference's greedy continuation (EOS included, so every runtime walks the same path)."""
    return list(ref.generate_ids(prompt_ids, steps, stop_at_eos=False))


def stepped_logits(rt: Runtime, prompt_ids: list[int], path: list[int]) -> np.ndarray:
    """Last-position logits after the prefill and after each decode of `path` (teacher-forced)."""
    rt.reset()
    out = [rt.prefill(prompt_ids)]
    out += [rt.decode(t) for t in path[:-1]]
    return np.stack(out)


def max_diff(a: Runtime, b: Runtime, prompt_ids: list[int], path: list[int]) -> float:
    return float(np.abs(stepped_logits(a, prompt_ids, path) - stepped_logits(b, prompt_ids, path)).max())
