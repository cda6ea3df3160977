"""The core model on the GPU: the bf16 flash backend against the fp32 reference (error-ratio rule), torch.compile,
no host synchronisation in a training step, and the CUDA-graph step against the eager one."""

from __future__ import annotations

import pytest
import torch

from flasht5 import FlashT5Config, FlashT5ForConditionalGeneration
from flasht5.layout import Batch, Layout
from flasht5.model import T5
from flasht5.train.optim import AdamWScale
from flasht5.train.step import TrainStep

pytestmark = pytest.mark.gpu

FIELDS = dict(
    vocab_size=1024, d_model=512, d_kv=64, d_ff=1024, num_layers=3, num_decoder_layers=3, num_heads=8,
    dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
)  # fmt: skip


def _model(backend: str, **kw) -> T5:
    torch.manual_seed(0)
    return T5(FlashT5Config(**{**FIELDS, **kw}), backend=backend).cuda()


def _padded(B=4, L=300, T=70):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 1024, (B, L), generator=g)
    mask = torch.ones_like(ids)
    mask[1, (2 * L) // 3 :] = 0
    mask[B - 1, L // 20 :] = 0
    labels = torch.randint(2, 1024, (B, T), generator=g)
    dmask = torch.ones_like(labels)
    dmask[B - 1, T // 2 :] = 0
    labels[dmask == 0] = -100
    return Batch(ids, labels, Layout.padded(mask), Layout.padded(dmask)).to("cuda"), dmask.cuda().bool()


def _varlen(enc_lens=(300, 1, 77, 129), dec_lens=(40, 5, 1, 64), seed=1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    ids = torch.randint(2, 1024, (sum(enc_lens),), generator=g)
    labels = torch.randint(2, 1024, (sum(dec_lens),), generator=g)
    return Batch.varlen(ids, labels, cu(enc_lens), max(enc_lens), cu(dec_lens), max(dec_lens)).to("cuda")


def _run(model: T5, b: Batch, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(b.input_ids, labels=b.labels, enc=b.enc, dec=b.dec, return_logits=True)
    out.loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
    return out.logits.float(), out.loss.float(), grads


@pytest.mark.parametrize("pe", ["t5", "alibi"])
def test_flash_bf16_error_ratio_vs_reference(pe):
    """flash (bf16 autocast) is no further from the fp32 reference than the eager path in bf16 is (x2 + atol)."""
    b, valid = _padded()
    ref_logits, ref_loss, ref_grads = _run(_model("eager", position_encoding=pe), b, autocast=False)
    e_logits, e_loss, e_grads = _run(_model("eager", position_encoding=pe), b, autocast=True)
    f_logits, f_loss, f_grads = _run(_model("flash", position_encoding=pe), b, autocast=True)
    err = lambda a: (a[valid] - ref_logits[valid]).abs().max().item()
    assert err(f_logits) <= 2 * err(e_logits) + 1e-2
    assert abs(f_loss.item() - ref_loss.item()) <= 2 * abs(e_loss.item() - ref_loss.item()) + 1e-3
    for name, g in ref_grads.items():
        fe, ee = (f_grads[name] - g).abs().max().item(), (e_grads[name] - g).abs().max().item()
        assert fe <= 2 * ee + 1e-3 * g.abs().max().item() + 1e-6, (name, fe, ee)


def test_flash_packed_varlen_matches_separate_documents_on_gpu():
    model = _model("flash").eval()
    b = _varlen()
    cu, dcu = b.enc.cu_seqlens.tolist(), b.dec.cu_seqlens.tolist()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        packed = model(b.input_ids, labels=b.labels, enc=b.enc, dec=b.dec).logits[0]
        single = torch.cat([
            model(b.input_ids[:, cu[i] : cu[i + 1]], labels=b.labels[:, dcu[i] : dcu[i + 1]]).logits[0]
            for i in range(len(cu) - 1)
        ])  # fmt: skip
    assert (packed.float() - single.float()).abs().max().item() <= 0.05 * single.float().abs().max().item()


def test_compiled_flash_model_equals_eager_mode():
    model = _model("flash").eval()
    b = Batch.dense(torch.randint(2, 1024, (2, 128)), torch.randint(2, 1024, (2, 32))).to("cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(b.input_ids, labels=b.labels).logits.float()
        compiled = torch.compile(model)(b.input_ids, labels=b.labels).logits.float()
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2 * eager.abs().max().item())


def test_generate_flash_matches_eager_on_gpu():
    cfg = dict(FIELDS)
    flash = FlashT5ForConditionalGeneration(FlashT5Config(**cfg, attn_implementation="flash")).cuda().eval()
    eager = FlashT5ForConditionalGeneration(FlashT5Config(**cfg, attn_implementation="eager")).cuda().eval()
    eager.load_state_dict(flash.state_dict())
    b, _ = _padded(B=3, L=64, T=8)
    mask = b.enc.mask.long()
    x = dict(input_ids=b.input_ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    # fp32 weights: the two backends agree to rounding, so greedy tokens match.
    assert torch.equal(flash.generate(**x), eager.generate(**x))


@pytest.mark.parametrize("tied", [False, True])
def test_fused_lm_loss_and_kernels_match_reference_in_training(tied):
    """Training with flash uses the RMSNorm / gated-act / linear+CE kernels; loss, z-loss and grads match eager."""
    kw = dict(z_loss=1e-4, tie_word_embeddings=tied, feed_forward_proj="relu" if tied else "gated-gelu")
    b, _ = _padded(B=2, L=200, T=50)
    ref, eager, flash = _model("eager", **kw).train(), _model("eager", **kw).train(), _model("flash", **kw).train()
    _, r_loss, r_grads = _run(ref, b, autocast=False)
    _, e_loss, e_grads = _run(eager, b, autocast=True)
    flash.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = flash(b.input_ids, labels=b.labels, enc=b.enc, dec=b.dec)
    assert out.logits is None and out.z_loss is not None  # the fused head never builds the logits
    out.loss.backward()
    assert abs(out.loss.item() - r_loss.item()) <= 2 * abs(e_loss.item() - r_loss.item()) + 2e-3
    for name, p in flash.named_parameters():
        g, fe = r_grads[name], (p.grad.float() - r_grads[name]).abs().max().item()
        ee = (e_grads[name] - g).abs().max().item()
        assert fe <= 2 * ee + 2e-3 * g.abs().max().item() + 1e-6, (name, fe, ee)


@pytest.mark.parametrize("optimizer", ["adamwscale", "adamw"])
def test_training_step_never_syncs_the_host(optimizer):
    """Forward + backward + clipping + optimizer step of a packed varlen batch under sync_debug_mode("error")."""
    model = _model("flash", z_loss=1e-4).train()
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=True)
    else:
        opt = AdamWScale(model.parameters(), lr=1e-3)
    step = TrainStep(model, opt, grad_clip=1.0, cuda_graph=False)
    b = _varlen()
    step(b)  # first call: kernel compilation and lookup tables (may sync once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            out = step(b)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(out.loss).item() and torch.isfinite(out.grad_norm).item()


def test_graph_captured_step_gives_the_eager_losses():
    """The same model, optimizer and batches: replayed from a CUDA graph == eager, step after step."""
    batches = [_varlen(seed=s % 2) for s in range(8)]  # two batches in turn: the loss on each one must fall
    losses = {}
    for graph in (False, True):
        model = _model("flash").train()
        step = TrainStep(model, AdamWScale(model.parameters(), lr=1e-3), grad_clip=1.0, cuda_graph=graph, warmup=2)
        out = []
        for i, b in enumerate(batches):
            step.set_lr(1e-3 * (i + 1) / len(batches))
            out.append(step(b).loss)
        assert step.graphed == graph
        losses[graph] = torch.stack(out).float().cpu()
    assert losses[True][-2] < losses[True][0] - 0.05  # it trains (step 6 sees step 0's batch again)
    # bf16 and the bias-gradient atomics: not bitwise, but the same trajectory
    torch.testing.assert_close(losses[True], losses[False], rtol=2e-3, atol=2e-3)


def test_padded_encoder_is_graph_capturable_and_compilable():
    """Padded rows under CUDA-graph capture, torch.compile and in inference take the sync-free static view: the
    captured encoder replayed on new ids and masks, the compiled one and the eager one without autograd (never
    syncing) give the unpadded view's outputs (autograd on); padding is 0."""
    from flasht5 import FlashT5EncoderModel

    torch.manual_seed(0)
    fields = {k: v for k, v in FIELDS.items() if k != "num_decoder_layers"}
    model = FlashT5EncoderModel(FlashT5Config(**fields)).cuda().eval()
    B, L = 4, 200
    ids = torch.zeros(B, L, dtype=torch.long, device="cuda")
    mask = torch.zeros(B, L, dtype=torch.long, device="cuda")

    def batch(seed: int):
        g = torch.Generator(device="cuda").manual_seed(seed)
        lengths = torch.randint(1, L + 1, (B,), device="cuda", generator=g)
        m = (torch.arange(L, device="cuda")[None] < lengths[:, None]).long()
        m[0] = torch.roll(m[0], 7)  # a row that is not right-padded
        return torch.randint(2, 1024, (B, L), device="cuda", generator=g), m

    with torch.no_grad():
        first_ids, first_mask = batch(0)
        ids.copy_(first_ids)
        mask.copy_(first_mask)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                model(input_ids=ids, attention_mask=mask)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        compiled = torch.compile(model)
        for seed in (1, 2):
            new_ids, new_mask = batch(seed)
            ids.copy_(new_ids)
            mask.copy_(new_mask)
            graph.replay()
            with torch.enable_grad():  # autograd on: the unpadded view (one sync), the reference
                ref = model(input_ids=new_ids, attention_mask=new_mask).last_hidden_state.detach()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")  # inference: the static view, no host sync
            try:
                eager = model(input_ids=new_ids, attention_mask=new_mask).last_hidden_state
            finally:
                torch.cuda.set_sync_debug_mode("default")
            tol = dict(rtol=1e-4, atol=1e-4 * ref.abs().max().item())
            torch.testing.assert_close(out, ref, **tol)
            torch.testing.assert_close(eager, ref, **tol)
            assert torch.all(out[new_mask == 0] == 0)
            comp = compiled(input_ids=new_ids, attention_mask=new_mask).last_hidden_state
            torch.testing.assert_close(comp, ref, **tol)
