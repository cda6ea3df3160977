"""cross_entropy (Triton) against the fp32-upcast reference and torch, with the error-ratio rule of DESIGN.md §5."""

import pytest
import torch
import torch.nn.functional as F
from ratio import assert_ratio, random_labels

from flasht5.ops.cross_entropy import cross_entropy, cross_entropy_ref


def _loss_and_grad(fn, logits, labels, upstream, **kw):
    leaf = logits.detach().clone().requires_grad_()
    loss, z = fn(leaf, labels, return_z_loss=True, **kw)
    (grad,) = torch.autograd.grad((loss.double() * upstream).sum(), leaf)
    return loss, z, grad


def _check(logits, labels, **kw):
    upstream = torch.randn((), dtype=torch.float64) if kw.get("reduction", "mean") != "none" else None
    if upstream is None:
        upstream = torch.randn(labels.shape, dtype=torch.float64)
    upstream = upstream.to(logits.device)
    out = _loss_and_grad(cross_entropy, logits, labels, upstream, **kw)
    # torch with the same input dtype: the fp32 upcast path everyone uses; high precision: fp64
    same = _loss_and_grad(cross_entropy_ref, logits, labels, upstream, **kw)
    hi = _loss_and_grad(cross_entropy_ref, logits.double(), labels, upstream, **kw)
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
    _check(logits, labels, reduction=reduction, label_smoothing=smoothing, z_loss=z_loss)


def test_reference_matches_torch_mean_with_ignore_and_smoothing(device):
    torch.manual_seed(0)
    logits = torch.randn(9, 50, device=device)
    labels = random_labels((9,), 50, device, p_ignore=0.4)
    for eps in (0.0, 0.25):
        expect = F.cross_entropy(logits, labels, ignore_index=-100, label_smoothing=eps)
        torch.testing.assert_close(cross_entropy_ref(logits, labels, label_smoothing=eps), expect)
        torch.testing.assert_close(cross_entropy(logits, labels, label_smoothing=eps), expect)


def test_z_loss_definition(device):
    torch.manual_seed(0)
    logits = torch.randn(6, 33, device=device)
    labels = random_labels((6,), 33, device, p_ignore=0.5, seed=3)
    keep = labels != -100
    loss, z = cross_entropy(logits, labels, z_loss=1e-2, return_z_loss=True)
    lse = torch.logsumexp(logits, -1)
    torch.testing.assert_close(z, 1e-2 * lse[keep].pow(2).mean())
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels) + z)


def test_all_ignored_gives_zero_loss_and_grad(device):
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


def test_padding_does_not_change_the_loss(device):
    # FAT5's bug: averaging over -100 rows. Adding padded rows must leave loss and real-row gradients unchanged.
    torch.manual_seed(0)
    logits = torch.randn(5, 300, device=device)
    labels = random_labels((5,), 300, device, p_ignore=0.2)
    padded_logits = torch.cat([logits, torch.randn(7, 300, device=device)])
    padded_labels = torch.cat([labels, torch.full((7,), -100, device=device)])
    a, ga = _loss_and_grad(cross_entropy, logits, labels, 1.0, z_loss=1e-3, label_smoothing=0.1)[::2]
    b, gb = _loss_and_grad(cross_entropy, padded_logits, padded_labels, 1.0, z_loss=1e-3, label_smoothing=0.1)[::2]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb[:5])
    assert gb[5:].abs().max().item() == 0.0


def test_non_contiguous_logits(device):
    torch.manual_seed(0)
    wide = torch.randn(4, 2, 160, device=device)
    logits = wide.transpose(0, 1)[..., :150]  # (2, 4, 150): strided rows, vocab sliced out of a padded buffer
    assert not logits.is_contiguous()
    labels = random_labels((2, 4), 150, device)
    _check(logits, labels, z_loss=1e-4)
    col_strided = torch.randn(150, 6, device=device).t()  # stride 6 along the vocab: copied first
    _check(col_strided, random_labels((6,), 150, device), reduction="sum")


def test_bad_inputs(device):
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
    _check(logits, labels, reduction=reduction, label_smoothing=smoothing, z_loss=z_loss)


@pytest.mark.gpu
def test_cross_entropy_inductor_gpu():
    logits = torch.randn(300, 32128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = random_labels((300,), 32128, "cuda")

    def f(x):
        return cross_entropy(x * 2, labels, z_loss=1e-4)

    (eager,) = torch.autograd.grad(f(logits), logits)
    (got,) = torch.autograd.grad(torch.compile(f, fullgraph=True)(logits), logits)
    torch.testing.assert_close(got, eager)
