"""AdamWScale and the learning-rate schedule.

AdamWScale is AdamW whose step for each tensor is multiplied by that tensor's root-mean-square (floored at 1e-3),
the relative step size of Adafactor (Shazeer & Stern 2018) kept inside Adam. nanoT5 (Nawrot 2023) showed it lets
T5 pre-train with Adam at Adafactor's learning rates (~1e-2); this is our own implementation of that rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class AdamWScale(torch.optim.Optimizer):
    """AdamW with the update scaled by ``max(1e-3, RMS(param))`` and decoupled weight decay.

    Moments are kept in fp32 whatever the parameter dtype, so bf16 parameters do not lose small updates in the
    optimizer state.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

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
                if p.grad.is_sparse:
                    raise ValueError("AdamWScale does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                grad = p.grad.float()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                t = state["step"]
                step_size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                p32 = p.float()
                rms = p32.pow(2).mean().sqrt().clamp(min=1e-3)  # the relative step: large tensors move more
                # In place on the fresh quotient: two parameter-sized temporaries per step instead of four.
                update = (m / v.sqrt().add_(group["eps"])).mul_(step_size * rms)
                if group["weight_decay"]:
                    p32.mul_(1 - group["lr"] * group["weight_decay"])
                p32.sub_(update)
                if p32 is not p:
                    p.copy_(p32)
        return loss


def lr_at(step: int, *, total: int, warmup: int, schedule: str, final_ratio: float) -> float:
    """Multiplier of the peak learning rate: linear warm-up, then cosine decay to ``final_ratio`` (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
