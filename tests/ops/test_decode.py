"""Tests of ``flasht5.ops.decode``: the split-KV decode kernel against its plain-PyTorch reference (error-ratio rule),
against ``flash_attention`` (the decode path it replaces), the split heuristic, compile == eager, the custom op,
bad-input errors. CPU cases run under the Triton interpreter and are kept small; the unused part of every cache
is NaN, so a kernel that read it would fail."""

import pytest
import torch
from ratio import assert_ratio
from torch.utils._python_dispatch import TorchDispatchMode

from flasht5.ops.attention import flash_attention, flash_attention_ref
from flasht5.ops.decode import auto_num_splits, flash_decode, flash_decode_ref
from flasht5.ops.relative_position import t5_bias_lut

# the interpreter warns on every tensor used as a loop bound
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"


def _inputs(B, Lmax, H, Dh, lens, *, dtype=torch.float32, device=DEV, seed=0, bias=None, lut_cfg=(8, 6)):
    """q (B, H, D), caches (B, Lmax, H, D) with NaN past each row's length, int32 lengths, bias kwargs."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Dh, generator=g)
    k = torch.randn(B, Lmax, H, Dh, generator=g)
    v = torch.randn(B, Lmax, H, Dh, generator=g)
    for b, n in enumerate(lens):
        k[b, n:] = float("nan")
        v[b, n:] = float("nan")
    kw = {}
    if bias == "t5":
        table = torch.randn(lut_cfg[0], H, generator=g) * 0.5
        kw["rel_lut"] = t5_bias_lut(table, False, lut_cfg[1]).to(device)
    elif bias == "alibi":
        kw["alibi_slopes"] = (torch.rand(H, generator=g) * 0.5).to(device)
    seq = torch.tensor(lens, dtype=torch.int32, device=device)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), seq, kw


def _check_against_ref(q, k, v, seq, kw, dtype, name="out", **call):
    out = flash_decode(q, k, v, seq, **kw, **call)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    hi = {n: t.double() for n, t in kw.items()}
    ref_hi = flash_decode_ref(q.double(), k.double(), v.double(), seq, **hi, scale=call.get("scale", 1.0))
    ref_same = flash_decode_ref(q, k, v, seq, **kw, scale=call.get("scale", 1.0))
    assert_ratio(out, ref_hi, ref_same, dtype, name)
    lens = seq.tolist()
    for b, n in enumerate(lens):
        if n == 0:
            assert (out[b] == 0).all(), "a row without keys must output 0"
    return out


# ------------------------------------------------------------------------------------------------ CPU / any device


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("bias", [None, "t5", "alibi"])
@pytest.mark.parametrize("num_splits", [1, 3, 40, None])
def test_against_reference(dtype, bias, num_splits):
    """Row lengths Lmax, 1, 0 and a partial one; one split, a few, more splits than key blocks, the heuristic."""
    q, k, v, seq, kw = _inputs(4, 45, 2, 32, [45, 1, 0, 29], dtype=dtype, bias=bias, seed=1)
    _check_against_ref(q, k, v, seq, kw, dtype, num_splits=num_splits)


@pytest.mark.parametrize("bias", [None, "t5"])
@pytest.mark.parametrize("num_splits", [1, 5])
def test_head_dim_64(bias, num_splits):
    q, k, v, seq, kw = _inputs(2, 37, 3, 64, [37, 18], bias=bias, seed=2)
    _check_against_ref(q, k, v, seq, kw, torch.float32, num_splits=num_splits)


@pytest.mark.parametrize("bias", [None, "alibi"])
def test_many_nonempty_splits(bias):
    """Seven splits of 16 keys with data (the combine kernel merges them over several of its loop iterations)."""
    q, k, v, seq, kw = _inputs(2, 100, 1, 16, [100, 70], bias=bias, seed=14)
    _check_against_ref(q, k, v, seq, kw, torch.float32, num_splits=7)


def test_scale_and_long_lut():
    """scale != 1, and a lookup wider than the cache (no clamping) next to the narrow one (clamping)."""
    q, k, v, seq, kw = _inputs(2, 40, 2, 16, [40, 33], bias="t5", lut_cfg=(32, 128), seed=3)
    assert kw["rel_lut"].shape[1] > 2 * 40
    _check_against_ref(q, k, v, seq, kw, torch.float32, scale=0.125, num_splits=2)


def test_lut_width_one_and_strided_lut():
    g = torch.Generator().manual_seed(4)
    q, k, v, seq, _ = _inputs(2, 20, 2, 16, [20, 7], seed=4)
    lut1 = torch.randn(2, 1, generator=g).to(DEV)  # R = 0: one bias for every distance
    _check_against_ref(q, k, v, seq, {"rel_lut": lut1}, torch.float32, num_splits=2)
    wide = torch.randn(13, 2, generator=g).to(DEV)
    lut_t = wide.t()  # (2, 13), strides (1, 2): read through its strides, not copied
    assert not lut_t.is_contiguous()
    _check_against_ref(q, k, v, seq, {"rel_lut": lut_t}, torch.float32, num_splits=3)


def test_strided_caches_and_query():
    """A fused (B, Lmax, 2, H, D) KV buffer (row stride 2*H*D), a head-major cache viewed as (B, Lmax, H, D), every
    other row of a larger batch, q from a fused qkv projection and q with a non-unit head-dim stride."""
    B, L, H, Dh = 2, 30, 2, 32
    g = torch.Generator().manual_seed(5)
    lens = [30, 11]
    seq = torch.tensor(lens, dtype=torch.int32, device=DEV)
    qkv = torch.randn(B, 3, H, Dh, generator=g).to(DEV)
    q = qkv[:, 0]
    kv = torch.randn(2 * B, L, 2, H, Dh, generator=g).to(DEV)[::2]  # batch stride 2 rows, row stride 2*H*D
    k, v = kv[:, :, 0], kv[:, :, 1]
    assert k.stride(1) == 2 * H * Dh and not k.is_contiguous()
    _check_against_ref(q, k, v, seq, {}, torch.float32, name="fused kv", num_splits=3)
    head_major = torch.randn(B, H, L, Dh, generator=g).to(DEV)
    kh, vh = head_major.transpose(1, 2), (head_major * 0.5).transpose(1, 2)  # (B, L, H, D), head stride L*D
    _check_against_ref(q, kh, vh, seq, {}, torch.float32, name="head-major", num_splits=2)
    q_t = torch.randn(B, Dh, H, generator=g).to(DEV).transpose(1, 2)  # head-dim stride H: copied (it is small)
    _check_against_ref(q_t, kh, vh, seq, {}, torch.float32, name="q strided", num_splits=1)


@pytest.mark.parametrize("bias", [None, "t5"])
def test_matches_flash_attention(bias):
    """The current decode path: dense flash_attention with Lq=1, causal (bottom-right) and the same lookup, run on
    each row's valid keys."""
    lens = [33, 1, 17]
    q, k, v, seq, kw = _inputs(3, 33, 2, 32, lens, bias=bias, seed=6)
    out = flash_decode(q, k, v, seq, **kw, num_splits=3)
    for b, n in enumerate(lens):
        fa = flash_attention(q[b : b + 1, None], k[b : b + 1, :n], v[b : b + 1, :n], causal=True, **kw)
        torch.testing.assert_close(out[b], fa[0, 0], rtol=1e-5, atol=1e-5)


def test_reference_matches_flash_attention_ref():
    """The reference's positions (query at seqlens_k - 1, bias by j - q_pos) are flash_attention_ref's bottom-right
    alignment with causal masking."""
    lens = [21, 1, 9]
    q, k, v, seq, kw = _inputs(3, 21, 2, 16, lens, bias="t5", seed=7)
    ref = flash_decode_ref(q, k, v, seq, **kw)
    for b, n in enumerate(lens):
        fa = flash_attention_ref(q[b : b + 1, None], k[b : b + 1, :n], v[b : b + 1, :n], causal=True, **kw)
        torch.testing.assert_close(ref[b], fa[0, 0], rtol=1e-6, atol=1e-6)


def test_empty_shapes():
    q, k, v, seq, kw = _inputs(2, 0, 2, 16, [0, 0], bias="t5")
    out = flash_decode(q, k, v, seq, **kw)
    assert out.shape == (2, 2, 16) and (out == 0).all()
    q0 = torch.randn(0, 2, 16, device=DEV)
    out0 = flash_decode(q0, torch.randn(0, 5, 2, 16, device=DEV), torch.randn(0, 5, 2, 16, device=DEV), seq[:0])
    assert out0.shape == (0, 2, 16)


def test_auto_num_splits():
    """None fills the GPU (about 2 programs per SM) from B*H, Lmax and the SM count, never more splits than
    Lmax / 64 or 128; a batch that already fills the GPU gets one split."""
    sms = 132  # H200
    assert auto_num_splits(12, 16384, sms) == 22  # B=1, H=12: 264 programs
    assert auto_num_splits(96, 16384, sms) == 3  # B=8
    assert auto_num_splits(384, 16384, sms) == 1  # B=32
    assert auto_num_splits(264, 16384, sms) == 1
    assert auto_num_splits(263, 16384, sms) == 2
    assert auto_num_splits(12, 512, sms) == 8  # short cache: >= 64 keys per split
    assert auto_num_splits(12, 100, sms) == 1
    assert auto_num_splits(1, 1 << 20, sms) == 128
    for bh in (1, 5, 12, 100, 384, 1000):
        for lmax in (1, 300, 2048, 16384):
            s = auto_num_splits(bh, lmax, sms)
            assert 1 <= s <= max(1, min(128, lmax // 64))
            assert s == 1 or bh * (s - 1) < 2 * sms  # never more splits than needed to fill the GPU


def test_eager_routes(monkeypatch):
    """Eager calls dispatch no custom op (and build no autograd node without gradients); with a gradient-requiring
    input the forward runs and the backward says it is inference only."""
    q, k, v, seq, kw = _inputs(2, 20, 2, 16, [20, 5], bias="t5", seed=8)

    class OpLog(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.name())
            return func(*args, **(kwargs or {}))

    with OpLog() as log:
        out = flash_decode(q, k, v, seq, **kw, num_splits=2)
    assert log.names and not any("flasht5" in n for n in log.names), log.names
    assert out.grad_fn is None
    qg = q.clone().requires_grad_()
    out_g = flash_decode(qg, k, v, seq, **kw, num_splits=2)
    torch.testing.assert_close(out_g.detach(), out, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="inference only"):
        out_g.sum().backward()


@pytest.mark.parametrize("num_splits", [None, 3])
def test_compile_fullgraph_matches_eager(num_splits):
    """torch.compile(fullgraph=True) traces flash_decode (checks + the custom op with its fake); aot_eager runs on
    the CPU too. The same launcher runs: identical bits."""
    q, k, v, seq, kw = _inputs(2, 26, 2, 16, [26, 9], bias="t5", seed=9)

    def step(q, k, v, seq, lut):
        return flash_decode(q * 2.0, k, v, seq, rel_lut=lut, num_splits=num_splits) + 1.0

    eager = step(q, k, v, seq, kw["rel_lut"])
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v, seq, kw["rel_lut"])
    torch.testing.assert_close(got, eager, rtol=0, atol=0)


def test_opcheck():
    """Schema, fake tensor and AOT dispatch of the custom op (T5 lookup, several splits)."""
    q, k, v, seq, kw = _inputs(2, 18, 1, 16, [18, 4], bias="t5", seed=10)
    torch.library.opcheck(torch.ops.flasht5.flash_decode.default, (q, k, v, seq, kw["rel_lut"], None, 1.0, 3))
    torch.library.opcheck(torch.ops.flasht5.flash_decode.default, (q, k, v, seq, None, None, 0.5, 0))


def test_public_names():
    import flasht5.ops

    assert flasht5.ops.flash_decode is flash_decode
    assert flasht5.ops.flash_decode_ref is flash_decode_ref


# ------------------------------------------------------------------------------------------------ bad input


def _bad_inputs():
    q = torch.randn(2, 2, 16, device=DEV)
    k = torch.randn(2, 8, 2, 16, device=DEV)
    seq = torch.tensor([8, 3], dtype=torch.int32, device=DEV)
    lut = torch.randn(2, 9, device=DEV)
    ones2 = torch.ones(2, device=DEV)
    k_t = k.transpose(1, 3).contiguous().transpose(1, 3)  # head-dim stride != 1
    k48 = torch.randn(2, 4, 2, 48, device=DEV)
    fd = flash_decode
    return [
        ("q must be a \\(B, H, D\\)", lambda: fd(q[None], k, k, seq)),
        ("q must be float32", lambda: fd(q.double(), k.double(), k.double(), seq)),
        ("k_cache must be a \\(B, Lmax, H, D\\)", lambda: fd(q, k[0], k, seq)),
        ("v_cache of shape", lambda: fd(q, k, k[:1], seq)),
        ("k_cache of shape", lambda: fd(q, k[:, :, :1], k[:, :, :1], seq)),
        ("k_cache.dtype", lambda: fd(q, k.half(), k, seq)),
        ("v_cache.dtype", lambda: fd(q, k, k.half(), seq)),
        ("k_cache and v_cache must have the same shape", lambda: fd(q, k, k[:, :5], seq)),
        ("k_cache must have a unit head-dim stride", lambda: fd(q, k_t, k, seq)),
        ("head dim 48", lambda: fd(torch.randn(2, 2, 48, device=DEV), k48, k48, seq)),
        ("seqlens_k must be int32", lambda: fd(q, k, k, seq.long())),
        ("seqlens_k must be a \\(2,\\)", lambda: fd(q, k, k, seq[:1])),
        ("seqlens_k must be a \\(2,\\)", lambda: fd(q, k, k, seq[None])),
        ("seqlens_k must be a \\(2,\\)", lambda: fd(q, k, k, [8, 3])),
        ("are exclusive", lambda: fd(q, k, k, seq, rel_lut=lut, alibi_slopes=ones2)),
        ("rel_lut must be \\(H=2", lambda: fd(q, k, k, seq, rel_lut=lut[:1])),
        ("rel_lut must be \\(H=2", lambda: fd(q, k, k, seq, rel_lut=lut[0])),
        ("rel_lut must have an odd", lambda: fd(q, k, k, seq, rel_lut=lut[:, :8])),
        ("rel_lut must be float32", lambda: fd(q, k, k, seq, rel_lut=lut.double())),
        ("alibi_slopes must have shape", lambda: fd(q, k, k, seq, alibi_slopes=torch.ones(3, device=DEV))),
        ("alibi_slopes must be float", lambda: fd(q, k, k, seq, alibi_slopes=ones2.long())),
        ("scale", lambda: fd(q, k, k, seq, scale=float("inf"))),
        ("scale", lambda: fd(q, k, k, seq, scale="1")),
        ("num_splits", lambda: fd(q, k, k, seq, num_splits=0)),
        ("num_splits", lambda: fd(q, k, k, seq, num_splits=2.0)),
        ("num_splits", lambda: fd(q, k, k, seq, num_splits=1 << 20)),
    ]  # fmt: skip


@pytest.mark.parametrize("i", range(len(_bad_inputs())))
def test_bad_input_raises(i):
    match, fn = _bad_inputs()[i]
    with pytest.raises(ValueError, match=match):
        fn()


@pytest.mark.skipif(HAS_CUDA, reason="CPU tensors: device checks and always-on value checks")
def test_cpu_only_errors(monkeypatch):
    q, k, v, seq, _ = _inputs(2, 8, 2, 16, [8, 3], device="cpu")
    with pytest.raises(ValueError, match="seqlens_k values must be in \\[0, Lmax=8\\]"):
        flash_decode(q, k, v, torch.tensor([9, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="seqlens_k values"):
        flash_decode(q, k, v, torch.tensor([2, -1], dtype=torch.int32))
    with pytest.raises(ValueError, match="bfloat16 is not supported by the Triton interpreter"):
        flash_decode(q.bfloat16(), k.bfloat16(), v.bfloat16(), seq)
    with pytest.raises(ValueError, match="is on"):
        flash_decode(q, k, v, seq.to("meta"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        flash_decode(q, k, v, seq)


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("bias", [None, "t5", "alibi"])
@pytest.mark.parametrize("num_splits", [None, 1, 7])
@pytest.mark.parametrize("Dh", [64, 128])
def test_gpu_long_cache(dtype, bias, num_splits, Dh):
    """Lk = 16384 (the issue's target shape) next to short rows, T5 v1.1's lookup (32 buckets, 128)."""
    lens = [16384, 9001, 1, 0]
    q, k, v, seq, kw = _inputs(4, 16384, 4, Dh, lens, dtype=dtype, bias=bias, lut_cfg=(32, 128), seed=11)
    _check_against_ref(q, k, v, seq, kw, dtype, num_splits=num_splits)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("Dh", [16, 32, 256])
def test_gpu_other_head_dims(dtype, Dh):
    q, k, v, seq, kw = _inputs(3, 3000, 2, Dh, [3000, 1500, 7], dtype=dtype, bias="t5", lut_cfg=(32, 128), seed=12)
    _check_against_ref(q, k, v, seq, kw, dtype)


@pytest.mark.gpu
def test_gpu_matches_flash_attention_bf16():
    lens = [16384, 3000]
    q, k, v, seq, kw = _inputs(2, 16384, 12, 64, lens, dtype=torch.bfloat16, bias="t5", lut_cfg=(32, 128), seed=13)
    out = flash_decode(q, k, v, seq, **kw)
    for b, n in enumerate(lens):
        fa = flash_attention(q[b : b + 1, None], k[b : b + 1, :n], v[b : b + 1, :n], causal=True, **kw)
        torch.testing.assert_close(out[b].float(), fa[0, 0].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_follows_seqlens():
    """Captured once, replayed after the lengths and the query change in place: the graph follows the values (no
    shape or launch parameter depends on them), and the capture itself never synchronises."""
    Lmax = 4096
    q, k, v, seq, kw = _inputs(2, Lmax, 4, 64, [Lmax, Lmax], dtype=torch.bfloat16, bias="t5", lut_cfg=(32, 128))
    k = torch.randn_like(k)  # every slot finite: the lengths change below
    v = torch.randn_like(v)
    flash_decode(q, k, v, seq, **kw)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flash_decode(q, k, v, seq, **kw)
    for lens, seed in (([1, 4096], 1), ([2000, 0], 2), ([37, 3000], 3)):
        seq.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        torch.testing.assert_close(out, flash_decode(q, k, v, seq, **kw), rtol=0, atol=0)
        assert (out[1] == 0).all() == (lens[1] == 0)


@pytest.mark.gpu
def test_gpu_no_host_sync():
    q, k, v, seq, kw = _inputs(2, 2048, 4, 64, [2048, 5], dtype=torch.bfloat16, bias="t5", lut_cfg=(32, 128))
    for splits in (None, 1, 4):
        flash_decode(q, k, v, seq, **kw, num_splits=splits)  # warm-up: compiles
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        for splits in (None, 1, 4):
            out = flash_decode(q, k, v, seq, **kw, num_splits=splits)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(out.float()).all()


@pytest.mark.gpu
def test_gpu_compile_matches_eager():
    q, k, v, seq, kw = _inputs(2, 1024, 4, 64, [1024, 100], dtype=torch.bfloat16, bias="t5", lut_cfg=(32, 128))

    def step(q, k, v, seq, lut):
        return flash_decode(q * 2, k, v, seq, rel_lut=lut).float().square()

    eager = step(q, k, v, seq, kw["rel_lut"])
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(q, k, v, seq, kw["rel_lut"])
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
