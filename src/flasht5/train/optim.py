"""AdamWScale and the learning-rate schedule.

AdamWScale is AdamW whose step for each tensor is multiplied by that tensor's root-mean-square (floored at 1e-3),
the relative step size of Adafactor (Shazeer & Stern 2018) kept inside Adam. nanoT5 (Nawrot 2023) showed it lets
T5 pre-train with Adam at Adafactor's learning rates (~1e-2); this is our own implementation of that rule.

``scale_by_rms=False`` (the config's ``optim.name: adamw``) drops the RMS factor and puts epsilon where
``torch.optim.AdamW`` puts it (after the bias correction of the second moment): the update is then plain AdamW with
decoupled weight decay, step for step the same as ``torch.optim.AdamW`` (what transformers' ``Trainer`` uses), with
this class's fused, sync-free, CUDA-graph capturable step and every ``precision`` below. With it, ``lr`` is the
absolute step size (fine-tuning rates such as 1e-4), not a relative one.

Precision (``precision=``, the config's ``optim.precision``):

- ``"fp32"``: moments in fp32 whatever the parameter dtype (fp32 parameters: the classic mixed-precision recipe
  with bf16 autocast; this is the default).
- ``"bf16"``: pure bf16, bf16 parameters and bf16 moments; every update is rounded to bf16. Updates smaller than
  half a bf16 ulp of the weight (2^-9 relative) are lost, so training stalls at small learning rates.
- ``"bf16_kahan"``: pure bf16 plus a bf16 Kahan compensation buffer per parameter that carries what rounding the
  weight to bf16 lost into the next step (compensated summation, Kahan 1965; as in Zamirai et al. 2020, "Revisiting
  BFloat16 Training", and the ``optimi`` library's Kahan optimizers). 6 bytes of state per parameter beside the
  2-byte weight, against 12 + 4 for fp32 master weights.
- ``"fp32_master"``: bf16 parameters (what forward and backward read), fp32 master weights and fp32 moments in the
  optimizer, copied to the bf16 parameters after every step.

The arithmetic of one step is always fp32 (bf16 state is widened, updated and rounded back once).

Sharded parameters (FSDP2 ``DTensor``): the step runs on each rank's local shard; the only cross-shard quantity,
each tensor's RMS, comes from one all-reduce of the stacked local sums of squares over the shards' process group.
The optimizer state is created like the parameter (a ``DTensor`` of the same placement), which is what
``torch.distributed.checkpoint`` needs to save it sharded and load it on another number of ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from flasht5.train.config import SCHEDULES

PRECISIONS = ("fp32", "bf16", "bf16_kahan", "fp32_master")


def _local(t: torch.Tensor) -> torch.Tensor:
    """The rank's own shard of a DTensor (a view), the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def _sharded_group(p: torch.Tensor):
    """(process groups, device type of the collective) of the mesh dimensions over which ``p`` is sharded (one for
    FSDP2, the shard dimension of HSDP's 2-D mesh), or None when it is whole."""
    mesh = getattr(p, "device_mesh", None)
    if mesh is None:
        return None
    dims = tuple(i for i, pl in enumerate(p.placements) if pl.is_shard())
    if not dims:
        return None
    groups = tuple(mesh.get_group(i) for i in dims) if mesh.ndim > 1 else (mesh.get_group(),)
    return groups, mesh.device_type


class AdamWScale(torch.optim.Optimizer):
    """AdamW with the update scaled by ``max(1e-3, RMS(param))`` and decoupled weight decay; ``precision`` as in the
    module docstring; ``scale_by_rms=False``: plain AdamW (the update of ``torch.optim.AdamW``).

    One step is a fixed sequence of ``torch._foreach_*`` kernels over all tensors (not a Python loop of ~10 ops per
    tensor) whose step counts live on the device; ``lr`` may be a 0-dim device tensor. That makes ``step()`` free of
    host synchronisation and capturable in a CUDA graph (the training step replays it).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float | torch.Tensor = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        precision: str = "fp32",
        scale_by_rms: bool = True,
    ):
        if not isinstance(lr, torch.Tensor) and lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.scale_by_rms = bool(scale_by_rms)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            moments = p.dtype if self.precision in ("bf16", "bf16_kahan") else torch.float32
            state["step"] = torch.zeros((), dtype=torch.float32, device=_local(p).device)
            state["exp_avg"] = torch.zeros_like(p, dtype=moments)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=moments)
            if self.precision == "bf16_kahan" and p.dtype != torch.float32:
                state["kahan"] = torch.zeros_like(p)  # what rounding the weight to its dtype lost, carried over
            if self.precision == "fp32_master" and p.dtype != torch.float32:
                state["master"] = p.detach().to(torch.float32, copy=True)
        return state

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
            states = [self._init_state(p) for p in params]
            f32 = lambda ts: [t if t.dtype == torch.float32 else t.float() for t in ts]  # noqa: E731
            steps = [s["step"] for s in states]
            m_store = [_local(s["exp_avg"]) for s in states]
            v_store = [_local(s["exp_avg_sq"]) for s in states]
            m, v = f32(m_store), f32(v_store)
            grads = f32([_local(p.grad) for p in params])
            local = [_local(p) for p in params]
            masters = [_local(s["master"]) if "master" in s else None for s in states]
            p32 = [mst if mst is not None else q for mst, q in zip(masters, f32(local))]

            torch._foreach_add_(steps, 1)
            torch._foreach_lerp_(m, grads, 1 - beta1)  # m = beta1 m + (1 - beta1) g
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
            # bias corrections 1 - beta1^t and sqrt(1 - beta2^t), per tensor, on the device
            bc1 = torch._foreach_pow(beta1, steps)
            torch._foreach_neg_(bc1)
            torch._foreach_add_(bc1, 1)
            bc2 = torch._foreach_pow(beta2, steps)
            torch._foreach_neg_(bc2)
            torch._foreach_add_(bc2, 1)
            torch._foreach_sqrt_(bc2)
            update = torch._foreach_sqrt(v)
            if self.scale_by_rms:
                # step size lr * sqrt(1 - beta2^t) / (1 - beta1^t) * max(1e-3, RMS(p)); eps on the raw sqrt(v)
                scale = torch._foreach_div(bc2, bc1)
                rms = self._rms(params, p32)
                torch._foreach_clamp_min_(rms, 1e-3)  # the relative step: large tensors move more
                torch._foreach_mul_(scale, rms)
                torch._foreach_mul_(scale, lr)
                torch._foreach_add_(update, eps)
            else:
                # torch.optim.AdamW: step size lr / (1 - beta1^t), eps after the second moment's bias correction
                scale = torch._foreach_reciprocal(bc1)
                torch._foreach_mul_(scale, lr)
                torch._foreach_div_(update, bc2)
                torch._foreach_add_(update, eps)
            torch._foreach_div_(update, scale)  # denominator / step size: p -= m / update
            if wd:
                torch._foreach_mul_(p32, 1 - lr * wd)
            torch._foreach_addcdiv_(p32, m, update, value=-1.0)
            comp = [_local(s["kahan"]) if "kahan" in s else None for s in states]
            kahan = [(q, w, c) for q, w, c in zip(p32, local, comp) if c is not None]
            if kahan:
                # target = weight + update + carried error; the weight takes it rounded, the buffer what was lost
                torch._foreach_add_([q for q, _, _ in kahan], f32([c for _, _, c in kahan]))
            copies = [(w, q) for w, q in zip(local, p32) if q is not w]
            if copies:
                torch._foreach_copy_([w for w, _ in copies], [q for _, q in copies])
            if kahan:
                torch._foreach_sub_([q for q, _, _ in kahan], f32([w for _, w, _ in kahan]))
                torch._foreach_copy_([c for _, _, c in kahan], [q for q, _, _ in kahan])
            for store, val in ((m_store, m), (v_store, v)):
                narrowed = [(s, x) for s, x in zip(store, val) if s is not x]
                if narrowed:
                    torch._foreach_copy_([s for s, _ in narrowed], [x for _, x in narrowed])
        return loss

    @staticmethod
    def _rms(params: list[torch.Tensor], p32: list[torch.Tensor]) -> list[torch.Tensor]:
        """RMS of every (whole) parameter from local values; sharded ones sum their squares over their group."""
        rms = list(torch._foreach_norm(p32))
        groups = [_sharded_group(p) for p in params]
        sharded = [i for i, g in enumerate(groups) if g is not None]
        if sharded:
            import torch.distributed as dist

            by_group: dict = {}
            for i in sharded:
                by_group.setdefault(groups[i], []).append(i)
            for (pgs, device_type), idx in by_group.items():
                sq = torch.stack([rms[i] for i in idx]).square()
                dev = sq.device
                if device_type != dev.type:  # e.g. optimizer state offloaded to the CPU, NCCL on the GPU
                    sq = sq.to(device_type)
                for pg in pgs:
                    dist.all_reduce(sq, group=pg)
                sq = sq.to(dev).sqrt()
                for j, i in enumerate(idx):
                    rms[i] = sq[j]
        torch._foreach_div_(rms, [math.sqrt(p.numel()) for p in params])  # p.numel(): the whole tensor's
        return rms


def lr_at(step: int, *, total: int, warmup: int, schedule: str, final_ratio: float) -> float:
    """Multiplier of the peak learning rate at 0-based ``step``: linear warm-up over ``warmup`` steps ((step + 1) /
    warmup), then ``"cosine"`` decay to ``final_ratio`` at ``total``, ``"linear"`` decay to it, or ``"constant"``.

    After the warm-up, ``"linear"`` with ``final_ratio=0`` is transformers' ``get_linear_schedule_with_warmup``
    ((total - step) / (total - warmup)); during it transformers uses step / warmup, one step behind (its first step
    has learning rate 0), so with ``warmup=0`` the two schedules are identical."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return final_ratio + (1 - final_ratio) * (1 - progress)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
