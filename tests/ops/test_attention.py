"""Tests of ``flasht5.ops.attention``: kernel vs plain-PyTorch reference (error-ratio rule), HF bucket parity,
bad-input errors, custom-op registration. CPU cases run under the Triton interpreter and are kept small."""

import math

import pytest
import torch

from flasht5.ops import attention as A
from flasht5.ops.attention import flash_attention, flash_attention_ref, relative_position_bucket, t5_bias_lut

# the interpreter warns on every tensor used as a loop bound
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
# atol of the error-ratio rule, relative to the reference's magnitude (grads of a table summed over L^2 scores are
# large, so a fixed atol would be meaningless for them).
ATOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _check(name: str, got: torch.Tensor, ref32: torch.Tensor, ref_same: torch.Tensor | None, dtype) -> None:
    """max|kernel - ref_fp32| <= 2 * max|torch_same_dtype - ref_fp32| + atol(dtype)."""
    got, ref32 = got.float(), ref32.float()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    assert got.shape == ref32.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref32.shape)}"
    base = 0.0 if ref_same is None else (ref_same.float() - ref32).abs().max().item() if ref32.numel() else 0.0
    atol = ATOL[dtype] * max(1.0, ref32.abs().max().item() if ref32.numel() else 1.0)
    err = (got - ref32).abs().max().item() if ref32.numel() else 0.0
    assert err <= 2 * base + atol, f"{name}: max err {err:.3g} > 2 * {base:.3g} + {atol:.3g}"


def _leaf(x: torch.Tensor, dtype=None) -> torch.Tensor:
    return x.detach().to(dtype or x.dtype).clone().requires_grad_(x.requires_grad)


def run_case(
    dtype=torch.float32,
    *,
    B=2,
    Lq=37,
    Lk=None,
    H=2,
    D=32,
    causal=False,
    rel=None,  # (num_buckets, max_distance, bidirectional)
    alibi=False,
    bias_shape=None,
    bias_grad=True,
    bias_mask_batch=None,
    lens=None,  # varlen: (q lengths, k lengths)
    table_dtype=torch.float32,
    lut=False,  # pass the T5 bias as rel_lut = t5_bias_lut(table) (gradient checked w.r.t. the lut)
    max_seqlen=None,  # varlen: (max_seqlen_q, max_seqlen_k) handed to the kernel instead of the true maxima
    seed=0,
    device=DEV,
):
    """Run kernel and references on the same random inputs; check output and every gradient."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    Lk = Lq if Lk is None else Lk
    rnd = lambda *s: torch.randn(*s, generator=g).to(device)
    if lens is None:
        q, k, v = rnd(B, Lq, H, D), rnd(B, Lk, H, D), rnd(B, Lk, H, D)
        cu = {}
    else:
        lq, lk = lens
        q, k, v = rnd(sum(lq), H, D), rnd(sum(lk), H, D), rnd(sum(lk), H, D)
        cq = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32, device=device)
        ck = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32, device=device)
        cu = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=max(lq), max_seqlen_k=max(lk))
        if max_seqlen is not None:
            cu.update(max_seqlen_q=max_seqlen[0], max_seqlen_k=max_seqlen[1])
    q, k, v = (x.to(dtype).requires_grad_() for x in (q, k, v))
    kw: dict = dict(causal=causal, **cu)
    params = {}
    if rel is not None:
        nb, R, bidir = rel
        table = (rnd(nb, H) * 0.5).to(table_dtype)
        if lut:
            params["rel_lut"] = t5_bias_lut(table, bidir, R).requires_grad_()
        else:
            params["rel_table"] = table.requires_grad_()
            kw.update(rel_bidirectional=bidir, rel_max_distance=R)
    if alibi:
        kw["alibi_slopes"] = torch.rand(H, generator=g).to(device) * 0.5
    if bias_shape is not None:
        b = rnd(*bias_shape).to(dtype)
        if bias_mask_batch is not None:  # a padding-style mask: every key of this batch element is -inf
            b[bias_mask_batch] = float("-inf")
        params["bias"] = b.requires_grad_(bias_grad)
    inputs = [q, k, v] + [p for p in params.values() if p.requires_grad]

    out = flash_attention(q, k, v, **kw, **params)
    assert out.dtype == dtype and out.shape == q.shape
    dout = torch.randn(out.shape, generator=g).to(device).to(dtype)
    grads = torch.autograd.grad(out, inputs, dout)

    def reference(upcast: bool):
        cast = (lambda x: x.float()) if upcast else (lambda x: x)
        ins = [_leaf(x, torch.float32 if upcast and x.is_floating_point() else None) for x in inputs]
        rq, rk, rv = ins[:3]
        rp = dict(params)
        for i, name in enumerate(n for n, p in params.items() if p.requires_grad):
            rp[name] = ins[3 + i]
        o = flash_attention_ref(rq, rk, rv, **kw, **rp, upcast=upcast)
        return o, torch.autograd.grad(o, ins, cast(dout))

    out32, grads32 = reference(True)
    out_same, grads_same = reference(False) if dtype != torch.float32 else (None, [None] * len(grads))
    names = ["out", "dq", "dk", "dv"] + [f"d{n}" for n, p in params.items() if p.requires_grad]
    _check(names[0], out, out32, out_same, dtype)
    for name, gk, g32, gs in zip(names[1:], grads, grads32, grads_same):
        _check(name, gk, g32, gs, dtype)
        if name == "drel_table":
            assert gk.dtype == params["rel_table"].dtype
        if name == "drel_lut":
            assert gk.dtype == torch.float32
    return out


# ------------------------------------------------------------------------------------------------ CPU / any device


@pytest.mark.parametrize(
    "case",
    [
        dict(Lq=37),  # odd length, no bias
        dict(Lq=61, causal=True),
        dict(Lq=61, rel=(8, 6, True)),  # encoder: far-left / near / far-right / tail segments
        dict(Lq=61, rel=(8, 6, False), causal=True),  # decoder
        dict(Lq=20, Lk=45, rel=(8, 6, False), causal=True),  # Lq < Lk, bottom-right
        dict(Lq=45, Lk=20, rel=(8, 6, True), causal=True),  # Lq > Lk: first rows see no key -> 0
        dict(Lq=1, Lk=37, rel=(8, 6, False), causal=True),  # decode step
        dict(Lq=29, Lk=50, rel=(8, 6, True)),  # cross-attention shapes, bidirectional
        dict(Lq=40, alibi=True),
        dict(Lq=23, Lk=40, alibi=True, causal=True),
    ],
    ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()).replace(" ", ""),
)
def test_fp32_cases(case):
    run_case(torch.float32, **case)


def test_t5_default_buckets_with_far_tiles():
    """32 buckets, max distance 128 (T5): distances beyond 128 saturate; a far tile exists at L = 150."""
    run_case(torch.float32, B=1, Lq=150, H=1, D=16, rel=(32, 128, True))


@pytest.mark.parametrize(
    "bias_shape",
    [(1, 2, 33, 21), (2, 1, 33, 21), (2, 1, 1, 21), (33, 1)],
    ids=["1HQK", "B1QK", "B11K", "Q1"],
)
def test_additive_bias(bias_shape):
    run_case(torch.float32, B=2, Lq=33, Lk=21, H=2, bias_shape=bias_shape, causal=bias_shape == (33, 1))


def test_bias_with_rel_and_fully_masked_rows():
    """A padding-style -inf bias that masks every key of one batch element: output 0, finite grads."""
    out = run_case(torch.float32, B=2, Lq=24, H=2, bias_shape=(2, 1, 1, 24), bias_mask_batch=1, rel=(8, 6, True))
    assert out[1].abs().max().item() == 0.0


def test_bias_without_grad():
    run_case(torch.float32, Lq=19, bias_shape=(2, 2, 19, 19), bias_grad=False)


@pytest.mark.parametrize("D", [64, 128])
def test_head_dims(D):
    run_case(torch.float32, B=1, Lq=17, Lk=24, H=1, D=D, rel=(8, 6, True))


def test_fp16_and_bf16_table():
    """fp16 q/k/v with a bf16 table: the table's gradient comes back in bf16."""
    run_case(torch.float16, B=1, Lq=33, H=2, rel=(8, 6, False), causal=True, table_dtype=torch.bfloat16)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen(causal):
    """Packed sequences with lengths 1 and 0, query and key lengths differing per sequence."""
    lens = ([1, 0, 17, 33], [3, 2, 17, 20])
    run_case(torch.float32, lens=lens, H=2, causal=causal, rel=(8, 6, not causal))


def test_varlen_matches_dense():
    """A varlen batch of equal lengths equals the dense layout."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 19, 2, 32, generator=g).to(DEV) for _ in range(3))
    tab = torch.randn(8, 2, generator=g).to(DEV)
    dense = flash_attention(q, k, v, rel_table=tab, rel_max_distance=4)
    cu = torch.tensor([0, 19, 38], dtype=torch.int32, device=DEV)
    packed = flash_attention(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), rel_table=tab, rel_max_distance=4,
        cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=19, max_seqlen_k=19,
    )  # fmt: skip
    torch.testing.assert_close(packed, dense.flatten(0, 1), rtol=1e-5, atol=1e-5)


def test_strided_inputs_no_copy_path():
    """(B, H, L, D)-transposed views and a fused-qkv slice are read through their strides."""
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(2, 21, 3, 2, 32, generator=g).to(DEV)
    q, k, v = qkv.unbind(2)  # (B, L, H, D) views with row stride 3*H*D
    vt = torch.randn(2, 2, 21, 32, generator=g).to(DEV).transpose(1, 2)  # (B, L, H, D) view of (B, H, L, D)
    out = flash_attention(q, k, vt, causal=True)
    ref = flash_attention_ref(q, k, vt, causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "force",
    [
        dict(diag_gather=False, bwd="fused"),
        dict(diag_gather=False, bwd="split"),
        dict(bwd="split", dq=A._Cfg(16, 32, 4, 1), dkdv=A._Cfg(32, 16, 4, 1), fwd=A._Cfg(32, 16, 4, 1)),
        dict(bwd="fused", kv=A._Cfg(16, 32, 4, 1)),
        dict(bwd="fused", kv=A._Cfg(32, 16, 4, 1)),
        dict(bwd="fused", kv=A._Cfg(16, 32, 4, 1, False)),
    ],
    ids=[
        "atomic-fallback-fused",
        "atomic-fallback-split",
        "split-other-tiles",
        "fused-BN>BM",
        "fused-BM>BN",
        "fused-dQ",
    ],
)
def test_alternative_kernel_paths(force, monkeypatch):
    """The per-element-atomic fallback of the d_lut reduction, both gather orientations of each backward, and the
    fused backward's dQ (instead of dQ^T) orientation (the sm80 one)."""
    monkeypatch.setattr(A, "_FORCE", dict(force))
    run_case(torch.float32, B=1, Lq=45, Lk=38, H=2, rel=(8, 6, True))


@pytest.mark.parametrize(
    "dq",
    [A._Cfg(32, 16, 4, 1), A._Cfg(64, 16, 4, 1), A._Cfg(64, 8, 4, 1), A._Cfg(16, 32, 4, 1)],
    ids=["3-wraps", "5-wraps", "9-wraps-per-tile", "BN>BM"],
)
@pytest.mark.parametrize(
    "case",
    [dict(Lq=45, Lk=38, rel=(8, 6, True)), dict(Lq=70, rel=(32, 128, False), causal=True),
     dict(lens=([1, 0, 17, 40], [3, 2, 17, 45]), rel=(16, 20, True))],
    ids=["narrow-band", "wide-band-causal", "varlen"],
)  # fmt: skip
def test_split_dq_tiles_reduce_the_lut_gradient(dq, case, monkeypatch):
    """The dQ kernel's d_lut reduction (rotated near tiles, masked column sums per wrap) with 2 to 9 wraps per tile,
    with far tiles between near ones (narrow band), a band wider than the sequence, and varlen sequence ends."""
    monkeypatch.setattr(A, "_FORCE", {"bwd": "split", "dq": dq})
    run_case(torch.float32, B=1 if "lens" in case else 2, H=2, **case)


@pytest.mark.parametrize(
    "case",
    [
        dict(Lq=61, rel=(8, 6, True)),
        dict(Lq=20, Lk=45, rel=(8, 6, False), causal=True),
        dict(Lq=45, Lk=20, rel=(8, 6, True), causal=True),
        dict(Lq=23, Lk=40, alibi=True, causal=True),
        dict(Lq=33, Lk=21, bias_shape=(1, 2, 33, 21)),
        dict(Lq=33, Lk=21, bias_shape=(2, 1, 1, 21)),
        dict(Lq=33, Lk=21, bias_shape=(33, 1), causal=True),
        dict(Lq=24, bias_shape=(2, 1, 1, 24), bias_mask_batch=1, rel=(8, 6, True)),
        dict(lens=([1, 0, 17, 33], [3, 2, 17, 20]), rel=(8, 6, True)),
        dict(lens=([1, 0, 17, 33], [1, 0, 17, 33]), rel=(8, 6, False), causal=True),
    ],
    ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()).replace(" ", ""),
)
@pytest.mark.parametrize("variant", ["split", "split2", "split3"])
def test_split_backward(case, variant, monkeypatch):
    """The deterministic two-kernel backwards (split: prep, dK/dV, dQ + d_lut; split2: dQ + delta, then dK/dV +
    d_lut; split3: dQ + delta + d_lut, then dK/dV) on the shapes that break kernels."""
    monkeypatch.setattr(A, "_FORCE", {"bwd": variant})
    run_case(torch.float32, **case)


@pytest.mark.parametrize("route", A.TABLE_ROUTES)
@pytest.mark.parametrize("variant", A.BWD_VARIANTS)
@pytest.mark.parametrize(
    "case",
    [
        dict(Lq=45, Lk=38, rel=(8, 6, True)),
        dict(Lq=20, Lk=45, rel=(8, 6, False), causal=True),
        dict(lens=([1, 0, 17, 33], [3, 2, 17, 20]), rel=(8, 6, True)),
        dict(dtype=torch.float16, Lq=37, rel=(8, 6, True), table_dtype=torch.float16),
    ],
    ids=["cross", "causal-cross", "varlen", "fp16"],
)
def test_table_routes(case, variant, route, monkeypatch):
    """The table route (the kernels reduce d_lut straight into the table's bucket rows) and the autograd route
    (t5_bias_lut + index_select backward) give the table gradient of the reference, with every backward."""
    monkeypatch.setattr(A, "_FORCE", {"bwd": variant, "table": route})
    run_case(**{"dtype": torch.float32, "B": 1, "H": 2, "D": 16, **case})


@pytest.mark.parametrize("variant", A.BWD_VARIANTS)
def test_autotune_timing_launches_are_undone(variant, monkeypatch):
    """The autotuner's timing launches add into the accumulators (d_lut, d_bias, the fused dQ): a tuner that
    launches other tiles twice each before choosing must still give the reference's gradients."""
    tuned = []

    def fake_tuned(kernel, head_dim, t, flags, lens, launch, default):
        for c in (A._Cfg(16, 32, 4, 1), A._Cfg(32, 16, 4, 1)):
            launch(c)
            launch(c)
        tuned.append(kernel)
        return A._Cfg(32, 16, 4, 1), True

    monkeypatch.setattr(A, "_FORCE", {"bwd": variant, "autotune": True})
    monkeypatch.setattr(A, "_tuned", fake_tuned)
    run_case(torch.float32, B=2, Lq=37, Lk=29, H=2, D=16, rel=(8, 6, True), bias_shape=(1, 2, 1, 29))
    assert "fwd" in tuned and ("dq" in tuned or "dq2" in tuned or variant == "fused")


@pytest.mark.parametrize(
    "case",
    [
        dict(B=2, Lq=37, Lk=29, rel=(8, 6, True)),
        dict(lens=([1, 0, 17, 33], [3, 2, 17, 20]), rel=(8, 6, True)),
        dict(lens=([1, 0, 17, 33], [1, 0, 17, 33]), rel=(8, 6, False), causal=True),
    ],
    ids=["cross", "varlen", "varlen-causal"],
)
def test_tma_forward(case, monkeypatch):
    """The forward's tensor-descriptor (TMA) loads of K/V: rows past each sequence's end read as zeros, empty key
    sequences load nothing (fp16: the path is off for fp32)."""
    monkeypatch.setattr(A, "_FORCE", {"tma": True})
    run_case(torch.float16, **{"H": 2, "D": 16, **case})


def test_tma_eligibility(monkeypatch):
    monkeypatch.setattr(A, "_FORCE", {"tma": True})
    q = torch.randn(1, 8, 2, 16, dtype=torch.float16)
    assert A._tma_ok(q, q, q)
    assert not A._tma_ok(q.float(), q.float(), q.float())  # fp32 keeps the IEEE path
    odd = torch.randn(1, 8, 2, 17, dtype=torch.float16)[..., :16]  # row stride 34 elements: not 16-byte aligned
    assert not A._tma_ok(q, odd, odd)
    monkeypatch.setattr(A, "_FORCE", {"tma": False})
    assert not A._tma_ok(q, q, q)


def test_table_route_has_no_lookup_autograd_node(monkeypatch):
    """The table route puts one autograd node in the graph (the lookup's gather and scatter are inside it)."""
    monkeypatch.setattr(A, "_FORCE", {"table": "kernel"})
    q, k, v = (torch.randn(1, 9, 2, 16).to(DEV).requires_grad_() for _ in range(3))
    table = torch.randn(8, 2).to(DEV).requires_grad_()
    out = flash_attention(q, k, v, rel_table=table, rel_max_distance=6)
    nxt = [f for f, _ in out.grad_fn.next_functions if f is not None]
    assert type(out.grad_fn).__name__ == "_FlashAttentionBackward"
    assert sorted(type(f).__name__ for f in nxt) == ["AccumulateGrad"] * 4


@pytest.mark.parametrize("default", A.BWD_VARIANTS)
def test_deterministic_mode_selects_split(default, monkeypatch):
    """torch.use_deterministic_algorithms(True) never gets the fused backward (atomic dQ)."""
    monkeypatch.setattr(A, "_FORCE", {})
    monkeypatch.setattr(A, "_BWD_DEFAULT", default)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert A._bwd_variant() in ("split", "split2", "split3")
    finally:
        torch.use_deterministic_algorithms(prev)
    assert A._bwd_variant() == default


# ------------------------------------------------------------------------------------------------ varlen grid stride


@pytest.mark.parametrize("variant", A.BWD_VARIANTS)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_understated_max_seqlen(causal, variant, monkeypatch):
    """A max_seqlen below the longest sequence (even 0) costs parallelism, never rows: the programs walk their
    blocks with a grid stride. Sequences longer than 2 blocks of the interpreter's 16-row tiles, and empty ones."""
    monkeypatch.setattr(A, "_FORCE", {"bwd": variant})
    lens = ([40, 3, 0, 25], [40, 3, 0, 25]) if causal else ([40, 3, 0, 25], [33, 40, 5, 0])
    for max_seqlen in ((16, 16), (0, 0), (40, 1)):
        run_case(torch.float32, lens=lens, H=2, causal=causal, rel=(8, 6, not causal), max_seqlen=max_seqlen)


def test_varlen_strided_cu_seqlens():
    """A strided cu_seqlens view (every other entry of a longer tensor) is read as its values."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(30, 2, 16, generator=g).to(DEV) for _ in range(3))
    cu = torch.tensor([0, 99, 7, 99, 30], dtype=torch.int32, device=DEV)[::2]  # [0, 7, 30], stride 2
    out = flash_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=23, max_seqlen_k=23)
    ref = flash_attention_ref(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_varlen_max_seqlen_none():
    """None: the maxima are computed from cu_seqlens (one sync)."""
    run_case(torch.float32, lens=([5, 0, 37], [9, 1, 20]), H=1, rel=(8, 6, True), max_seqlen=(None, None))


# ------------------------------------------------------------------------------------------------ precomputed T5 lookup


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_bias_lut_is_hf_bias(bidirectional):
    """t5_bias_lut: fp32 (H, 2Re+1) lookup equal to table[HF bucket] at every (clamped) distance; its gradient is
    the plain autograd scatter of the gather, accumulated in fp32 and returned in the table's dtype."""
    from transformers.models.t5.modeling_t5 import T5Attention

    g = torch.Generator().manual_seed(5)
    table = torch.randn(32, 3, generator=g).to(DEV).bfloat16().requires_grad_()
    lut = t5_bias_lut(table, bidirectional, 128)
    radius = (lut.shape[1] - 1) // 2
    assert lut.dtype == torch.float32 and lut.is_contiguous() and lut.shape == (3, 2 * radius + 1)
    assert radius == (91 if bidirectional else 113)
    r = torch.arange(-1500, 1501, device=DEV)
    hf = T5Attention._relative_position_bucket(r, bidirectional, 32, 128)
    assert torch.equal(lut[:, r.clamp(-radius, radius) + radius], table.detach().float()[hf].t())
    w = torch.randn(lut.shape, generator=g).to(DEV)
    (gt,) = torch.autograd.grad((lut * w).sum(), table)
    buckets, _ = A.lut_buckets(table.device, bidirectional, 32, 128)
    ref = torch.zeros(32, 3, device=DEV).index_add_(0, buckets, w.t()).bfloat16()
    assert gt.dtype == torch.bfloat16 and torch.equal(gt, ref)


@pytest.mark.parametrize("bidirectional,causal", [(True, False), (False, True)])
def test_lut_path_equals_table_path(bidirectional, causal):
    """rel_lut=t5_bias_lut(table) gives the same output and the same table gradient as rel_table=table."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 27, 2, 16, generator=g).to(DEV).requires_grad_() for _ in range(3))
    table = torch.randn(8, 2, generator=g).to(DEV).requires_grad_()
    dout = torch.randn(2, 27, 2, 16, generator=g).to(DEV)
    out_t = flash_attention(q, k, v, rel_table=table, rel_bidirectional=bidirectional, rel_max_distance=6,
                            causal=causal)  # fmt: skip
    grads_t = torch.autograd.grad(out_t, [q, k, v, table], dout)
    lut = t5_bias_lut(table, bidirectional, 6)
    out_l = flash_attention(q, k, v, rel_lut=lut, causal=causal)
    grads_l = torch.autograd.grad(out_l, [q, k, v, table], dout)
    torch.testing.assert_close(out_l, out_t, rtol=0, atol=0)
    for a, b in zip(grads_l, grads_t):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # d_lut is summed by atomics (order may vary)
    assert grads_l[3].abs().sum() > 0


@pytest.mark.parametrize("causal", [False, True])
def test_rel_lut_gradient(causal):
    """d_lut against the reference's gradient of the same clamped lookup (error-ratio rule)."""
    run_case(torch.float32, Lq=45, Lk=40, rel=(8, 6, not causal), causal=causal, lut=True)


def test_arbitrary_lut_width_one():
    """A user lookup of width 1 (R = 0: one constant per head) is the constant bias."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 20, 2, 16, generator=g).to(DEV) for _ in range(3))
    lut = torch.tensor([[0.5], [-2.0]], device=DEV)
    out = flash_attention(q, k, v, rel_lut=lut)
    torch.testing.assert_close(out, flash_attention_ref(q, k, v, rel_lut=lut), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, flash_attention_ref(q, k, v), rtol=1e-4, atol=1e-4)  # softmax shift-invariant


# ------------------------------------------------------------------------------------------------ host path


def test_eager_path_skips_custom_ops(monkeypatch):
    """Eager calls go flash_attention -> autograd.Function -> launchers (the custom ops are for torch.compile),
    and straight to the forward launcher when no input needs a gradient."""

    def boom(*args, **kwargs):
        raise AssertionError("not on this path")

    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 18, 2, 16, generator=g).to(DEV).requires_grad_() for _ in range(3))
    table = torch.randn(8, 2, generator=g).to(DEV).requires_grad_()
    ref = flash_attention(q, k, v, rel_table=table, rel_max_distance=6)
    monkeypatch.setattr(A, "_flash_attn_fwd", boom)
    monkeypatch.setattr(A, "_flash_attn_bwd", boom)
    out = flash_attention(q, k, v, rel_table=table, rel_max_distance=6)
    grads = torch.autograd.grad(out.sum(), [q, k, v, table])
    assert all(gr.abs().sum() > 0 for gr in grads)
    monkeypatch.setattr(A, "_apply", boom)
    with torch.no_grad():
        out_ng = flash_attention(q, k, v, rel_table=table, rel_max_distance=6)
    assert not out_ng.requires_grad
    torch.testing.assert_close(out_ng, ref.detach(), rtol=0, atol=0)


def test_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) traces flash_attention (validation, t5_bias_lut, the custom ops and their
    autograd), also when the bucket cache is cold; aot_eager so that it runs on the CPU as well."""
    from flasht5.ops import relative_position as RP

    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 20, 2, 16, generator=g).to(DEV).requires_grad_() for _ in range(3))
    table = torch.randn(8, 2, generator=g).to(DEV).requires_grad_()

    def f(q, k, v, table):
        o = flash_attention(q, k, v, rel_table=table, rel_max_distance=7, rel_bidirectional=False, causal=True)
        return o.square().sum()

    loss_e = f(q, k, v, table)
    grads_e = torch.autograd.grad(loss_e, [q, k, v, table])
    RP._BUCKET_CACHE.clear()
    RP._VALUE_CACHE.clear()
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss_c = compiled(q, k, v, table)
    grads_c = torch.autograd.grad(loss_c, [q, k, v, table])
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ buckets


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 64), (8, 20), (64, 256), (33, 100), (2, 3)])
def test_buckets_match_hf(bidirectional, num_buckets, max_distance):
    """The kernel's clamped lookup equals HF's bucket for distances far beyond max_distance."""
    from transformers.models.t5.modeling_t5 import T5Attention

    if bidirectional and num_buckets < 4:
        pytest.skip("degenerate: rejected by validation")
    R = max_distance
    r = torch.arange(-11 * R - 5, 11 * R + 6)
    hf = T5Attention._relative_position_bucket(r, bidirectional, num_buckets, max_distance)
    lut_buckets, Re = A.lut_buckets(torch.device("cpu"), bidirectional, num_buckets, max_distance)
    assert 1 <= Re <= R and lut_buckets.shape == (2 * Re + 1,)
    assert torch.equal(lut_buckets[r.clamp(-Re, Re) + Re], hf)
    rel2d = torch.arange(300)[None, :] - torch.arange(260)[:, None]
    assert torch.equal(
        relative_position_bucket(rel2d, bidirectional, num_buckets, max_distance),
        T5Attention._relative_position_bucket(rel2d, bidirectional, num_buckets, max_distance),
    )


# ------------------------------------------------------------------------------------------------ bad input


def _bad_inputs():
    q = torch.randn(2, 8, 2, 32, device=DEV)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEV)
    qv = torch.randn(8, 2, 32, device=DEV)
    tab = torch.randn(8, 2, device=DEV)
    lut = torch.randn(2, 9, device=DEV)
    ones2 = torch.ones(2, device=DEV)
    return [
        ("q must be", lambda: flash_attention(q[0], q, q)),
        ("k.dtype", lambda: flash_attention(q, q.half(), q)),
        ("q: unsupported dtype", lambda: flash_attention(q.double(), q.double(), q.double())),
        ("head dim 96", lambda: flash_attention(*(torch.randn(1, 4, 1, 96, device=DEV),) * 3)),
        ("k and v", lambda: flash_attention(q, q, q[:, :5])),
        ("k: batch", lambda: flash_attention(q, q[:1], q[:1])),
        ("k: heads", lambda: flash_attention(q, q[:, :, :1], q[:, :, :1])),
        ("rel_table must be", lambda: flash_attention(q, q, q, rel_table=torch.randn(8, 3, device=DEV))),
        ("are exclusive", lambda: flash_attention(q, q, q, rel_table=tab, alibi_slopes=ones2)),
        ("are exclusive", lambda: flash_attention(q, q, q, rel_lut=lut, alibi_slopes=ones2)),
        ("are exclusive", lambda: flash_attention(q, q, q, rel_lut=lut, rel_table=tab)),
        ("rel_lut must be floating", lambda: flash_attention(q, q, q, rel_lut=lut.long())),
        ("rel_lut must have an odd", lambda: flash_attention(q, q, q, rel_lut=lut[:, :8])),
        ("rel_lut must be \\(H=2", lambda: flash_attention(q, q, q, rel_lut=lut[:1])),
        ("rel_lut must be \\(H=2", lambda: flash_attention(q, q, q, rel_lut=lut[0])),
        ("rel_max_distance", lambda: flash_attention(q, q, q, rel_table=tab, rel_max_distance=2)),
        ("num_buckets", lambda: flash_attention(q, q, q, rel_table=tab[:3])),
        ("alibi_slopes must", lambda: flash_attention(q, q, q, alibi_slopes=torch.ones(3, device=DEV))),
        ("alibi_slopes: gradients", lambda: flash_attention(q, q, q, alibi_slopes=ones2.requires_grad_())),
        ("bias of shape", lambda: flash_attention(q, q, q, bias=torch.randn(3, 1, 8, 8, device=DEV))),
        ("bias must be", lambda: flash_attention(q, q, q, bias=torch.ones(8, 8, dtype=torch.long, device=DEV))),
        ("bias is only", lambda: flash_attention(qv, qv, qv, bias=qv[:, 0, :8], cu_seqlens_q=cu, cu_seqlens_k=cu)),
        ("cu_seqlens_q and cu_seqlens_k", lambda: flash_attention(qv, qv, qv, cu_seqlens_q=cu)),
        ("cu_seqlens_q must be int32", lambda: flash_attention(qv, qv, qv, cu_seqlens_q=cu.long(), cu_seqlens_k=cu)),
        ("cu_seqlens_k must be 1-D", lambda: flash_attention(qv, qv, qv, cu_seqlens_q=cu, cu_seqlens_k=cu[None])),
        ("scale", lambda: flash_attention(q, q, q, scale=float("nan"))),
        ("max_seqlen_q", lambda: flash_attention(qv, qv, qv, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=-1)),
    ]  # fmt: skip


def test_a_half_lookup_is_widened_and_its_gradient_cast_back():
    """FSDP2's mixed precision casts a block's forward inputs, the T5 lookup among them, to bf16: the kernel reads
    it widened to fp32 (the same output as the fp32 lookup of the same values) and the gradient keeps bf16."""
    g = torch.Generator(device=DEV).manual_seed(3)
    q, k, v = (torch.randn(1, 24, 2, 32, device=DEV, generator=g) for _ in range(3))
    lut = torch.randn(2, 9, device=DEV, generator=g).bfloat16().requires_grad_()
    wide = lut.detach().float().requires_grad_()
    out, ref = flash_attention(q, k, v, rel_lut=lut), flash_attention(q, k, v, rel_lut=wide)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.sum().backward()
    ref.sum().backward()
    assert lut.grad.dtype == torch.bfloat16
    torch.testing.assert_close(lut.grad, wide.grad.bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("i", range(len(_bad_inputs())))
def test_bad_input_raises(i):
    match, fn = _bad_inputs()[i]
    with pytest.raises(ValueError, match=match):
        fn()


@pytest.mark.skipif(HAS_CUDA, reason="value checks of cu_seqlens run on CPU tensors (or with FLASHT5_DEBUG=1)")
@pytest.mark.parametrize(
    "cu,match",
    [([1, 3, 8], "start at 0"), ([0, 5, 3, 8], "monotone"), ([0, 3, 7], "must equal")],
)
def test_bad_cu_seqlens_values(cu, match):
    qv = torch.randn(8, 2, 32)
    c = torch.tensor(cu, dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        flash_attention(qv, qv, qv, cu_seqlens_q=c, cu_seqlens_k=c)


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only check")
def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 4, 1, 32)
    with pytest.raises(ValueError, match="CUDA"):
        flash_attention(q, q, q)


# ------------------------------------------------------------------------------------------------ registration


def test_opcheck():
    """Schema, fake tensor, autograd registration and AOT dispatch of the custom op (T5 lookup + bias)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 9, 1, 16, generator=g).to(DEV).requires_grad_() for _ in range(3))
    lut = torch.randn(1, 9, generator=g).to(DEV).requires_grad_()
    bias = torch.randn(1, 1, 9, 9, generator=g).to(DEV).requires_grad_()
    args = (q, k, v, lut, None, bias, None, None, 9, 9, 1.0, True)
    torch.library.opcheck(torch.ops.flasht5.flash_attn_fwd.default, args)


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "case",
    [
        dict(B=2, Lq=1024, H=12, D=64, rel=(32, 128, True)),  # T5 encoder
        dict(B=1, Lq=2048, H=12, D=128, rel=(32, 128, False), causal=True),  # T5 decoder
        dict(B=2, Lq=1000, Lk=1531, H=12, D=64, causal=True, rel=(32, 128, False)),  # Lq < Lk, odd
        dict(B=2, Lq=777, Lk=1024, H=12, D=128),  # cross-attention, no bias
        dict(B=2, Lq=1024, H=12, D=64, alibi=True, causal=True),
        dict(B=2, Lq=512, Lk=700, H=12, D=64, bias_shape=(2, 1, 512, 700)),
        dict(B=4, Lq=1, Lk=1024, H=12, D=64, causal=True, rel=(32, 128, False)),  # decode
    ],
    ids=["enc-d64", "dec-d128", "causal-LqLk", "cross-d128", "alibi", "bias", "decode"],
)
def test_gpu_main_cases(dtype, case):
    run_case(dtype, **case)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_varlen(causal):
    lens = ([1, 0, 17, 1000, 333, 700, 129], [5, 3, 17, 1000, 400, 650, 1500])
    if causal:
        lens = (lens[0], lens[0])  # decoder self-attention
    run_case(torch.bfloat16, lens=lens, H=12, D=64, causal=causal, rel=(32, 128, not causal))


@pytest.mark.gpu
@pytest.mark.parametrize("variant", A.BWD_VARIANTS)
def test_gpu_bwd_variants(variant, monkeypatch):
    """Both backward schemes on the GPU tiles: T5 lookup, causal Lq != Lk at D=128, a broadcast bias, varlen with
    an understated max_seqlen."""
    monkeypatch.setattr(A, "_FORCE", {"bwd": variant})
    run_case(torch.bfloat16, B=2, Lq=1024, H=12, D=64, rel=(32, 128, True), lut=True)
    run_case(torch.bfloat16, B=1, Lq=1000, Lk=1531, H=12, D=128, rel=(32, 128, False), causal=True)
    run_case(torch.float16, B=2, Lq=512, Lk=700, H=4, D=64, bias_shape=(2, 1, 1, 700))
    lens = ([1, 0, 17, 1000, 333], [5, 3, 17, 1000, 400])
    run_case(torch.bfloat16, lens=lens, H=12, D=64, rel=(32, 128, True), max_seqlen=(128, 64))


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["split2", "split3"])
def test_gpu_tma_and_autotune(variant, monkeypatch):
    """TMA forward and the real autotuner (its timing launches dirty the accumulators, which it zeroes again) on
    the GPU: T5 table (table route), causal cross-attention at D=128, a broadcast bias, varlen. Two candidates per
    kernel (compile time)."""
    monkeypatch.setattr(A, "_FORCE", {"bwd": variant, "tma": True, "autotune": True})
    monkeypatch.setattr(A, "_TUNED", {})
    monkeypatch.setattr(A, "_TUNE_SM90", {key: cands[:2] for key, cands in A._TUNE_SM90.items()})
    run_case(torch.bfloat16, B=2, Lq=1024, H=12, D=64, rel=(32, 128, True))
    run_case(torch.bfloat16, B=1, Lq=1000, Lk=1531, H=12, D=128, rel=(32, 128, False), causal=True)
    run_case(torch.float16, B=2, Lq=512, Lk=700, H=4, D=64, bias_shape=(2, 1, 1, 700))
    lens = ([1, 0, 17, 1000, 333], [5, 3, 17, 1000, 400])
    run_case(torch.bfloat16, lens=lens, H=12, D=64, rel=(32, 128, True), max_seqlen=(128, 64))
    assert A._TUNED, "the autotuner ran"


@pytest.mark.gpu
def test_gpu_no_host_sync():
    """A warmed-up forward + backward (T5 table, varlen with given max_seqlen) never synchronises with the host."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(700, 4, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    table = torch.randn(32, 4, device="cuda", generator=g, requires_grad=True)
    cu = torch.tensor([0, 100, 100, 700], dtype=torch.int32, device="cuda")
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=600, max_seqlen_k=600)

    def step():
        for variant in A.BWD_VARIANTS:
            A._FORCE["bwd"] = variant
            flash_attention(q, k, v, rel_table=table, **kw).sum().backward()
            lut = t5_bias_lut(table, False, 128)
            flash_attention(q, k, v, rel_lut=lut, causal=True, **kw).sum().backward()

    try:
        step()  # warm-up: compiles every kernel, caches the buckets (one sync each)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        A._FORCE.clear()
    torch.cuda.synchronize()
    assert table.grad is not None and torch.isfinite(table.grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize("D", [16, 32, 256])
def test_gpu_other_head_dims(D):
    run_case(torch.bfloat16, B=2, Lq=513, H=4, D=D, rel=(32, 128, True))


@pytest.mark.gpu
def test_gpu_sm80_configs(monkeypatch):
    """The Ampere config table (run on whatever GPU is present: exercises the tiles, not the hardware)."""
    monkeypatch.setattr(A, "_FORCE", {"arch": 8})
    for D in (64, 128):
        run_case(torch.bfloat16, B=2, Lq=700, H=4, D=D, rel=(32, 128, True))
        run_case(torch.float16, B=1, Lq=700, H=4, D=D, rel=(32, 128, False), causal=True)


@pytest.mark.gpu
def test_gpu_atomic_fallback(monkeypatch):
    monkeypatch.setattr(A, "_FORCE", {"diag_gather": False})
    run_case(torch.bfloat16, B=2, Lq=600, H=4, D=64, rel=(32, 128, True))


@pytest.mark.gpu
def test_gpu_fp32_inputs():
    run_case(torch.float32, B=1, Lq=300, H=2, D=64, rel=(32, 128, True))


@pytest.mark.gpu
def test_gpu_buckets_match_hf_on_device():
    from transformers.models.t5.modeling_t5 import T5Attention

    for bidir in (True, False):
        r = torch.arange(-2000, 2001, device="cuda")
        hf = T5Attention._relative_position_bucket(r, bidir, 32, 128)
        lut_buckets, Re = A.lut_buckets(r.device, bidir, 32, 128)
        assert torch.equal(lut_buckets[r.clamp(-Re, Re) + Re], hf)


@pytest.mark.gpu
def test_gpu_compile_matches_eager():
    """torch.compile(fullgraph=True) of a small attention block that calls flash_attention equals eager."""
    torch.manual_seed(0)
    H, D = 4, 64
    proj = torch.nn.Linear(H * D, 3 * H * D, device="cuda")
    table = torch.nn.Embedding(32, H, device="cuda")

    def block(x):
        B, L, _ = x.shape
        q, k, v = proj(x).view(B, L, 3, H, D).unbind(2)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            o = flash_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), rel_table=table.weight, causal=True,
                                rel_bidirectional=False)  # fmt: skip
        return o.float().square().mean()

    x = torch.randn(2, 300, H * D, device="cuda")
    compiled = torch.compile(block, fullgraph=True)
    loss_e = block(x)
    grads_e = torch.autograd.grad(loss_e, [proj.weight, table.weight])
    loss_c = compiled(x)
    grads_c = torch.autograd.grad(loss_c, [proj.weight, table.weight])
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-3, atol=1e-5)
    for ge, gc in zip(grads_e, grads_c):
        torch.testing.assert_close(gc, ge, rtol=2e-2, atol=1e-4)
    assert grads_c[1].dtype == torch.float32


def test_math_sanity():
    """Guard against a vacuous reference: a uniform-softmax case has a closed form."""
    q = torch.zeros(1, 5, 1, 16, device=DEV)
    v = torch.arange(5.0, device=DEV)[None, :, None, None].expand(1, 5, 1, 16).contiguous()
    out = flash_attention(q, q, v, causal=True)
    expect = torch.tensor([sum(range(i + 1)) / (i + 1) for i in range(5)], device=DEV)
    torch.testing.assert_close(out[0, :, 0, 0], expect)
    assert math.isclose(out[0, 4, 0, 15].item(), 2.0, rel_tol=1e-6)
