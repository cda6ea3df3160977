"""gated_act (Triton) against HF's formulas, error-ratio rule of DESIGN.md §5."""

import math

import pytest
import torch
from ratio import assert_ratio

from flasht5.ops.activations import gated_act, gated_act_ref


def _run(fn, gate, up, kind, upstream):
    g, u = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    out = fn(g, u, kind)
    dg, du = torch.autograd.grad((out.double() * upstream).sum(), (g, u))
    return out, dg, du


def _check(gate, up, kind):
    upstream = torch.randn(gate.shape, dtype=torch.float64).to(gate.device)
    out = _run(gated_act, gate, up, kind, upstream)
    same = _run(gated_act_ref, gate, up, kind, upstream)
    hi = _run(gated_act_ref, gate.double(), up.double(), kind, upstream)
    for name, o, h, s in zip(("out", "dgate", "dup"), out, hi, same):
        assert o.dtype == gate.dtype and o.shape == gate.shape and torch.isfinite(o).all(), name
        assert_ratio(o, h, s, gate.dtype, name)


@pytest.mark.parametrize("kind", ["gelu_tanh", "gelu_new", "gelu_pytorch_tanh", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gated_act_matches_reference(kind, dtype, device):
    torch.manual_seed(0)
    gate = (torch.randn(3, 5, 700, device=device) * 3).to(dtype)
    gate[0, 0, :4] = torch.tensor([-30.0, 30.0, 0.0, -1e-3])  # tanh / sigmoid saturation and zero
    up = torch.randn(3, 5, 700, device=device).to(dtype)
    _check(gate, up, kind)


def test_gated_act_on_chunks_of_a_fused_projection(device):
    # gate, up = wi(x).chunk(2, -1): strided views, used without a copy
    torch.manual_seed(0)
    fused = torch.randn(4, 6, 2 * 300, device=device)
    gate, up = fused.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    _check(gate, up, "silu")
    _check(gate.transpose(0, 1), up.transpose(0, 1), "gelu_tanh")


def test_gelu_tanh_is_hf_new_gelu(device):
    activations = pytest.importorskip("transformers.activations")
    x = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    up = torch.ones_like(x)
    expect = activations.NewGELUActivation()(x)
    torch.testing.assert_close(gated_act_ref(x, up, "gelu_tanh"), expect, rtol=0, atol=0)
    xf, upf = x.float().to(device), up.float().to(device)
    torch.testing.assert_close(gated_act(xf, upf, "gelu_tanh").cpu().double(), expect, rtol=1e-5, atol=1e-6)
    pytorch_tanh = activations.PytorchGELUTanh()(x.float())
    got = gated_act(xf, upf, "gelu_pytorch_tanh")
    torch.testing.assert_close(got.cpu(), pytorch_tanh)
    # definition check without HF: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    v = 1.3
    ref = 0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))
    one = torch.ones(1, device=device)
    assert abs(gated_act(one * v, one, "gelu_tanh").item() - ref) < 1e-6


def test_bad_inputs():
    a = torch.randn(4, 8)
    with pytest.raises(ValueError, match="kind"):
        gated_act(a, a, "relu")
    with pytest.raises(ValueError, match="shape"):
        gated_act(a, torch.randn(4, 9), "silu")
    with pytest.raises(ValueError, match="dtype"):
        gated_act(a, a.half(), "silu")
    with pytest.raises(ValueError, match="gate"):
        gated_act(a.long(), a.long(), "silu")


def test_gated_act_torch_compile_matches_eager(device):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, device=device, requires_grad=True)

    def f(x):
        gate, up = (x * 2).chunk(2, -1)
        return gated_act(gate, up, "gelu_new").sum()

    eager = torch.autograd.grad(f(x), x)[0]
    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(x), x)[0]
    torch.testing.assert_close(got, eager)
    gate, up = (torch.randn(5, 16, device=device, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.flasht5.gated_act_fwd.default, (gate, up, 0))
    torch.library.opcheck(torch.ops.flasht5.gated_act_fwd.default, (gate, up, 1))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gelu_tanh", "silu"])
def test_gated_act_bf16_gpu(kind):
    torch.manual_seed(0)
    fused = (torch.randn(4, 257, 2 * 2816, device="cuda") * 3).to(torch.bfloat16)
    gate, up = fused.chunk(2, dim=-1)
    _check(gate, up, kind)


@pytest.mark.gpu
def test_gated_act_inductor_gpu():
    x = torch.randn(8, 100, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def f(x):
        gate, up = x.chunk(2, -1)
        return gated_act(gate, up, "silu").float().sum()

    eager = torch.autograd.grad(f(x), x)[0]
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(x), x)[0]
    torch.testing.assert_close(got, eager)
