"""Key/value caches for decoding and the Hugging Face ``generate`` integration, with a fast path of its own.

The decoder talks to a cache through :class:`flasht5.model.KVCache` ((B, L, H, D) tensors).

Greedy search and sampling (``num_beams == 1``) take flasht5's own decoding loop, :func:`fast_sample`, which
``generate`` hands its prepared inputs to (transformers' ``custom_generate`` hook: its argument handling, encoder
pass, input expansion for ``num_return_sequences``, logits processors and stopping criteria are transformers' own,
so the tokens are too). The loop decodes into a :class:`StaticCache` preallocated for the whole request (each step
writes one position in place; cross-attention keys/values computed once), replays the decoder step from a CUDA
graph on the flash backend, and reads the device only every ``stop_check_interval`` tokens (default 16, a
``generate`` argument) to see whether every sequence has finished; the output is then cut where transformers' loop
would have stopped. Everything else (beam search, streamers, scores or hidden states returned, assisted decoding)
runs transformers' own loop over an ``EncoderDecoderCache`` ((B, H, L, D), reordered for beam search) that
:class:`HFCacheAdapter` presents to the model, saying once why. That cache is created without a layer count so a
decoder deeper than its encoder (ByT5) works — transformers' own T5 sizes the cache from the encoder depth and
fails there.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.generation.utils import GENERATION_MODES_MAPPING

from flasht5.layout import Layout

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


class StaticCache:
    """:class:`flasht5.model.KVCache` preallocated for a whole request: (layers, B, capacity, H, D) keys and values.

    :meth:`advance_to` sets the position of the next token (a host integer, and device tensors that the step reads:
    the write position and every row's number of valid keys), so a decode step has the same shapes from the first
    token to the last and a CUDA graph of it stays valid. Cross-attention keys/values are set once.
    """

    def __init__(
        self, num_layers: int, batch: int, capacity: int, heads: int, head_dim: int, *, dtype: torch.dtype,
        device: torch.device,
    ):  # fmt: skip
        self.keys = torch.zeros(num_layers, batch, capacity, heads, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.cross: list[tuple[Tensor, Tensor] | None] = [None] * num_layers
        self.capacity, self.step = capacity, 0
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)

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

    def get_cross(self, layer_idx: int) -> tuple[Tensor, Tensor] | None:
        return self.cross[layer_idx]

    def set_cross(self, layer_idx: int, k: Tensor, v: Tensor) -> None:
        self.cross[layer_idx] = (k, v)


class DecodeStep:
    """next-token logits (B, vocab) fp32 of the decoder for the tokens at ``position``, over a :class:`StaticCache`;
    replayed from a CUDA graph (captured at its third call, once the cross-attention keys are cached and the kernels
    compiled) where the backend allows it."""

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
        if self._graph is not None:
            self._tokens.copy_(tokens)
            self._graph.replay()
            return self._logits.clone()
        if not self.use_graph or self.calls < 3:
            return self._run(tokens)
        self._tokens = tokens.clone()
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._logits = self._run(self._tokens)
        self._graph.replay()
        return self._logits.clone()


@functools.cache
def _say_once(message: str) -> None:
    log.warning("flasht5 generate: %s", message)


def _fallback_reason(model: Any, generation_config: Any, model_kwargs: dict[str, Any]) -> str | None:
    """Why a request cannot take the fast loop (None when it can)."""
    mode = generation_config.get_generation_mode()
    if mode not in ("greedy_search", "sample"):
        return f"{mode.value} runs transformers' loop"
    if generation_config.return_dict_in_generate:
        return "return_dict_in_generate (scores, hidden states) runs transformers' loop"
    if model_kwargs.get("encoder_outputs") is None:
        return "no encoder output prepared"
    if model.model.decoder is None:
        return "the model has no decoder"
    return None


def _encoder_layout(hidden: Tensor, mask: Tensor | None) -> tuple[Layout, bool]:
    """The encoder output's layout, as per-row lengths when the mask is right padding (the usual T5 tokenizer
    output: the decode kernel then reads the lengths), and whether it is right padding (one host read)."""
    if mask is None:
        return Layout.dense(*hidden.shape[:2]), True
    mask = mask != 0
    lengths = mask.sum(1, dtype=torch.int32)
    if bool((mask == (torch.arange(mask.shape[1], device=mask.device) < lengths[:, None])).all()):
        return Layout.right_padded(lengths, mask.shape[1]), True
    return Layout.padded(mask), False


@torch.no_grad()
def fast_sample(
    model: Any,
    input_ids: Tensor,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: Any,
    stop_check_interval: int = 16,
    **model_kwargs: Any,
) -> Tensor:
    """transformers' greedy search / sampling (``GenerationMixin._sample``, token for token) over a
    :class:`StaticCache` and a graph-replayed decoder step; the device is read every ``stop_check_interval`` tokens.
    Other requests go to transformers' own decoding method."""
    why = _fallback_reason(model, generation_config, model_kwargs)
    if why is not None:
        _say_once(why)
        method = getattr(type(model), GENERATION_MODES_MAPPING[generation_config.get_generation_mode()])
        return method(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs)
    if not isinstance(stop_check_interval, int) or stop_check_interval < 1:
        raise ValueError(f"stop_check_interval must be an integer >= 1, got {stop_check_interval!r}")
    core = model.model
    hidden = model_kwargs["encoder_outputs"][0]
    enc_layout, right = _encoder_layout(hidden, model_kwargs.get("attention_mask"))
    encoded = core.encoded_from(hidden, enc_layout)
    B, start = input_ids.shape
    max_length = generation_config.max_length
    cache = StaticCache(
        len(core.decoder.layers), B, max_length, core.cfg.num_heads, core.cfg.d_kv,
        dtype=hidden.dtype, device=hidden.device,
    )  # fmt: skip
    # The graph needs the decode kernel (a padding-free gather would sync) and positions that it does not read.
    graph = (
        right and hidden.is_cuda and core.kernels.decode is not None and core.cfg.position_encoding in ("t5", "alibi")
    )
    step = DecodeStep(core, encoded, cache, graph=graph)
    for p in range(start - 1):  # a given decoder prompt: its tokens enter the cache one by one
        step(input_ids[:, p : p + 1], p)
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


class GenerationHooks:
    """Overrides for ``transformers.GenerationMixin`` that our seq2seq LM mixes in."""

    def generate(self, *args: Any, **kwargs: Any):
        """transformers' ``generate``; greedy search and sampling take :func:`fast_sample` (module docstring).
        ``labels`` (Seq2SeqTrainer's ``predict_with_generate`` passes them) play no part in generation: dropped."""
        kwargs.pop("labels", None)
        hf_only = ("custom_generate", "streamer", "assistant_model", "synced_gpus", "prefix_allowed_tokens_fn")
        used = [k for k in hf_only if kwargs.get(k) is not None] + (["positional arguments"] if len(args) > 2 else [])
        if not used:
            kwargs["custom_generate"] = fast_sample
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
