"""The training config is strict (issue 14): every key known, every value in range, numbers in any spelling, and
every mistake a ``ValueError`` naming the key or file, raised by ``load_config`` before anything expensive runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flasht5.train.config import load_config, parse_overrides

DEMO = "configs/pretrain/demo.yaml"


def test_exponent_numbers_are_numbers(tmp_path: Path) -> None:
    """D10: `--optim.lr=1e-3` and `lr: 1e-3` were "optim.lr must be a number, got '1e-3'"."""
    assert load_config(DEMO, ["--optim.lr=1e-3"]).optim.lr == 1e-3
    assert load_config(DEMO, ["--optim.lr=5E-4", "--optim.eps=1e-9"]).optim.eps == 1e-9
    assert load_config(DEMO, ["--train.steps=1e3"]).train.steps == 1000  # an integral float for an int key
    assert load_config(DEMO, ['--optim.lr="2e-3"']).optim.lr == 2e-3  # quoted: a string, still a number
    assert parse_overrides(["--a=1e-3", "--b=-2.5e+2", "--c=1e3x"]) == {"a": 1e-3, "b": -250.0, "c": "1e3x"}
    yml = tmp_path / "c.yaml"
    yml.write_text(Path(DEMO).read_text().replace("lr: 0.02", "lr: 5e-4"))
    assert load_config(yml).optim.lr == 5e-4
    cfg = load_config(DEMO, ["--model.overrides={dropout_rate: 1e-1, z_loss: 1e-4, d_model: 64, d_kv: 16}"])
    assert cfg.model.overrides["dropout_rate"] == 0.1 and cfg.model.overrides["z_loss"] == 1e-4
    for bad, match in (("--optim.lr=1e-3x", "must be a number"), ("--optim.lr=nan", "finite"),
                       ("--train.steps=2.5", "must be an integer")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            load_config(DEMO, [bad])


@pytest.mark.parametrize(
    "override, match",
    [
        ("--model.overrides={num_layer: 1, dropout: 0.5}", r"unknown key\(s\) \['dropout', 'num_layer'\] in model.ov"),
        ("--model.overrides={d_mdoel: 64}", "'d_mdoel' -> 'd_model'"),
        ("--model.overrides={d_model: 0}", "model.overrides: d_model must be a positive integer"),
        ("--model.overrides={feed_forward_proj: gated-gleu}", "model.overrides: feed_forward_proj"),
    ],
)  # fmt: skip
def test_model_overrides_are_checked_against_the_config(override: str, match: str) -> None:
    """D5: typos in model.overrides were ignored (the default model trained; stray keys in config.json)."""
    with pytest.raises(ValueError, match=match):
        load_config(DEMO, [override])


@pytest.mark.parametrize(
    "override, match",
    [
        ("--train.save_every=-1", r"train.save_every must be >= 0, got -1 \(0: only at the end\)"),
        ("--optim.warmup_steps=-10", "optim.warmup_steps must be >= 0"),
        ("--optim.grad_clip=-1", "optim.grad_clip must be >= 0"),
        ("--train.keep_checkpoints=-1", "train.keep_checkpoints must be >= 1"),
        ("--train.keep_checkpoints=0", "train.keep_checkpoints must be >= 1"),
        ("--data.eval_batches=0", "data.eval_batches must be >= 1"),
        ("--data.eval_batches=-3", "data.eval_batches must be >= 1"),
        ("--optim.weight_decay=-1", "optim.weight_decay must be >= 0"),
        ("--data.max_target_len=1", "data.max_target_len must be >= 2"),
        ("--data.max_target_len=2", "leave no room for a target"),
        ("--train.threads=-2", "train.threads must be >= 0"),
        ("--optim.lr=-0.01", "optim.lr must be >= 0"),
        ("--optim.eps=0", "optim.eps must be > 0"),
        ("--optim.betas=[0.9, 1.0]", r"optim.betas\[1\] must be in \[0, 1\)"),
        ("--train.seed=-1", "train.seed must be in"),
        ("--data.max_input_len=0", "data.max_input_len must be >= 2"),
        ("--data.num_workers=-1", "data.num_workers must be >= 0"),
        ("--data.max_target_tokens=8", "data.max_target_tokens must be >= 32"),
        ("--data.row_len=256", "apply to data.mode=padded only"),
        ("--data.objective=ul3", r"data.objective must be one of \['fat5', 't5', 'ul2'\]"),
        ("--data.denoisers=[{mu: 0, r: 0.15}]", "data.denoisers: Denoiser mu"),
        ("--data.vocab_size=5", "data.vocab_size must be >= 11"),
        ("--train.device=gpu", "train.device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        ("--train.device=mps", "train.device must be auto, cpu, cuda or cuda:N"),
        ("--model.preset=t5-tiny", r"model.preset must be one of \[.*'t5-small'"),
        ("--model.attn_implementation=xformers", "model.attn_implementation must be one of"),
        ("--trian.steps=5", r"\['trian'\] in the top level \(sections\) \(did you mean 'trian' -> 'train'"),
        ("--train.stpes=5", r"in section 'train' \(did you mean 'stpes' -> 'steps'"),
    ],
)  # fmt: skip
def test_every_value_is_range_checked(override: str, match: str) -> None:
    """D17: these were accepted silently (or failed late, after the tokenizer, the store and the model)."""
    with pytest.raises(ValueError, match=match):
        load_config(DEMO, [override])


def test_cuda_device_without_cuda_is_refused_up_front(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device is available"):
        load_config(DEMO, ["--train.device=cuda"])


@pytest.mark.parametrize(
    "text, match",
    [
        ("train: {steps: 3", r"config file '.*c.yaml' is not valid YAML \(line 1, column 17\): expected ','"),
        ("model:\n  overrides: {d_model: 64\n", "is not valid YAML"),
        ("- 1\n- 2\n", "must hold a mapping of sections"),
        ("train:\n  steps: !!python/object/apply:os.system [echo PWNED]\n", "is not valid YAML"),
    ],
)
def test_malformed_yaml_is_a_clear_error(tmp_path: Path, text: str, match: str) -> None:
    """D18: malformed YAML was a yaml.parser.ParserError traceback."""
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config(tmp_path / "c.yaml")


def test_config_file_mistakes(tmp_path: Path) -> None:
    """D18: a missing config file or a folder was a FileNotFoundError / IsADirectoryError traceback."""
    with pytest.raises(ValueError, match="config file 'nope.yaml' does not exist"):
        load_config("nope.yaml")
    with pytest.raises(ValueError, match="is a folder; give a YAML file"):
        load_config(tmp_path)
    with pytest.raises(ValueError, match=r"override '--model.overrides=\{d_model: 64' is not valid YAML"):
        load_config(DEMO, ["--model.overrides={d_model: 64"])


def test_input_paths_are_checked_before_anything_is_built(tmp_path: Path) -> None:
    """D15, D16, D8: globs in data.corpus expand; a missing init_from is an error, never a Hub lookup; an empty
    data.tokenizer folder is not a tokenizer. All raised by load_config, before tokenizer training or the store."""
    cfg = load_config(DEMO, ["--data.corpus=[data/corpus/kjv_train*.gz]"])
    assert cfg.data.corpus == ["data/corpus/kjv_train*.gz"]
    with pytest.raises(ValueError, match="data.corpus: input pattern 'data/corpus/nothing_.*gz' matches no files"):
        load_config(DEMO, ["--data.corpus=[data/corpus/nothing_*.gz]"])
    with pytest.raises(ValueError, match="data.heldout: input 'runs/none.txt' does not exist"):
        load_config(DEMO, ["--data.heldout=[runs/none.txt]"])
    with pytest.raises(ValueError, match="data.corpus is empty"):
        load_config(DEMO, ["--data.corpus=[]"])
    with pytest.raises(ValueError, match=r"model.init_from='runs/a/fnal' is not a local folder; nothing is downloaded"):
        load_config(DEMO, ["--model.init_from=runs/a/fnal"])
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        load_config(DEMO, [f"--model.init_from={tmp_path}"])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    assert load_config(DEMO, [f"--model.init_from={tmp_path}"]).model.init_from == str(tmp_path)
    assert load_config(DEMO, ["--model.init_from=hf:google/flan-t5-small"]).model.init_from.startswith("hf:")
    with pytest.raises(ValueError, match=r"model.overrides \['dropout_rate'\] would be ignored"):
        load_config(DEMO, [f"--model.init_from={tmp_path}", "--model.overrides={dropout_rate: 0.1}"])
    (tmp_path / "tok").mkdir()
    with pytest.raises(ValueError, match="data.tokenizer: .*tok holds no tokenizer files"):
        load_config(DEMO, [f"--data.tokenizer={tmp_path / 'tok'}"])
    (tmp_path / "out").write_text("")
    with pytest.raises(ValueError, match="train.out_dir=.* is a file, not a folder"):
        load_config(DEMO, [f"--train.out_dir={tmp_path / 'out'}"])
