"""The ``flasht5`` command (issue 14): a user's mistake is one line naming the key or file and what would be
valid (exit code 2), never a traceback; a run prints no spurious warnings or progress bars."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from hf_utils import save_hf, tiny_hf

from flasht5.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "pretrain" / "demo.yaml")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    with gzip.open(ROOT / "data" / "corpus" / "kjv_train.txt.gz", "rt", encoding="utf-8") as f:
        docs = [next(f) for _ in range(60)]
    path = tmp_path_factory.mktemp("corpus") / "kjv.txt"
    path.write_text("".join(docs))
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, corpus: Path) -> Path:
    from flasht5.data.tokenizer import train_tokenizer

    return train_tokenizer([corpus], tmp_path_factory.mktemp("tok") / "tok", vocab_size=300, character_coverage=1.0)


@pytest.fixture(scope="module")
def flasht5_folder(tmp_path_factory, tokenizer: Path) -> Path:
    """A flasht5 checkpoint folder with the run's tokenizer, as `flasht5 train` leaves in final/."""
    from flasht5 import FlashT5Config, FlashT5ForConditionalGeneration

    cfg = FlashT5Config.from_preset("demo", vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
    out = tmp_path_factory.mktemp("final") / "final"
    FlashT5ForConditionalGeneration(cfg).save_pretrained(out)
    from flasht5.data.tokenizer import load_tokenizer

    load_tokenizer(tokenizer).save_pretrained(out)
    return out


def _run(capfd, *argv: str) -> tuple[int, str]:
    capfd.readouterr()
    code = main(list(argv))
    out, err = capfd.readouterr()
    return code, out + err


def _clear_error(code: int, text: str, *expect: str) -> None:
    assert code == 2, text
    assert "Traceback" not in text, text
    for e in expect:
        assert e in text, text


def test_train_mistakes_are_one_line(tmp_path: Path, capfd) -> None:
    """D18: malformed YAML, a missing config file or a folder, a bad device: tracebacks before."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: 3\n")
    cases = [
        ([str(bad)], ["flasht5 train: error: config file", "is not valid YAML (line 2, column 1)"]),
        (["nope.yaml"], ["config file 'nope.yaml' does not exist"]),
        ([str(tmp_path)], ["is a folder; give a YAML file"]),
        ([DEMO, "--model.overrides={d_model: 64"], ["override '--model.overrides={d_model: 64' is not valid YAML"]),
        ([DEMO, "--train.device=gpu"], ["train.device must be auto, cpu, cuda or cuda:N, got 'gpu'"]),
        ([DEMO, "--train.threads=-2"], ["train.threads must be >= 0"]),
        ([DEMO, "--model.init_from=runs/a/fnal"], ["model.init_from='runs/a/fnal' is not a local folder"]),
    ]
    for argv, expect in cases:
        code, text = _run(capfd, "train", *argv)
        _clear_error(code, text, *expect)


def test_generate_mistakes_are_one_line(tmp_path: Path, capfd, flasht5_folder: Path, tokenizer: Path) -> None:
    """D18 (--num-beams 0 was a ZeroDivisionError, --device gpu a torch RuntimeError), D8 (a folder without
    tokenizer files generated from an empty tokenizer, or named sentencepiece as the cause)."""
    weights_only = save_hf(tiny_hf("t5-v1.1"), tmp_path / "hf_t5")
    cases = [
        ([str(flasht5_folder), "hi", "--num-beams", "0"], ["--num-beams must be >= 1 (1: greedy), got 0"]),
        ([str(flasht5_folder), "hi", "--max-new-tokens", "0"], ["--max-new-tokens must be >= 1"]),
        ([str(flasht5_folder), "hi", "--top-p", "0"], ["--top-p must be in (0, 1]"]),
        ([str(flasht5_folder), "hi", "--device", "gpu"], ["--device must be cpu, cuda or cuda:N, got 'gpu'"]),
        ([str(weights_only), "translate English to German: hi"], ["holds no tokenizer files", "pass --tokenizer"]),
        ([str(flasht5_folder), "hi", "--tokenizer", str(tmp_path)], ["--tokenizer:", "holds no tokenizer files"]),
        ([str(tmp_path / "missing"), "hi"], ["is not a checkpoint folder"]),
    ]
    for argv, expect in cases:
        code, text = _run(capfd, "generate", *argv)
        _clear_error(code, text, *expect)
        assert "sentencepiece or tiktoken" not in text


def test_generate_and_convert_print_no_noise(tmp_path: Path, capfd, flasht5_folder: Path) -> None:
    """D20: every generate printed "You are using a model of type flasht5 to instantiate a model of type ``" and
    transformers' "Loading weights" bar; every save a "Writing model shards" bar."""
    code, text = _run(capfd, "generate", str(flasht5_folder), "hello world", "--max-new-tokens", "3", "--json")
    assert code == 0, text
    assert [json.loads(line)["input"] for line in text.splitlines()] == ["hello world"]  # the output and nothing else
    code, text = _run(capfd, "convert", str(flasht5_folder), str(tmp_path / "hf"))
    assert code == 0 and text.strip() == f"wrote hf checkpoint to {tmp_path / 'hf'}", text


def test_data_commands_refuse_a_file_as_output(tmp_path: Path, capfd, corpus: Path, tokenizer: Path) -> None:
    """D18: `--out` an existing file was a FileExistsError traceback (tokenizer train: after the training)."""
    (tmp_path / "f").write_text("")
    code, text = _run(capfd, "pretokenize", str(corpus), "--tokenizer", str(tokenizer), "--out", str(tmp_path / "f"))
    _clear_error(code, text, "is a file, not a folder")
    code, text = _run(capfd, "tokenizer", "train", str(corpus), "--out", str(tmp_path / "f"), "--vocab-size", "100")
    _clear_error(code, text, "is a file, not a folder")
    code, text = _run(capfd, "pretokenize", str(corpus), "--tokenizer", str(corpus), "--out", str(tmp_path / "s"))
    _clear_error(code, text, "must be a folder or a SentencePiece .model file")


def test_train_refuses_a_store_another_run_is_writing(tmp_path: Path, capfd, corpus: Path, tokenizer: Path) -> None:
    """D1: two runs pretokenizing into one store truncated it (a 498 of 1130 document store reported as 1130)."""
    from flasht5.data.store import store_lock

    store = tmp_path / "store"
    args = [DEMO, f"--data.corpus=[{corpus}]", "--data.heldout=[]", f"--data.tokenizer={tokenizer}",
            f"--data.store={store}", f"--train.out_dir={tmp_path / 'run'}", "--train.progress=false"]  # fmt: skip
    with store_lock(store):
        code, text = _run(capfd, "train", *args)
    _clear_error(code, text, f"{store} is being written by another process (pid ")


def test_train_prints_no_shard_bars(tmp_path: Path, capfd, corpus: Path, tokenizer: Path) -> None:
    """D20: "Writing model shards" appeared at every checkpoint even with train.progress=false."""
    code, text = _run(
        capfd, "train", DEMO, f"--data.corpus=[{corpus}]", "--data.heldout=[]", f"--data.tokenizer={tokenizer}",
        f"--train.out_dir={tmp_path / 'run'}", "--train.progress=false", "--train.steps=2", "--train.save_every=1",
        "--train.samples=0", "--data.max_tokens=256", "--data.max_input_len=64", "--data.max_target_len=16",
        "--model.overrides={d_model: 32, d_kv: 8, d_ff: 64, num_layers: 1, num_heads: 2}",
    )  # fmt: skip
    assert code == 0, text
    assert "Writing model shards" not in text and "Loading weights" not in text and "warning" not in text.lower()


def test_tokenizer_without_sentinels_is_refused_before_training(tmp_path: Path, capfd, corpus: Path) -> None:
    """D18 (D26 in the report): a --num-sentinels 0 tokenizer failed only once train had built its data."""
    code, text = _run(capfd, "tokenizer", "train", str(corpus), "--out", str(tmp_path / "tok"), "--vocab-size", "200",
                      "--num-sentinels", "0")  # fmt: skip
    assert code == 0 and "note: no <extra_id_N> sentinels" in text, text
    code, text = _run(capfd, "train", DEMO, f"--data.corpus=[{corpus}]", f"--data.tokenizer={tmp_path / 'tok'}")
    _clear_error(code, text, "has no <extra_id_N> sentinels (trained with --num-sentinels 0)")


# ---------------------------------------------------------------------------------------------------------------
# Issue 12: --help lists every config key (from the dataclasses), --print-config, flasht5 finetune
# ---------------------------------------------------------------------------------------------------------------

FT_DEMO = str(ROOT / "configs" / "finetune" / "demo.yaml")


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_help_lists_every_config_key_with_type_default_and_meaning(capfd, command: str) -> None:
    from flasht5.train.config import Config, FinetuneConfig, _yaml_value, config_keys

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capfd.readouterr().out
    keys = config_keys(Config if command == "train" else FinetuneConfig)
    assert len(keys) > 40
    for key, kind, default, meaning in keys:
        assert f"  {key}: {kind} = {_yaml_value(default)}\n" in text, key
        assert meaning, f"{key} has no comment in src/flasht5/train/config.py"
    assert "`" not in text  # no RST markup
    assert "--print-config" in text
    if command == "finetune":  # the fine-tuning defaults, not pretraining's
        assert "  optim.lr: float = 0.0005\n" in text and "  train.out_dir: str = runs/finetune\n" in text
    main_help = build_help(capfd)
    assert "`" not in main_help and "finetune" in main_help


def build_help(capfd) -> str:
    with pytest.raises(SystemExit):
        main(["--help"])
    return capfd.readouterr().out


@pytest.mark.parametrize("command, config", [("train", DEMO), ("finetune", FT_DEMO)])
def test_print_config_prints_the_resolved_config_and_reloads_to_it(tmp_path: Path, capfd, command, config) -> None:
    from flasht5.train.config import Config, FinetuneConfig, load_config

    schema = Config if command == "train" else FinetuneConfig
    code, text = _run(capfd, command, config, "--train.steps=7", "--optim.lr=3e-4", "--print-config")
    assert code == 0, text
    assert "train:\n" in text and "  steps: 7\n" in text and "  lr: 0.0003\n" in text
    (tmp_path / "resolved.yaml").write_text(text)
    again = load_config(tmp_path / "resolved.yaml", check_paths_too=False, schema=schema)
    assert again == load_config(config, ["--train.steps=7", "--optim.lr=3e-4"], check_paths_too=False, schema=schema)
    assert not (tmp_path / "runs").exists()  # nothing was run


def test_finetune_mistakes_are_one_line(tmp_path: Path, capfd) -> None:
    cases = [
        (
            [FT_DEMO, "--task=regression"],
            ["flasht5 finetune: error: task must be one of ['seq2seq'"],
        ),
        ([FT_DEMO, "--data.train=[nope.jsonl]"], ["data.train: input 'nope.jsonl' does not exist"]),
        ([FT_DEMO, "--eval.best_metric=f1"], ["eval.best_metric must be one of"]),
        ([FT_DEMO, "--data.corpus=[a.txt]"], ["unknown key(s) ['corpus'] in section 'data'"]),
        ([FT_DEMO, "--model.init_from=runs/a/fnal"], ["model.init_from='runs/a/fnal' is not a local folder"]),
    ]
    for argv, expect in cases:
        code, text = _run(capfd, "finetune", *argv)
        _clear_error(code, text, *expect)


def test_finetune_command_runs_and_reports(tmp_path: Path, capfd, tokenizer: Path) -> None:
    rows = [{"input": f"copy {w}", "target": w} for w in ("alpha beta", "gamma", "delta epsilon", "zeta") * 8]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, text = _run(
        capfd, "finetune", FT_DEMO, f"--data.train=[{tmp_path / 'd.jsonl'}]", f"--data.eval=[{tmp_path / 'd.jsonl'}]",
        f"--data.tokenizer={tokenizer}", f"--train.out_dir={tmp_path / 'run'}", "--train.steps=3",
        "--train.eval_every=3", "--eval.max_examples=4", "--eval.max_new_tokens=3", "--eval.metrics=[exact_match]",
        "--eval.best_metric=loss", "--data.max_tokens=128", "--train.progress=false", "--train.samples=1",
        "--model.overrides={d_model: 32, d_kv: 8, d_ff: 64, num_layers: 1, num_heads: 2}", "--data.prefix=",
    )  # fmt: skip
    assert code == 0, text
    assert "held-out: step 0 loss" in text and "-> step 3 loss" in text and "exact_match" in text
    assert "best loss" in text and f"{tmp_path / 'run'}/best" in text
    assert "--- held-out example 1 ---" in text and "prediction:" in text
    assert "Writing model shards" not in text and "Traceback" not in text


@pytest.mark.parametrize("rank", ["0", "1"])
def test_train_summary_is_printed_by_rank_zero_only(tmp_path: Path, capfd, monkeypatch, rank: str) -> None:
    """Under torchrun every rank returns rank 0's summary; only rank 0 prints it (one copy per launch)."""
    import flasht5.train.loop as loop

    summary = dict(initial_eval_loss=2.0, final_eval_loss=1.0, steps=3, model_dir="m", metrics="x", loss_plot="p",
                   samples=[])  # fmt: skip
    monkeypatch.setattr(loop, "train", lambda cfg: summary)
    monkeypatch.setenv("RANK", rank)
    config = Path(__file__).parents[1] / "configs" / "pretrain" / "demo.yaml"
    code, text = _run(capfd, "train", str(config), f"--train.out_dir={tmp_path / 'run'}")
    assert code == 0, text
    assert ("held-out loss: step 0 2.0000 -> step 3 1.0000" in text) == (rank == "0"), text
