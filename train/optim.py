"""Optimizers: AdamW (torch) or Lion, with weight decay only on matrices (not norms)."""
from __future__ import annotations

import torch

from nima_edge.train.recipe import TrainConfig


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2).

    torch ships no Lion; this is the paper's update, a few lines:
        update = sign(beta1 * m + (1 - beta1) * g);  p -= lr * (update + wd * p);  m = beta2 * m + (1 - beta2) * g
    """

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m.mul(beta1).add_(p.grad, alpha=1 - beta1)), alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights); leave 1-D tensors (RMSNorm gains) and scales undecayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # a tied tensor is yielded once
        if p.requires_grad:  # quantization scales (finetune --train-scales) are not weights to shrink
            (decay if p.dim() >= 2 and not name.endswith(".scales") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "lion":
        return Lion(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
