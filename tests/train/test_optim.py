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


def test_scale_by_rms_off_is_torch_adamw_step_for_step():
    """AdamWScale(scale_by_rms=False), the config's optim.name=adamw: the update of torch.optim.AdamW (decoupled
    weight decay, eps after the second moment's bias correction), over steps with changing gradients and lrs."""
    torch.manual_seed(0)
    shapes = [(7, 5), (13,), (3, 4, 2)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    opt = AdamWScale(ours, lr=3e-3, scale_by_rms=False, **kw)
    torch_opt = torch.optim.AdamW(ref, lr=3e-3, foreach=False, **kw)
    g = torch.Generator().manual_seed(1)
    for step in range(20):
        lr = 3e-3 * (step + 1) / 20
        for group in (*opt.param_groups, *torch_opt.param_groups):
            group["lr"] = lr
        for a, b in zip(ours, ref):
            grad = torch.randn(a.shape, generator=g) * (1e-4 if step % 5 == 0 else 1.0)  # small ones test eps
            a.grad, b.grad = grad.clone(), grad.clone()
        opt.step()
        torch_opt.step()
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
    torch.manual_seed(0)
    start = [torch.randn(s) for s in shapes]
    assert min((a.detach() - s).abs().max().item() for a, s in zip(ours, start)) > 1e-3  # every tensor moved
    # the default (RMS-scaled) step is a different update: the flag is what makes it AdamW
    scaled = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    for p in (*scaled, *plain):
        p.grad = torch.ones_like(p)
    AdamWScale(scaled, lr=3e-3, **kw).step()
    AdamWScale(plain, lr=3e-3, scale_by_rms=False, **kw).step()
    assert max((a - b).abs().max().item() for a, b in zip(scaled, plain)) > 1e-4


def test_linear_schedule_values():
    from flasht5.train.optim import lr_at

    at = lambda s, **kw: lr_at(s, **{"total": 10, "warmup": 2, "schedule": "linear", "final_ratio": 0.0, **kw})  # noqa: E731
    assert [at(s) for s in range(10)] == pytest.approx([0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
    assert at(10) == 0.0 and at(12) == 0.0  # past the end: the floor
    assert at(6, final_ratio=0.2) == pytest.approx(0.2 + 0.8 * 0.5)
    # no warm-up: transformers' get_linear_schedule_with_warmup(num_warmup_steps=0) multiplier, (total - s) / total
    assert [at(s, warmup=0) for s in range(10)] == pytest.approx([(10 - s) / 10 for s in range(10)])
    with pytest.raises(ValueError, match="cosine"):
        lr_at(0, total=10, warmup=0, schedule="step", final_ratio=0.0)


def test_bad_optimizer_name_and_schedule_are_refused_naming_the_choices():
    from flasht5.train.config import FinetuneConfig, load_config

    with pytest.raises(ValueError, match=r"optim\.name must be one of \['adamwscale', 'adamw'\].*'adam'"):
        load_config(None, ["--optim.name=adam"], check_paths_too=False)
    with pytest.raises(ValueError, match=r"optim\.schedule must be one of \['cosine', 'linear', 'constant'\]"):
        load_config(None, ["--optim.schedule=linaer", "--data.tokenizer=tok"], check_paths_too=False,
                    schema=FinetuneConfig)  # fmt: skip
    cfg = load_config(None, ["--optim.name=adamw", "--optim.schedule=linear"], check_paths_too=False)
    assert (cfg.optim.name, cfg.optim.schedule) == ("adamw", "linear")


@pytest.mark.gpu
def test_adamw_mode_replays_in_a_cuda_graph_without_host_sync_and_matches_torch_adamw():
    """optim.name=adamw on the GPU as the training step runs it: lr a device tensor, the step captured once in a CUDA
    graph and replayed (no host synchronisation), bf16_kahan as well; fp32 matches torch.optim.AdamW."""
    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (8, 4, 4)]
    for precision in ("fp32", "bf16_kahan"):
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        ours = [torch.nn.Parameter(torch.randn(s, device="cuda").to(dtype)) for s in shapes]
        ref = [torch.nn.Parameter(p.detach().float().clone()) for p in ours]
        lr = torch.tensor(1e-3, device="cuda")
        opt = AdamWScale(ours, lr=lr, weight_decay=0.01, precision=precision, scale_by_rms=False)
        torch_opt = torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.01)
        grads = [torch.randn(s, device="cuda") for s in shapes]
        for p, g in zip(ours, grads):
            p.grad = g.to(dtype)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            opt.step()  # warm-up step (state created outside the graph)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt.step()
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        torch_opt.step()  # the warm-up step
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(5):
                graph.replay()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for _ in range(5):  # capture records the step without running it: 1 warm-up + 5 replays
            torch_opt.step()
        for a, b in zip(ours, ref):
            if precision == "fp32":
                torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
            else:  # bf16 weights + compensation hold the fp32 trajectory to bf16 rounding
                state = opt.state[a]
                held = a.detach().float() + state["kahan"].float()
                torch.testing.assert_close(held, b.detach(), rtol=1e-2, atol=1e-3)
