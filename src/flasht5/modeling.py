"""Hugging Face ``PreTrainedModel`` classes over :mod:`flasht5.model`, with the forward signatures and output
classes of their transformers T5 counterparts (``Trainer``, ``save_pretrained`` / ``from_pretrained``, ``generate``
and ``AutoModel*`` after :func:`flasht5.register`).

Beyond the Hugging Face arguments every forward accepts packed batches: ``segment_ids`` + ``position_ids`` (rows
holding several documents) or ``cu_seqlens`` + ``max_seqlen`` (flattened, padding-free tokens of shape (1, T)),
and the same with a ``decoder_`` prefix; packed documents never attend to each other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import (
    BaseModelOutput,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
    Seq2SeqQuestionAnsweringModelOutput,
    Seq2SeqSequenceClassifierOutput,
    TokenClassifierOutput,
)

from flasht5.config import ATTN_IMPLEMENTATIONS, FlashT5Config
from flasht5.generation import GenerationHooks, HFCacheAdapter, new_hf_cache
from flasht5.model import FIRE, MLP, T5, Attention, RMSNorm, Seqs


def default_attn_implementation() -> str:
    """``flash`` where a CUDA GPU and Triton are present, ``sdpa`` otherwise."""
    if torch.cuda.is_available():
        try:
            import triton  # noqa: F401

            return "flash"
        except ImportError:
            pass
    return "sdpa"


def shift_right(labels: torch.Tensor, positions: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs from labels: every document starts with ``start_id`` (also packed ones); -100 -> pad."""
    shifted = labels.roll(1, dims=-1)
    shifted = shifted.masked_fill(positions.expand_as(labels) == 0, start_id)
    return shifted.masked_fill(shifted == -100, pad_id)


def lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, z_loss: float = 0.0, kernels: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss, z-term): mean cross-entropy over tokens whose label is not -100 (0, not NaN, when there are none),
    plus ``z_loss * mean(logsumexp(logits)**2)`` over the same tokens; the z-term (included in the loss) is returned
    detached for logging, or None when ``z_loss`` is 0. ``kernels`` uses the Triton cross-entropy on CUDA."""
    flat_logits, flat = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    if kernels and logits.is_cuda:
        from flasht5.ops.cross_entropy import cross_entropy

        loss, z = cross_entropy(flat_logits, flat, z_loss=z_loss, return_z_loss=True)
        return loss, (z if z_loss else None)
    logits32 = flat_logits.float()
    keep = flat != -100
    count = keep.sum().clamp(min=1)
    loss = F.cross_entropy(logits32, flat, ignore_index=-100, reduction="sum") / count
    if not z_loss:
        return loss, None
    z = z_loss * (torch.logsumexp(logits32, dim=-1).pow(2) * keep).sum() / count
    return loss + z, z.detach()


@dataclass
class FlashT5Seq2SeqLMOutput(Seq2SeqLMOutput):
    """transformers' ``Seq2SeqLMOutput`` plus ``z_loss`` (the z-term included in ``loss``, for logging).

    ``logits`` is None when the loss was computed by the fused LM head + cross-entropy (training on CUDA with
    ``attn_implementation="flash"``): the full logits are never materialised there.
    """

    z_loss: torch.FloatTensor | None = None


def _flat_tokens(x: torch.Tensor | None, cu: torch.Tensor | None) -> torch.Tensor | None:
    """Varlen inputs may come as (T,); the model takes (1, T)."""
    return x[None] if x is not None and cu is not None and x.dim() == 1 else x


class FlashT5PreTrainedModel(PreTrainedModel):
    config_class = FlashT5Config
    config: FlashT5Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _keep_in_fp32_modules = ["wo"]
    _supports_sdpa = True

    # -- attention backend: one switch, validated here ---------------------------------------------------------
    def _check_and_adjust_attn_implementation(
        self, attn_implementation: str | None, is_init_check: bool = False, allow_all_kernels: bool = False
    ) -> str:
        if attn_implementation is None:
            return default_attn_implementation()
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation={attn_implementation!r} is not supported; choose one of {ATTN_IMPLEMENTATIONS}."
            )
        return attn_implementation

    def set_attn_implementation(self, attn_implementation: str | dict, allow_all_kernels: bool = False) -> None:
        self.config._attn_implementation = self._check_and_adjust_attn_implementation(attn_implementation)

    # -- loading: flasht5 folders, or stock Hugging Face T5 / mT5 / umT5 folders converted on the fly ------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        from flasht5 import convert

        path = str(pretrained_model_name_or_path)
        if convert.is_hf_t5_folder(path):
            return convert.from_hf(path, cls=cls, **kwargs)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
        convert.check_loading_info(cls, info)
        return (model, info) if want_info else model

    # -- T5 initialisation (Mesh TensorFlow's scheme, as transformers implements it) -----------------------------
    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # transformers skips modules of "custom code" that own no parameters directly, which would skip Attention
        # and MLP, whose children's init they set. Every init here goes through transformers.initialization, which
        # leaves loaded tensors alone, so nothing needs skipping.
        super()._initialize_weights(module, is_custom_code=False)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        cfg, f = self.config, self.config.initializer_factor
        if isinstance(module, RMSNorm):
            init.constant_(module.weight, f * 1.0)
        elif isinstance(module, T5):
            init.normal_(module.shared.weight, mean=0.0, std=f * 1.0)
            if module.lm_head is not None:
                # Mesh TensorFlow's fan-in init of an untied logits layer: unit-variance logits, so training starts
                # at loss ~ln(vocab). (transformers uses std 1.0 here, i.e. logits of std sqrt(d_model).)
                std = f * (1.0 if cfg.scale_decoder_outputs else cfg.d_model**-0.5)
                init.normal_(module.lm_head.weight, mean=0.0, std=std)
        elif isinstance(module, MLP):
            for name in ("wi", "wi_0", "wi_1"):
                if hasattr(module, name):
                    init.normal_(getattr(module, name).weight, mean=0.0, std=f * cfg.d_model**-0.5)
            init.normal_(module.wo.weight, mean=0.0, std=f * cfg.d_ff**-0.5)
        elif isinstance(module, Attention):
            init.normal_(module.q.weight, mean=0.0, std=f * (cfg.d_model * cfg.d_kv) ** -0.5)
            init.normal_(module.k.weight, mean=0.0, std=f * cfg.d_model**-0.5)
            init.normal_(module.v.weight, mean=0.0, std=f * cfg.d_model**-0.5)
            init.normal_(module.o.weight, mean=0.0, std=f * (cfg.num_heads * cfg.d_kv) ** -0.5)
            if hasattr(module, "relative_attention_bias"):
                init.normal_(module.relative_attention_bias.weight, mean=0.0, std=f * cfg.d_model**-0.5)
        elif isinstance(module, FIRE):
            init.normal_(module.mlp_in.weight, mean=0.0, std=f)
            init.zeros_(module.mlp_in.bias)
            init.normal_(module.mlp_out.weight, mean=0.0, std=f * module.mlp_out.in_features**-0.5)
            init.zeros_(module.mlp_out.bias)
            init.zeros_(module.log_c)
            init.constant_(module.threshold, float(cfg.fire_init_length))
        elif isinstance(module, ClassificationHead):
            for lin in (module.dense, module.out_proj):
                init.normal_(lin.weight, mean=0.0, std=f * cfg.d_model**-0.5)
                init.zeros_(lin.bias)
        elif isinstance(module, FlashT5ForTokenClassification):
            init.normal_(module.classifier.weight, mean=0.0, std=f * 1.0)
            init.zeros_(module.classifier.bias)
        elif isinstance(module, FlashT5ForQuestionAnswering):
            init.normal_(module.qa_outputs.weight, mean=0.0, std=f * cfg.d_model**-0.5)
            init.zeros_(module.qa_outputs.bias)

    # -- shared plumbing ----------------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.shared

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.shared = value

    @staticmethod
    def _unsupported(output_attentions: bool | None, output_hidden_states: bool | None) -> None:
        if output_attentions or output_hidden_states:
            raise ValueError(
                "output_attentions / output_hidden_states are not supported by flasht5 (the flash path never "
                "materialises attention weights); use transformers' T5 for inspection."
            )

    def _encode(self, input_ids, attention_mask, inputs_embeds, packing: dict[str, Any]) -> tuple[torch.Tensor, Seqs]:
        input_ids = _flat_tokens(input_ids, packing.get("cu_seqlens"))
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("pass input_ids or inputs_embeds.")
        seqs = self._enc_seqs(ref, attention_mask, packing, "input_ids")
        return self.model.encode(input_ids, inputs_embeds=inputs_embeds, seqs=seqs)

    @staticmethod
    def _enc_seqs(ref: torch.Tensor, attention_mask, packing: dict[str, Any], name="encoder_outputs") -> Seqs:
        """The encoder layout of ``ref`` (token ids, embeddings, or a given encoder output during generation)."""
        return Seqs.build(
            ref.shape[0], ref.shape[1], ref.device, attention_mask=attention_mask,
            segment_ids=packing.get("segment_ids"), position_ids=packing.get("position_ids"),
            cu_seqlens=packing.get("cu_seqlens"), max_seqlen=packing.get("max_seqlen"), name=name,
        )  # fmt: skip

    def _shift_right(self, ids: torch.Tensor) -> torch.Tensor:
        """Decoder inputs from one-document rows (labels, or input_ids for the classification / QA heads)."""
        positions = torch.arange(ids.shape[-1], device=ids.device)[None]
        return shift_right(ids, positions, self.config.decoder_start_token_id, self.config.pad_token_id)

    def _seq2seq(
        self, *, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs,
        past_key_values, inputs_embeds, decoder_inputs_embeds, labels, use_cache, packing: dict[str, Any],
    ) -> tuple[torch.Tensor, BaseModelOutput, Any]:  # fmt: skip
        """Run encoder (unless given) and decoder; returns (decoder hidden, encoder output, cache or None)."""
        if encoder_outputs is None:
            enc_hidden, enc_seqs = self._encode(input_ids, attention_mask, inputs_embeds, packing)
            encoder_outputs = BaseModelOutput(last_hidden_state=enc_hidden)
        else:
            if not isinstance(encoder_outputs, BaseModelOutput):
                encoder_outputs = BaseModelOutput(last_hidden_state=encoder_outputs[0])
            enc_hidden = encoder_outputs.last_hidden_state
            enc_seqs = self._enc_seqs(enc_hidden, attention_mask, packing)

        d_cu = packing.get("decoder_cu_seqlens")
        decoder_input_ids = _flat_tokens(decoder_input_ids, d_cu)
        labels = _flat_tokens(labels, d_cu)
        if past_key_values is None and use_cache:
            past_key_values = new_hf_cache()
        cache = HFCacheAdapter(past_key_values) if past_key_values is not None else None

        dec_seqs = None
        if cache is None:
            ref = decoder_input_ids if decoder_input_ids is not None else decoder_inputs_embeds
            ref = labels if ref is None else ref
            if ref is None:
                raise ValueError("pass decoder_input_ids, decoder_inputs_embeds or labels.")
            dec_seqs = Seqs.build(
                ref.shape[0], ref.shape[1], ref.device, attention_mask=decoder_attention_mask,
                segment_ids=packing.get("decoder_segment_ids"), position_ids=packing.get("decoder_position_ids"),
                cu_seqlens=d_cu, max_seqlen=packing.get("decoder_max_seqlen"), name="decoder_input_ids",
            )  # fmt: skip
            if dec_seqs.packed != enc_seqs.packed:
                raise ValueError(
                    "packed batches must be packed on both sides: pass segment_ids/cu_seqlens for the encoder and "
                    "decoder_segment_ids/decoder_cu_seqlens for the decoder."
                )
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids, decoder_inputs_embeds or labels.")
            if dec_seqs is None:
                decoder_input_ids = self._shift_right(labels)
            else:  # packed documents each start with the start token
                decoder_input_ids = shift_right(
                    labels, dec_seqs.positions, self.config.decoder_start_token_id, self.config.pad_token_id
                )
        hidden = self.model.decode(
            decoder_input_ids, enc_hidden, enc_seqs, inputs_embeds=decoder_inputs_embeds, seqs=dec_seqs,
            cache=cache, attention_mask=decoder_attention_mask if cache is not None else None,
        )  # fmt: skip
        return hidden, encoder_outputs, past_key_values


def _packing(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop flasht5's packed-batch arguments from **kwargs; reject anything else unknown."""
    names = (
        "segment_ids", "position_ids", "cu_seqlens", "max_seqlen",
        "decoder_segment_ids", "decoder_position_ids", "decoder_cu_seqlens", "decoder_max_seqlen",
    )  # fmt: skip
    packing = {k: kwargs.pop(k) for k in names if k in kwargs}
    for ignorable in (
        "cache_position",
        "num_items_in_batch",
        "return_dict",
        "output_attentions",
        "output_hidden_states",
    ):
        kwargs.pop(ignorable, None)
    if kwargs:
        raise ValueError(f"unexpected forward arguments: {sorted(kwargs)}")
    return packing


class FlashT5Model(FlashT5PreTrainedModel):
    """Encoder-decoder without a head (transformers' ``T5Model``)."""

    def __init__(self, config: FlashT5Config):
        super().__init__(config)
        self.model = T5(config, lm_head=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: Any = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> Seq2SeqModelOutput | tuple:
        self._unsupported(output_attentions, output_hidden_states)
        hidden, enc, cache = self._seq2seq(
            input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask, encoder_outputs=encoder_outputs,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, decoder_inputs_embeds=decoder_inputs_embeds,
            labels=None, use_cache=use_cache, packing=_packing(kwargs),
        )  # fmt: skip
        out = Seq2SeqModelOutput(
            last_hidden_state=hidden, past_key_values=cache, encoder_last_hidden_state=enc.last_hidden_state
        )
        return out if return_dict is not False else out.to_tuple()


class FlashT5ForConditionalGeneration(GenerationHooks, FlashT5PreTrainedModel, GenerationMixin):
    """T5 with its LM head (transformers' ``T5ForConditionalGeneration``), including ``generate``."""

    def __init__(self, config: FlashT5Config):
        super().__init__(config)
        self.model = T5(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.lm_head = value

    def get_encoder(self):
        return _EncoderView(self)

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return self._shift_right(labels)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: Any = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> Seq2SeqLMOutput | tuple:
        self._unsupported(output_attentions, output_hidden_states)
        packing = _packing(kwargs)
        hidden, enc, cache = self._seq2seq(
            input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask, encoder_outputs=encoder_outputs,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, decoder_inputs_embeds=decoder_inputs_embeds,
            labels=labels, use_cache=use_cache, packing=packing,
        )  # fmt: skip
        kernels = self.model.attn_implementation == "flash" and hidden.is_cuda
        logits, loss, z = None, None, None
        if labels is not None:
            labels = _flat_tokens(labels, packing.get("decoder_cu_seqlens")).reshape(hidden.shape[:-1])
        if labels is not None and kernels and self.training:
            # LM head + loss fused: the (tokens, vocab) logits are never materialised.
            from flasht5.ops.linear_cross_entropy import linear_cross_entropy

            dt = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else hidden.dtype
            loss, z = linear_cross_entropy(
                hidden.to(dt), self.model.output_weight().to(dt), labels, z_loss=self.config.z_loss,
                scale=self.model.output_scale(), return_z_loss=True,
            )  # fmt: skip
            z = z if self.config.z_loss else None
        else:
            logits = self.model.logits(hidden)
            if labels is not None:
                loss, z = lm_loss(logits, labels, z_loss=self.config.z_loss, kernels=kernels)
        out = FlashT5Seq2SeqLMOutput(
            loss=loss, logits=logits, past_key_values=cache, encoder_last_hidden_state=enc.last_hidden_state, z_loss=z
        )
        return out if return_dict is not False else out.to_tuple()


class _EncoderView(nn.Module):
    """What ``generate`` calls as ``model.get_encoder()(input_ids=..., attention_mask=...)``."""

    def __init__(self, parent: FlashT5PreTrainedModel):
        super().__init__()
        self._parent = [parent]  # a list, so the parent is not registered as a submodule

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs: Any) -> BaseModelOutput:
        hidden, _ = self._parent[0]._encode(input_ids, attention_mask, inputs_embeds, _packing(kwargs))
        return BaseModelOutput(last_hidden_state=hidden)


class FlashT5EncoderModel(FlashT5PreTrainedModel):
    """The encoder alone (transformers' ``T5EncoderModel``)."""

    def __init__(self, config: FlashT5Config):
        super().__init__(config)
        self.model = T5(config, decoder=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutput | tuple:
        self._unsupported(output_attentions, output_hidden_states)
        hidden, _ = self._encode(input_ids, attention_mask, inputs_embeds, _packing(kwargs))
        out = BaseModelOutput(last_hidden_state=hidden)
        return out if return_dict is not False else out.to_tuple()


class ClassificationHead(nn.Module):
    """dense -> tanh -> out_proj on one sentence representation (transformers' ``T5ClassificationHead``)."""

    def __init__(self, config: FlashT5Config):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.dropout = nn.Dropout(p=config.classifier_dropout)
        self.out_proj = nn.Linear(config.d_model, config.num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.dense(self.dropout(x)))
        return self.out_proj(self.dropout(x))


def classification_loss(config: FlashT5Config, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Regression, single- or multi-label loss, chosen as transformers chooses it."""
    if config.problem_type is None:
        if config.num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        return F.mse_loss(logits.squeeze(), labels.squeeze()) if config.num_labels == 1 else F.mse_loss(logits, labels)
    if config.problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, config.num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels)


class FlashT5ForSequenceClassification(FlashT5PreTrainedModel):
    """Classification from the decoder state at the last EOS (transformers' ``T5ForSequenceClassification``)."""

    def __init__(self, config: FlashT5Config):
        super().__init__(config)
        self.model = T5(config, lm_head=False)
        self.classification_head = ClassificationHead(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> Seq2SeqSequenceClassifierOutput | tuple:
        self._unsupported(output_attentions, output_hidden_states)
        if input_ids is None:
            raise ValueError("FlashT5ForSequenceClassification needs input_ids (it locates the EOS tokens).")
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self._shift_right(input_ids)
        hidden, enc, _ = self._seq2seq(
            input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask, encoder_outputs=encoder_outputs, past_key_values=None,
            inputs_embeds=inputs_embeds, decoder_inputs_embeds=decoder_inputs_embeds, labels=None, use_cache=False,
            packing=_packing(kwargs),
        )  # fmt: skip
        eos = input_ids.eq(self.config.eos_token_id)
        counts = eos.sum(1)
        if bool((counts == 0).any()) or torch.unique(counts).numel() != 1:
            raise ValueError(
                "every example of input_ids must contain the same number (>= 1) of EOS tokens "
                f"(eos_token_id={self.config.eos_token_id}); got counts {counts.tolist()}."
            )
        batch, width = hidden.shape[0], hidden.shape[-1]
        sentence = hidden[eos, :].view(batch, -1, width)[:, -1, :]
        logits = self.classification_head(sentence)
        loss = classification_loss(self.config, logits, labels) if labels is not None else None
        out = Seq2SeqSequenceClassifierOutput(loss=loss, logits=logits, encoder_last_hidden_state=enc.last_hidden_state)
        return out if return_dict is not False else out.to_tuple()


class FlashT5ForTokenClassification(FlashT5PreTrainedModel):
    """Per-token labels from the encoder (transformers' ``T5ForTokenClassification``)."""

    def __init__(self, config: FlashT5Config):
        super().__init__(config)
        self.model = T5(config, decoder=False)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.d_model, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> TokenClassifierOutput | tuple:
        self._unsupported(output_attentions, output_hidden_states)
        hidden, _ = self._encode(input_ids, attention_mask, inputs_embeds, _packing(kwargs))
        logits = self.classifier(self.dropout(hidden))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.config.num_labels), labels.view(-1).to(logits.device))
        out = TokenClassifierOutput(loss=loss, logits=logits)
        return out if return_dict is not False else out.to_tuple()


class FlashT5ForQuestionAnswering(FlashT5PreTrainedModel):
    """Extractive QA: start/end logits from the decoder (transformers' ``T5ForQuestionAnswering``)."""

    def __init__(self, config: FlashT5Config):
        super().__init__(config)
        self.model = T5(config, lm_head=False)
        self.qa_outputs = nn.Linear(config.d_model, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: Any = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> Seq2SeqQuestionAnsweringModelOutput | tuple:
        self._unsupported(output_attentions, output_hidden_states)
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids, decoder_input_ids or decoder_inputs_embeds.")
            decoder_input_ids = self._shift_right(input_ids)
        hidden, enc, _ = self._seq2seq(
            input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask, encoder_outputs=encoder_outputs, past_key_values=None,
            inputs_embeds=inputs_embeds, decoder_inputs_embeds=decoder_inputs_embeds, labels=None, use_cache=False,
            packing=_packing(kwargs),
        )  # fmt: skip
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in self.qa_outputs(hidden).split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.size(1)  # positions outside the inputs are ignored, as in transformers
            start = start_positions.reshape(-1).clamp(0, ignored).to(start_logits.device)
            end = end_positions.reshape(-1).clamp(0, ignored).to(end_logits.device)
            loss = (
                F.cross_entropy(start_logits, start, ignore_index=ignored)
                + F.cross_entropy(end_logits, end, ignore_index=ignored)
            ) / 2
        out = Seq2SeqQuestionAnsweringModelOutput(
            loss=loss, start_logits=start_logits, end_logits=end_logits,
            encoder_last_hidden_state=enc.last_hidden_state,
        )  # fmt: skip
        return out if return_dict is not False else out.to_tuple()
