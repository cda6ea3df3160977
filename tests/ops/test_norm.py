"""ops/norm.py: rms_norm (Triton) against the HF-semantics reference, with the error-ratio rule of DESIGN.md §5."""

import pytest
import torch
from ratio import assert_ratio

from flasht5.ops.norm import rms_norm, rms_norm_ref


def _run(fn, x, w, r, gy, gh):
    """Output(s) and gradients of sum(y * gy) (+ sum(h * gh)) w.r.t. x, w (and r)."""
    leaves = [t.detach().clone().requires_grad_() for t in ((x, w) if r is None else (x, w, r))]
    out = fn(leaves[0], leaves[1], 1e-6, None if r is None else leaves[2])
    if r is None:
        outs, loss = [out], (out.double() * gy).sum()
    else:
        outs, loss = list(out), (out[0].double() * gy).sum() + (out[1].double() * gh).sum()
    grads = torch.autograd.grad(loss, leaves)
    return outs, list(grads)


def _check(x, w, r, device):
    g = torch.Generator(device="cpu").manual_seed(1)
    gy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(device)
    gh = torch.randn(x.shape, generator=g, dtype=torch.float64).to(device)
    outs, grads = _run(rms_norm, x, w, r, gy, gh)
    same_outs, same_grads = _run(rms_norm_ref, x, w, r, gy, gh)
    d = lambda t: None if t is None else t.double()
    hi_outs, hi_grads = _run(rms_norm_ref, d(x), d(w), d(r), gy, gh)
    for o, s in zip(outs, same_outs):
        assert o.dtype == s.dtype and o.shape == s.shape
    for i, (o, h, s) in enumerate(zip(outs + grads, hi_outs + hi_grads, same_outs + same_grads)):
        assert torch.isfinite(o).all()
        assert_ratio(o, h, s, x.dtype, f"tensor {i}")
    for gr, leaf in zip(grads, (x, w, r)):
        assert gr.dtype == leaf.dtype


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize(
    "dtype,wdtype,d_model",
    [
        (torch.float32, torch.float32, 3000),
        (torch.float16, torch.float16, 3000),
        (torch.float16, torch.float32, 64),  # fp32 weight, half input -> fp32 output (HF promotion)
        (torch.float32, torch.float16, 200),  # half weight, fp32 input -> half output
    ],
)
def test_rms_norm_matches_reference(dtype, wdtype, d_model, residual, device):
    torch.manual_seed(0)
    x = torch.randn(2, 3, d_model, device=device, dtype=dtype) * 3
    w = (1 + 0.2 * torch.randn(d_model, device=device)).to(wdtype)
    r = torch.randn(2, 3, d_model, device=device, dtype=dtype) if residual else None
    _check(x, w, r, device)


def test_rms_norm_large_d_model(device):
    torch.manual_seed(0)
    x = torch.randn(3, 8192, device=device)
    w = torch.randn(8192, device=device)
    _check(x, w, None, device)


def test_rms_norm_non_contiguous_and_mixed_residual(device):
    torch.manual_seed(0)
    base = torch.randn(40, 2, 24, device=device, dtype=torch.float16)
    x = base.transpose(0, 1)[:, ::3]  # (2, 14, 24), strided rows
    r = torch.randn(2, 14, 48, device=device, dtype=torch.float32)[..., :24]  # row stride 48, fp32
    w = torch.randn(24, device=device, dtype=torch.float16)
    assert not x.is_contiguous() and not r.is_contiguous()
    y, h = rms_norm(x, w, residual=r)
    assert h.dtype == torch.float32 and y.dtype == torch.float16  # promote(fp16, fp32); half weight
    _check(x, w, r, device)


def test_rms_norm_only_one_output_used(device):
    # unused outputs get no zero-filled gradient (set_materialize_grads(False)); both backward branches must hold
    torch.manual_seed(0)
    x = torch.randn(3, 40, device=device, requires_grad=True)
    r = torch.randn(3, 40, device=device, dtype=torch.float16, requires_grad=True)
    w = torch.randn(40, device=device, requires_grad=True)
    _, h = rms_norm(x, w, residual=r)
    gx, gr = torch.autograd.grad((h * 3).sum(), (x, r))
    assert gx.dtype == torch.float32 and gr.dtype == torch.float16
    assert (gx == 3).all() and (gr == 3).all()
    y, _ = rms_norm(x, w, residual=r)
    got = torch.autograd.grad(y.sum(), (x, w, r))
    yr, _ = rms_norm_ref(x, w, residual=r)
    expect = torch.autograd.grad(yr.sum(), (x, w, r))
    for a, b in zip(got, expect):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-3)


def test_rms_norm_dtype_rule_matches_hf_t5_layer_norm(device):
    T5LayerNorm = pytest.importorskip("transformers.models.t5.modeling_t5").T5LayerNorm
    torch.manual_seed(0)
    for xdt, wdt in [(torch.float16, torch.float32), (torch.float32, torch.float16), (torch.float16, torch.float16)]:
        ln = T5LayerNorm(48, eps=1e-6).to(device, wdt)
        with torch.no_grad():
            ln.weight.copy_(torch.randn(48))
        x = torch.randn(5, 48, device=device).to(xdt)
        expect = ln(x)
        got = rms_norm(x, ln.weight.detach(), 1e-6)
        assert got.dtype == expect.dtype
        torch.testing.assert_close(rms_norm_ref(x, ln.weight, 1e-6), expect, rtol=0, atol=0)
        torch.testing.assert_close(got, expect, rtol=2e-3, atol=2e-3)


def test_rms_norm_bad_inputs():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(8, dtype=torch.int32))
    with pytest.raises(ValueError, match="x must"):
        rms_norm(torch.ones(2, 8, dtype=torch.int64), torch.ones(8))
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(8), residual=torch.randn(2, 9))


def test_traced_custom_ops_go_on_inductors_fallback_list(device, monkeypatch):
    """Off that list, torch <= 2.11 formats an op's IR arguments eagerly before its implicit fallback (minutes on a
    T5 graph, the compiled-model GPU test's hang); once traced, every flasht5 op is on it."""
    import torch._inductor.lowering as lowering

    from flasht5.ops import _device, attention, loss  # noqa: F401 (registers their ops)

    monkeypatch.setattr(_device, "_FALLBACK_ALLOWED", 0)
    fresh = type(lowering.FALLBACK_ALLOW_LIST)(n for n in lowering.FALLBACK_ALLOW_LIST if not n.startswith("flasht5::"))
    monkeypatch.setattr(lowering, "FALLBACK_ALLOW_LIST", fresh)  # as before any trace
    x, w = torch.randn(2, 32, device=device), torch.ones(32, device=device)
    torch.compile(lambda x, w: rms_norm(x, w), fullgraph=True, backend="aot_eager")(x, w)
    names = set(_device._CUSTOM_OPS)
    assert {"flasht5::rms_norm_fwd", "flasht5::flash_attn_bwd", "flasht5::linear_cross_entropy_fwd"} <= names
    assert names <= set(fresh)


def test_rms_norm_torch_compile_matches_eager(device):
    # aot_eager traces the custom ops with fullgraph=True (inductor's CPU codegen is too slow for CPU CI; the GPU
    # test below uses inductor); opcheck validates schema, fake and autograd registration.
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, device=device, requires_grad=True)
    r = torch.randn(2, 3, 32, device=device, requires_grad=True)
    w = torch.randn(32, device=device, requires_grad=True)

    def f(x, w, r):
        y, h = rms_norm(x * 2, w, 1e-6, r)
        return (y * h).sum()

    eager = torch.autograd.grad(f(x, w, r), (x, w, r))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, w, r), (x, w, r))
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)
    torch.library.opcheck(torch.ops.flasht5.rms_norm_fwd.default, (x, w, r, 1e-6, torch.float32))
    torch.library.opcheck(torch.ops.flasht5.rms_norm_fwd.default, (x, w, None, 1e-6, torch.float32))
    torch.library.opcheck(torch.ops.flasht5.rms_norm_fwd.default, (x, w, r, 1e-6, torch.float16))


# out_dtype: the dtype of y, rounded once from the value of the default call. bf16 on the GPU (the autocast use:
# fp32 weight and residual stream, bf16 into the next Linear); the interpreter cannot do bf16, so fp16 there.
_HALF_OUT = torch.bfloat16 if torch.cuda.is_available() else torch.float16


def _grads_of(fn, leaves, gys):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    outs = list(out) if isinstance(out, tuple) else [out]
    loss = sum((o.double() * g).sum() for o, g in zip(outs, gys))
    return outs, list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize(
    "xdtype,wdtype,out_dtype",
    [
        (torch.float32, torch.float32, _HALF_OUT),
        (torch.float16, torch.float32, _HALF_OUT),  # HF + autocast: half activations, fp32 weight
        (torch.float32, torch.float16, torch.float32),  # half weight: the product unrounded
        (torch.float16, torch.float16, _HALF_OUT),
    ],
)
def test_rms_norm_out_dtype_matches_reference(xdtype, wdtype, out_dtype, residual, device):
    torch.manual_seed(0)
    d_model = 200
    x = torch.randn(3, 7, d_model, device=device).to(xdtype) * 3
    w = (1 + 0.2 * torch.randn(d_model, device=device)).to(wdtype)
    r = torch.randn(3, 7, d_model, device=device) if residual else None  # an fp32 residual stream
    leaves = [x, w] if r is None else [x, w, r]
    g = torch.Generator().manual_seed(1)
    gys = [torch.randn(x.shape, generator=g, dtype=torch.float64).to(device) for _ in range(2)]

    def ours(x, w, r=None):
        return rms_norm(x, w, 1e-6, r, out_dtype=out_dtype)

    def same(x, w, r=None):  # HF's norm, then the cast the next layer does
        out = rms_norm_ref(x, w, 1e-6, r)
        return out.to(out_dtype) if r is None else (out[0].to(out_dtype), out[1])

    outs, grads = _grads_of(ours, leaves, gys)
    s_outs, s_grads = _grads_of(same, leaves, gys)
    hi_outs, hi_grads = _grads_of(lambda *a: rms_norm_ref(*a[:2], 1e-6, *a[2:]), [t.double() for t in leaves], gys)
    assert outs[0].dtype == out_dtype and outs[0].shape == x.shape
    if residual:
        assert outs[1].dtype == torch.promote_types(xdtype, torch.float32) and outs[1].dtype == s_outs[1].dtype
    dtypes = [out_dtype, xdtype][: len(outs)] + [t.dtype for t in leaves]
    for i, (o, h, s, dt) in enumerate(zip(outs + grads, hi_outs + hi_grads, s_outs + s_grads, dtypes, strict=True)):
        assert o.dtype == s.dtype, i
        assert torch.isfinite(o).all()
        assert_ratio(o, h, s, dt if dt != torch.float32 else xdtype, f"tensor {i}")


@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_out_dtype_is_one_rounding_of_the_default(residual, device):
    # fp32 weight: the default output is the fp32 value; out_dtype rounds that value once, h is unchanged, and the
    # backward of a gradient given in out_dtype is the default backward of the same gradient upcast.
    torch.manual_seed(0)
    x = torch.randn(5, 96, device=device, dtype=torch.float16)
    w = 1 + 0.2 * torch.randn(96, device=device)
    r = torch.randn(5, 96, device=device) if residual else None
    leaves = [x, w] if r is None else [x, w, r]
    dy = torch.randn(5, 96, device=device).to(_HALF_OUT)
    dh = torch.randn(5, 96, device=device)

    def run(out_dtype, dy):
        ls = [t.detach().clone().requires_grad_() for t in leaves]
        out = rms_norm(ls[0], ls[1], 1e-6, ls[2] if residual else None, out_dtype=out_dtype)
        outs = list(out) if residual else [out]
        grads = torch.autograd.grad(outs, ls, [dy, dh][: len(outs)])
        return outs, grads

    (y, *h), grads = run(_HALF_OUT, dy)
    (y_def, *h_def), grads_def = run(None, dy.float())
    assert y_def.dtype == torch.float32 and y.dtype == _HALF_OUT
    assert torch.equal(y, y_def.to(_HALF_OUT))
    for i, (a, b) in enumerate(zip(h + list(grads), h_def + list(grads_def), strict=True)):
        assert a.dtype == b.dtype
        if i == len(h) + 1:  # dweight: on the GPU the persistent grid's size (and so the order of the fp32 partial
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # sums) follows the bytes dy brings per row
        else:
            assert torch.equal(a, b)


def test_rms_norm_out_dtype_compile_and_bad_value(device):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, device=device, requires_grad=True)
    w = torch.randn(32, device=device, requires_grad=True)

    def f(x, w):
        y, h = rms_norm(x * 2, w, 1e-6, x, out_dtype=torch.float16)
        return (y.float() * h).sum()

    eager = torch.autograd.grad(f(x, w), (x, w))
    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(x, w), (x, w))
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="out_dtype"):
        rms_norm(x, w, out_dtype=torch.int32)


@pytest.mark.gpu
@pytest.mark.parametrize("d_model", [768, 3000, 4096, 8192])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_bf16_gpu(d_model, residual):
    torch.manual_seed(0)
    x = torch.randn(4, 129, d_model, device="cuda", dtype=torch.bfloat16)
    w = (1 + 0.2 * torch.randn(d_model, device="cuda")).to(torch.bfloat16)
    r = torch.randn_like(x) if residual else None
    _check(x, w, r, "cuda")
    _check(x, w.float(), r, "cuda")  # fp32 weight: fp32 output


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(16384, 768), (8192, 4096)])
def test_rms_norm_many_rows_gpu(shape):
    # Enough rows that every backward program loops over many row blocks (the software-pipelined path) and the
    # dweight reduction sums hundreds of partials.
    torch.manual_seed(0)
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    w = (1 + 0.2 * torch.randn(shape[1], device="cuda")).to(torch.bfloat16)
    _check(x, w, torch.randn_like(x), "cuda")


@pytest.mark.gpu
def test_rms_norm_inductor_gpu():
    x = torch.randn(4, 100, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def f(x, w):
        y, h = rms_norm(x, w, 1e-6, x * 0.5)
        return (y.float() * h.float()).sum()

    eager = torch.autograd.grad(f(x, w), (x, w))
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(x, w), (x, w))
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)
