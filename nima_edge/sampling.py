"""Next-token choice from a logits vector, shared by every runtime so they all sample alike."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nima_edge.errors import NimaError


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0            # 0 means no top-k cut
    top_p: float = 1.0        # 1 means no nucleus cut
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise NimaError(f"temperature {self.temperature} is negative", "use 0 for greedy or a positive value")
        if not 0.0 < self.top_p <= 1.0:
            raise NimaError(f"top-p {self.top_p} is outside (0, 1]", "use e.g. --top-p 0.9")
        if self.top_k < 0:
            raise NimaError(f"top-k {self.top_k} is negative", "use 0 to disable top-k")

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def choose(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    if s.temperature == 0.0:
        return int(np.argmax(logits))
    logits = logits / s.temperature
    if 0 < s.top_k < logits.size:
        kth = np.partition(logits, -s.top_k)[-s.top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if s.top_p < 1.0:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < s.top_p  # always keeps the most likely token
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))
