"""``FlashT5Config``: Hugging Face T5 field names plus flasht5's own fields, and named presets.

One config describes every public T5 family (DESIGN.md §1); the family is chosen by fields alone:

==============  =====================  ====================  =============================  ==================
family          feed_forward_proj      tie_word_embeddings   relative_attention_per_layer   num_decoder_layers
==============  =====================  ====================  =============================  ==================
T5 v1.0         relu                   True (+ rescale)      False                          = num_layers
T5 v1.1 / FLAN  gated-gelu             False                 False                          = num_layers
mT5             gated-gelu             False                 False                          = num_layers
umT5            gated-gelu             False                 True                           = num_layers
ByT5            gated-gelu             False                 False                          != num_layers
UL2             gated-silu             False                 False                          = num_layers
==============  =====================  ====================  =============================  ==================
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig

from flasht5.model import ACTIVATIONS as _ACTIVATION_FNS

POSITION_ENCODINGS = ("t5", "alibi", "rope", "fire")
ACTIVATIONS = tuple(_ACTIVATION_FNS)  # the names the model implements
HF_MODEL_TYPES = ("t5", "mt5", "umt5")  # the Hugging Face families an export writes


@strict
class FlashT5Config(PretrainedConfig):
    r"""Configuration of a flasht5 encoder-decoder.

    Hugging Face ``T5Config`` fields keep their names and meaning (so a stock ``config.json`` loads as is), plus:

    position_encoding (`str`, defaults to ``"t5"``):
        ``"t5"`` relative buckets (exact T5), ``"alibi"`` (symmetric in the encoder, causal in the decoder),
        ``"rope"`` (rotary on ``rope_fraction`` of each head's dims, base ``rope_theta``), or ``"fire"``
        (learned MLP over the normalised log distance, Li et al. 2023). Cross-attention never has one.
    relative_attention_per_layer (`bool`, defaults to ``False``):
        Every layer owns its own relative-position table (umT5); otherwise layer 0 owns one shared by the stack.
    scale_decoder_outputs (`bool`, *optional*):
        Multiply the decoder output by ``d_model**-0.5`` before the LM head. Defaults to ``tie_word_embeddings``
        (T5 v1.0 semantics: the rescale belongs to the tied embedding).
    hf_model_type (`str`, defaults to ``"t5"``):
        Which Hugging Face family (``t5``, ``mt5``, ``umt5``) an export writes.
    z_loss (`float`, defaults to 0.0):
        Coefficient of the z-loss ``mean(logsumexp(logits)**2)`` (PaLM) added to the LM loss; reported separately.
    """

    model_type = "flasht5"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "num_heads",
        "num_hidden_layers": "num_layers",
        "head_dim": "d_kv",
    }

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int | None = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float | int = 0.1
    classifier_dropout: float | int = 0.0
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "relu"
    is_encoder_decoder: bool = True
    use_cache: bool = True
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    decoder_start_token_id: int | None = 0
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool | None = None
    # flasht5's own fields
    position_encoding: str = "t5"
    relative_attention_per_layer: bool = False
    rope_theta: float | int = 10000.0
    rope_fraction: float | int = 1.0
    fire_hidden_size: int = 32
    fire_init_length: int = 512
    hf_model_type: str = "t5"
    z_loss: float | int = 0.0

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = bool(self.tie_word_embeddings)
        # Fields transformers' T5Config derives and saves; they are derived here too (properties below).
        kwargs.pop("dense_act_fn", None)
        kwargs.pop("is_gated_act", None)
        if self.d_kv is None:
            if self.num_heads < 1 or self.d_model % self.num_heads:
                raise ValueError(
                    f"d_kv is not set and d_model={self.d_model} is not divisible by num_heads={self.num_heads}."
                )
            self.d_kv = self.d_model // self.num_heads
        self.check()
        super().__post_init__(**kwargs)

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act_fn(self) -> str:
        act = self.feed_forward_proj.split("-")[-1]
        # transformers maps the historical "gated-gelu" to the tanh approximation (gelu_new).
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act

    def check(self) -> None:
        """Raise a ``ValueError`` that names the field for any inconsistent setting."""
        act = self.feed_forward_proj.split("-")
        if len(act) > 2 or (len(act) == 2 and act[0] != "gated") or act[-1] not in ACTIVATIONS:
            raise ValueError(
                f"feed_forward_proj={self.feed_forward_proj!r} is not valid: use 'ACT' or 'gated-ACT' with ACT in "
                f"{ACTIVATIONS}, e.g. 'relu' (T5 v1.0), 'gated-gelu' (v1.1), 'gated-silu' (UL2)."
            )
        if self.position_encoding not in POSITION_ENCODINGS:
            raise ValueError(
                f"position_encoding={self.position_encoding!r} is unknown; choose one of {POSITION_ENCODINGS}."
            )
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers", "num_decoder_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "num_decoder_layers" else 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.position_encoding == "t5":
            if self.relative_attention_num_buckets < 2:
                raise ValueError(
                    f"relative_attention_num_buckets must be >= 2, got {self.relative_attention_num_buckets}."
                )
            if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
                raise ValueError(
                    "relative_attention_max_distance must exceed relative_attention_num_buckets // 4 (the exact "
                    f"range), got {self.relative_attention_max_distance}."
                )
        if self.position_encoding == "rope":
            rot = int(self.d_kv * self.rope_fraction)
            if not 0 < self.rope_fraction <= 1 or rot < 2 or rot % 2:
                raise ValueError(
                    f"rope_fraction={self.rope_fraction} must be in (0, 1] and give an even number of rotary dims "
                    f"of d_kv={self.d_kv} (got {rot})."
                )
        if self.z_loss < 0:
            raise ValueError(f"z_loss must be >= 0, got {self.z_loss}.")
        if not 0 <= self.dropout_rate < 1:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}.")
        if self.hf_model_type not in HF_MODEL_TYPES:
            raise ValueError(f"hf_model_type={self.hf_model_type!r} must be one of {HF_MODEL_TYPES}.")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> FlashT5Config:
        """A named public architecture (weights not included), e.g. ``FlashT5Config.from_preset("flan-t5-base")``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


_V10 = dict(feed_forward_proj="relu", tie_word_embeddings=True, vocab_size=32128)
_V11 = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, vocab_size=32128)
_MT5 = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, vocab_size=250112, hf_model_type="mt5")
_UMT5 = dict(_MT5, vocab_size=256384, relative_attention_per_layer=True, hf_model_type="umt5")
_BYT5 = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, vocab_size=384)

PRESETS: dict[str, dict[str, Any]] = {
    # T5 v1.0 (Raffel et al. 2020)
    "t5-small": dict(_V10, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8),
    "t5-base": dict(_V10, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),
    "t5-large": dict(_V10, d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_heads=16),
    # T5 v1.1, LM-adapted and FLAN-T5 share these shapes
    "t5-v1_1-small": dict(_V11, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6),
    "t5-v1_1-base": dict(_V11, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12),
    "t5-v1_1-large": dict(_V11, d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16),
    "t5-v1_1-xl": dict(_V11, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32),
    "t5-v1_1-xxl": dict(_V11, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
    "flan-t5-small": dict(_V11, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6),
    "flan-t5-base": dict(_V11, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12),
    "flan-t5-large": dict(_V11, d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16),
    "flan-t5-xl": dict(_V11, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32),
    "flan-t5-xxl": dict(_V11, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
    "mt5-small": dict(_MT5, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6),
    "mt5-base": dict(_MT5, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12),
    "umt5-small": dict(_UMT5, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6),
    "umt5-base": dict(_UMT5, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12),
    "byt5-small": dict(_BYT5, d_model=1472, d_kv=64, d_ff=3584, num_layers=12, num_decoder_layers=4, num_heads=6),
    "byt5-base": dict(_BYT5, d_model=1536, d_kv=64, d_ff=3968, num_layers=18, num_decoder_layers=6, num_heads=12),
    "ul2": dict(
        feed_forward_proj="gated-silu",
        tie_word_embeddings=False,
        vocab_size=32128,
        d_model=4096,
        d_kv=256,
        d_ff=16384,
        num_layers=32,
        num_decoder_layers=32,
        num_heads=16,
    ),  # fmt: skip
    # What `make demo` trains on a laptop CPU in a few minutes.
    "demo": dict(_V11, vocab_size=4096, d_model=192, d_kv=32, d_ff=512, num_layers=3, num_heads=6, dropout_rate=0.0),
}
