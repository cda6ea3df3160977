"""The per-op host contract (DESIGN.md §4): the eager route (autograd.Function around the launchers) and the traced
route (the torch.library custom ops) give the same bits; eager calls dispatch no custom op; calls without gradients
build no autograd node; on the GPU no call synchronises with the host, nothing queries the device per call, and
label values of CUDA tensors are only checked with FLASHT5_DEBUG=1."""

import pytest
import torch
from ratio import random_labels
from torch.utils._python_dispatch import TorchDispatchMode

import flasht5.ops.activations as act_mod
import flasht5.ops.loss as loss_mod
import flasht5.ops.norm as norm_mod


def _cases(device):
    """name -> (module, fn(*leaves) -> output(s), leaves)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s, dtype=torch.float32: (torch.randn(*s, generator=g) * 2).to(dtype).to(device)  # noqa: E731
    y = random_labels((2, 5), 300, device)
    return {
        "rms_norm": (norm_mod, lambda x, w: norm_mod.rms_norm(x, w, 1e-6), [r(2, 5, 40), r(40, dtype=torch.float16)]),
        "rms_norm residual": (
            norm_mod,
            lambda x, w, res: norm_mod.rms_norm(x, w, 1e-6, res),
            [r(2, 5, 40, dtype=torch.float16), r(40), r(2, 5, 40)],
        ),
        "rms_norm residual out_dtype": (
            norm_mod,
            lambda x, w, res: norm_mod.rms_norm(x, w, 1e-6, res, out_dtype=torch.float16),
            [r(2, 5, 40, dtype=torch.float16), r(40), r(2, 5, 40)],
        ),
        "gated_act": (act_mod, lambda f: act_mod.gated_act(*f.chunk(2, -1), "gelu_tanh"), [r(2, 5, 80)]),
        "cross_entropy mean": (
            loss_mod,
            lambda x: loss_mod.cross_entropy(x, y, z_loss=1e-3, label_smoothing=0.1, return_z_loss=True),
            [r(2, 5, 300, dtype=torch.float16)],
        ),
        "cross_entropy none": (loss_mod, lambda x: loss_mod.cross_entropy(x, y, reduction="none"), [r(2, 5, 300)]),
        "linear_cross_entropy mean": (
            loss_mod,
            lambda h, w: loss_mod.linear_cross_entropy(h, w, y, z_loss=1e-3, scale=0.5, return_z_loss=True),
            [r(2, 5, 16), r(300, 16)],
        ),
        "linear_cross_entropy sum": (
            loss_mod,
            lambda h, w: loss_mod.linear_cross_entropy(h, w, y, reduction="sum"),
            [r(2, 5, 16), r(300, 16)],
        ),
        "linear_cross_entropy none": (
            loss_mod,
            lambda h, w: loss_mod.linear_cross_entropy(h, w, y, reduction="none", scale=0.5),
            [r(2, 5, 16), r(300, 16)],
        ),
    }


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def _fwd_bwd(fn, leaves):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    outs = list(out) if isinstance(out, tuple) else [out]
    g = torch.Generator().manual_seed(1)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum() for o in outs)
    return outs, list(torch.autograd.grad(loss, leaves))


def _bits(t):
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8)


@pytest.mark.parametrize("name", list(_cases("cpu")))
def test_eager_route_equals_custom_op_route_bit_for_bit(name, device, monkeypatch):
    mod, fn, leaves = _cases(device)[name]
    with _OpLog() as log:
        eager = _fwd_bwd(fn, leaves)
    assert not [n for n in log.names if n.startswith("flasht5::")], "the eager route dispatched a custom op"
    monkeypatch.setattr(mod, "use_custom_op", lambda t: True)
    with _OpLog() as log:
        traced = _fwd_bwd(fn, leaves)
    assert [n for n in log.names if n.startswith("flasht5::")], "the patched route did not use the custom ops"
    for a, b in zip(eager[0] + eager[1], traced[0] + traced[1], strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("name", list(_cases("cpu")))
def test_no_grad_call_builds_no_graph_and_gives_the_same_bits(name, device):
    _mod, fn, leaves = _cases(device)[name]
    with torch.no_grad():
        plain = fn(*leaves)
    plain = list(plain) if isinstance(plain, tuple) else [plain]
    tracked = _fwd_bwd(fn, leaves)[0]
    for a, b in zip(plain, tracked, strict=True):
        assert a.grad_fn is None and not a.requires_grad
        assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("n", [0, 1, 7, 4096, 4097, loss_mod._COUNT_MAX_ROWS, loss_mod._COUNT_MAX_ROWS + 1])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_inv_count_is_torchs_formula_bit_for_bit(n, dtype, device):
    y = random_labels((n,), 50, device, p_ignore=0.4, seed=n).to(dtype)
    expect = 1.0 / (y != -100).sum().clamp(min=1).to(torch.float32)
    got = loss_mod._inv_count(y, n, -100)
    assert got.shape == () and got.dtype == torch.float32 and got.device == y.device
    assert torch.equal(_bits(got), _bits(expect))
    if n:
        y_all = torch.full((n,), 5, dtype=dtype, device=device)  # ignore_index other than -100, none ignored
        assert loss_mod._inv_count(y_all, n, 5).item() == 1.0  # all ignored: divide by 1
        assert loss_mod._inv_count(y_all, n, 3).item() == (1.0 / torch.tensor(float(n))).item()


@pytest.mark.parametrize("n", [0, 7, 4097, loss_mod._COUNT_MAX_ROWS + 1])
@pytest.mark.parametrize("with_z", [False, True])
def test_mean_in_place_is_torchs_sum_times_inv_count_bit_for_bit(n, with_z, device):
    # the kernel divides the torch sums in place (or torch's mul_ above the kernel's limit): total * (1 / n_kept)
    y = random_labels((n,), 50, device, p_ignore=0.4, seed=n)
    g = torch.Generator().manual_seed(n)
    rows = (torch.randn(n, generator=g) * 3).to(device)
    z_rows = (torch.rand(n, generator=g) * 1e-3).to(device)
    inv = 1.0 / (y != -100).sum().clamp(min=1).to(torch.float32)
    total, total_z = rows.sum(), (z_rows.sum() if with_z else None)
    got_inv = loss_mod._mean_(y, n, -100, total, total_z)
    assert torch.equal(_bits(got_inv), _bits(inv))
    assert torch.equal(_bits(total), _bits(rows.sum() * inv))
    if with_z:
        assert torch.equal(_bits(total_z), _bits(z_rows.sum() * inv))


def test_cpu_labels_are_always_checked(device):
    if device != "cpu":
        pytest.skip("CPU tensors need the interpreter")
    with pytest.raises(ValueError, match="labels"):
        loss_mod.cross_entropy(torch.randn(3, 5), torch.tensor([0, 5, 1]))


@pytest.mark.gpu
def test_no_host_sync_on_the_hot_path_gpu():
    cases = _cases("cuda")
    for _mod, fn, leaves in cases.values():  # warm up: compile, cache configs, probe cuBLAS
        _fwd_bwd(fn, leaves)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _mod, fn, leaves in cases.values():
            leaves = [t.detach().clone().requires_grad_() for t in leaves]
            out = fn(*leaves)
            out = out[0] if isinstance(out, tuple) else out
            out.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
def test_no_device_query_per_call_gpu(monkeypatch):
    cases = _cases("cuda")
    for _mod, fn, leaves in cases.values():
        _fwd_bwd(fn, leaves)

    def forbidden(*a, **k):
        raise AssertionError("get_device_properties called on the hot path")

    monkeypatch.setattr(torch.cuda, "get_device_properties", forbidden)
    for _mod, fn, leaves in cases.values():
        _fwd_bwd(fn, leaves)


@pytest.mark.gpu
def test_cuda_labels_are_value_checked_only_in_debug_mode_gpu(monkeypatch):
    logits = torch.randn(4, 10, device="cuda")
    bad = torch.tensor([0, 1, 10, -100], device="cuda")
    monkeypatch.delenv("FLASHT5_DEBUG", raising=False)
    loss_mod.cross_entropy(logits, bad)  # unchecked: no sync, a wrong loss but no out-of-bounds read
    loss_mod.linear_cross_entropy(torch.randn(4, 8, device="cuda"), torch.randn(10, 8, device="cuda"), bad)
    torch.cuda.synchronize()
    monkeypatch.setenv("FLASHT5_DEBUG", "1")
    with pytest.raises(ValueError, match="labels"):
        loss_mod.cross_entropy(logits, bad)
