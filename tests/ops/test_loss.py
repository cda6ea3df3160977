"""ops/loss.py: cross_entropy (Triton) against the fp32-upcast reference and torch, and linear_cross_entropy (chunked
LM head + CE) against matmul + the reference CE, both with the error-ratio rule of DESIGN.md §5."""

import pytest
import torch
import torch.nn.functional as F
from ratio import assert_ratio, random_labels

import flasht5.ops.loss as loss_mod
from flasht5.ops.loss import cross_entropy, cross_entropy_ref, linear_cross_entropy, linear_cross_entropy_ref


# ------------------------------------------------------------------------------------------------------------------
# cross_entropy
# ------------------------------------------------------------------------------------------------------------------
def _ce_run(fn, logits, labels, upstream, **kw):
    leaf = logits.detach().clone().requires_grad_()
    loss, z = fn(leaf, labels, return_z_loss=True, **kw)
    (grad,) = torch.autograd.grad((loss.double() * upstream).sum(), leaf)
    return loss, z, grad


def _ce_check(logits, labels, **kw):
    upstream = torch.randn((), dtype=torch.float64) if kw.get("reduction", "mean") != "none" else None
    if upstream is None:
        upstream = torch.randn(labels.shape, dtype=torch.float64)
    upstream = upstream.to(logits.device)
    out = _ce_run(cross_entropy, logits, labels, upstream, **kw)
    # torch with the same input dtype: the fp32 upcast path everyone uses; high precision: fp64
    same = _ce_run(cross_entropy_ref, logits, labels, upstream, **kw)
    hi = _ce_run(cross_entropy_ref, logits.double(), labels, upstream, **kw)
    assert out[0].dtype == torch.float32 and out[0].shape == same[0].shape
    assert out[2].dtype == logits.dtype
    for name, o, h, s in zip(("loss", "z_term", "grad"), out, hi, same):
        assert torch.isfinite(o).all(), name
        assert_ratio(o, h, s, logits.dtype, name)
    return out


@pytest.mark.parametrize(
    "dtype,n_classes,reduction,smoothing,z_loss",
    [
        (torch.float32, 32128, "mean", 0.0, 0.0),
        (torch.float16, 32100, "mean", 0.1, 1e-4),
        (torch.float32, 32100, "sum", 0.0, 1e-3),
        (torch.float16, 1000, "none", 0.2, 1e-3),
        (torch.float32, 7, "none", 0.0, 0.0),
    ],
)
def test_cross_entropy_matches_reference(dtype, n_classes, reduction, smoothing, z_loss, device):
    torch.manual_seed(0)
    logits = (torch.randn(2, 3, n_classes, device=device) * 4).to(dtype)
    labels = random_labels((2, 3), n_classes, device)
    labels[0, 0] = n_classes - 1  # last class (edge of the last block)
    _ce_check(logits, labels, reduction=reduction, label_smoothing=smoothing, z_loss=z_loss)


def test_reference_matches_torch_mean_with_ignore_and_smoothing(device):
    torch.manual_seed(0)
    logits = torch.randn(9, 50, device=device)
    labels = random_labels((9,), 50, device, p_ignore=0.4)
    for eps in (0.0, 0.25):
        expect = F.cross_entropy(logits, labels, ignore_index=-100, label_smoothing=eps)
        torch.testing.assert_close(cross_entropy_ref(logits, labels, label_smoothing=eps), expect)
        torch.testing.assert_close(cross_entropy(logits, labels, label_smoothing=eps), expect)


def test_cross_entropy_z_loss_definition(device):
    torch.manual_seed(0)
    logits = torch.randn(6, 33, device=device)
    labels = random_labels((6,), 33, device, p_ignore=0.5, seed=3)
    keep = labels != -100
    loss, z = cross_entropy(logits, labels, z_loss=1e-2, return_z_loss=True)
    lse = torch.logsumexp(logits, -1)
    torch.testing.assert_close(z, 1e-2 * lse[keep].pow(2).mean())
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels) + z)


def test_cross_entropy_all_ignored_gives_zero_loss_and_grad(device):
    # large logits: an ignored row's gradient must be exactly 0, never exp(overflow) * 0 = NaN
    logits = (100 * torch.randn(4, 3, 100, device=device)).to(torch.float16).requires_grad_()
    labels = torch.full((4, 3), -100, device=device)
    for reduction in ("mean", "sum"):
        loss, z = cross_entropy(
            logits, labels, z_loss=1e-3, label_smoothing=0.1, reduction=reduction, return_z_loss=True
        )
        (grad,) = torch.autograd.grad(loss, logits)
        assert loss.item() == 0.0 and z.item() == 0.0
        assert torch.isfinite(grad).all() and grad.abs().max().item() == 0.0


def test_cross_entropy_padding_does_not_change_the_loss(device):
    # FAT5's bug: averaging over -100 rows. Adding padded rows must leave loss and real-row gradients unchanged.
    torch.manual_seed(0)
    logits = torch.randn(5, 300, device=device)
    labels = random_labels((5,), 300, device, p_ignore=0.2)
    padded_logits = torch.cat([logits, torch.randn(7, 300, device=device)])
    padded_labels = torch.cat([labels, torch.full((7,), -100, device=device)])
    a, ga = _ce_run(cross_entropy, logits, labels, 1.0, z_loss=1e-3, label_smoothing=0.1)[::2]
    b, gb = _ce_run(cross_entropy, padded_logits, padded_labels, 1.0, z_loss=1e-3, label_smoothing=0.1)[::2]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb[:5])
    assert gb[5:].abs().max().item() == 0.0


def test_cross_entropy_non_contiguous_logits(device):
    torch.manual_seed(0)
    wide = torch.randn(4, 2, 160, device=device)
    logits = wide.transpose(0, 1)[..., :150]  # (2, 4, 150): strided rows, vocab sliced out of a padded buffer
    assert not logits.is_contiguous()
    labels = random_labels((2, 4), 150, device)
    _ce_check(logits, labels, z_loss=1e-4)
    col_strided = torch.randn(150, 6, device=device).t()  # stride 6 along the vocab: copied first
    _ce_check(col_strided, random_labels((6,), 150, device), reduction="sum")


def test_cross_entropy_bad_inputs(device, monkeypatch):
    monkeypatch.setenv("FLASHT5_DEBUG", "1")  # label values of CUDA tensors are only checked in debug mode
    logits = torch.randn(4, 10, device=device)
    with pytest.raises(ValueError, match="labels"):
        cross_entropy(logits, torch.tensor([0, 1, 10, -100], device=device))
    with pytest.raises(ValueError, match="labels"):
        cross_entropy(logits, torch.tensor([0, 1, -1, 2], device=device))
    with pytest.raises(ValueError, match="labels"):
        cross_entropy(logits, torch.zeros(4, device=device))  # float labels
    with pytest.raises(ValueError, match="shape"):
        cross_entropy(logits, torch.zeros(5, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, torch.zeros(4, dtype=torch.long, device=device), reduction="avg")
    with pytest.raises(ValueError, match="logits"):
        cross_entropy(logits.long(), torch.zeros(4, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(logits, torch.zeros(4, dtype=torch.long, device=device), label_smoothing=1.5)


def test_cross_entropy_torch_compile_matches_eager(device):
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 70, device=device, requires_grad=True)
    labels = random_labels((2, 5), 70, device)

    def f(x):
        loss, z = cross_entropy(x * 2, labels, z_loss=1e-3, label_smoothing=0.1, return_z_loss=True)
        return loss + z

    eager_loss = f(logits)
    (eager,) = torch.autograd.grad(eager_loss, logits)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got_loss = compiled(logits)
    (got,) = torch.autograd.grad(got_loss, logits)
    torch.testing.assert_close(got_loss, eager_loss)
    torch.testing.assert_close(got, eager)
    args = (logits.reshape(10, 70), labels.reshape(10), -100, 0.1, 1e-3)
    torch.library.opcheck(torch.ops.flasht5.cross_entropy_fwd.default, (*args, "mean"))
    torch.library.opcheck(torch.ops.flasht5.cross_entropy_fwd.default, (*args, "none"))


@pytest.mark.gpu
@pytest.mark.parametrize("n_classes", [32100, 32128, 250112])
@pytest.mark.parametrize("reduction,smoothing,z_loss", [("mean", 0.0, 0.0), ("mean", 0.1, 1e-4), ("none", 0.0, 1e-4)])
def test_cross_entropy_bf16_gpu(n_classes, reduction, smoothing, z_loss):
    torch.manual_seed(0)
    logits = (torch.randn(3, 171, n_classes, device="cuda") * 4).to(torch.bfloat16)
    labels = random_labels((3, 171), n_classes, "cuda")
    _ce_check(logits, labels, reduction=reduction, label_smoothing=smoothing, z_loss=z_loss)


@pytest.mark.gpu
def test_cross_entropy_inductor_gpu():
    logits = torch.randn(300, 32128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = random_labels((300,), 32128, "cuda")

    def f(x):
        return cross_entropy(x * 2, labels, z_loss=1e-4)

    (eager,) = torch.autograd.grad(f(logits), logits)
    (got,) = torch.autograd.grad(torch.compile(f, fullgraph=True)(logits), logits)
    torch.testing.assert_close(got, eager)


# ------------------------------------------------------------------------------------------------------------------
# linear_cross_entropy
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def small_chunks(monkeypatch):
    """Force several token chunks (and a ragged last one) so the cross-chunk accumulation is exercised."""
    monkeypatch.setattr(loss_mod, "_default_chunk_tokens", lambda n, v, d: 4)


def _lce_run(fn, hidden, weight, labels, upstream, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss, z = fn(h, w, labels, return_z_loss=True, **kw)
    gh, gw = torch.autograd.grad((loss.double() * upstream).sum(), (h, w))
    return loss, z, gh, gw


def _lce_check(hidden, weight, labels, **kw):
    shape = labels.shape if kw.get("reduction", "mean") == "none" else ()
    upstream = torch.randn(shape, dtype=torch.float64).to(hidden.device)
    out = _lce_run(linear_cross_entropy, hidden, weight, labels, upstream, **kw)
    same = _lce_run(linear_cross_entropy_ref, hidden, weight, labels, upstream, **kw)
    hi = _lce_run(linear_cross_entropy_ref, hidden.double(), weight.double(), labels, upstream, **kw)
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
    _lce_check(hidden, weight, labels, reduction=reduction, label_smoothing=smoothing, z_loss=z_loss, scale=scale)


def test_linear_cross_entropy_tied_embedding_gradient_accumulates(small_chunks, device):
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


def test_linear_cross_entropy_padding_does_not_change_the_loss(small_chunks, device):
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


def test_linear_cross_entropy_all_ignored(small_chunks, device):
    hidden = torch.randn(2, 5, 8, device=device, requires_grad=True)
    weight = torch.randn(50, 8, device=device, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.full((2, 5), -100, device=device), label_smoothing=0.1)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    assert loss.item() == 0.0
    assert gh.abs().max().item() == 0.0 and gw.abs().max().item() == 0.0


def test_linear_cross_entropy_non_contiguous_inputs(small_chunks, device):
    torch.manual_seed(0)
    hidden = torch.randn(24, 3, 7, device=device).transpose(0, 2)[..., ::2]  # (7, 3, 12), strided
    weight = torch.randn(24, 150, device=device).t()  # (150, 24)... sliced below to d = 12
    weight = weight[:, :12]
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    labels = random_labels((7, 3), 150, device)
    _lce_check(hidden, weight, labels, z_loss=1e-4)


def test_linear_cross_entropy_no_grad_and_frozen_weight(small_chunks, device):
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


def test_linear_cross_entropy_bad_inputs(device, monkeypatch):
    monkeypatch.setenv("FLASHT5_DEBUG", "1")  # label values of CUDA tensors are only checked in debug mode
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
    _lce_check(hidden, weight, labels, reduction=reduction, z_loss=1e-4, label_smoothing=0.1, scale=d_model**-0.5)


@pytest.mark.gpu
def test_linear_cross_entropy_bf16_gpu_many_chunks(small_chunks):
    torch.manual_seed(0)
    hidden = torch.randn(37, 256, device="cuda").to(torch.bfloat16)
    weight = (torch.randn(32128, 256, device="cuda") * 256**-0.5).to(torch.bfloat16)
    _lce_check(hidden, weight, random_labels((37,), 32128, "cuda"), z_loss=1e-4)


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
