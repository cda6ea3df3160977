"""Tiny random Hugging Face T5-family models, built offline, for parity tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    MT5Config,
    MT5ForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
    UMT5Config,
    UMT5ForConditionalGeneration,
)

TINY = dict(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_heads=4, dropout_rate=0.0, decoder_start_token_id=0,
            relative_attention_num_buckets=8, relative_attention_max_distance=20)  # fmt: skip

# family -> (config class, model class, config overrides)
FAMILIES = {
    "t5-v1.0": (T5Config, T5ForConditionalGeneration, dict(feed_forward_proj="relu", num_layers=2)),
    "t5-v1.1": (T5Config, T5ForConditionalGeneration,
                dict(feed_forward_proj="gated-gelu", num_layers=2, tie_word_embeddings=False)),
    "mt5": (MT5Config, MT5ForConditionalGeneration, dict(feed_forward_proj="gated-gelu", num_layers=2)),
    "umt5": (UMT5Config, UMT5ForConditionalGeneration, dict(feed_forward_proj="gated-gelu", num_layers=2)),
    "byt5": (T5Config, T5ForConditionalGeneration,
             dict(feed_forward_proj="gated-gelu", num_layers=3, num_decoder_layers=1, tie_word_embeddings=False)),
    "ul2": (T5Config, T5ForConditionalGeneration,
            dict(feed_forward_proj="gated-silu", num_layers=2, num_decoder_layers=3, tie_word_embeddings=False)),
}  # fmt: skip


def tiny_hf(family: str, seed: int = 0, **overrides):
    """A random HF model of the family, in eval mode. Untied families get an lm_head of their own (transformers 5
    ties every freshly built T5's head to the embedding, which real v1.1 / mT5 / umT5 checkpoints are not)."""
    cfg_cls, model_cls, kw = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**{**TINY, **kw, **overrides}))
    if kw.get("tie_word_embeddings", True) is False or family in ("mt5", "umt5"):
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.5)
    with torch.no_grad():  # non-trivial norms and position tables
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.uniform_(0.5, 1.5)
            if "relative_attention_bias" in name:
                p.normal_(0.0, 1.0)
    return model.eval()


def save_hf(model, folder: str | Path, *, shards: int = 1, fmt: str = "safetensors") -> Path:
    """Write a stock-format folder: config.json + weights (single file, sharded with an index, or .bin)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if getattr(model, "lm_head", None) is not None and model.lm_head.weight is model.shared.weight:
        state.pop("lm_head.weight", None)
    state.pop("encoder.embed_tokens.weight", None)
    state.pop("decoder.embed_tokens.weight", None)
    keys = sorted(state)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    if shards == 1:
        _write(state, folder / f"{stem}.{ext}", fmt)
        return folder
    weight_map = {}
    for s in range(shards):
        part = {k: state[k] for k in keys[s::shards]}
        name = f"{stem}-{s + 1:05d}-of-{shards:05d}.{ext}"
        _write(part, folder / name, fmt)
        weight_map.update(dict.fromkeys(part, name))
    (folder / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _write(state, path: Path, fmt: str) -> None:
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)


def padded_batch(vocab: int = 97, seed: int = 1):
    """A right-padded encoder/decoder batch with attention masks and -100 labels."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab, (3, 11), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    attention_mask[2, 4:] = 0
    input_ids[attention_mask == 0] = 0
    labels = torch.randint(2, vocab, (3, 6), generator=g)
    decoder_attention_mask = torch.ones_like(labels)
    decoder_attention_mask[0, 4:] = 0
    decoder_attention_mask[2, 5:] = 0
    labels[decoder_attention_mask == 0] = -100
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                decoder_attention_mask=decoder_attention_mask)  # fmt: skip
