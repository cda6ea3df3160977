"""linear_cross_entropy (chunked LM head + CE) against matmul + reference CE, error-ratio rule of DESIGN.md §5."""

import pytest
import torch
import torch.nn.functional as F
from ratio import assert_ratio, random_labels

import flasht5.ops.linear_cross_entropy as lce_mod
from flasht5.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref


@pytest.fixture
def small_chunks(monkeypatch):
    """Force several token chunks (and a ragged last one) so the cross-chunk accumulation is exercised."""
    monkeypatch.setattr(lce_mod, "_default_chunk_tokens", lambda n, v, d: 4)


def _run(fn, hidden, weight, labels, upstream, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss, z = fn(h, w, labels, return_z_loss=True, **kw)
    gh, gw = torch.autograd.grad((loss.double() * upstream).sum(), (h, w))
    return loss, z, gh, gw


def _check(hidden, weight, labels, **kw):
    shape = labels.shape if kw.get("reduction", "mean") == "none" else ()
    upstream = torch.randn(shape, dtype=torch.float64).to(hidden.device)
    out = _run(linear_cross_entropy, hidden, weight, labels, upstream, **kw)
    same = _run(linear_cross_entropy_ref, hidden, weight, labels, upstream, **kw)
    hi = _run(linear_cross_entropy_ref, hidden.double(), weight.double(), labels, upstream, **kw)
    assert out[2].dtype == hidden.dtype and out[3].dtype == weight.dtype
    for name, o, h, s in zip(("loss", "z_term", "grad_hidden", "grad_weight"), out, hi, same):
        assert o.shape == s.shape, name
        assert torch.isfinite(o).all(), name
        assert_ratio(o, h, s, hidden.dtype, name)
    return out


@pytest.mark.parametrize(
    "dtype,n_classes,d_model,reduction,smoothing,z_loss,scale",
    [
        (torch.float32, 32128, 64, "mean", 0.0, 0.0, None),
        (torch.float32, 32100, 48, "sum", 0.1, 1e-4, 48**-0.5),
        (torch.float16, 1000, 3000, "mean", 0.1, 1e-3, 3000**-0.5),
        (torch.float32, 500, 40, "none", 0.2, 1e-3, 0.7),
    ],
)
def test_linear_cross_entropy_matches_reference(dtype, n_classes, d_model, reduction, smoothing, z_loss, scale,
                                                small_chunks, device):  # fmt: skip
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, d_model, device=device).to(dtype)
    weight = (torch.randn(n_classes, d_model, device=device) * d_model**-0.5).to(dtype)
    labels = random_labels((2, 5), n_classes, device)
    _check(hidden, weight, labels, reduction=reduction, label_smoothing=smoothing, z_loss=z_loss, scale=scale)


def test_tied_embedding_gradient_accumulates(small_chunks, device):
    # T5 v1.0: the LM head reuses the input embedding and rescales by d_model**-0.5 first.
    torch.manual_seed(0)
    d_model, vocab = 32, 300
    table = torch.randn(vocab, d_model, device=device, requires_grad=True)
    ids = torch.randint(0, vocab, (3, 4), device=device)
    labels = random_labels((3, 4), vocab, device)
    grads = []
    for fn in (linear_cross_entropy, linear_cross_entropy_ref):
        hidden = torch.tanh(F.embedding(ids, table))
        loss = fn(hidden, table, labels, scale=d_model**-0.5, z_loss=1e-3)
        grads.append(torch.autograd.grad(loss, table)[0])
    torch.testing.assert_close(grads[0], grads[1])


def test_padding_does_not_change_the_loss(small_chunks, device):
    torch.manual_seed(0)
    hidden = torch.randn(6, 16, device=device, requires_grad=True)
    weight = torch.randn(200, 16, device=device, requires_grad=True)
    labels = random_labels((6,), 200, device, p_ignore=0.2)
    padded_hidden = torch.cat([hidden, torch.randn(9, 16, device=device)])
    padded_labels = torch.cat([labels, torch.full((9,), -100, device=device)])
    a = linear_cross_entropy(hidden, weight, labels, z_loss=1e-3)
    ga = torch.autograd.grad(a, (hidden, weight))
    b = linear_cross_entropy(padded_hidden, weight, padded_labels, z_loss=1e-3)
    gb = torch.autograd.grad(b, (hidden, weight))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga[0], gb[0])
    torch.testing.assert_close(ga[1], gb[1])


def test_all_ignored(small_chunks, device):
    hidden = torch.randn(2, 5, 8, device=device, requires_grad=True)
    weight = torch.randn(50, 8, device=device, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.full((2, 5), -100, device=device), label_smoothing=0.1)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    assert loss.item() == 0.0
    assert gh.abs().max().item() == 0.0 and gw.abs().max().item() == 0.0


def test_non_contiguous_inputs(small_chunks, device):
    torch.manual_seed(0)
    hidden = torch.randn(24, 3, 7, device=device).transpose(0, 2)[..., ::2]  # (7, 3, 12), strided
    weight = torch.randn(24, 150, device=device).t()  # (150, 24)... sliced below to d = 12
    weight = weight[:, :12]
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    labels = random_labels((7, 3), 150, device)
    _check(hidden, weight, labels, z_loss=1e-4)


def test_no_grad_and_frozen_weight(small_chunks, device):
    torch.manual_seed(0)
    hidden = torch.randn(7, 16, device=device, requires_grad=True)
    weight = torch.randn(90, 16, device=device)  # frozen head
    labels = random_labels((7,), 90, device)
    with torch.no_grad():
        torch.testing.assert_close(
            linear_cross_entropy(hidden, weight, labels), linear_cross_entropy_ref(hidden, weight, labels)
        )
    (gh,) = torch.autograd.grad(linear_cross_entropy(hidden, weight, labels), hidden)
    (expect,) = torch.autograd.grad(linear_cross_entropy_ref(hidden, weight, labels), hidden)
    torch.testing.assert_close(gh, expect)


def test_bad_inputs(device):
    h, w = torch.randn(4, 8, device=device), torch.randn(10, 8, device=device)
    y = torch.zeros(4, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, w, torch.tensor([0, 10, 1, 2], device=device))
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(h, torch.randn(10, 9, device=device), y)
    with pytest.raises(ValueError, match="dtype"):
        linear_cross_entropy(h, w.half(), y)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, w, torch.zeros(5, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, y, reduction="batchmean")


def test_linear_cross_entropy_torch_compile_matches_eager(small_chunks, device):
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 16, device=device, requires_grad=True)
    weight = torch.randn(60, 16, device=device, requires_grad=True)
    labels = random_labels((2, 5), 60, device)

    def f(h, w):
        return linear_cross_entropy(torch.relu(h), w, labels, z_loss=1e-3, scale=0.25)

    eager = torch.autograd.grad(f(hidden, weight), (hidden, weight))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(hidden, weight), (hidden, weight))
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)
    args = (hidden.reshape(10, 16), weight, labels.reshape(10), -100, 0.0, 1e-3)
    torch.library.opcheck(torch.ops.flasht5.linear_cross_entropy_fwd.default, (*args, "mean", 0.5, True, True))
    torch.library.opcheck(torch.ops.flasht5.linear_cross_entropy_fwd.default, (*args, "none", 1.0, True, True))


@pytest.mark.gpu
@pytest.mark.parametrize("n_classes,d_model", [(32128, 512), (32100, 768), (250112, 256)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_bf16_gpu(n_classes, d_model, reduction):
    torch.manual_seed(0)
    hidden = torch.randn(3, 700, d_model, device="cuda").to(torch.bfloat16)
    weight = (torch.randn(n_classes, d_model, device="cuda") * d_model**-0.5).to(torch.bfloat16)
    labels = random_labels((3, 700), n_classes, "cuda")
    _check(hidden, weight, labels, reduction=reduction, z_loss=1e-4, label_smoothing=0.1, scale=d_model**-0.5)


@pytest.mark.gpu
def test_linear_cross_entropy_bf16_gpu_many_chunks(small_chunks):
    torch.manual_seed(0)
    hidden = torch.randn(37, 256, device="cuda").to(torch.bfloat16)
    weight = (torch.randn(32128, 256, device="cuda") * 256**-0.5).to(torch.bfloat16)
    _check(hidden, weight, random_labels((37,), 32128, "cuda"), z_loss=1e-4)


@pytest.mark.gpu
def test_linear_cross_entropy_inductor_gpu():
    hidden = torch.randn(600, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(32128, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = random_labels((600,), 32128, "cuda")

    def f(h, w):
        return linear_cross_entropy(h * 2, w, labels, z_loss=1e-4)

    eager = torch.autograd.grad(f(hidden, weight), (hidden, weight))
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(hidden, weight), (hidden, weight))
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)
