"""AdamWScale's precisions (src/flasht5/train/optim.py): pure bf16, bf16 + Kahan compensation, fp32 master weights.

The curve test trains one small network four times from the same initialisation on the same batches: fp32, pure
bf16, bf16 + Kahan, bf16 weights with fp32 masters. At a learning rate whose relative updates (1e-3) are below half
a bf16 ulp (2^-9), plain bf16 rounds most updates away and stalls; the compensation buffer carries them, so the
Kahan run tracks the fp32 loss far closer.
"""

from __future__ import annotations

import pytest
import torch

from flasht5.train.optim import AdamWScale


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))


def _curve(precision: str, steps: int = 300, lr: float = 1e-3) -> list[float]:
    net = _net()
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    net.to(dtype)
    opt = AdamWScale(net.parameters(), lr=lr, betas=(0.9, 0.99), precision=precision)
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(16, 1, generator=g)
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 16, generator=g)
        y = torch.tanh(x @ teacher)
        loss = torch.nn.functional.mse_loss(net(x.to(dtype)).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_bf16_kahan_tracks_the_fp32_loss_far_closer_than_plain_bf16():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits (and a loaded CI machine makes it slow)
    try:
        curves = {p: torch.tensor(_curve(p)) for p in ("fp32", "bf16", "bf16_kahan", "fp32_master")}
    finally:
        torch.set_num_threads(threads)
    gap = {p: (c - curves["fp32"]).abs()[100:].mean().item() for p, c in curves.items()}
    fp32 = curves["fp32"]
    assert fp32[-50:].mean() < 0.8 * fp32[:10].mean()  # the fp32 run learns
    assert curves["bf16"][-50:].mean() > 1.2 * fp32[-50:].mean(), gap  # plain bf16 lags far behind
    assert gap["bf16_kahan"] < 0.2 * gap["bf16"], gap
    assert gap["fp32_master"] < 0.2 * gap["bf16"], gap


def test_state_dtypes_and_the_compensation_carries_the_rounding_error():
    p = torch.nn.Parameter(torch.randn(8, 8).to(torch.bfloat16))
    opt = AdamWScale([p], lr=1e-3, precision="bf16_kahan")
    p0 = p.detach().float().clone()
    p.grad = torch.randn(8, 8).to(torch.bfloat16)
    opt.step()
    st = opt.state[p]
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == st["kahan"].dtype == torch.bfloat16
    # first step: |update| = lr * RMS(p); weight + compensation hold the fp32 result to the compensation's precision
    rms = p0.pow(2).mean().sqrt()
    want = p0 - 1e-3 * rms * torch.sign(p.grad.float())
    held = p.detach().float() + st["kahan"].float()
    assert (held - want).abs().max() < 1e-2 * (p.detach().float() - want).abs().max() + 1e-6
    assert st["kahan"].abs().max() > 0  # something was lost in rounding and is carried

    q = torch.nn.Parameter(torch.randn(8, 8).to(torch.bfloat16))
    opt = AdamWScale([q], lr=1e-3, precision="fp32_master")
    q.grad = torch.randn(8, 8).to(torch.bfloat16)
    opt.step()
    st = opt.state[q]
    assert st["master"].dtype == st["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(q.detach(), st["master"].to(torch.bfloat16), rtol=0, atol=0)


def test_fp32_parameters_are_untouched_by_the_bf16_options():
    """fp32 parameters under bf16_kahan / fp32_master take the plain fp32 step (no buffers, same numbers)."""
    results = []
    for precision in ("fp32", "bf16_kahan", "fp32_master"):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(5, 3))
        opt = AdamWScale([p], lr=1e-2, precision=precision)
        for _ in range(3):
            p.grad = torch.ones(5, 3)
            opt.step()
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
        results.append(p.detach().clone())
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
    torch.testing.assert_close(results[2], results[0], rtol=0, atol=0)


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        AdamWScale([torch.nn.Parameter(torch.zeros(2))], precision="fp8")


def test_resumed_bf16_state_keeps_its_dtypes_and_values():
    """checkpoint.load_optimizer_state (the single-process resume) leaves bf16 moments and Kahan buffers bf16."""
    from flasht5.train import checkpoint as ckpt

    p = torch.nn.Parameter(torch.randn(4, 4).to(torch.bfloat16))
    opt = AdamWScale([p], lr=1e-3, precision="bf16_kahan")
    p.grad = torch.randn(4, 4).to(torch.bfloat16)
    opt.step()
    saved = opt.state_dict()
    fresh = AdamWScale([p], lr=1e-3, precision="bf16_kahan")
    ckpt.load_optimizer_state(fresh, saved, 1e-3)
    for k, v in opt.state[p].items():
        assert fresh.state[p][k].dtype == (torch.float32 if k == "step" else torch.bfloat16), k
        torch.testing.assert_close(fresh.state[p][k], v, rtol=0, atol=0)
