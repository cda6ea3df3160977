"""The pieces of tests/hf_suite's test files: flasht5's model tester and the suite's test classes, built from
transformers' own ``ModelTesterMixin`` (assertions untouched). The test files only bind a part of them, so that
pytest-xdist's ``--dist loadfile`` (``make test``) spreads the suite over the cores."""

from __future__ import annotations

import unittest

from hf_suite_upstream import WHY_NOT

if not WHY_NOT:
    from hf_upstream.generation.test_utils import GenerationTesterMixin
    from hf_upstream.test_modeling_common import ModelTesterMixin, ids_tensor

from flasht5 import (
    FlashT5Config,
    FlashT5EncoderModel,
    FlashT5ForConditionalGeneration,
    FlashT5ForQuestionAnswering,
    FlashT5ForSequenceClassification,
    FlashT5ForTokenClassification,
    FlashT5Model,
)

SEQ2SEQ_CLASSES = (
    FlashT5Model, FlashT5ForConditionalGeneration, FlashT5ForSequenceClassification, FlashT5ForQuestionAnswering,
)  # fmt: skip
ENCODER_CLASSES = (FlashT5EncoderModel, FlashT5ForTokenClassification)


class FlashT5ModelTester:
    """Tiny configs and inputs (transformers' T5 tester's sizes: vocab 99, batch 13, 7 tokens, d_model 32, 4 heads,
    d_ff 37, 8 buckets; eos 1, pad 0, decoder start 0; 2 layers, as test_num_layers_is_small asks). Encoder and
    decoder have the same length: the common eager-vs-sdpa test passes the encoder's attention mask as the
    decoder's (its own TODO says so), and the classification head reads the decoder state at the encoder's EOS
    positions."""

    def __init__(self, parent, *, encoder_only: bool = False, batch_size: int = 13, encoder_seq_length: int = 7,
                 decoder_seq_length: int = 7, vocab_size: int = 99, hidden_size: int = 32, num_hidden_layers: int = 2,
                 num_attention_heads: int = 4, d_ff: int = 37, relative_attention_num_buckets: int = 8,
                 dropout_rate: float = 0.1, initializer_factor: float = 0.002, eos_token_id: int = 1,
                 pad_token_id: int = 0, decoder_start_token_id: int = 0, is_training: bool = True):  # fmt: skip
        self.parent, self.encoder_only = parent, encoder_only
        self.batch_size, self.vocab_size, self.hidden_size = batch_size, vocab_size, hidden_size
        self.encoder_seq_length, self.decoder_seq_length = encoder_seq_length, decoder_seq_length
        self.seq_length = encoder_seq_length if encoder_only else decoder_seq_length  # what the common tests use
        self.num_hidden_layers, self.num_attention_heads, self.d_ff = num_hidden_layers, num_attention_heads, d_ff
        self.relative_attention_num_buckets, self.dropout_rate = relative_attention_num_buckets, dropout_rate
        self.initializer_factor, self.is_training = initializer_factor, is_training
        self.eos_token_id, self.pad_token_id, self.decoder_start_token_id = (
            eos_token_id, pad_token_id, decoder_start_token_id,
        )  # fmt: skip

    def get_config(self) -> FlashT5Config:
        return FlashT5Config(
            vocab_size=self.vocab_size, d_model=self.hidden_size, d_ff=self.d_ff,
            d_kv=self.hidden_size // self.num_attention_heads, num_layers=self.num_hidden_layers,
            num_heads=self.num_attention_heads, relative_attention_num_buckets=self.relative_attention_num_buckets,
            dropout_rate=self.dropout_rate, initializer_factor=self.initializer_factor,
            eos_token_id=self.eos_token_id, bos_token_id=self.pad_token_id, pad_token_id=self.pad_token_id,
            decoder_start_token_id=self.decoder_start_token_id, is_encoder_decoder=not self.encoder_only,
        )  # fmt: skip

    def prepare_config_and_inputs(self):
        # the last token is EOS (the sequence-classification head reads the state there)
        input_ids = ids_tensor([self.batch_size, self.encoder_seq_length], self.vocab_size).clamp(2)
        input_ids[:, -1] = self.eos_token_id
        decoder_input_ids = ids_tensor([self.batch_size, self.decoder_seq_length], self.vocab_size).clamp(2)
        attention_mask = ids_tensor([self.batch_size, self.encoder_seq_length], vocab_size=2)
        decoder_attention_mask = ids_tensor([self.batch_size, self.decoder_seq_length], vocab_size=2)
        return self.get_config(), input_ids, decoder_input_ids, attention_mask, decoder_attention_mask

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, decoder_input_ids, attention_mask, decoder_attention_mask = self.prepare_config_and_inputs()
        if self.encoder_only:
            return config, {"input_ids": input_ids, "attention_mask": attention_mask}
        return config, {
            "input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids,
            "decoder_attention_mask": decoder_attention_mask,
        }  # fmt: skip


def seq2seq_suite(part: int, parts: int) -> type:
    """transformers' common tests on the seq2seq classes; only the ``part``-th of every ``parts`` tests (by name)."""

    class FlashT5ModelTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
        all_model_classes = SEQ2SEQ_CLASSES
        is_encoder_decoder = True

        def setUp(self):
            self.model_tester = FlashT5ModelTester(self)

    return _keep_part(FlashT5ModelTest, part, parts)


def encoder_suite() -> type:
    """transformers' common tests on the encoder-only classes."""

    class FlashT5EncoderOnlyModelTest(ModelTesterMixin, unittest.TestCase):
        all_model_classes = ENCODER_CLASSES
        is_encoder_decoder = False

        def setUp(self):
            # no training tests: the encoder model returns no loss (the common test_training expects one)
            self.model_tester = FlashT5ModelTester(self, encoder_only=True, is_training=False)

    return FlashT5EncoderOnlyModelTest


def test_names(cls: type) -> list[str]:
    return sorted(n for n in dir(cls) if n.startswith("test_") and callable(getattr(cls, n)))


def _keep_part(cls: type, part: int, parts: int) -> type:
    for i, name in enumerate(test_names(cls)):
        if i % parts != part:
            setattr(cls, name, None)  # unittest collects callables only
    return cls
