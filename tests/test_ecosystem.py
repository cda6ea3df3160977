"""The Hugging Face ecosystem around flasht5 (issue 12): Auto classes by path, PEFT defaults, loading corners,
dtype policy, gradient checkpointing, the ops package, export extras."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import transformers
from hf_utils import padded_batch, save_hf, tiny_hf

import flasht5
from flasht5 import FlashT5Config, FlashT5ForConditionalGeneration

ROOT = Path(__file__).resolve().parents[1]


def _tiny(**kw) -> FlashT5Config:
    base = dict(vocab_size=97, d_model=32, d_kv=16, d_ff=48, num_heads=4, num_layers=2, num_decoder_layers=2,
                dropout_rate=0.0, decoder_start_token_id=0, relative_attention_num_buckets=8,
                relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
                tie_word_embeddings=False)  # fmt: skip
    return FlashT5Config(**{**base, **kw})


def _model(seed: int = 0, cls=FlashT5ForConditionalGeneration, **kw):
    torch.manual_seed(seed)
    return cls(_tiny(**kw)).eval()


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter that sees this checkout's package (nothing imported beforehand)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TRANSFORMERS_VERBOSITY="error")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout


# ------------------------------------------------------------------------------------------------------------
# import flasht5 registers with the Auto classes (a folder loads by its path alone)
# ------------------------------------------------------------------------------------------------------------

AUTOS = {
    "AutoConfig": "FlashT5Config",
    "AutoModel": "FlashT5Model",
    "AutoModelForSeq2SeqLM": "FlashT5ForConditionalGeneration",
    "AutoModelForSequenceClassification": "FlashT5ForSequenceClassification",
    "AutoModelForTokenClassification": "FlashT5ForTokenClassification",
    "AutoModelForQuestionAnswering": "FlashT5ForQuestionAnswering",
    "AutoModelForTextEncoding": "FlashT5EncoderModel",
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft5") / "saved"
    _model().save_pretrained(out)
    return out


@pytest.mark.parametrize("transformers_first", [False, True], ids=["flasht5-first", "transformers-first"])
def test_import_alone_makes_every_auto_class_load_by_path(saved: Path, transformers_first: bool) -> None:
    first = "from transformers import AutoModelForSeq2SeqLM\n" if transformers_first else ""
    # the registration is lazy: nothing of transformers' model code is imported until an Auto module is
    lazy = "" if transformers_first else 'assert "flasht5.modeling" not in sys.modules and "torch" not in sys.modules\n'
    code = f"""{first}import sys, flasht5
{lazy}import transformers
for auto in {list(AUTOS)!r}:
    print(auto, type(getattr(transformers, auto).from_pretrained({str(saved)!r})).__name__)
"""
    lines = dict(line.split() for line in _python(code).splitlines())
    assert lines == AUTOS


def test_path_only_load_matches_the_saved_model(saved: Path) -> None:
    code = f"""import flasht5, torch
from transformers import AutoModelForSeq2SeqLM
m = AutoModelForSeq2SeqLM.from_pretrained({str(saved)!r}).eval()
ids = torch.arange(2, 14).view(2, 6)
print(m(input_ids=ids, labels=ids).loss.item())
"""
    ids = torch.arange(2, 14).view(2, 6)
    with torch.no_grad():
        want = _model()(input_ids=ids, labels=ids).loss.item()
    assert float(_python(code)) == pytest.approx(want, rel=1e-6)


def test_register_stays_an_idempotent_alias() -> None:
    flasht5.register()
    flasht5.register()
    cfg = transformers.AutoConfig.for_model("flasht5")
    assert isinstance(cfg, FlashT5Config)
    assert transformers.AutoModelForSeq2SeqLM.from_config(_tiny()).__class__ is FlashT5ForConditionalGeneration


# ------------------------------------------------------------------------------------------------------------
# Loading corners and the dtype policy
# ------------------------------------------------------------------------------------------------------------


def test_from_pretrained_none_with_config_and_state_dict() -> None:
    ref = _model(seed=3)
    got = FlashT5ForConditionalGeneration.from_pretrained(None, config=ref.config, state_dict=ref.state_dict()).eval()
    batch = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(got(**batch).logits, ref(**batch).logits)
    with pytest.raises(ValueError, match="state_dict"):
        FlashT5ForConditionalGeneration.from_pretrained(None, config=ref.config)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_wo_dtype_policy_is_transformers_on_both_load_paths(tmp_path: Path, dtype: torch.dtype) -> None:
    """transformers' T5 keeps ``wo`` in fp32 for fp16 loads only (``_keep_in_fp32_modules``); a stock folder and a
    folder flasht5 saved give flasht5 the same policy."""
    hf = tiny_hf("t5-v1.1")
    stock = save_hf(hf, tmp_path / "hf")
    want = transformers.T5ForConditionalGeneration.from_pretrained(stock, dtype=dtype)
    want_wo = want.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype
    want_wi = want.encoder.block[0].layer[1].DenseReluDense.wi_0.weight.dtype
    assert want_wi == dtype
    from_stock = FlashT5ForConditionalGeneration.from_pretrained(stock, dtype=dtype)
    from_stock.save_pretrained(tmp_path / "ft5")
    from_ours = FlashT5ForConditionalGeneration.from_pretrained(tmp_path / "ft5", dtype=dtype)
    for m in (from_stock, from_ours):
        mlp = m.model.decoder.layers[0].mlp
        assert (mlp.wo.weight.dtype, mlp.wi_0.weight.dtype) == (want_wo, want_wi)


# ------------------------------------------------------------------------------------------------------------
# get_decoder, gradient checkpointing
# ------------------------------------------------------------------------------------------------------------


def test_get_decoder_is_the_decoder_stack() -> None:
    m = _model()
    assert m.get_decoder() is m.model.decoder
    assert m.get_encoder() is not None
    enc = _model(cls=flasht5.FlashT5EncoderModel)
    assert not hasattr(enc.model, "decoder") or enc.model.decoder is None


@pytest.mark.parametrize("reentrant,backend", [(True, "eager"), (False, "eager"), (True, "flash")])
def test_gradient_checkpointing_kwargs_use_reentrant(reentrant: bool, backend: str) -> None:
    from torch.utils import checkpoint as ckpt

    m = _model(attn_implementation=backend, d_kv=16).train()  # flash takes head dims >= 16
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    batch = padded_batch()
    with mock.patch.object(ckpt.CheckpointFunction, "apply", wraps=ckpt.CheckpointFunction.apply) as apply:
        loss = m(**batch).loss
        loss.backward()
    assert (apply.call_count > 0) == reentrant
    assert apply.call_count in (0, 4)  # every layer of both stacks, or none
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)

    ref = _model(attn_implementation=backend, d_kv=16).train()
    ref(**batch).loss.backward()
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


# ------------------------------------------------------------------------------------------------------------
# flasht5.ops public functions
# ------------------------------------------------------------------------------------------------------------


def test_ops_names_are_the_functions_in_a_fresh_process() -> None:
    code = """import inspect
import flasht5.ops.norm, flasht5.ops.loss  # the submodules first: they must not shadow the functions
from flasht5.ops import rms_norm, cross_entropy, linear_cross_entropy
for f in (rms_norm, cross_entropy, linear_cross_entropy):
    print(f.__name__, inspect.isfunction(f))
"""
    assert _python(code).split() == ["rms_norm", "True", "cross_entropy", "True", "linear_cross_entropy", "True"]


# ------------------------------------------------------------------------------------------------------------
# flasht5 convert --to hf carries the generation config and the tokenizer
# ------------------------------------------------------------------------------------------------------------


def test_convert_to_hf_carries_generation_config_and_tokenizer(tmp_path: Path, saved: Path) -> None:
    from flasht5.cli import main

    src = tmp_path / "src"
    m = FlashT5ForConditionalGeneration.from_pretrained(saved)
    m.generation_config.max_new_tokens = 17
    m.generation_config.num_beams = 3
    m.save_pretrained(src)
    tok = {"tokenizer.json": "{}", "tokenizer_config.json": '{"model_max_length": 64}',
           "special_tokens_map.json": "{}", "spiece.model": "x"}  # fmt: skip
    for name, text in tok.items():
        (src / name).write_text(text)
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf"]) == 0
    out = tmp_path / "hf"
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["max_new_tokens"], gen["num_beams"]) == (17, 3)
    for name, text in tok.items():
        assert (out / name).read_text() == text
    hf = transformers.T5ForConditionalGeneration.from_pretrained(out)
    assert (hf.generation_config.max_new_tokens, hf.generation_config.num_beams) == (17, 3)
    # and back: a stock folder's generation config becomes the flasht5 model's
    back = FlashT5ForConditionalGeneration.from_pretrained(out)
    assert (back.generation_config.max_new_tokens, back.generation_config.num_beams) == (17, 3)


# ------------------------------------------------------------------------------------------------------------
# PEFT
# ------------------------------------------------------------------------------------------------------------


def test_peft_defaults_registered_in_either_import_order() -> None:
    pytest.importorskip("peft")
    code = """import sys
first, second = sys.argv[1:]
__import__(first); __import__(second)
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as lora
from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as ia3_ff
print(lora["flasht5"], ia3_ff["flasht5"])
"""
    for order in (["flasht5", "peft"], ["peft", "flasht5"]):
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        res = subprocess.run([sys.executable, "-c", code, *order], capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == ["['q',", "'v']", "['wo']"], (order, res.stdout)


def test_peft_lora_defaults_to_q_and_v_trains_saves_reloads(tmp_path: Path, saved: Path) -> None:
    peft = pytest.importorskip("peft")
    base = FlashT5ForConditionalGeneration.from_pretrained(saved, attn_implementation="eager")
    model = peft.get_peft_model(
        base, peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, init_lora_weights=False)
    )
    wrapped = {n.rsplit(".", 1)[-1] for n, mod in model.named_modules() if hasattr(mod, "lora_A")}
    assert wrapped == {"q", "v"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    batch = padded_batch()
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model(**batch).loss.backward()
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        want = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()

    fresh = FlashT5ForConditionalGeneration.from_pretrained(saved, attn_implementation="eager")
    again = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, want)
        plain = FlashT5ForConditionalGeneration.from_pretrained(saved, attn_implementation="eager").eval()
        assert not torch.allclose(plain(**batch).logits, want)


# ------------------------------------------------------------------------------------------------------------
# output_attentions: transformers' tuples on the eager backend, a clear error elsewhere
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["t5-v1.0", "umt5", "ul2"])
def test_output_attentions_eager_equal_transformers(family: str, tmp_path: Path) -> None:
    folder = save_hf(tiny_hf(family), tmp_path / "hf")
    hf = type(tiny_hf(family)).from_pretrained(folder, attn_implementation="eager").eval()
    ours = FlashT5ForConditionalGeneration.from_pretrained(folder, attn_implementation="eager")
    batch = padded_batch()
    with torch.no_grad():
        o, h = ours(**batch, output_attentions=True), hf(**batch, output_attentions=True)
        enc_o = ours.get_encoder()(batch["input_ids"], batch["attention_mask"], output_attentions=True)
    for name in ("encoder_attentions", "decoder_attentions", "cross_attentions"):
        got, want = getattr(o, name), getattr(h, name)
        assert isinstance(got, tuple) and len(got) == len(want), name
        for g, w in zip(got, want):
            assert g.shape == w.shape, name
            torch.testing.assert_close(g, w, msg=name)
    for g, w in zip(enc_o.attentions, h.encoder_attentions):
        torch.testing.assert_close(g, w)
    B, Le, Ld, H = 3, 11, 6, hf.config.num_heads
    assert o.encoder_attentions[0].shape == (B, H, Le, Le)
    assert o.decoder_attentions[0].shape == (B, H, Ld, Ld) and o.cross_attentions[0].shape == (B, H, Ld, Le)
    # cached decoding: one more token attends over the cache, as transformers' does
    with torch.no_grad():
        first = ours(**batch, use_cache=True)
        nxt = torch.full((B, 1), 5)
        step_o = ours(encoder_outputs=(first.encoder_last_hidden_state,), attention_mask=batch["attention_mask"],
                      decoder_input_ids=nxt, past_key_values=first.past_key_values, output_attentions=True)  # fmt: skip
        hf1 = hf(**batch, use_cache=True)
        step_h = hf(encoder_outputs=(hf1.encoder_last_hidden_state,), attention_mask=batch["attention_mask"],
                    decoder_input_ids=nxt, past_key_values=hf1.past_key_values, output_attentions=True)  # fmt: skip
    for g, w in zip(
        step_o.decoder_attentions + step_o.cross_attentions, step_h.decoder_attentions + step_h.cross_attentions
    ):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w)


def test_output_attentions_default_off_and_config_default(saved: Path) -> None:
    m = FlashT5ForConditionalGeneration.from_pretrained(saved, attn_implementation="eager")
    batch = padded_batch()
    with torch.no_grad():
        assert m(**batch).encoder_attentions is None
        m.config.output_attentions = True
        assert len(m(**batch).cross_attentions) == m.config.num_decoder_layers
    assert all(a.record is None for a in m.modules() if hasattr(a, "record"))  # nothing kept after the call


@pytest.mark.parametrize("backend", ["sdpa", "flash"])
def test_output_attentions_is_a_clear_error_off_eager(saved: Path, backend: str) -> None:
    m = FlashT5ForConditionalGeneration.from_pretrained(saved, attn_implementation=backend)
    with pytest.raises(ValueError, match="output_attentions needs attn_implementation='eager'"):
        m(**padded_batch(), output_attentions=True)
    enc = flasht5.FlashT5EncoderModel.from_pretrained(saved, attn_implementation=backend)
    with pytest.raises(ValueError, match="output_attentions needs attn_implementation='eager'"):
        enc(input_ids=torch.arange(2, 8)[None], output_attentions=True)
