"""Checkpoint folders in and out (issue 14): stale weights, the file transformers picks, confinement of shard names
and links, hostile or broken files named, and no Hub lookup for a local path."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import transformers
from hf_utils import padded_batch, save_hf, tiny_hf

from flasht5 import FlashT5ForConditionalGeneration, convert
from flasht5.cli import main

SRC = Path(__file__).resolve().parents[1] / "src" / "flasht5"


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**padded_batch()).logits


def _ours(tmp_path: Path, seed: int, name: str) -> FlashT5ForConditionalGeneration:
    return FlashT5ForConditionalGeneration.from_pretrained(save_hf(tiny_hf("t5-v1.1", seed=seed), tmp_path / name))


def test_convert_removes_stale_weights_so_both_libraries_read_the_new_model(tmp_path: Path) -> None:
    """D9: an earlier sharded export stayed next to the new model.safetensors; flasht5 read the stale shards,
    transformers the new file: one folder, two models."""
    out = tmp_path / "out"
    save_hf(tiny_hf("t5-v1.1", seed=1), out, shards=3)  # the earlier export
    (out / "pytorch_model.bin").write_bytes(b"stale")
    new = _ours(tmp_path, seed=2, name="new")
    convert.to_hf(new, out)
    left = sorted(p.name for p in out.iterdir())
    assert left == ["config.json", "generation_config.json", "model.safetensors"], left
    want = _logits(new)
    torch.testing.assert_close(_logits(FlashT5ForConditionalGeneration.from_pretrained(out)), want)
    torch.testing.assert_close(_logits(transformers.T5ForConditionalGeneration.from_pretrained(out)), want)
    # The same through `flasht5 convert` into a folder holding a flasht5-format sharded save.
    ft5 = tmp_path / "ft5"
    _ours(tmp_path, seed=3, name="old").save_pretrained(ft5, max_shard_size="20KB")
    assert (ft5 / "model.safetensors.index.json").is_file()
    assert main(["convert", str(tmp_path / "new"), str(ft5), "--to", "flasht5"]) == 0
    assert not (ft5 / "model.safetensors.index.json").exists() and not list(ft5.glob("model-*"))
    torch.testing.assert_close(_logits(FlashT5ForConditionalGeneration.from_pretrained(ft5)), want)


def test_flasht5_picks_the_file_transformers_picks(tmp_path: Path) -> None:
    """D9: with model.safetensors and an index both present, flasht5 read the index, transformers the file."""
    both = save_hf(tiny_hf("t5-v1.1", seed=1), tmp_path / "both", shards=2)
    single = save_hf(tiny_hf("t5-v1.1", seed=2), tmp_path / "single")
    os.replace(single / "model.safetensors", both / "model.safetensors")
    assert convert.weight_files(both) == [both / "model.safetensors"]
    ref = _logits(transformers.T5ForConditionalGeneration.from_pretrained(both))
    torch.testing.assert_close(_logits(FlashT5ForConditionalGeneration.from_pretrained(both)), ref)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", "a/../../x.safetensors"])
def test_shard_names_are_confined_to_the_folder(tmp_path: Path, shard: str) -> None:
    """D19: an index could make the loaders read any file of the machine ("../x", absolute paths)."""
    folder = save_hf(tiny_hf("t5-v1.1"), tmp_path / "hf", shards=2)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = shard
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="is not a file name inside"):
        FlashT5ForConditionalGeneration.from_pretrained(folder)
    # The same for a flasht5 folder (read by transformers' loader, after flasht5's check).
    ft5 = tmp_path / "ft5"
    _ours(tmp_path, 0, "x").save_pretrained(ft5, max_shard_size="20KB")
    index = ft5 / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][next(iter(data["weight_map"]))] = shard
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="is not a file name inside"):
        FlashT5ForConditionalGeneration.from_pretrained(ft5)


def test_links_out_of_the_folder_are_not_copied(tmp_path: Path, capsys) -> None:
    """D19: `flasht5 convert` followed a symlinked tokenizer.json and copied a secret file into the export."""
    src = save_hf(tiny_hf("t5-v1.1"), tmp_path / "hf")
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET CONTENT")
    (src / "tokenizer.json").symlink_to(secret)
    (src / "real_spiece.model").write_bytes(b"spm")
    (src / "spiece.model").symlink_to("real_spiece.model")  # a link inside the folder is fine
    assert main(["convert", str(src), str(tmp_path / "out")]) == 0
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    assert (tmp_path / "out" / "spiece.model").read_bytes() == b"spm"
    assert "not copying" in capsys.readouterr().err
    # A Hugging Face cache snapshot links every file into the repository's blobs/: those are followed.
    repo = tmp_path / "hub" / "models--org--t5"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "blobs" / "f00").write_text('{"tok": 1}')
    (snap / "tokenizer.json").symlink_to("../../blobs/f00")
    assert convert.safe_copy(snap / "tokenizer.json", tmp_path / "t.json") and (tmp_path / "t.json").is_file()


def test_convert_in_place_and_output_mistakes(tmp_path: Path, capsys) -> None:
    """D18: an in-place `convert X X --to hf` converted, then failed with shutil.SameFileError (exit 1)."""
    src = save_hf(tiny_hf("t5-v1.1", seed=4), tmp_path / "x")
    (src / "tokenizer_config.json").write_text("{}")
    want = _logits(FlashT5ForConditionalGeneration.from_pretrained(src))
    assert main(["convert", str(src), str(tmp_path / "ft5")]) == 0
    (tmp_path / "ft5" / "tokenizer_config.json").write_text("{}")
    assert main(["convert", str(tmp_path / "ft5"), str(tmp_path / "ft5"), "--to", "hf"]) == 0
    torch.testing.assert_close(_logits(transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "ft5")), want)
    (tmp_path / "file").write_text("")
    assert main(["convert", str(src), str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "config, match",
    [
        ({"model_type": "bert", "hidden_size": 64}, "is not a T5 checkpoint: its config.json has model_type 'bert'"),
        ({"d_model": 64}, "is not a T5 checkpoint: its config.json has model_type None"),
        ('{"model_type": "t5", ', r"config.json is not valid JSON"),
    ],
)
def test_not_a_t5_config_is_named(tmp_path: Path, config, match: str, capsys) -> None:
    """D18: a BERT config or one without model_type gave a list of missing weights; a broken config.json gave the
    JSON error with no file name."""
    folder = save_hf(tiny_hf("t5-v1.1"), tmp_path / "m")
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(ValueError, match=match):
        FlashT5ForConditionalGeneration.from_pretrained(folder)
    assert main(["convert", str(folder), str(tmp_path / "out")]) == 2
    assert re.search(match, capsys.readouterr().err)


def test_unreadable_weights_are_named(tmp_path: Path) -> None:
    """G1-G3, G11 (the convert side of D13): truncated or random safetensors files gave nameless tracebacks."""
    hf = save_hf(tiny_hf("t5-v1.1"), tmp_path / "hf")
    ft5 = tmp_path / "ft5"
    FlashT5ForConditionalGeneration.from_pretrained(hf).save_pretrained(ft5)
    for folder in (hf, ft5):
        weights = folder / "model.safetensors"
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size // 2)
        with pytest.raises(ValueError, match=f"cannot read the weights in {re.escape(str(weights))}"):
            FlashT5ForConditionalGeneration.from_pretrained(folder)


def test_a_missing_path_is_not_a_hub_lookup(tmp_path: Path, monkeypatch) -> None:
    """D16: from_pretrained('runs/nonexistent') retried huggingface.co for about 25 s; now it fails at once, and a
    Hub id is fetched only when asked for with 'hf:ORG/NAME'."""
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.setattr(transformers.utils.hub, "cached_files", no_network)
    for path in ("runs/nonexistent", "runs", "google/flan-t5-small"):
        monkeypatch.chdir(tmp_path)
        with pytest.raises(ValueError, match="is not a local folder .* nothing is downloaded unless you ask"):
            FlashT5ForConditionalGeneration.from_pretrained(path)
    local = save_hf(tiny_hf("t5-v1.1", seed=5), tmp_path / "snapshot")
    asked = {}

    def fake_snapshot(repo_id, **kwargs):
        asked.update(repo=repo_id, **kwargs)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    model = FlashT5ForConditionalGeneration.from_pretrained("hf:org/t5-tiny", revision="main")
    assert asked["repo"] == "org/t5-tiny" and asked["revision"] == "main"
    torch.testing.assert_close(_logits(model), _logits(FlashT5ForConditionalGeneration.from_pretrained(local)))


def test_no_unpickling_of_user_files() -> None:
    """D4: no torch.load(weights_only=False) where a user path reaches (the loop's trainer.pt included)."""
    offenders = []
    for path in SRC.rglob("*.py"):
        for no, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(SRC)}:{no}: {line.strip()}")
            if re.search(r"\bpickle\.loads?\(|weights_only=False", line):
                offenders.append(f"{path.relative_to(SRC)}:{no}: {line.strip()}")
    assert not offenders, offenders
