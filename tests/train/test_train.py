"""The training skeleton: typed configs, AdamWScale, schedule, and the demo config actually learning."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flasht5.train.config import Config, load_config, parse_overrides
from flasht5.train.optim import AdamWScale, lr_at

DEMO = "configs/pretrain/demo.yaml"


def test_demo_config_loads_with_overrides():
    cfg = load_config(DEMO, ["--train.steps=7", "data.mode=padded", "--model.overrides.position_encoding=alibi"])
    assert isinstance(cfg, Config)
    assert cfg.train.steps == 7 and cfg.data.mode == "padded"
    assert cfg.model.overrides == {"position_encoding": "alibi"}
    assert cfg.optim.betas == (0.9, 0.999) and cfg.data.objective == "t5"


@pytest.mark.parametrize(
    "override, match",
    [
        ("--train.stepz=3", "unknown key"),
        ("--train.steps=many", "train.steps must be an integer"),
        ("--train.resume=maybe", "train.resume must be true or false"),
        ("--data.mode=dense", "data.mode"),
        ("--optim.betas=[0.9]", "optim.betas"),
        ("train.steps", "--section.key=value"),
    ],
)
def test_bad_config_values_raise(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(DEMO, [override])


def test_parse_overrides_types():
    assert parse_overrides(["--a.b=3", "--a.c=0.5", "--d=[1, 2]", "--e=null"]) == {
        "a": {"b": 3, "c": 0.5},
        "d": [1, 2],
        "e": None,
    }


def test_adamwscale_step_is_rms_scaled_adam():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 5) * 3)
    g = torch.randn(4, 5)
    p0 = p.detach().clone()
    opt = AdamWScale([p], lr=0.1, betas=(0.9, 0.99), eps=1e-8)
    p.grad = g
    opt.step()
    # first step: m_hat = g, v_hat = g^2 -> update = lr * rms(p) * g / (|g| + eps)
    rms = p0.pow(2).mean().sqrt()
    expected = p0 - 0.1 * rms * g / (g.abs() + 1e-8 * math.sqrt(1 - 0.99))
    torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
    z = torch.nn.Parameter(torch.zeros(3))  # tiny tensors still move: the RMS is floored at 1e-3
    opt = AdamWScale([z], lr=1.0)
    z.grad = torch.ones(3)
    opt.step()
    torch.testing.assert_close(z.detach(), torch.full((3,), -1e-3), rtol=1e-4, atol=1e-7)


def test_lr_schedule_warmup_then_cosine():
    kw = dict(total=100, warmup=10, schedule="cosine", final_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0) and lr_at(100, **kw) == pytest.approx(0.1)
    assert lr_at(55, **kw) == pytest.approx(0.55)
    assert lr_at(50, **dict(kw, schedule="constant")) == 1.0


def _tiny_run(tmp_path, steps, extra=()):
    from flasht5.train.loop import train

    cfg = load_config(
        DEMO,
        [
            f"--train.out_dir={tmp_path / 'run'}", f"--data.tokenizer={tmp_path / 'tok'}", f"--train.steps={steps}",
            "--data.vocab_size=600", "--data.tokenizer_sample=3000", "--data.max_tokens=512",
            "--data.max_input_len=64", "--data.max_target_len=16", "--data.eval_batches=2",
            "--model.overrides={d_model: 64, d_kv: 16, d_ff: 128, num_layers: 2, num_heads: 4}",
            "--optim.warmup_steps=3", "--train.eval_every=100", "--train.log_every=2", "--train.save_every=4",
            "--train.samples=1", "--train.progress=false", *extra,
        ],
    )  # fmt: skip
    return train(cfg)


def test_demo_config_trains_and_loss_goes_down(tmp_path):
    summary = _tiny_run(tmp_path, steps=12)
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.5, summary
    assert summary["initial_eval_loss"] < 9.0  # unit-variance logits at init: about ln(vocab)
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("tokens_per_s" in r for r in rows) and any("eval_loss" in r for r in rows)
    assert (run / "loss.png").stat().st_size > 1000
    assert (run / "final" / "model.safetensors").is_file() and (run / "final" / "tokenizer.json").is_file()
    assert len(summary["samples"]) == 1 and "<extra_id_0>" in summary["samples"][0]["input"]
    # Resuming from the last checkpoint continues the step count instead of starting over.
    resumed = _tiny_run(tmp_path, steps=14, extra=["--train.resume=true"])
    assert resumed["steps"] == 14
