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
    optimizer state. One step is a fixed sequence of ``torch._foreach_*`` kernels over all tensors (not a Python loop
    of ~10 ops per tensor) whose step counts live on the device; ``lr`` may be a 0-dim device tensor. That makes
    ``step()`` free of host synchronisation and capturable in a CUDA graph (the training step replays it).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float | torch.Tensor = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        if not isinstance(lr, torch.Tensor) and lr < 0:
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
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise ValueError("AdamWScale does not support sparse gradients")
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            states = [self.state[p] for p in params]
            steps = [s["step"] for s in states]
            m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
            grads = [p.grad if p.grad.dtype == torch.float32 else p.grad.float() for p in params]
            p32 = [p if p.dtype == torch.float32 else p.float() for p in params]

            torch._foreach_add_(steps, 1)
            torch._foreach_lerp_(m, grads, 1 - beta1)  # m = beta1 m + (1 - beta1) g
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
            # step size per tensor: lr * sqrt(1 - beta2^t) / (1 - beta1^t) * max(1e-3, RMS(p)), all on the device
            bc1 = torch._foreach_pow(beta1, steps)
            torch._foreach_neg_(bc1)
            torch._foreach_add_(bc1, 1)
            scale = torch._foreach_pow(beta2, steps)
            torch._foreach_neg_(scale)
            torch._foreach_add_(scale, 1)
            torch._foreach_sqrt_(scale)
            torch._foreach_div_(scale, bc1)
            rms = torch._foreach_norm(p32)
            torch._foreach_div_(rms, [math.sqrt(p.numel()) for p in p32])
            torch._foreach_clamp_min_(rms, 1e-3)  # the relative step: large tensors move more
            torch._foreach_mul_(scale, rms)
            torch._foreach_mul_(scale, lr)
            update = torch._foreach_sqrt(v)
            torch._foreach_add_(update, eps)
            torch._foreach_div_(update, scale)  # (sqrt(v) + eps) / step size
            if wd:
                torch._foreach_mul_(p32, 1 - lr * wd)
            torch._foreach_addcdiv_(p32, m, update, value=-1.0)
            copies = [(p, q) for p, q in zip(params, p32) if q is not p]
            if copies:
                torch._foreach_copy_([p for p, _ in copies], [q for _, q in copies])
        return loss


def lr_at(step: int, *, total: int, warmup: int, schedule: str, final_ratio: float) -> float:
    """Multiplier of the peak learning rate: linear warm-up, then cosine decay to ``final_ratio`` (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
