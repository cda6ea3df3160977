"""generate's fast loop (static cache, deferred stop check) against transformers' generate on CPU fp32, every family."""

from __future__ import annotations

import pytest
import torch
import transformers
from hf_utils import FAMILIES, padded_batch, save_hf, tiny_hf

import flasht5.generation as G
from flasht5 import FlashT5ForConditionalGeneration


@pytest.fixture
def counted(monkeypatch):
    """Counts the static caches the fast loop builds (0: transformers' own loop ran)."""
    made = []

    class Counting(G.StaticCache):
        def __init__(self, *a, **k):
            made.append(1)
            super().__init__(*a, **k)

    monkeypatch.setattr(G, "StaticCache", Counting)
    return made


def _pair(family, tmp_path, **kw):
    hf = tiny_hf(family, **kw)
    ours = FlashT5ForConditionalGeneration.from_pretrained(save_hf(hf, tmp_path / "hf"), attn_implementation="sdpa")
    return hf, ours


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("interval", [1, 16])
def test_greedy_fast_loop_is_token_exact(family, interval, tmp_path, counted):
    hf, ours = _pair(family, tmp_path)
    b = padded_batch()
    x = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], do_sample=False)
    # transformers' own cache fails when the decoder is deeper than the encoder (UL2 here): compare without it
    deeper = hf.config.num_decoder_layers > hf.config.num_layers
    for kw in (dict(max_new_tokens=7), dict(max_new_tokens=9, min_new_tokens=4), dict(max_new_tokens=30)):
        got = ours.generate(**x, **kw, stop_check_interval=interval)
        assert torch.equal(got, hf.generate(**x, **kw, use_cache=not deeper)), kw
    assert len(counted) == 3  # the fast loop ran every time


def test_early_stop_is_cut_where_transformers_stops(tmp_path, counted):
    """Every row ends with an EOS early: the loop runs on to its next stop check, the output is cut exactly."""
    hf, ours = _pair("t5-v1.1", tmp_path)
    b = padded_batch()
    x = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], do_sample=False, max_new_tokens=40)
    free = hf.generate(**x)
    eos = sorted(set(free[:, 3].tolist()))  # every row stops by its third new token
    want = hf.generate(**x, eos_token_id=eos)
    got = ours.generate(**x, eos_token_id=eos, stop_check_interval=32)
    assert torch.equal(got, want) and got.shape[1] <= 4 and len(counted) == 1


def test_sampling_is_seeded_and_matches_transformers(tmp_path, counted):
    hf, ours = _pair("t5-v1.1", tmp_path)
    b = padded_batch()
    x = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], do_sample=True, max_new_tokens=8)
    for kw in (dict(top_k=20), dict(top_p=0.9, temperature=0.7), dict(num_return_sequences=2)):
        torch.manual_seed(0)
        got = ours.generate(**x, **kw)
        torch.manual_seed(0)
        assert torch.equal(got, ours.generate(**x, **kw))  # reproducible
        torch.manual_seed(0)
        assert torch.equal(got, hf.generate(**x, **kw)), kw  # and transformers' own draws
    assert len(counted) == 6


def test_what_the_fast_loop_does_not_take_runs_transformers_loop(tmp_path, counted):
    hf, ours = _pair("t5-v1.1", tmp_path)
    b = padded_batch()
    x = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=6)
    out = ours.generate(**x, return_dict_in_generate=True, output_scores=True)
    assert isinstance(out, transformers.generation.utils.GenerateEncoderDecoderOutput) and len(out.scores) == 6
    kw = dict(num_beams=2, return_dict_in_generate=True, output_scores=True)
    out, want = ours.generate(**x, **kw), hf.generate(**x, **kw)
    assert isinstance(out, transformers.generation.utils.GenerateBeamEncoderDecoderOutput)
    assert torch.equal(out.sequences, want.sequences)
    d = dict(decoder_input_ids=torch.tensor([[0, 5, 7]] * 3), decoder_attention_mask=torch.tensor([[1, 1, 1]] * 3))
    d["decoder_attention_mask"][1, 1] = 0
    assert torch.equal(ours.generate(**x, **d), hf.generate(**x, **d))
    assert not counted
    with pytest.raises(ValueError, match="stop_check_interval"):
        ours.generate(**x, stop_check_interval=0)


def test_flash_backend_decodes_with_the_decode_kernel(tmp_path, counted, monkeypatch):
    """The flash backend's fast loop: cross- and self-attention of each step take flash_decode (over the static
    cache and the encoder rows' lengths); greedy tokens equal transformers' (Triton's interpreter on the CPU)."""
    import flasht5.ops.decode as D

    calls = []
    real = D.flash_decode
    monkeypatch.setattr(D, "flash_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    hf = tiny_hf("t5-v1.1", d_kv=16)  # the kernels' smallest head dim
    folder = save_hf(hf, tmp_path / "hf")
    ours = FlashT5ForConditionalGeneration.from_pretrained(folder, attn_implementation="flash")
    b = padded_batch()
    x = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], do_sample=False, max_new_tokens=5)
    assert torch.equal(ours.generate(**x), hf.generate(**x))
    assert len(counted) == 1 and len(calls) == 5 * 2 * hf.config.num_decoder_layers  # self + cross, every layer
    kw = dict(num_beams=3, num_return_sequences=2)  # the cache reordered under the kernel
    assert torch.equal(ours.generate(**x, **kw), hf.generate(**x, **kw))
    assert len(counted) == 2


BEAM_CASES = [
    dict(num_beams=2, max_new_tokens=7),
    dict(num_beams=4, max_new_tokens=9, min_new_tokens=3, num_return_sequences=3, length_penalty=0.5),
    dict(num_beams=3, max_new_tokens=12, early_stopping=True, length_penalty=-1.0),
    dict(num_beams=8, max_new_tokens=6, early_stopping="never", num_return_sequences=8),
]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_beam_search_fast_loop_is_token_exact(family, tmp_path, counted):
    hf, ours = _pair(family, tmp_path)
    b = padded_batch()
    x = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], do_sample=False)
    deeper = hf.config.num_decoder_layers > hf.config.num_layers
    for kw in BEAM_CASES:
        got = ours.generate(**x, **kw, stop_check_interval=3)
        assert torch.equal(got, hf.generate(**x, **kw, use_cache=not deeper)), kw
    assert len(counted) == len(BEAM_CASES)


def test_beam_search_stops_early_with_eos_exactly(tmp_path, counted):
    """Beams that end early (several EOS ids, a pad id): the device-side stop freezes the result at the step where
    transformers stops, whatever the stop check interval."""
    hf, ours = _pair("t5-v1.1", tmp_path)
    b = padded_batch()
    x = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], do_sample=False, max_new_tokens=30)
    free = hf.generate(**x, num_beams=4)
    eos = sorted(set(free[:, 2].tolist()) | set(free[:, 4].tolist()))[:3]
    lengths = []
    for kw in (dict(num_beams=4), dict(num_beams=4, early_stopping=True, num_return_sequences=2),
               dict(num_beams=2, early_stopping="never", length_penalty=2.0)):  # fmt: skip
        want = hf.generate(**x, **kw, eos_token_id=eos, pad_token_id=1)
        lengths.append(want.shape[1])
        for interval in (1, 5, 64):
            got = ours.generate(**x, **kw, eos_token_id=eos, pad_token_id=1, stop_check_interval=interval)
            assert torch.equal(got, want), (kw, interval)
    assert min(lengths) < 20 and len(counted) == 9, lengths  # stopped early, before the interval of 64


def test_beam_sampling_is_seeded_and_matches_transformers(tmp_path, counted):
    hf, ours = _pair("t5-v1.1", tmp_path)
    b = padded_batch()
    x = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], do_sample=True, num_beams=3,
             max_new_tokens=8, top_k=30, num_return_sequences=2)  # fmt: skip
    torch.manual_seed(0)
    got = ours.generate(**x)
    torch.manual_seed(0)
    assert torch.equal(got, hf.generate(**x))
    assert len(counted) == 1


@pytest.mark.parametrize("backend", ["sdpa", "flash"])
def test_requests_of_different_lengths_in_one_batch_equal_each_alone(backend, tmp_path, counted):
    """Inputs of lengths 11, 3, 7 and 1 in one right-padded batch: every row's output is the one it gets alone
    (then padded). On the flash backend the encoder runs padding-free (one varlen sequence of 22 tokens) and the
    decoder's cross-attention reads each row's own encoder length."""
    hf = tiny_hf("t5-v1.1", d_kv=16)
    ours = FlashT5ForConditionalGeneration.from_pretrained(save_hf(hf, tmp_path / "hf"), attn_implementation=backend)
    seen = []
    attend = ours.model.kernels.attend
    ours.model.kernels = ours.model.kernels._replace(
        attend=lambda q, k, v, bias, ql, kl, **kw: seen.append((ql.kind, ql.length, kl.kind)) or attend(
            q, k, v, bias, ql, kl, **kw)
    )  # fmt: skip
    lengths = [11, 3, 7, 1]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 97, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask
    cases = [dict(max_new_tokens=6)] + ([dict(max_new_tokens=6, num_beams=3)] if backend == "sdpa" else [])
    for kw in cases:
        seen.clear()
        got = ours.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)
        if backend == "flash":
            assert ("varlen", sum(lengths), "varlen") in seen  # the encoder: padding-free
        for i, n in enumerate(lengths):
            alone = ours.generate(input_ids=ids[i : i + 1, :n], do_sample=False, **kw)[0]
            assert torch.equal(got[i, : alone.numel()], alone), (kw, i)
            assert (got[i, alone.numel() :] == hf.config.pad_token_id).all()
    assert len(counted) == len(cases) * (1 + len(lengths))


@pytest.mark.parametrize("backend", ["sdpa", "flash"])
def test_decode_session_is_reused_across_requests(backend, tmp_path, monkeypatch):
    """The graph path keeps its static cache, encoder buffers (lengths rounded up to 64) and graph between requests of
    one bucket (here on the CPU without the graph): requests of other inputs, masks and lengths in that bucket reuse
    it and still match transformers; another batch size, a dtype change or another backend builds a new one."""
    monkeypatch.setattr(G, "_SESSION_WITHOUT_GRAPH", True)
    hf = tiny_hf("t5-v1.1", d_kv=16)
    ours = FlashT5ForConditionalGeneration.from_pretrained(save_hf(hf, tmp_path / "hf"), attn_implementation=backend)
    b = padded_batch()
    x = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], do_sample=False, max_new_tokens=5)
    assert torch.equal(ours.generate(**x), hf.generate(**x))
    first = G._SESSIONS[ours]
    cross = first.step.cache.cross[0][0]
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, 97, (3, 9), generator=g)
    mask = (torch.arange(9) < torch.tensor([[9], [2], [5]])).long()
    cases = [dict(input_ids=ids), dict(input_ids=ids, attention_mask=mask), dict(input_ids=ids, max_new_tokens=9)]
    for kw in cases if backend == "sdpa" else cases[1:2]:  # the interpreter is slow
        kw = {**dict(do_sample=False, max_new_tokens=5), **kw}
        assert torch.equal(ours.generate(**kw), hf.generate(**kw)), kw
        assert G._SESSIONS[ours] is first and first.step.cache.cross[0][0] is cross  # the same buffers
    if backend == "sdpa":
        kw = dict(input_ids=ids, do_sample=False, max_new_tokens=5, num_beams=2)
        assert torch.equal(ours.generate(**kw), hf.generate(**kw))
        assert G._SESSIONS[ours] is not first  # 6 rows: another bucket
        ours.to(torch.float64)
        kw = dict(input_ids=ids, do_sample=False, max_new_tokens=4)
        assert torch.equal(ours.generate(**kw), hf.double().generate(**kw))
        assert G._SESSIONS[ours].key[3] == torch.float64
        G.release_decode_cache(ours)
        with torch.inference_mode():  # buffers made for an inference-mode request are not reused outside it
            assert torch.equal(ours.generate(**kw), hf.double().generate(**kw))
        assert torch.equal(ours.generate(**kw), hf.double().generate(**kw))
    G.release_decode_cache(ours)
    assert ours not in G._SESSIONS


def test_decoder_prompt_enters_the_static_cache(tmp_path, counted):
    """decoder_input_ids of several tokens: they enter the cache one by one, for greedy, beams and sampling."""
    hf, ours = _pair("t5-v1.1", tmp_path)
    b = padded_batch()
    x = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=6,
             decoder_input_ids=torch.tensor([[0, 5, 7]] * 3))  # fmt: skip
    for kw in (dict(), dict(num_beams=2, num_return_sequences=2), dict(do_sample=True, top_k=5)):
        torch.manual_seed(0)
        got = ours.generate(**x, **kw)
        torch.manual_seed(0)
        assert torch.equal(got, hf.generate(**x, **kw)), kw
    assert len(counted) == 3


def test_decode_step_fuses_the_self_attention_projections_and_follows_weight_updates(tmp_path, monkeypatch):
    """The session's decode step computes q, k, v with one matmul over a fused copy of the weights: the tokens are
    transformers'; the copy is refreshed per request (an in-place weight update is seen by the next request, in the
    same session); a hook added later is called (a new session, unfused); FUSE_QKV=False gives the same tokens
    without it; a layer that is not a plain nn.Linear (PEFT, quantised) is never fused."""
    monkeypatch.setattr(G, "_SESSION_WITHOUT_GRAPH", True)
    hf = tiny_hf("t5-v1.1", d_kv=16)
    ours = FlashT5ForConditionalGeneration.from_pretrained(save_hf(hf, tmp_path / "hf"), attn_implementation="sdpa")
    b = padded_batch()
    x = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], do_sample=False, max_new_tokens=6)
    fused = ours.generate(**x)
    assert torch.equal(fused, hf.generate(**x))
    session = G._SESSIONS[ours]
    attn = ours.model.decoder.layers[0].attn
    assert session.step.cache.qkv is not None
    assert torch.equal(session.step.cache.qkv[0], torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]))
    with torch.no_grad():
        for w in (attn.v.weight, hf.decoder.block[0].layer[0].SelfAttention.v.weight):
            w.mul_(-3.0)  # a visible in-place change, as an optimizer step would make
    again = ours.generate(**x)
    assert G._SESSIONS[ours] is session and torch.equal(again, hf.generate(**x))
    calls = []
    hook = attn.k.register_forward_hook(lambda *a: calls.append(1))  # added after the session was built
    assert torch.equal(ours.generate(**x), again) and calls and G._SESSIONS[ours].step.cache.qkv is None
    hook.remove()
    monkeypatch.setattr(G, "FUSE_QKV", False)
    G.release_decode_cache(ours)
    assert torch.equal(ours.generate(**x), again) and G._SESSIONS[ours].step.cache.qkv is None

    class Wrapped(torch.nn.Linear):  # stands for a PEFT / quantised layer: its forward is not its weight alone
        pass

    attn.k.__class__ = Wrapped
    assert G._fusable_qkv(ours.model) is None
