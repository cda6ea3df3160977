"""Key/value caches for decoding and the Hugging Face ``generate`` integration, with a fast path of its own.

The decoder talks to a cache through :class:`flasht5.model.KVCache` ((B, L, H, D) tensors).

Greedy search, sampling, beam search and beam sampling take flasht5's own decoding loop, :func:`fast_generate`,
which ``generate`` hands its prepared inputs to (transformers' ``custom_generate`` hook: its argument handling,
encoder pass, input expansion for beams and ``num_return_sequences``, logits processors and stopping criteria are
transformers' own, and beam search calls transformers' beam helpers step for step, so the tokens are too). The loop
decodes into a :class:`StaticCache` preallocated for the whole request (each step writes one position in place;
cross-attention keys/values computed once; beam search reorders it on the device), replays the decoder step from a
CUDA graph on the flash backend (kept per model between requests of one shape bucket, :class:`_Session`), and reads
the device only every ``stop_check_interval`` tokens (default 16, a ``generate`` argument) to see whether the
request has finished; the output is then cut (or, for beams, frozen on the device) where transformers' loop would
have stopped. Everything else (streamers, scores or hidden states returned, assisted decoding) runs transformers'
own loop over an ``EncoderDecoderCache`` ((B, H, L, D), reordered for beam search) that :class:`HFCacheAdapter`
presents to the model, saying once why. That cache is created without a layer count so a decoder deeper than its
encoder (ByT5) works — transformers' own T5 sizes the cache from the encoder depth and fails there. docs/generation.md
describes the whole path.
"""

from __future__ import annotations

import functools
import logging
import weakref
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.generation.utils import GENERATION_MODES_MAPPING

from flasht5.layout import Layout
from flasht5.model import Encoded, View, fusable_linears

log = logging.getLogger("flasht5")


def new_hf_cache() -> EncoderDecoderCache:
    """An empty cache that grows one layer at a time, whatever the decoder's depth."""
    return EncoderDecoderCache(DynamicCache(), DynamicCache())


class HFCacheAdapter:
    """:class:`flasht5.model.KVCache` over a transformers ``EncoderDecoderCache``."""

    def __init__(self, cache: EncoderDecoderCache):
        if not isinstance(cache, EncoderDecoderCache):
            raise ValueError(
                f"past_key_values must be a transformers EncoderDecoderCache, got {type(cache).__name__}; "
                "tuples of tensors are no longer supported by transformers."
            )
        self.cache = cache

    def past_length(self) -> int:
        return self.cache.self_attention_cache.get_seq_length()

    def key_layout(self) -> Layout | None:
        return None  # the cached keys are every real key (the decoder mask, if any, says otherwise)

    def update_self(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self.cache.self_attention_cache.update(k.transpose(1, 2), v.transpose(1, 2), layer_idx)
        return k.transpose(1, 2), v.transpose(1, 2)

    def get_cross(self, layer_idx: int) -> tuple[Tensor, Tensor] | None:
        if not self.cache.is_updated.get(layer_idx, False):
            return None
        layer = self.cache.cross_attention_cache.layers[layer_idx]
        return layer.keys.transpose(1, 2), layer.values.transpose(1, 2)

    def set_cross(self, layer_idx: int, k: Tensor, v: Tensor) -> None:
        self.cache.cross_attention_cache.update(k.transpose(1, 2), v.transpose(1, 2), layer_idx)
        self.cache.is_updated[layer_idx] = True

    def qkv_weight(self, layer_idx: int) -> Tensor | None:
        return None


class StaticCache:
    """:class:`flasht5.model.KVCache` preallocated for a whole request: (layers, B, capacity, H, D) keys and values.

    :meth:`advance_to` sets the position of the next token (a host integer, and device tensors that the step reads:
    the write position and every row's number of valid keys), so a decode step has the same shapes from the first
    token to the last and a CUDA graph of it stays valid. Cross-attention keys/values are set once per request
    (:meth:`begin` starts another request in the same buffers).
    """

    def __init__(
        self, num_layers: int, batch: int, capacity: int, heads: int, head_dim: int, *, dtype: torch.dtype,
        device: torch.device,
    ):  # fmt: skip
        self.keys = torch.zeros(num_layers, batch, capacity, heads, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.cross: list[tuple[Tensor, Tensor] | None] = [None] * num_layers
        self.cross_ready = [False] * num_layers
        self.capacity, self.step = capacity, 0
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        self.qkv: list[Tensor] | None = None  # per layer, the fused self-attention weight (_Session.refresh_qkv)

    def advance_to(self, step: int) -> None:
        if not 0 <= step < self.capacity:
            raise ValueError(f"position {step} is outside the cache's {self.capacity} slots")
        self.step = step
        self.pos.fill_(step)
        self.lengths.fill_(step + 1)

    def past_length(self) -> int:
        return self.step

    def key_layout(self) -> Layout:
        # A new object every step: its derived mask must be recomputed from the (changing) lengths.
        return Layout.right_padded(self.lengths, self.capacity)

    def update_self(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.keys[layer_idx].index_copy_(1, self.pos, k)
        self.values[layer_idx].index_copy_(1, self.pos, v)
        return self.keys[layer_idx], self.values[layer_idx]

    def begin(self) -> None:
        """A new request in a reused cache: its cross-attention keys/values are computed again (into the same
        buffers, see :meth:`set_cross`) by the first step."""
        self.cross_ready = [False] * len(self.cross)

    def get_cross(self, layer_idx: int) -> tuple[Tensor, Tensor] | None:
        return self.cross[layer_idx] if self.cross_ready[layer_idx] else None

    def qkv_weight(self, layer_idx: int) -> Tensor | None:
        return None if self.qkv is None else self.qkv[layer_idx]

    def set_cross(self, layer_idx: int, k: Tensor, v: Tensor) -> None:
        old = self.cross[layer_idx]
        if old is not None and old[0].shape == k.shape and old[0].dtype == k.dtype:
            old[0].copy_(k)  # in place: a captured graph reads these buffers
            old[1].copy_(v)
        else:
            self.cross[layer_idx] = (k, v)
        self.cross_ready[layer_idx] = True

    def reorder(self, rows: Tensor, length: int) -> None:
        """Beam search: row i's first ``length`` self-attention keys/values become those of row ``rows[i]`` (a device
        index, no host read), in place so a captured graph keeps reading the same buffers. Cross-attention entries
        are left alone: beams of one request share the encoder output, and a beam only ever descends from a beam of
        its own request."""
        for buf in (self.keys, self.values):
            live = buf[:, :, :length]  # (layers, B, length, H, D)
            live.copy_(live.index_select(1, rows))


class DecodeStep:
    """next-token logits (B, vocab) fp32 of the decoder for the tokens at ``position``, over a :class:`StaticCache`;
    replayed from a CUDA graph (captured at its third call, once the cross-attention keys are cached and the kernels
    compiled) where the backend allows it. A step whose cross-attention keys are not computed yet (a request's
    first) runs eagerly: it fills the cross-attention buffers that the graph reads."""

    def __init__(self, core: Any, encoded: Any, cache: StaticCache, *, graph: bool):
        self.core, self.encoded, self.cache = core, encoded, cache
        self.use_graph, self.calls = graph, 0
        self._graph: torch.cuda.CUDAGraph | None = None

    def _run(self, tokens: Tensor) -> Tensor:
        hidden, _ = self.core.decode(tokens, self.encoded, cache=self.cache)
        return self.core.logits(hidden)[:, -1].float()

    def __call__(self, tokens: Tensor, position: int) -> Tensor:
        self.cache.advance_to(position)
        self.calls += 1
        if not all(self.cache.cross_ready):
            return self._run(tokens)
        if self._graph is not None:
            self._tokens.copy_(tokens)
            self._graph.replay()
            return self._logits.clone()
        if not self.use_graph or self.calls < 3:
            return self._run(tokens)
        self._tokens = tokens.clone()
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph, capture_error_mode="thread_local"):  # as TrainStep: other threads may pin
            self._logits = self._run(self._tokens)
        self._graph.replay()
        return self._logits.clone()


class _Session:
    """A graph-replayed decode step kept on the model between ``generate`` calls of one shape bucket: its static
    cache, the encoder-output and encoder-length buffers it reads, and the captured graph (capturing costs two eager
    steps and the capture itself, a large part of a short request at batch 1)."""

    def __init__(
        self, key: tuple, core: Any, batch: int, capacity: int, enc_len: int, hidden: Tensor, graph: bool,
        qkv: list[tuple[Tensor, Tensor, Tensor]] | None,
    ):  # fmt: skip
        self.key = key
        self.hidden = hidden.new_zeros(batch, enc_len, hidden.shape[-1])
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=hidden.device)
        self.flat, self.enc_len = core.kernels.flat, enc_len
        cache = StaticCache(
            len(core.decoder.layers), batch, capacity, core.cfg.num_heads, core.cfg.d_kv,
            dtype=_kv_dtype(core, hidden), device=hidden.device,
        )  # fmt: skip
        self.step = DecodeStep(core, self.encoded(), cache, graph=graph)
        self.qkv_sources = qkv  # the decoder self-attentions' weights to fuse (_fusable_qkv), or None
        if self.qkv_sources is not None:
            with torch.no_grad():
                cache.qkv = [torch.cat(ws) for ws in self.qkv_sources]

    def refresh_qkv(self) -> None:
        """Copy the self-attention weights into the fused buffers the graph reads (every request: the model may have
        been trained in place since the last one; a copy of 3 x d_model x inner per layer, microseconds)."""
        if self.qkv_sources is not None:
            with torch.no_grad():
                for buf, ws in zip(self.step.cache.qkv, self.qkv_sources):
                    torch.cat(ws, out=buf)

    def encoded(self) -> Encoded:
        """The encoder buffers as the decoder reads them; a new layout per request (a layout caches what it derives
        from the lengths, e.g. the reference paths' key mask; the decode kernel reads the lengths tensor itself)."""
        layout = Layout.right_padded(self.lengths, self.enc_len)
        return Encoded(self.hidden, View(layout, layout, None, self.flat))


def _fusable_qkv(core: Any) -> list[tuple[Tensor, Tensor, Tensor]] | None:
    """The decoder self-attentions' (q, k, v) weights, or None unless every one is a plain layer of one dtype
    (:func:`flasht5.model.fusable_linears`: a PEFT or quantised layer or a hook is never fused)."""
    found = []
    for block in core.decoder.layers:
        mods = (block.attn.q, block.attn.k, block.attn.v)
        if not fusable_linears(*mods):
            return None
        ws = tuple(m.weight for m in mods)
        if len({(w.dtype, w.device) for w in ws}) != 1:
            return None
        found.append(ws)
    return found


def _kv_dtype(core: Any, hidden: Tensor) -> torch.dtype:
    """The dtype of the decoder's keys/values: its projections' output (the autocast dtype under autocast)."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    w = core.decoder.layers[0].attn.k.weight.dtype
    return w if w.is_floating_point else hidden.dtype


def _processors(logits_processor: Any) -> Any:
    """``logits_processor`` as a callable of (input_ids, scores). transformers' list inspects every processor's
    signature at every step (a tenth of a millisecond per token in Python at batch 1); for a plain list of
    two-argument processors (what ``generate`` builds) the same calls run in the same order without that. Anything
    else is called as given."""
    import inspect

    if type(logits_processor).__name__ != "LogitsProcessorList" or not isinstance(logits_processor, list):
        return logits_processor
    procs = list(logits_processor)
    if any(len(inspect.signature(p.__call__).parameters) > 2 for p in procs):
        return logits_processor

    def run(input_ids: Tensor, scores: Tensor) -> Tensor:
        for p in procs:
            scores = p(input_ids, scores)
        return scores

    return run


def _bucket(n: int, size: int) -> int:
    return -(-n // size) * size


_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its _Session (not on the model:
# a deepcopy or pickle of the model must not meet a CUDA graph)
_SESSION_WITHOUT_GRAPH = False  # tests: take the session path on the CPU (no graph)
# The decode step computes each decoder layer's self-attention q, k, v with one matmul over a fused copy of the three
# weights (refreshed per request): on the H200, T5-base, one layer's three projections of a decode step take 9.8-11.8
# us in a CUDA graph and the fused one 3.3-3.7 us, ~0.1 ms per token over 12 layers (~8 % of a batch-1 step;
# benchmarks/bench_fused_qkv.py, benchmarks/results/2026-12-02-h200-b/ and -c/). The copy costs the memory of the
# decoder's self-attention q, k, v weights (~8 % of a T5's parameters); False turns it off.
FUSE_QKV = True


def release_decode_cache(model: Any | None = None) -> None:
    """Free the static cache, encoder buffers and CUDA graph that ``generate`` keeps for ``model`` between requests
    (every model's when None). The next request builds them again."""
    if model is None:
        _SESSIONS.clear()
    else:
        _SESSIONS.pop(model, None)


def _graph_step(model: Any, hidden: Tensor, lengths: Tensor, max_length: int, graph: bool) -> DecodeStep:
    """The model's cached :class:`_Session` for this request's bucket (batch, cache capacity rounded up to 64,
    encoder length rounded up to 64, dtype, device, backend, parameter storage), rebuilt when any of them changed
    (a ``.to(dtype)`` or a new backend never replays a stale graph); the request's encoder output is copied in."""
    core = model.model
    B, L = hidden.shape[:2]
    capacity, enc_len = _bucket(max_length, 64), _bucket(L, 64)
    params = tuple(p.data_ptr() for p in core.parameters())
    # Buffers made under inference_mode cannot be written outside it (and the other way round): part of the key.
    # Whether the projections fuse is part of it too: a hook or adapter added since the last request must be called.
    qkv = _fusable_qkv(core) if FUSE_QKV else None
    key = (B, capacity, enc_len, hidden.dtype, _kv_dtype(core, hidden), hidden.device, core.kernels, params, graph,
           torch.is_inference_mode_enabled(), qkv is not None)  # fmt: skip
    session = _SESSIONS.get(model)
    if session is None or session.key != key:
        _SESSIONS.pop(model, None)  # free the old graph and cache before allocating the new ones
        session = _SESSIONS[model] = _Session(key, core, B, capacity, enc_len, hidden, graph, qkv)
    session.hidden[:, :L].copy_(hidden)
    session.hidden[:, L:].zero_()
    session.lengths.copy_(lengths)
    session.step.encoded = session.encoded()
    session.step.cache.begin()
    session.refresh_qkv()
    return session.step


@functools.cache
def _say_once(message: str) -> None:
    log.warning("flasht5 generate: %s", message)


FAST_MODES = ("greedy_search", "sample", "beam_search", "beam_sample")


def _fallback_reason(model: Any, generation_config: Any, model_kwargs: dict[str, Any]) -> str | None:
    """Why a request cannot take the fast loop (None when it can)."""
    mode = generation_config.get_generation_mode()
    if mode not in FAST_MODES:
        return f"{mode.value} runs transformers' loop"
    if generation_config.return_dict_in_generate:
        return "return_dict_in_generate (scores, hidden states) runs transformers' loop"
    if getattr(generation_config, "low_memory", False):
        return "low_memory runs transformers' loop"
    if model_kwargs.get("encoder_outputs") is None:
        return "no encoder output prepared"
    if model_kwargs.get("decoder_attention_mask") is not None:
        return "decoder_attention_mask (a masked decoder prompt) runs transformers' loop"
    if model.model.decoder is None:
        return "the model has no decoder"
    return None


def _encoder_layout(hidden: Tensor, mask: Tensor | None) -> tuple[Layout, bool]:
    """The encoder output's layout, as per-row lengths when the mask is right padding (the usual T5 tokenizer
    output; also without a mask: every row full) so the decode kernel reads the lengths, and whether it is right
    padding (one host read)."""
    B, L = hidden.shape[:2]
    if mask is None:
        return Layout.right_padded(torch.full((B,), L, dtype=torch.int32, device=hidden.device), L), True
    mask = mask != 0
    lengths = mask.sum(1, dtype=torch.int32)
    if bool((mask == (torch.arange(mask.shape[1], device=mask.device) < lengths[:, None])).all()):
        return Layout.right_padded(lengths, mask.shape[1]), True
    return Layout.padded(mask), False


def _prepare(model: Any, input_ids: Tensor, generation_config: Any, model_kwargs: dict[str, Any]) -> DecodeStep:
    """The static cache and the decode step for a request whose encoder output ``generate`` prepared (already
    expanded to one row per beam / returned sequence); a given decoder prompt enters the cache here."""
    core = model.model
    hidden = model_kwargs["encoder_outputs"][0]
    enc_layout, right = _encoder_layout(hidden, model_kwargs.get("attention_mask"))
    B, start = input_ids.shape
    # The graph needs the decode kernel (a padding-free gather would sync) and positions that it does not read.
    graph = (
        right and hidden.is_cuda and core.kernels.decode is not None and core.cfg.position_encoding in ("t5", "alibi")
    )
    if graph or (_SESSION_WITHOUT_GRAPH and right):
        step = _graph_step(model, hidden, enc_layout.lengths, generation_config.max_length, graph)
    else:
        # Cross-attention with a cache reads the encoder rows as they are (T5.decode): no gather into a
        # padding-free view and back (core.encoded_from would do that, with a host read of the mask).
        encoded = Encoded(hidden, View(enc_layout, enc_layout, None, core.kernels.flat))
        cache = StaticCache(
            len(core.decoder.layers), B, generation_config.max_length, core.cfg.num_heads, core.cfg.d_kv,
            dtype=_kv_dtype(core, hidden), device=hidden.device,
        )  # fmt: skip
        step = DecodeStep(core, encoded, cache, graph=False)
    for p in range(start - 1):  # a given decoder prompt: its tokens enter the cache one by one
        step(input_ids[:, p : p + 1], p)
    return step


@torch.no_grad()
def fast_generate(
    model: Any,
    input_ids: Tensor,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: Any,
    stop_check_interval: int = 16,
    **model_kwargs: Any,
) -> Tensor:
    """``generate``'s decoding method (transformers' ``custom_generate``): greedy search and sampling
    (:func:`fast_sample`), beam search and beam sampling (:func:`fast_beam_search`) over a :class:`StaticCache`
    and a graph-replayed decoder step, reading the device every ``stop_check_interval`` tokens. Other requests go
    to transformers' own decoding method, saying why once."""
    why = _fallback_reason(model, generation_config, model_kwargs)
    if why is not None:
        _say_once(why)
        method = getattr(type(model), GENERATION_MODES_MAPPING[generation_config.get_generation_mode()])
        return method(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs)
    if not isinstance(stop_check_interval, int) or isinstance(stop_check_interval, bool) or stop_check_interval < 1:
        raise ValueError(f"stop_check_interval must be an integer >= 1, got {stop_check_interval!r}")
    loop = fast_beam_search if generation_config.num_beams > 1 else fast_sample
    return loop(model, input_ids, logits_processor, stopping_criteria, generation_config, stop_check_interval,
                model_kwargs)  # fmt: skip


def fast_sample(
    model: Any, input_ids: Tensor, logits_processor: Any, stopping_criteria: Any, generation_config: Any,
    stop_check_interval: int, model_kwargs: dict[str, Any],
) -> Tensor:  # fmt: skip
    """transformers' greedy search / sampling (``GenerationMixin._sample``, token for token); the device is read
    every ``stop_check_interval`` tokens and the output cut where transformers' loop would have stopped."""
    step = _prepare(model, input_ids, generation_config, model_kwargs)
    logits_processor = _processors(logits_processor)
    B, max_length = input_ids.shape[0], generation_config.max_length
    pad = generation_config._pad_token_tensor
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    unfinished = torch.ones(B, dtype=torch.long, device=input_ids.device)
    done_at = torch.full((), -1, dtype=torch.long, device=input_ids.device)  # length at which all rows finished
    n = 0
    while input_ids.shape[1] < max_length:
        logits = step(input_ids[:, -1:], input_ids.shape[1] - 1)
        scores = logits_processor(input_ids, logits)
        if generation_config.do_sample:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        if has_eos:
            tokens = tokens * unfinished + pad * (1 - unfinished)
        input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
        unfinished = unfinished & ~stopping_criteria(input_ids, None)
        finished = unfinished.max() == 0
        done_at = torch.where((done_at < 0) & finished, input_ids.shape[1], done_at)
        n += 1
        if n % stop_check_interval == 0 and bool(finished):  # the one host read of the loop
            break
    length = int(done_at)
    return input_ids[:, :length] if length > 0 else input_ids


def fast_beam_search(
    model: Any, input_ids: Tensor, logits_processor: Any, stopping_criteria: Any, generation_config: Any,
    stop_check_interval: int, model_kwargs: dict[str, Any],
) -> Tensor:  # fmt: skip
    """transformers' beam search / beam sampling (``GenerationMixin._beam_search``), step for step through its own
    helpers (top-k continuations, running beams, finished beams, the early-stop heuristic), so the beams, scores,
    ties and the returned sequences are the ones it computes.

    Two differences, neither visible in the output: the static cache is reordered by the chosen beams in place on
    the device (:meth:`StaticCache.reorder`), and transformers' per-token stop test (a host read) is kept on the
    device: once it says stop, the finished sequences and their beam indices are frozen (every later step's update
    is discarded with ``torch.where``), and the device is read every ``stop_check_interval`` tokens."""
    step = _prepare(model, input_ids, generation_config, model_kwargs)
    logits_processor = _processors(logits_processor)
    pad_token_id = generation_config._pad_token_tensor
    eos_token_id = generation_config._eos_token_tensor
    do_sample, early_stopping = generation_config.do_sample, generation_config.early_stopping
    length_penalty, max_length = generation_config.length_penalty, generation_config.max_length
    num_beams, num_return = generation_config.num_beams, generation_config.num_return_sequences
    flat_batch, cur_len = input_ids.shape
    batch_size, device = flat_batch // num_beams, input_ids.device
    vocab_size = model.config.get_text_config().vocab_size
    decoder_prompt_len = cur_len
    n_eos_tokens = eos_token_id.shape[0] if eos_token_id is not None else 0
    beams_to_keep = max(2, 1 + n_eos_tokens) * num_beams
    top_num_beam_mask = torch.cat(
        (torch.ones(num_beams, dtype=torch.bool), torch.zeros(beams_to_keep - num_beams, dtype=torch.bool))
    ).to(device)
    unflat = lambda t, k: t.reshape(batch_size, k, *t.shape[1:])  # noqa: E731
    flat = lambda t: t.reshape(-1, *t.shape[2:])  # noqa: E731

    fill = pad_token_id or eos_token_id[0] if eos_token_id is not None else -1  # transformers' expression, as is
    running_sequences = torch.full((batch_size, num_beams, max_length), fill, dtype=torch.int64, device=device)
    running_sequences[:, :, :cur_len] = unflat(input_ids, num_beams)
    sequences = running_sequences.clone()
    running_beam_scores = torch.zeros((batch_size, num_beams), dtype=torch.float, device=device)
    running_beam_scores[:, 1:] = -1e9
    beam_scores = torch.full((batch_size, num_beams), -1e9, dtype=torch.float, device=device)
    is_sent_finished = torch.zeros((batch_size, num_beams), dtype=torch.bool, device=device)
    heuristic_unsatisfied = torch.ones((batch_size, 1), dtype=torch.bool, device=device)
    running_beam_indices = torch.full(
        (batch_size, num_beams, max_length - cur_len), -1, dtype=torch.int32, device=device
    )
    beam_indices = running_beam_indices.clone()
    stopped = torch.zeros((), dtype=torch.bool, device=device)  # transformers' loop has ended
    n = 0
    while cur_len < max_length:
        flat_running = flat(running_sequences[:, :, :cur_len])
        logits = step(flat_running[:, -1:], cur_len - 1)
        log_probs = logits_processor(flat_running, torch.nn.functional.log_softmax(logits, dim=-1))
        log_probs = unflat(log_probs, num_beams) + running_beam_scores[:, :, None]
        log_probs = log_probs.reshape(batch_size, num_beams * vocab_size)
        topk_log_probs, topk_sequences, topk_beam_indices = model._get_top_k_continuations(
            accumulated_log_probs=log_probs, running_sequences=running_sequences,
            running_beam_indices=running_beam_indices, cur_len=cur_len, decoder_prompt_len=decoder_prompt_len,
            do_sample=do_sample, beams_to_keep=beams_to_keep, num_beams=num_beams, vocab_size=vocab_size,
            batch_size=batch_size,
        )  # fmt: skip
        hits = unflat(stopping_criteria(flat(topk_sequences[:, :, : cur_len + 1]), None), beams_to_keep)
        running_sequences, running_beam_scores, running_beam_indices = model._get_running_beams_for_next_iteration(
            topk_log_probs=topk_log_probs, topk_running_sequences=topk_sequences,
            topk_running_beam_indices=topk_beam_indices, next_token_hits_stopping_criteria=hits, num_beams=num_beams,
        )  # fmt: skip
        new_sequences, beam_scores, new_beam_indices, is_sent_finished = model._update_finished_beams(
            sequences=sequences, topk_running_sequences=topk_sequences, beam_scores=beam_scores,
            topk_log_probs=topk_log_probs, beam_indices=beam_indices, topk_running_beam_indices=topk_beam_indices,
            is_early_stop_heuristic_unsatisfied=heuristic_unsatisfied, is_sent_finished=is_sent_finished,
            next_token_hits_stopping_criteria=hits, top_num_beam_mask=top_num_beam_mask, num_beams=num_beams,
            cur_len=cur_len, decoder_prompt_len=decoder_prompt_len, length_penalty=length_penalty,
            early_stopping=early_stopping,
        )  # fmt: skip
        # What transformers returns is fixed at its last step: later updates are discarded.
        sequences = torch.where(stopped, sequences, new_sequences)
        beam_indices = torch.where(stopped, beam_indices, new_beam_indices)
        step.cache.reorder(flat(running_beam_indices[..., cur_len - decoder_prompt_len]), cur_len)
        cur_len += 1
        heuristic_unsatisfied = model._check_early_stop_heuristic(
            is_early_stop_heuristic_unsatisfied=heuristic_unsatisfied, running_beam_scores=running_beam_scores,
            beam_scores=beam_scores, is_sent_finished=is_sent_finished, cur_len=cur_len, max_length=max_length,
            decoder_prompt_len=decoder_prompt_len, early_stopping=early_stopping, length_penalty=length_penalty,
        )  # fmt: skip
        going = model._beam_search_has_unfinished_sequences(heuristic_unsatisfied, is_sent_finished, hits,
                                                            early_stopping)  # fmt: skip
        stopped = stopped | ~going
        n += 1
        if n % stop_check_interval == 0 and bool(stopped):  # the one host read of the loop
            break
    sequences = flat(sequences[:, :num_return])
    beam_indices = flat(beam_indices[:, :num_return])
    generated = int(((beam_indices + 1).bool()).sum(dim=1).max())
    return sequences[:, : decoder_prompt_len + generated]


class GenerationHooks:
    """Overrides for ``transformers.GenerationMixin`` that our seq2seq LM mixes in."""

    def generate(self, *args: Any, **kwargs: Any):
        """transformers' ``generate``; greedy search and sampling take :func:`fast_sample` (module docstring).
        ``labels`` (Seq2SeqTrainer's ``predict_with_generate`` passes them) play no part in generation: dropped."""
        kwargs.pop("labels", None)
        hf_only = ("custom_generate", "streamer", "assistant_model", "synced_gpus", "prefix_allowed_tokens_fn")
        used = [k for k in hf_only if kwargs.get(k) is not None] + (["positional arguments"] if len(args) > 2 else [])
        if not used:
            kwargs["custom_generate"] = fast_generate
        elif "custom_generate" not in used:
            _say_once(f"{', '.join(used)} runs transformers' loop")
        return super().generate(*args, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size, max_len):
        if model_kwargs.get("past_key_values") is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_len
            )
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} is not supported by flasht5's "
                "Hugging Face generate path; leave it unset (dynamic cache)."
            )
        model_kwargs["past_key_values"] = new_hf_cache()
