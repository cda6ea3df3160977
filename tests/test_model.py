"""The pure-PyTorch model: position encodings' defining properties, backends agreeing, packed layouts exact."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.t5.modeling_t5 import T5Attention

from flasht5 import FlashT5Config, FlashT5ForConditionalGeneration
from flasht5.model import FIRE, Seqs, alibi_slopes, apply_rope, relative_position_bucket, rope_angles


def tiny(position_encoding="t5", impl="eager", **kw):
    cfg = FlashT5Config(
        vocab_size=61, d_model=32, d_kv=16, d_ff=48, num_heads=4, num_layers=2, num_decoder_layers=2,
        dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        position_encoding=position_encoding, attn_implementation=impl, **kw,
    )  # fmt: skip
    torch.manual_seed(0)
    model = FlashT5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_attention_bias" in name:
                p.normal_(0, 1)
    return model


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
    attn = model.model.encoder.layers[0].attn
    spec = attn.position_spec(None)
    seqs = Seqs.build(1, 9, torch.device("cpu"))
    from flasht5.model import _materialised_bias

    bias = _materialised_bias(spec, seqs, seqs, {})  # (1, H, 9, 9)
    i, j = torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij")
    expected = -alibi_slopes(4)[:, None, None] * (i - j).abs()
    torch.testing.assert_close(bias[0], expected)
    dec = model.model.decoder.layers[0].attn.position_spec(None)
    assert not dec.bidirectional  # causal distance in the decoder


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
    ids = torch.randint(2, 61, (1, 10))
    a, _ = model.model.encode(ids, seqs=Seqs.build(1, 10, ids.device))
    b, _ = model.model.encode(ids, seqs=Seqs.build(1, 10, ids.device, position_ids=torch.arange(10)[None] + 100))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fire_is_a_learned_function_of_normalised_log_distance():
    torch.manual_seed(0)
    fire = FIRE(num_heads=3, hidden=16, init_length=64)
    pos = torch.arange(40)[None]
    causal = fire(pos, pos, bidirectional=False)[0]  # (H, 40, 40)
    # Below the threshold L the normaliser is constant: the bias depends on i - j only (translation invariance).
    torch.testing.assert_close(causal[:, 10, 3], causal[:, 30, 23])
    # It is exactly f(psi(i - j) / psi(max(L, i))).
    i, j = 33, 5
    x = torch.log1p(torch.tensor(float(i - j))) / torch.log1p(torch.tensor(64.0))
    expected = fire.mlp_out(torch.relu(fire.mlp_in(x.view(1, 1))))[0]
    torch.testing.assert_close(causal[:, i, j], expected)
    bidir = fire(pos, pos, bidirectional=True)[0]
    assert not torch.allclose(bidir[:, 10, 3], bidir[:, 3, 10])  # both directions are distinguished
    bidir.sum().backward()
    assert fire.log_c.grad is not None and fire.mlp_in.weight.grad is not None


# Backends and layouts are compared in float64, where the logic must agree to ~1e-12: a tiny random model
# amplifies fp32 rounding to ~1e-4 of the logit scale, which would hide real differences.
@pytest.mark.parametrize("pe", ["t5", "alibi", "rope", "fire"])
def test_eager_and_sdpa_agree(pe):
    eager, sdpa = tiny(pe, "eager").double(), tiny(pe, "sdpa").double()
    sdpa.load_state_dict(eager.state_dict())
    ids = torch.randint(2, 61, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = torch.randint(2, 61, (3, 5))
    dmask = torch.ones_like(labels)
    dmask[2, 3:] = 0
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dmask)
    a, b = eager(**kw), sdpa(**kw)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-9, atol=1e-9)
    a.loss.backward()
    b.loss.backward()
    ga = dict(eager.named_parameters())
    for name, p in sdpa.named_parameters():
        ref = ga[name].grad
        torch.testing.assert_close(p.grad, ref, rtol=1e-8, atol=1e-9, msg=name)


def _docs():
    g = torch.Generator().manual_seed(3)
    enc = [torch.randint(2, 61, (n,), generator=g) for n in (5, 1, 8)]
    dec = [torch.randint(2, 61, (n,), generator=g) for n in (3, 4, 1)]
    return enc, dec


def _separately(model, enc, dec):
    outs = []
    for e, d in zip(enc, dec):
        outs.append(model(input_ids=e[None], labels=d[None]).logits[0])
    return torch.cat(outs)


@pytest.mark.parametrize("pe", ["t5", "alibi", "rope", "fire"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packed_rows_and_varlen_equal_separate_documents(pe, impl):
    model = tiny(pe, impl).double()
    enc, dec = _docs()
    ref = _separately(model, enc, dec)

    def seg_pos(parts):
        seg = torch.cat([torch.full((len(p),), i + 1) for i, p in enumerate(parts)])
        pos = torch.cat([torch.arange(len(p)) for p in parts])
        return seg[None], pos[None]

    # One packed row (plus trailing padding), documents side by side.
    e_seg, e_pos = seg_pos(enc)
    d_seg, d_pos = seg_pos(dec)
    pad = lambda x, n: torch.cat([x, x.new_zeros(1, n)], dim=1)
    out = model(
        input_ids=pad(torch.cat(enc)[None], 2), segment_ids=pad(e_seg, 2), position_ids=pad(e_pos, 2),
        labels=pad(torch.cat(dec)[None], 3), decoder_segment_ids=pad(d_seg, 3), decoder_position_ids=pad(d_pos, 3),
    ).logits[0, : sum(map(len, dec))]  # fmt: skip
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)

    # Flattened, padding-free tokens with cu_seqlens.
    cu = lambda parts: torch.tensor([0] + [sum(map(len, parts[: i + 1])) for i in range(len(parts))], dtype=torch.int32)
    out = model(input_ids=torch.cat(enc), cu_seqlens=cu(enc), labels=torch.cat(dec), decoder_cu_seqlens=cu(dec)).logits[
        0
    ]
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_packed_labels_shift_per_document():
    model = tiny()
    enc, dec = _docs()
    cu = torch.tensor([0, 3, 7, 8], dtype=torch.int32)
    loss = model(input_ids=torch.cat(enc), cu_seqlens=torch.tensor([0, 5, 6, 14], dtype=torch.int32),
                 labels=torch.cat(dec), decoder_cu_seqlens=cu).loss  # fmt: skip
    ref = torch.stack([model(input_ids=e[None], labels=d[None]).loss * len(d) for e, d in zip(enc, dec)]).sum() / 8
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_bad_packed_inputs_raise():
    model = tiny()
    ids = torch.randint(2, 61, (1, 6))
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        model(input_ids=ids, cu_seqlens=torch.tensor([0, 4, 3, 6], dtype=torch.int32), labels=ids,
              decoder_cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))  # fmt: skip
    with pytest.raises(ValueError, match="end at the number of tokens"):
        model(input_ids=ids, cu_seqlens=torch.tensor([0, 4], dtype=torch.int32), labels=ids,
              decoder_cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))  # fmt: skip
    with pytest.raises(ValueError, match="packed on both sides"):
        model(input_ids=ids, cu_seqlens=torch.tensor([0, 6], dtype=torch.int32), labels=ids)
    with pytest.raises(ValueError, match="position_ids"):
        model(input_ids=ids, segment_ids=torch.ones_like(ids), labels=ids)


def test_all_ignored_labels_give_zero_loss_not_nan():
    model = tiny()
    ids = torch.randint(2, 61, (2, 5))
    out = model(input_ids=ids, labels=torch.full((2, 4), -100))
    assert out.loss.item() == 0.0


@pytest.mark.parametrize("pe,impl", [("t5", "eager"), ("fire", "flash")])
def test_gradient_checkpointing_matches(pe, impl):
    model = tiny(pe, impl)
    ids, labels = torch.randint(2, 61, (2, 7)), torch.randint(2, 61, (2, 4))
    model.train()
    model(input_ids=ids, labels=labels).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(input_ids=ids, labels=labels).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)


def test_v10_tied_head_rescales():
    cfg = tiny().config.to_dict()
    cfg.update(feed_forward_proj="relu", tie_word_embeddings=True, scale_decoder_outputs=None)
    tied = FlashT5ForConditionalGeneration(FlashT5Config(**cfg)).eval()
    assert tied.model.lm_head is None and tied.config.scale_decoder_outputs
    h = torch.randn(1, 2, 32)
    torch.testing.assert_close(tied.model.logits(h), (h * 32**-0.5) @ tied.model.shared.weight.T)
    assert math.isclose(tied.model.output_scale(), 32**-0.5)


# ------------------------------------------------------------------------------------------------------------
# attn_implementation="flash" (the Triton kernel; under Triton's interpreter on the CPU)
# ------------------------------------------------------------------------------------------------------------


def _flash_pair(pe="t5"):
    eager, flash = tiny(pe, "eager"), tiny(pe, "flash")
    flash.load_state_dict(eager.state_dict())
    return eager, flash


def test_flash_matches_eager_on_padded_batches_with_grads():
    """Padded HF batches are unpadded for the kernel: valid positions and every gradient match eager."""
    eager, flash = _flash_pair()
    torch.manual_seed(0)
    ids = torch.randint(2, 61, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = torch.randint(2, 61, (3, 5))
    dmask = torch.ones_like(labels)
    dmask[2, 3:] = 0
    labels[dmask == 0] = -100
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dmask)
    a, b = eager(**kw), flash(**kw)
    valid = dmask.bool()
    torch.testing.assert_close(b.logits[valid], a.logits[valid], rtol=1e-4, atol=1e-5 * a.logits.abs().max().item())
    a.loss.backward()
    b.loss.backward()
    ref = dict(eager.named_parameters())
    for name, p in flash.named_parameters():
        g = ref[name].grad
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-5 * g.abs().max().item(), msg=name)


def test_flash_packed_varlen_equals_separate_documents_and_generate():
    eager, flash = _flash_pair()
    enc, dec = _docs()
    ref = _separately(eager, enc, dec)
    cu = lambda parts: torch.tensor([0] + [sum(map(len, parts[: i + 1])) for i in range(len(parts))], dtype=torch.int32)
    out = flash(input_ids=torch.cat(enc), cu_seqlens=cu(enc), labels=torch.cat(dec), decoder_cu_seqlens=cu(dec))
    torch.testing.assert_close(out.logits[0], ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    ids = torch.randint(2, 61, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    x = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(flash.generate(**x), eager.generate(**x))  # cached decoding: Lq = 1 against Lk keys


@pytest.mark.parametrize("pe", ["alibi", "rope", "fire"])
def test_flash_matches_eager_other_position_encodings(pe):
    eager, flash = _flash_pair(pe)
    ids, labels = torch.randint(2, 61, (2, 7)), torch.randint(2, 61, (2, 4))
    a, b = eager(input_ids=ids, labels=labels), flash(input_ids=ids, labels=labels)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-5 * a.logits.abs().max().item())


def test_z_loss_is_added_and_reported():
    model = tiny()
    model.config.z_loss = 1e-2
    ids, labels = torch.randint(2, 61, (2, 7)), torch.randint(2, 61, (2, 4))
    labels[1, 2:] = -100
    out = model(input_ids=ids, labels=labels)
    lse = torch.logsumexp(out.logits.float(), -1)[labels != -100]
    ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 61).float(), labels.reshape(-1))
    torch.testing.assert_close(out.z_loss, 1e-2 * lse.pow(2).mean())
    torch.testing.assert_close(out.loss, ce + out.z_loss)
