"""Learning-rate schedules as pure functions of progress, so a resumed run gets exactly the same rate.

torch.optim.lr_scheduler's classes keep their own counters (and SequentialLR + warm restarts have
had off-by-one bugs); a pure function of the step needs no state in the checkpoint at all.
"""
from __future__ import annotations

import math

from nima_edge.train.recipe import TrainConfig


def _cosine(lo: float, hi: float, t: float) -> float:
    return lo + 0.5 * (hi - lo) * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


def lr_at(step: int, cfg: TrainConfig, time_fraction: float | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Linear warmup over `warmup_steps`, then:
      cosine          one half-cosine from lr down to min_lr at the end of training;
      cosine_restarts SGDR: cosine cycles of restart_steps, each restart_mult times longer, back to lr each time;
      constant        lr.
    With schedule_clock = "time", `time_fraction` (elapsed / max_seconds) sets the decay progress instead
    of step / max_steps when it is further along, so the decay fits a wall-clock budget.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    after = step - cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = after / max(1, cfg.max_steps - cfg.warmup_steps)
        if time_fraction is not None:
            progress = max(progress, time_fraction)
        return _cosine(cfg.min_lr, cfg.lr, progress)
    # cosine_restarts: find the cycle that holds `after`
    length, start = float(cfg.restart_steps), 0.0
    while after >= start + length:
        start += length
        length *= cfg.restart_mult
    return _cosine(cfg.min_lr, cfg.lr, (after - start) / length)
