"""The core model (``flasht5.model.T5``, no transformers wrapper): position encodings' defining properties, backends
agreeing, every layout exact, the loss, the initialisation; flash cases run under Triton's interpreter on the CPU."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.t5.modeling_t5 import T5Attention

from flasht5 import FlashT5Config
from flasht5.layout import Batch, Layout, shift_right
from flasht5.model import FIRE, T5, alibi_slopes, apply_rope, kernels_for, rope_angles
from flasht5.ops.relative_position import relative_position_bucket

V = 61


def tiny_cfg(position_encoding="t5", **kw) -> FlashT5Config:
    return FlashT5Config(**{**dict(
        vocab_size=V, d_model=32, d_kv=16, d_ff=48, num_heads=4, num_layers=2, num_decoder_layers=2,
        dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, position_encoding=position_encoding,
    ), **kw})  # fmt: skip


def tiny(position_encoding="t5", backend="eager", **kw) -> T5:
    torch.manual_seed(0)
    model = T5(tiny_cfg(position_encoding, **kw), backend=backend).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos_bias.tables" in name:
                p.normal_(0, 1)  # a visible bias
    return model


def pair(pe="t5", a="eager", b="flash", **kw) -> tuple[T5, T5]:
    ma, mb = tiny(pe, a, **kw), tiny(pe, b, **kw)
    mb.load_state_dict(ma.state_dict())
    return ma, mb


def cu(parts) -> torch.Tensor:
    return torch.tensor([0] + [sum(map(len, parts[: i + 1])) for i in range(len(parts))], dtype=torch.int32)


def _docs():
    g = torch.Generator().manual_seed(3)
    enc = [torch.randint(2, V, (n,), generator=g) for n in (5, 1, 8)]
    dec = [torch.randint(2, V, (n,), generator=g) for n in (3, 4, 1)]
    return enc, dec


def _separately(model, enc, dec):
    return torch.cat([model(e[None], labels=d[None], return_logits=True).logits[0] for e, d in zip(enc, dec)])


def _varlen(model, enc, dec, **kw):
    b = Batch.varlen(torch.cat(enc), torch.cat(dec), cu(enc), None, cu(dec), None)
    return model(b.input_ids, labels=b.labels, enc=b.enc, dec=b.dec, **kw)


# ------------------------------------------------------------------------------------------------------------
# Position encodings
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 16), (64, 256), (33, 100)])
def test_buckets_match_hf_far_beyond_max_distance(bidirectional, num_buckets, max_distance):
    rel = torch.arange(-12 * max_distance, 12 * max_distance + 1)
    ours = relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    ref = T5Attention._relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    assert torch.equal(ours, ref)


def test_alibi_slopes_and_bias_are_linear_in_distance():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert alibi_slopes(12).shape == (12,) and (alibi_slopes(12) > 0).all()
    model = tiny("alibi")
    lay = Layout.dense(1, 9)
    bias = model.encoder.pos_bias(lay, lay, kernels_for("eager"), torch.device("cpu"))[0]  # (1, H, 9, 9)
    i, j = torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij")
    torch.testing.assert_close(bias[0], -alibi_slopes(4)[:, None, None] * (i - j).abs())
    assert model.encoder.pos_bias.bidirectional and not model.decoder.pos_bias.bidirectional
    assert "slopes" not in model.state_dict() and not any("slopes" in k for k in model.state_dict())


def test_position_tables_are_owned_by_the_stack():
    shared, per_layer = tiny("t5"), tiny("t5", relative_attention_per_layer=True)
    assert len(shared.encoder.pos_bias.tables) == 1 and len(shared.decoder.pos_bias.tables) == 1
    assert len(per_layer.encoder.pos_bias.tables) == 2  # umT5: one table per layer
    lay = Layout.dense(1, 5)
    biases = per_layer.encoder.pos_bias(lay, lay, kernels_for("eager"), torch.device("cpu"))
    assert len(biases) == 2 and not torch.equal(biases[0], biases[1])


def test_rope_depends_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8)
    pos = torch.arange(6)[None]
    scores = []
    for shift in (0, 37):
        cos, sin = rope_angles(pos + shift, 8, 10000.0)
        qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        scores.append(torch.einsum("bqhd,bkhd->bhqk", qr, kr))
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-4, atol=1e-4)
    cos, sin = rope_angles(pos, 4, 10000.0)  # partial rotary: the last dims pass through untouched
    assert torch.equal(apply_rope(q, cos, sin)[..., 4:], q[..., 4:])


def test_rope_model_is_translation_invariant():
    model = tiny("rope", rope_fraction=0.5)
    ids = torch.randint(2, V, (1, 10))
    a = model.encode(ids, Layout.dense(1, 10)).hidden
    b = model.encode(ids, Layout.dense(1, 10, offset=100)).hidden
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fire_is_a_learned_function_of_normalised_log_distance():
    torch.manual_seed(0)
    fire = FIRE(num_heads=3, hidden=16, init_length=64)
    pos = torch.arange(40)[None]
    causal = fire(pos, pos, bidirectional=False)[0]  # (H, 40, 40)
    # Below the threshold L the normaliser is constant: the bias depends on i - j only (translation invariance).
    torch.testing.assert_close(causal[:, 10, 3], causal[:, 30, 23])
    i, j = 33, 5  # it is exactly f(psi(i - j) / psi(max(L, i)))
    x = torch.log1p(torch.tensor(float(i - j))) / torch.log1p(torch.tensor(64.0))
    expected = fire.mlp_out(torch.relu(fire.mlp_in(x.view(1, 1))))[0]
    torch.testing.assert_close(causal[:, i, j], expected)
    bidir = fire(pos, pos, bidirectional=True)[0]
    assert not torch.allclose(bidir[:, 10, 3], bidir[:, 3, 10])  # both directions are distinguished
    bidir.sum().backward()
    assert fire.log_c.grad is not None and fire.mlp_in.weight.grad is not None


# ------------------------------------------------------------------------------------------------------------
# Backends and layouts (float64 on the reference paths: the logic must agree to ~1e-12)
# ------------------------------------------------------------------------------------------------------------


def _padded_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, V, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = torch.randint(2, V, (3, 5), generator=g)
    dmask = torch.ones_like(labels)
    dmask[2, 3:] = 0
    labels[dmask == 0] = -100
    return ids, Layout.padded(mask), labels, Layout.padded(dmask), dmask.bool()


@pytest.mark.parametrize("pe", ["t5", "alibi", "rope", "fire"])
def test_eager_and_sdpa_agree(pe):
    eager, sdpa = (m.double() for m in pair(pe, "eager", "sdpa"))
    ids, enc, labels, dec, _ = _padded_batch()
    a = eager(ids, labels=labels, enc=enc, dec=dec, return_logits=True)
    b = sdpa(ids, labels=labels, enc=enc, dec=dec, return_logits=True)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-9, atol=1e-9)
    a.loss.backward()
    b.loss.backward()
    ga = dict(eager.named_parameters())
    for name, p in sdpa.named_parameters():
        torch.testing.assert_close(p.grad, ga[name].grad, rtol=1e-8, atol=1e-9, msg=name)


@pytest.mark.parametrize("pe", ["t5", "alibi", "rope", "fire"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_packed_rows_and_varlen_equal_separate_documents(pe, backend):
    model = tiny(pe, backend).double()
    enc, dec = _docs()
    ref = _separately(model, enc, dec)

    def seg(parts, pad):
        s = torch.cat(
            [torch.full((len(p),), i + 1) for i, p in enumerate(parts)] + [torch.zeros(pad, dtype=torch.long)]
        )
        return s[None]

    pad = lambda x, n: torch.cat([x, x.new_zeros(n)])[None]
    out = model(
        pad(torch.cat(enc), 2), labels=torch.cat([torch.cat(dec), torch.full((3,), -100)])[None],
        enc=Layout.packed(seg(enc, 2)), dec=Layout.packed(seg(dec, 3)), return_logits=True,
    ).logits[0, : sum(map(len, dec))]  # fmt: skip
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(_varlen(model, enc, dec, return_logits=True).logits[0], ref, rtol=1e-9, atol=1e-9)


def test_packed_labels_shift_per_document_and_loss_is_token_mean():
    model = tiny()
    enc, dec = _docs()
    lay = Layout.varlen(cu(dec), total=8)
    shifted = shift_right(torch.cat(dec)[None], lay, start_id=0, pad_id=0)
    starts = cu(dec)[:-1].long()
    assert (shifted[0, starts] == 0).all() and torch.equal(shifted[0, 1:3], dec[0][:2])
    loss = _varlen(model, enc, dec).loss
    ref = torch.stack([model(e[None], labels=d[None]).loss * len(d) for e, d in zip(enc, dec)]).sum() / 8
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_bad_layouts_raise_clear_errors():
    model = tiny()
    ids = torch.randint(2, V, (1, 6))
    with pytest.raises(ValueError, match="start at 0 and be non-decreasing"):
        Layout.varlen(torch.tensor([0, 4, 3, 6], dtype=torch.int32), total=6)
    with pytest.raises(ValueError, match="end at the number of tokens"):
        Layout.varlen(torch.tensor([0, 4], dtype=torch.int32), total=6)
    with pytest.raises(ValueError, match="contiguous run"):
        Layout.packed(torch.tensor([[1, 1, 2, 1, 0, 0]]))
    with pytest.raises(ValueError, match="packed on both sides"):
        model(ids, labels=ids, enc=Layout.varlen(torch.tensor([0, 6], dtype=torch.int32), total=6))
    with pytest.raises(ValueError, match="documents"):
        model(ids, labels=ids, enc=Layout.varlen(torch.tensor([0, 2, 6], dtype=torch.int32), total=6),
              dec=Layout.varlen(torch.tensor([0, 6], dtype=torch.int32), total=6))  # fmt: skip
    with pytest.raises(ValueError, match="input_ids has shape"):
        model(ids, labels=ids, enc=Layout.dense(1, 5))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(ids + V, labels=ids)


def test_all_ignored_labels_give_zero_loss_not_nan():
    out = tiny()(torch.randint(2, V, (2, 5)), labels=torch.full((2, 4), -100))
    assert out.loss.item() == 0.0


def test_z_loss_is_added_and_reported():
    model = tiny(z_loss=1e-2)
    ids, labels = torch.randint(2, V, (2, 7)), torch.randint(2, V, (2, 4))
    labels[1, 2:] = -100
    out = model(ids, labels=labels, return_logits=True)
    lse = torch.logsumexp(out.logits.float(), -1)[labels != -100]
    ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, V).float(), labels.reshape(-1))
    torch.testing.assert_close(out.z_loss, 1e-2 * lse.pow(2).mean())
    torch.testing.assert_close(out.loss, ce + out.z_loss)


@pytest.mark.parametrize("pe,backend", [("t5", "eager"), ("fire", "flash")])
def test_gradient_checkpointing_matches(pe, backend):
    model = tiny(pe, backend).train()
    ids, labels = torch.randint(2, V, (2, 7)), torch.randint(2, V, (2, 4))
    model(ids, labels=labels).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for stack in (model.encoder, model.decoder):
        stack.gradient_checkpointing = True
    model(ids, labels=labels).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)


def test_v10_tied_head_rescales():
    tied = T5(tiny_cfg(feed_forward_proj="relu", tie_word_embeddings=True), backend="eager").eval()
    assert tied.lm_head is None and tied.cfg.scale_decoder_outputs
    h = torch.randn(1, 2, 32)
    torch.testing.assert_close(tied.logits(h), (h * 32**-0.5) @ tied.shared.weight.T)
    assert math.isclose(tied.output_scale(), 32**-0.5)


def test_bare_core_is_t5_initialised_and_trains():
    """A bare ``T5(config)`` has Mesh TensorFlow's per-role init (no wrapper involved) and learns a batch."""
    cfg = FlashT5Config(vocab_size=500, d_model=64, d_kv=16, d_ff=256, num_layers=2, num_heads=8,
                        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)  # fmt: skip
    torch.manual_seed(0)
    m = T5(cfg, backend="sdpa")
    std = lambda p: p.detach().float().std().item()
    layer = m.encoder.layers[0]
    for value, expected in [
        (std(m.shared.weight), 1.0),
        (std(m.lm_head.weight), 64**-0.5),
        (std(layer.attn.q.weight), (64 * 16) ** -0.5),
        (std(layer.attn.k.weight), 64**-0.5),
        (std(layer.attn.o.weight), (8 * 16) ** -0.5),
        (std(layer.mlp.wi_0.weight), 64**-0.5),
        (std(layer.mlp.wo.weight), 256**-0.5),
        (std(m.encoder.pos_bias.tables[0].weight), 64**-0.5),
    ]:
        assert abs(value / expected - 1) < 0.2, (value, expected)
    assert torch.equal(layer.attn_norm.weight, torch.ones(64))
    ids, labels = torch.randint(2, 500, (4, 12)), torch.randint(2, 500, (4, 6))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = m.train()(ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[0] > math.log(500) - 1.0 and losses[-1] < 0.5 * losses[0]


# ------------------------------------------------------------------------------------------------------------
# The flash backend (the Triton kernels; under Triton's interpreter on the CPU)
# ------------------------------------------------------------------------------------------------------------


def test_flash_matches_eager_on_padded_batches_with_grads():
    """Padded rows lose their padding once per stack: valid positions and every gradient match eager."""
    eager, flash = pair()
    ids, enc, labels, dec, valid = _padded_batch()
    a = eager(ids, labels=labels, enc=enc, dec=dec, return_logits=True)
    b = flash(ids, labels=labels, enc=enc, dec=dec, return_logits=True)
    torch.testing.assert_close(b.logits[valid], a.logits[valid], rtol=1e-4, atol=1e-5 * a.logits.abs().max().item())
    a.loss.backward()
    b.loss.backward()
    ref = dict(eager.named_parameters())
    for name, p in flash.named_parameters():
        g = ref[name].grad
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-5 * g.abs().max().item(), msg=name)


def test_flash_static_view_of_padded_rows_equals_the_unpadded_one(monkeypatch):
    """Under CUDA-graph capture or torch.compile padded rows keep every slot (no host sync; real tokens first, each
    row's padding a trailing document): outputs, loss and gradients equal the unpadded path's; padding stays zero.
    Rows right-padded, left-padded, with a hole and empty; a dense decoder pairs with the padded encoder too."""
    import flasht5.layout as layout_mod

    _, flash = pair()
    g = torch.Generator().manual_seed(5)
    ids, labels = torch.randint(2, V, (4, 9), generator=g), torch.randint(2, V, (4, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:], mask[1, :3], mask[2, 2:4], mask[3, :] = 0, 0, 0, 0
    dmask = torch.ones_like(labels)
    dmask[0, 3:] = 0
    labels = labels.masked_fill(dmask == 0, 0)  # padding labels that are NOT -100: padding must still not count

    def run(static: bool, dec_kind: str):
        monkeypatch.setattr(layout_mod, "static_shapes_needed", lambda: static)
        flash.zero_grad(set_to_none=True)
        dec = Layout.padded(dmask) if dec_kind == "padded" else Layout.dense(4, 5)
        with torch.set_grad_enabled(dec_kind == "padded"):  # gradients once (the interpreter is slow)
            out = flash(ids, labels=labels, enc=Layout.padded(mask), dec=dec, return_logits=True)
        if out.loss.requires_grad:
            out.loss.backward()
        assert out.encoded.view.inner.pad_docs == (4 if static else 0)
        assert out.view.inner.pad_docs == (4 if static and dec_kind == "padded" else 0)
        grads = {n: p.grad.clone() for n, p in flash.named_parameters() if p.grad is not None}
        return out.encoded.hidden, out.logits, out.loss, grads

    for dec_kind in ("padded", "dense"):
        hid_a, logits_a, loss_a, grads_a = run(False, dec_kind)
        hid_b, logits_b, loss_b, grads_b = run(True, dec_kind)
        torch.testing.assert_close(hid_b, hid_a, rtol=1e-5, atol=1e-6)
        assert torch.all(hid_b[mask == 0] == 0)
        keep = dmask.bool() if dec_kind == "padded" else torch.ones_like(dmask, dtype=torch.bool)
        torch.testing.assert_close(logits_b[keep], logits_a[keep], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-7)
        assert grads_a.keys() == grads_b.keys()
        for name, ga in grads_a.items():
            torch.testing.assert_close(grads_b[name], ga, rtol=1e-4, atol=1e-6 * ga.abs().max().item(), msg=name)


def test_flash_static_view_refuses_packed_rows(monkeypatch):
    import flasht5.layout as layout_mod

    monkeypatch.setattr(layout_mod, "static_shapes_needed", lambda: True)
    seg = torch.tensor([[1, 1, 2, 0]])
    with pytest.raises(ValueError, match="varlen cu_seqlens"):
        Layout.packed(seg).flat()


def test_flash_packed_varlen_equals_separate_documents():
    eager, flash = pair()
    enc, dec = _docs()
    ref = _separately(eager, enc, dec)
    out = _varlen(flash, enc, dec, return_logits=True).logits[0]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_flash_understated_max_seqlen_is_harmless():
    """Documents longer than the kernel's blocks (16 under the interpreter) with max_seqlen far too small."""
    eager, flash = pair()
    g = torch.Generator().manual_seed(5)
    enc = [torch.randint(2, V, (n,), generator=g) for n in (37, 3, 20)]
    dec = [torch.randint(2, V, (n,), generator=g) for n in (18, 2, 33)]
    ref = _separately(eager, enc, dec)
    b = Batch.varlen(torch.cat(enc), torch.cat(dec), cu(enc), 2, cu(dec), 1)
    low = flash(b.input_ids, labels=b.labels, enc=b.enc, dec=b.dec, return_logits=True).logits[0]
    torch.testing.assert_close(low, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_flash_fused_loss_equals_logits_loss_in_training():
    eager, flash = pair(z_loss=1e-3)
    enc, dec = _docs()
    ref = _varlen(eager.train(), enc, dec)
    out = _varlen(flash.train(), enc, dec)
    assert out.logits is None  # the fused LM head never materialises the logits
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.z_loss, ref.z_loss, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("pe", ["alibi", "rope", "fire"])
def test_flash_matches_eager_other_position_encodings(pe):
    eager, flash = pair(pe)
    ids, labels = torch.randint(2, V, (2, 7)), torch.randint(2, V, (2, 4))
    a, b = eager(ids, labels=labels), flash(ids, labels=labels)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-5 * a.logits.abs().max().item())


def test_flash_umt5_per_layer_tables():
    eager, flash = pair(relative_attention_per_layer=True)
    enc, dec = _docs()
    a, b = _varlen(eager.train(), enc, dec), _varlen(flash.train(), enc, dec)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-4, atol=1e-5)
    a.loss.backward()
    b.loss.backward()
    for i in range(2):
        ga, gb = eager.encoder.pos_bias.tables[i].weight.grad, flash.encoder.pos_bias.tables[i].weight.grad
        torch.testing.assert_close(gb, ga, rtol=1e-3, atol=1e-5 * ga.abs().max().item())


def test_flash_hidden_states_match_eager():
    """output_hidden_states on the flash backend (stacks run padding-free): the same per-layer states as eager."""
    eager, flash = pair()
    ids, labels = torch.randint(2, V, (2, 7)), torch.randint(2, V, (2, 4))
    a = eager(ids, labels=labels, output_hidden_states=True)
    b = flash(ids, labels=labels, output_hidden_states=True)
    for x, y in zip(
        a.encoded.hidden_states + a.decoder_hidden_states, b.encoded.hidden_states + b.decoder_hidden_states
    ):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5 * x.abs().max().item())
    assert len(b.encoded.hidden_states) == 3 and len(b.decoder_hidden_states) == 3


def test_flash_rejects_a_head_dim_its_kernels_do_not_take_and_the_default_avoids_it(monkeypatch):
    """d_kv=8 on the flash backend: a clear error at construction (naming d_kv and the alternatives), not deep in a
    forward; the default backend on a CUDA machine then picks sdpa for such a model and flash for a d_kv=64 one."""
    from flasht5 import FlashT5ForConditionalGeneration
    from flasht5.model import default_backend

    for build in (lambda: T5(tiny_cfg(d_kv=8), backend="flash"),
                  lambda: FlashT5ForConditionalGeneration(tiny_cfg(d_kv=8, attn_implementation="flash"))):  # fmt: skip
        with pytest.raises(ValueError, match=r"d_kv=8: use attn_implementation='sdpa' or 'eager'"):
            build()
    model = T5(tiny_cfg(d_kv=16), backend="flash")
    with pytest.raises(ValueError, match="d_kv=12"):
        model.cfg.d_kv = 12  # a head dim changed after the fact is caught by set_backend too
        model.set_backend("flash")
    with pytest.raises(ValueError, match="choose one of"):
        model.set_backend("flex")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_backend(8) == "sdpa" and default_backend(64) == "flash" and default_backend() == "flash"


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flash"])
def test_fused_projections_equal_the_separate_ones(backend, monkeypatch):
    """FLASHT5_FUSED_PROJ: q, k, v (self-attention), k, v (cross-attention) and wi_0, wi_1 (gated feed-forward) from
    one matmul over the stacked weights give the separate projections' loss, logits and every gradient (fp32; dense
    and padded batches); a layer with a forward hook is not fused (the hook still sees its call)."""
    import flasht5.model as M

    torch.manual_seed(1)
    ids, labels = torch.randint(2, V, (2, 11)), torch.randint(2, V, (2, 5))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    batches = [dict(enc=Layout.padded(mask.bool())), dict()]
    results, stacked, real = {}, [], M._stacked
    monkeypatch.setattr(M, "_stacked", lambda *a: stacked.append(1) or real(*a))
    for fused in (False, True):
        monkeypatch.setattr(M, "FUSED_PROJ", fused)
        model = tiny("t5", backend)
        outs = []
        for kw in batches:
            model.zero_grad(set_to_none=True)
            out = model(ids, labels=labels, return_logits=True, **kw)
            out.loss.backward()
            outs.append(
                (out.loss.detach(), out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
            )
        results[fused] = outs
    assert len(stacked) == 2 * 6  # fused: 2 batches x (2 encoder + 2 decoder self-attentions + 2 cross k, v)
    for (l0, g0, d0), (l1, g1, d1) in zip(results[False], results[True]):
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-5)
        for name in d0:
            torch.testing.assert_close(d1[name], d0[name], rtol=1e-4, atol=1e-6, msg=name)
    monkeypatch.setattr(M, "FUSED_PROJ", True)
    model, calls = tiny("t5", backend), []
    model.encoder.layers[0].attn.q.register_forward_hook(lambda *a: calls.append("q"))
    model.decoder.layers[1].mlp.wi_1.register_forward_hook(lambda *a: calls.append("wi_1"))
    model(ids, labels=labels)
    assert calls == ["q", "wi_1"] and not M.fusable_linears(model.encoder.layers[0].attn.q)
