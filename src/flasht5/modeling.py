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
from transformers import initialization as hf_init
from transformers.modeling_outputs import (
    BaseModelOutput,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
    Seq2SeqQuestionAnsweringModelOutput,
    Seq2SeqSequenceClassifierOutput,
    TokenClassifierOutput,
)

from flasht5.config import FlashT5Config
from flasht5.generation import GenerationHooks, HFCacheAdapter, new_hf_cache
from flasht5.layout import Layout, shift_right
from flasht5.model import OWN_INIT, T5, Encoded, check_backend, default_backend


@dataclass
class FlashT5Seq2SeqLMOutput(Seq2SeqLMOutput):
    """transformers' ``Seq2SeqLMOutput`` plus ``z_loss`` (the z-term included in ``loss``, for logging).

    ``logits`` is None when the loss was computed by the fused LM head + cross-entropy (training with the flash
    backend): the full logits are never materialised there.
    """

    z_loss: torch.FloatTensor | None = None


def _flat_tokens(x: torch.Tensor | None, cu: torch.Tensor | None) -> torch.Tensor | None:
    """Varlen inputs may come as (T,); the model takes (1, T)."""
    return x[None] if x is not None and cu is not None and x.dim() == 1 else x


_PACKING = ("segment_ids", "cu_seqlens", "max_seqlen")
_IGNORED = ("cache_position", "num_items_in_batch", "return_dict", "output_attentions", "output_hidden_states")


def _packing(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop flasht5's packed-batch arguments (and their ``decoder_`` twins) from **kwargs; reject anything else."""
    for name in ("position_ids", "decoder_position_ids"):
        if kwargs.get(name) is not None:
            raise ValueError(
                f"{name} is not accepted: flasht5 derives positions from the layout (they restart at 0 in every "
                "document of segment_ids / cu_seqlens), the same way on every backend."
            )
        kwargs.pop(name, None)
    packing = {k: kwargs.pop(k) for k in (*_PACKING, *(f"decoder_{n}" for n in _PACKING)) if k in kwargs}
    for ignorable in _IGNORED:
        kwargs.pop(ignorable, None)
    if kwargs:
        raise ValueError(f"unexpected forward arguments: {sorted(kwargs)}")
    return packing


def _layout(ref: torch.Tensor, mask: torch.Tensor | None, packing: dict[str, Any], prefix: str, name: str) -> Layout:
    """The layout of one side from Hugging Face-style arguments (``prefix``: "" or "decoder_")."""
    return Layout.from_hf(
        ref.shape[0], ref.shape[1], attention_mask=mask, segment_ids=packing.get(f"{prefix}segment_ids"),
        cu_seqlens=packing.get(f"{prefix}cu_seqlens"), max_seqlen=packing.get(f"{prefix}max_seqlen"), name=name,
        prefix=prefix,
    )  # fmt: skip


class _Recorder:
    """While active, every attention module of the core appends its weights (eager backend) to a list; the tuples
    come out per stack in Hugging Face's order (one (B, H, Lq, Lk) tensor per layer)."""

    def __init__(self, core: T5, on: bool):
        self.on = on
        self.stacks = {"encoder": [b.attn for b in core.encoder.layers]}
        if core.decoder is not None:
            self.stacks["decoder"] = [b.attn for b in core.decoder.layers]
            self.stacks["cross"] = [b.cross_attn for b in core.decoder.layers]

    def __enter__(self) -> _Recorder:
        if self.on:
            for mods in self.stacks.values():
                for m in mods:
                    m.record = []
        return self

    def __exit__(self, *exc: Any) -> None:
        self.taken = {k: [m.record for m in mods] for k, mods in self.stacks.items()} if self.on else {}
        for mods in self.stacks.values():
            for m in mods:
                m.record = None

    def get(self, stack: str, given: Any = None) -> tuple[torch.Tensor, ...] | None:
        """The stack's per-layer weights; for the encoder of a call given ``encoder_outputs``, theirs."""
        if not self.on:
            return None
        recs = self.taken.get(stack) or []
        if recs and all(recs):
            return tuple(r[0] for r in recs)
        return getattr(given, "attentions", None) if stack == "encoder" else None


def _seq2seq_attentions(rec: _Recorder, encoder_outputs: Any) -> dict[str, Any]:
    """The three attention tuples of transformers' seq2seq outputs (None unless output_attentions)."""
    return dict(
        encoder_attentions=rec.get("encoder", encoder_outputs),
        decoder_attentions=rec.get("decoder"),
        cross_attentions=rec.get("cross"),
    )


class FlashT5PreTrainedModel(PreTrainedModel):
    """The Hugging Face face of :class:`flasht5.model.T5`: argument translation, output classes, loading."""

    config_class = FlashT5Config
    config: FlashT5Config
    # transformers' T5 value. No flasht5 class has a module of that name, so ``base_model`` is the model itself (a
    # PreTrainedModel, as for transformers' T5ForConditionalGeneration), never the bare core in ``self.model``.
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _keep_in_fp32_modules = ["wo"]
    _supports_sdpa = True
    has_decoder = True  # the checkpoint's decoder weights are used (convert ignores them for encoder-only heads)

    # -- the backend: Hugging Face's attn_implementation, resolved into the model's kernel bundle ---------------
    def _check_and_adjust_attn_implementation(
        self, attn_implementation: str | None, is_init_check: bool = False, allow_all_kernels: bool = False
    ) -> str:
        backend = attn_implementation or default_backend(self.config.d_kv)
        try:
            check_backend(backend, self.config.d_kv)
        except ValueError as e:  # transformers' wording first (tools match it), then ours
            raise ValueError(f'Specified `attn_implementation="{backend}"` is not supported. {e}') from None
        return backend

    def set_attn_implementation(self, attn_implementation: str | dict, allow_all_kernels: bool = False) -> None:
        self.config._attn_implementation = self._check_and_adjust_attn_implementation(attn_implementation)
        self.model.set_backend(self.config._attn_implementation)

    def _new_core(self, **kwargs: Any) -> T5:
        return T5(self.config, backend=self.config._attn_implementation, **kwargs)

    # -- loading: flasht5 folders, or stock Hugging Face T5 / mT5 / umT5 folders converted on the fly ------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        """Load a local flasht5 or transformers T5 / mT5 / umT5 folder; ``"hf:ORG/NAME"`` downloads from the Hub.

        A path that is not a local folder is an error, not a Hub lookup (see :func:`flasht5.convert.local_checkpoint`;
        ``revision``, ``cache_dir``, ``token``, ``force_download`` and ``local_files_only`` apply to ``hf:`` ids).
        """
        from flasht5 import convert

        ignore = bool(kwargs.get("ignore_mismatched_sizes", False))
        if pretrained_model_name_or_path is None:  # transformers' way to build from config= and state_dict=
            if kwargs.get("config") is None or kwargs.get("state_dict") is None:
                raise ValueError("from_pretrained(None, ...) needs both config= and state_dict=")
            want_info = kwargs.pop("output_loading_info", False)
            model, info = super().from_pretrained(None, *args, output_loading_info=True, **kwargs)
            convert.check_loading_info(cls, info, ignore_mismatched_sizes=ignore)
            return (model, info) if want_info else model
        hub = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "token", "force_download") if k in kwargs}
        if "local_files_only" in kwargs:
            hub["local_files_only"] = kwargs.pop("local_files_only")
        path = convert.local_checkpoint(pretrained_model_name_or_path, hub)
        if convert.is_hf_t5_folder(path):
            return convert.from_hf(path, cls, **kwargs)
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
        except Exception as e:
            if type(e).__name__ != "SafetensorError":
                raise
            files = ", ".join(str(f) for f in convert.weight_files(path))
            raise ValueError(f"cannot read the weights in {files}: SafetensorError: {e}") from None
        convert.check_loading_info(cls, info, ignore_mismatched_sizes=ignore)
        return (model, info) if want_info else model

    # -- initialisation: the modules' own (Mesh TensorFlow's scheme), through transformers' initialisers --------
    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # transformers skips modules of "custom code" that own no parameters directly, which would skip Attention
        # and MLP, whose children's init they set. transformers.initialization leaves loaded tensors alone.
        super()._initialize_weights(module, is_custom_code=False)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, OWN_INIT):
            module.reset_parameters(hf_init)
        elif isinstance(module, _HEADS):
            module.reset_parameters(hf_init, self.config)

    # -- shared plumbing ----------------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.shared

    def get_decoder(self) -> nn.Module:
        """The decoder stack (``model.decoder``), as transformers' T5 returns its ``decoder``; encoder-only classes
        have none and return themselves, as transformers' default does."""
        return self.model.decoder if getattr(self.model, "decoder", None) is not None else self

    def set_decoder(self, decoder: nn.Module) -> None:
        self.model.decoder = decoder

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.shared = value

    def _attentions(self, output_attentions: bool | None) -> _Recorder:
        """Hugging Face's ``output_attentions`` (the config's by default): the eager backend records every layer's
        attention weights; sdpa and flash never materialise them, so asking there is an error."""
        on = bool(self.config.output_attentions if output_attentions is None else output_attentions)
        if on and self.model.backend != "eager":
            raise ValueError(
                f"output_attentions needs attn_implementation='eager' (this model runs {self.model.backend!r}, which "
                "never materialises attention weights): load with attn_implementation='eager' or call "
                "model.set_attn_implementation('eager')."
            )
        return _Recorder(self.model, on)

    def _hidden_states(self, output_hidden_states: bool | None) -> bool:
        return bool(self.config.output_hidden_states if output_hidden_states is None else output_hidden_states)

    def _encode(
        self, input_ids, attention_mask, inputs_embeds, packing: dict[str, Any], output_hidden_states: bool = False
    ) -> Encoded:
        input_ids = _flat_tokens(input_ids, packing.get("cu_seqlens"))
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("pass input_ids or inputs_embeds.")
        layout = _layout(ref, attention_mask, packing, "", "input_ids")
        return self.model.encode(
            input_ids, layout, inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states
        )

    def _shift_right(self, ids: torch.Tensor) -> torch.Tensor:
        """Decoder inputs from one-document rows (labels, or input_ids for the classification / QA heads)."""
        return shift_right(ids, Layout.dense(*ids.shape), self.config.decoder_start_token_id, self.config.pad_token_id)

    def _head_backbone(self, **kw: Any):
        """:meth:`_backbone` as the task heads run it: no labels, no cache, the decoder's hidden states only."""
        out, _ = self._backbone(past_key_values=None, labels=None, use_cache=False, return_logits=False, **kw)
        return out

    def _backbone(
        self, *, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs,
        past_key_values, inputs_embeds, decoder_inputs_embeds, labels, use_cache, kwargs: dict[str, Any],
        return_logits: bool | None = True, output_hidden_states: bool = False,
    ):  # fmt: skip
        """Translate Hugging Face's arguments and run :meth:`flasht5.model.T5.forward`; returns (its output, the
        decoder hidden states in the token tensor's layout, the cache or None)."""
        packing = _packing(kwargs)
        if encoder_outputs is None:
            encoded = self._encode(input_ids, attention_mask, inputs_embeds, packing, output_hidden_states)
        else:
            hidden = encoder_outputs[0]
            encoded = self.model.encoded_from(hidden, _layout(hidden, attention_mask, packing, "", "encoder_outputs"))
            if isinstance(encoder_outputs, BaseModelOutput):
                encoded.hidden_states = encoder_outputs.hidden_states
        d_cu = packing.get("decoder_cu_seqlens")
        decoder_input_ids, labels = _flat_tokens(decoder_input_ids, d_cu), _flat_tokens(labels, d_cu)
        if use_cache is None:  # transformers' default (the config's), outside training and packed decoder batches
            use_cache = (
                bool(self.config.use_cache) and not self.training and not any(k.startswith("decoder_") for k in packing)
            )
        if past_key_values is None and use_cache:
            past_key_values = new_hf_cache()
        cache = HFCacheAdapter(past_key_values) if past_key_values is not None else None
        ref = next((t for t in (decoder_input_ids, decoder_inputs_embeds, labels) if t is not None), None)
        if ref is None:
            raise ValueError("pass decoder_input_ids, decoder_inputs_embeds or labels.")
        dec, key_mask = None, None
        if cache is None:
            dec = _layout(ref, decoder_attention_mask, packing, "decoder_", "decoder_input_ids")
        elif decoder_attention_mask is not None:
            # During cached decoding the mask may cover the cache and the new rows, or the new rows only.
            past, (B, Lq) = cache.past_length(), ref.shape[:2]
            if (
                decoder_attention_mask.dim() != 2
                or decoder_attention_mask.shape[0] != B
                or decoder_attention_mask.shape[1] not in (Lq, past + Lq)
            ):
                raise ValueError(
                    f"decoder_attention_mask has shape {tuple(decoder_attention_mask.shape)}; with decoder_input_ids "
                    f"of shape {(B, Lq)} and {past} cached tokens it must be {(B, Lq)} or {(B, past + Lq)}"
                )
            if decoder_attention_mask.shape[-1] == past + Lq:
                key_mask = decoder_attention_mask
            else:
                key_mask = torch.cat([decoder_attention_mask.new_ones(B, past), decoder_attention_mask], dim=1)
        if decoder_input_ids is None and decoder_inputs_embeds is None and cache is not None:
            decoder_input_ids = self._shift_right(labels)
        out = self.model(
            decoder_input_ids=decoder_input_ids, labels=labels, dec=dec, decoder_inputs_embeds=decoder_inputs_embeds,
            encoded=encoded, cache=cache, key_mask=key_mask, return_logits=return_logits,
            output_hidden_states=output_hidden_states,
        )  # fmt: skip
        return out, past_key_values


class FlashT5Model(FlashT5PreTrainedModel):
    """Encoder-decoder without a head (transformers' ``T5Model``)."""

    def __init__(self, config: FlashT5Config):
        super().__init__(config)
        self.model = self._new_core(lm_head=False)
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
        output_hidden_states = self._hidden_states(output_hidden_states)
        with self._attentions(output_attentions) as rec:
            out, cache = self._backbone(
                input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask, encoder_outputs=encoder_outputs,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                decoder_inputs_embeds=decoder_inputs_embeds, labels=None, use_cache=use_cache, kwargs=kwargs,
                return_logits=False, output_hidden_states=output_hidden_states,
            )  # fmt: skip
        res = Seq2SeqModelOutput(
            last_hidden_state=out.hidden, past_key_values=cache, encoder_last_hidden_state=out.encoded.hidden,
            decoder_hidden_states=out.decoder_hidden_states, encoder_hidden_states=out.encoded.hidden_states,
            **_seq2seq_attentions(rec, encoder_outputs),
        )  # fmt: skip
        return res if return_dict is not False else res.to_tuple()


class FlashT5ForConditionalGeneration(GenerationHooks, FlashT5PreTrainedModel, GenerationMixin):
    """T5 with its LM head (transformers' ``T5ForConditionalGeneration``), including ``generate``.

    In training with the flash backend the LM head is fused into the loss and ``logits`` is None."""

    def __init__(self, config: FlashT5Config):
        super().__init__(config)
        self.model = self._new_core()
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
        output_hidden_states = self._hidden_states(output_hidden_states)
        with self._attentions(output_attentions) as rec:
            out, cache = self._backbone(
                input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask, encoder_outputs=encoder_outputs,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                decoder_inputs_embeds=decoder_inputs_embeds, labels=labels, use_cache=use_cache, kwargs=kwargs,
                return_logits=not self.training or self.model.kernels.lm_loss is None,
                output_hidden_states=output_hidden_states,
            )  # fmt: skip
        res = FlashT5Seq2SeqLMOutput(
            loss=out.loss, logits=out.logits, past_key_values=cache, encoder_last_hidden_state=out.encoded.hidden,
            z_loss=out.z_loss, decoder_hidden_states=out.decoder_hidden_states,
            encoder_hidden_states=out.encoded.hidden_states, **_seq2seq_attentions(rec, encoder_outputs),
        )  # fmt: skip
        return res if return_dict is not False else res.to_tuple()


class _EncoderView(nn.Module):
    """What ``generate`` calls as ``model.get_encoder()(input_ids=..., attention_mask=...)``."""

    def __init__(self, parent: FlashT5PreTrainedModel):
        super().__init__()
        self._parent = [parent]  # a list, so the parent is not registered as a submodule

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs: Any) -> BaseModelOutput:
        parent = self._parent[0]
        states = parent._hidden_states(kwargs.pop("output_hidden_states", None))
        with parent._attentions(kwargs.pop("output_attentions", None)) as rec:
            encoded = parent._encode(input_ids, attention_mask, inputs_embeds, _packing(kwargs), states)
        return BaseModelOutput(
            last_hidden_state=encoded.hidden, hidden_states=encoded.hidden_states, attentions=rec.get("encoder")
        )


class FlashT5EncoderModel(FlashT5PreTrainedModel):
    """The encoder alone (transformers' ``T5EncoderModel``)."""

    has_decoder = False
    # a full model's folder loads into the encoder alone (transformers' T5EncoderModel ignores "decoder" too)
    _keys_to_ignore_on_load_unexpected = [r"^model\.decoder\.", r"^model\.lm_head\."]

    def __init__(self, config: FlashT5Config):
        super().__init__(config)
        self.model = self._new_core(decoder=False)
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
        output_hidden_states = self._hidden_states(output_hidden_states)
        with self._attentions(output_attentions) as rec:
            encoded = self._encode(input_ids, attention_mask, inputs_embeds, _packing(kwargs), output_hidden_states)
        out = BaseModelOutput(
            last_hidden_state=encoded.hidden, hidden_states=encoded.hidden_states, attentions=rec.get("encoder")
        )
        return out if return_dict is not False else out.to_tuple()


class ClassificationHead(nn.Module):
    """dense -> tanh -> out_proj on one sentence representation (transformers' ``T5ClassificationHead``)."""

    def __init__(self, config: FlashT5Config):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.dropout = nn.Dropout(p=config.classifier_dropout)
        self.out_proj = nn.Linear(config.d_model, config.num_labels)

    def reset_parameters(self, init: Any, config: FlashT5Config) -> None:
        for lin in (self.dense, self.out_proj):
            init.normal_(lin.weight, mean=0.0, std=config.initializer_factor * config.d_model**-0.5)
            init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.dense(self.dropout(x)))
        return self.out_proj(self.dropout(x))


class TokenClassificationHead(nn.Module):
    """dropout -> linear per token (transformers' ``T5ForTokenClassification`` head)."""

    def __init__(self, config: FlashT5Config):
        super().__init__()
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.d_model, config.num_labels)

    def reset_parameters(self, init: Any, config: FlashT5Config) -> None:
        init.normal_(self.classifier.weight, mean=0.0, std=config.initializer_factor * 1.0)
        init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(x))


class QAHead(nn.Module):
    """Start / end logits per token (transformers' ``T5ForQuestionAnswering`` head)."""

    def __init__(self, config: FlashT5Config):
        super().__init__()
        self.qa_outputs = nn.Linear(config.d_model, config.num_labels)

    def reset_parameters(self, init: Any, config: FlashT5Config) -> None:
        init.normal_(self.qa_outputs.weight, mean=0.0, std=config.initializer_factor * config.d_model**-0.5)
        init.zeros_(self.qa_outputs.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.qa_outputs(x).split(1, dim=-1)
        return start.squeeze(-1).contiguous(), end.squeeze(-1).contiguous()


_HEADS = (ClassificationHead, TokenClassificationHead, QAHead)


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
        self.model = self._new_core(lm_head=False)
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
        output_hidden_states = self._hidden_states(output_hidden_states)
        rec = self._attentions(output_attentions)
        if input_ids is None:
            raise ValueError("FlashT5ForSequenceClassification needs input_ids (it locates the EOS tokens).")
        eos = input_ids.eq(self.config.eos_token_id)
        counts = eos.sum(1)
        if bool((counts == 0).any()) or torch.unique(counts).numel() != 1:
            raise ValueError(
                "every example of input_ids must contain the same number (>= 1) of EOS tokens "
                f"(eos_token_id={self.config.eos_token_id}); got counts {counts.tolist()}."
            )
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self._shift_right(input_ids)
        with rec:
            out = self._head_backbone(
                input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask, encoder_outputs=encoder_outputs,
                inputs_embeds=inputs_embeds, decoder_inputs_embeds=decoder_inputs_embeds, kwargs=kwargs,
                output_hidden_states=output_hidden_states,
            )  # fmt: skip
        hidden = out.hidden
        batch, width = hidden.shape[0], hidden.shape[-1]
        sentence = hidden[eos, :].view(batch, -1, width)[:, -1, :]
        logits = self.classification_head(sentence)
        loss = classification_loss(self.config, logits, labels) if labels is not None else None
        res = Seq2SeqSequenceClassifierOutput(
            loss=loss, logits=logits, encoder_last_hidden_state=out.encoded.hidden,
            decoder_hidden_states=out.decoder_hidden_states, encoder_hidden_states=out.encoded.hidden_states,
            **_seq2seq_attentions(rec, encoder_outputs),
        )  # fmt: skip
        return res if return_dict is not False else res.to_tuple()


class FlashT5ForTokenClassification(FlashT5PreTrainedModel):
    """Per-token labels from the encoder (transformers' ``T5ForTokenClassification``)."""

    has_decoder = False
    # a full model's folder loads into the encoder alone (transformers' T5EncoderModel ignores "decoder" too)
    _keys_to_ignore_on_load_unexpected = [r"^model\.decoder\.", r"^model\.lm_head\."]

    def __init__(self, config: FlashT5Config):
        super().__init__(config)
        self.model = self._new_core(decoder=False)
        self.head = TokenClassificationHead(config)
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
        output_hidden_states = self._hidden_states(output_hidden_states)
        with self._attentions(output_attentions) as rec:
            encoded = self._encode(input_ids, attention_mask, inputs_embeds, _packing(kwargs), output_hidden_states)
        logits = self.head(encoded.hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.config.num_labels), labels.view(-1).to(logits.device))
        out = TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=encoded.hidden_states, attentions=rec.get("encoder")
        )
        return out if return_dict is not False else out.to_tuple()


class FlashT5ForQuestionAnswering(FlashT5PreTrainedModel):
    """Extractive QA: start/end logits from the decoder (transformers' ``T5ForQuestionAnswering``)."""

    def __init__(self, config: FlashT5Config):
        super().__init__(config)
        self.model = self._new_core(lm_head=False)
        self.head = QAHead(config)
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
        output_hidden_states = self._hidden_states(output_hidden_states)
        rec = self._attentions(output_attentions)
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids, decoder_input_ids or decoder_inputs_embeds.")
            decoder_input_ids = self._shift_right(input_ids)
        with rec:
            out = self._head_backbone(
                input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask, encoder_outputs=encoder_outputs,
                inputs_embeds=inputs_embeds, decoder_inputs_embeds=decoder_inputs_embeds, kwargs=kwargs,
                output_hidden_states=output_hidden_states,
            )  # fmt: skip
        start_logits, end_logits = self.head(out.hidden)
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.size(1)  # positions outside the inputs are ignored, as in transformers
            start = start_positions.reshape(-1).clamp(0, ignored).to(start_logits.device)
            end = end_positions.reshape(-1).clamp(0, ignored).to(end_logits.device)
            loss = (
                F.cross_entropy(start_logits, start, ignore_index=ignored)
                + F.cross_entropy(end_logits, end, ignore_index=ignored)
            ) / 2
        res = Seq2SeqQuestionAnsweringModelOutput(
            loss=loss, start_logits=start_logits, end_logits=end_logits,
            encoder_last_hidden_state=out.encoded.hidden, decoder_hidden_states=out.decoder_hidden_states,
            encoder_hidden_states=out.encoded.hidden_states, **_seq2seq_attentions(rec, encoder_outputs),
        )  # fmt: skip
        return res if return_dict is not False else res.to_tuple()
