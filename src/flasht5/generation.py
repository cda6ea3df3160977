"""Key/value caches for decoding and the Hugging Face ``generate`` integration.

The decoder talks to a cache through :class:`flasht5.model.KVCache` ((B, L, H, D) tensors). Hugging Face's
``generate`` owns an ``EncoderDecoderCache`` ((B, H, L, D), reordered for beam search, expanded for
``num_return_sequences``); :class:`HFCacheAdapter` presents it to the model. The cache is created without a
layer count so a decoder deeper than its encoder (ByT5) works — transformers' own T5 sizes the cache from the
encoder depth and fails there.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache


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

    def update_self(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.cache.self_attention_cache.update(k.transpose(1, 2), v.transpose(1, 2), layer_idx)
        return k.transpose(1, 2), v.transpose(1, 2)

    def get_cross(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.cache.is_updated.get(layer_idx, False):
            return None
        layer = self.cache.cross_attention_cache.layers[layer_idx]
        return layer.keys.transpose(1, 2), layer.values.transpose(1, 2)

    def set_cross(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cache.cross_attention_cache.update(k.transpose(1, 2), v.transpose(1, 2), layer_idx)
        self.cache.is_updated[layer_idx] = True


class GenerationHooks:
    """Overrides for ``transformers.GenerationMixin`` that our seq2seq LM mixes in."""

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
