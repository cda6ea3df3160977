"""``flasht5 generate`` batch mode: files in (text lines, JSONL), JSONL out in input order, batching by length,
generation flags, and one-line errors for bad input (src/flasht5/generate_batch.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import _clear_error, _run, corpus, flasht5_folder, tokenizer  # noqa: F401 (test_cli's fixtures)

from flasht5.generate_batch import length_batches

LINES = ["In the beginning God created the heaven and the earth.", "And God said", "",
         "Let there be light: and there was light, and God saw the light, that it was good.", "amen",
         "And the evening and the morning were the first day."]  # fmt: skip


@pytest.fixture
def model_dir(request) -> Path:
    """test_cli's tiny flasht5 checkpoint with its tokenizer."""
    return request.getfixturevalue("flasht5_folder")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_length_batches_sort_longest_first_and_cover_every_request() -> None:
    batches = length_batches([3, 9, 1, 9, 5], 2)
    assert batches == [[1, 3], [4, 0], [2]]


def test_text_file_in_jsonl_out_in_input_order_equals_one_at_a_time(tmp_path: Path, capfd, model_dir) -> None:
    src = tmp_path / "in.txt"
    src.write_text("\n".join(LINES) + "\n")
    common = [str(model_dir), "--input", str(src), "--max-new-tokens", "5", "--min-new-tokens", "2"]
    code, text = _run(capfd, "generate", *common, "--output", str(tmp_path / "a.jsonl"), "--batch-size", "2")
    assert code == 0, text
    assert "generate" in text and "req" in text and "wrote 5 outputs" in text  # the progress bar and the summary
    batched = _rows(tmp_path / "a.jsonl")
    assert [r["input"] for r in batched] == [line for line in LINES if line]  # input order, blank lines skipped
    code, text = _run(capfd, "generate", *common, "--output", str(tmp_path / "b.jsonl"), "--batch-size", "1")
    assert code == 0, text
    assert batched == _rows(tmp_path / "b.jsonl")  # batching by length changes no output
    assert all(isinstance(r["output"], str) for r in batched)


def test_jsonl_in_with_beams_and_return_sequences(tmp_path: Path, capfd, model_dir) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in enumerate(LINES) if t))
    out = tmp_path / "sub" / "out.jsonl"
    code, text = _run(capfd, "generate", str(model_dir), "--input", str(src), "--input-field", "prompt",
                      "--output", str(out), "--num-beams", "3", "--num-return-sequences", "2", "--max-new-tokens", "4",
                      "--no-progress")  # fmt: skip
    assert code == 0, text
    assert "req" not in text  # --no-progress
    rows = _rows(out)
    assert [r["id"] for r in rows] == [0, 1, 3, 4, 5] and all(len(r["output"]) == 2 for r in rows)


def test_seeded_sampling_is_reproducible_and_stdout_mode_still_works(tmp_path: Path, capfd, model_dir) -> None:
    argv = [str(model_dir), "a b c", "d e", "--do-sample", "--seed", "7", "--top-k", "20", "--temperature",
            "0.8", "--max-new-tokens", "6", "--json"]  # fmt: skip
    code, first = _run(capfd, "generate", *argv)
    assert code == 0, first
    code, second = _run(capfd, "generate", *argv)
    assert first == second and [json.loads(x)["input"] for x in first.splitlines()] == ["a b c", "d e"]


def test_batch_mode_mistakes_are_one_line(tmp_path: Path, capfd, model_dir) -> None:
    f = str(model_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "unterminated\n')
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"prompt": "x"}\n')
    notstr = tmp_path / "notstr.jsonl"
    notstr.write_text('{"text": 3}\n')
    arr = tmp_path / "arr.jsonl"
    arr.write_text("[1, 2]\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9\n")
    cases = [
        ([f, "--input", str(bad)], ["line 2 is not JSON"]),
        ([f, "--input", str(nofield)], ["line 1 has no field 'text' (its fields: prompt); set --input-field"]),
        ([f, "--input", str(notstr)], ["line 1: field 'text' is a int, not a string"]),
        ([f, "--input", str(arr)], ["line 1 is a JSON list, not an object"]),
        ([f, "--input", str(empty)], ["holds no inputs"]),
        ([f, "--input", str(latin)], ["is not UTF-8 text"]),
        ([f, "--input", str(tmp_path / "nope.txt")], ["does not exist"]),
        ([f, "--input", str(tmp_path)], ["is a folder"]),
        ([f, "hi", "--input", str(empty)], ["not both"]),
        ([f, "hi", "--input-field", "x"], ["--input-field needs --input"]),
        ([f, "--input", str(empty), "--output", str(tmp_path)], ["--output", "is a folder"]),
        ([f, "hi", "--num-return-sequences", "3"], ["needs --num-beams >= 3"]),
        ([f, "hi", "--min-new-tokens", "9", "--max-new-tokens", "4"], ["--min-new-tokens must be >= 0 and <= "]),
        ([f, "hi", "--batch-size", "0"], ["--batch-size must be >= 1"]),
        ([f, "hi", "--top-k", "-1"], ["--top-k must be >= 0"]),
    ]
    for argv, expect in cases:
        code, text = _run(capfd, "generate", *argv)
        _clear_error(code, text, *expect)


def test_tensorboard_scalars_per_batch(tmp_path: Path, capfd, model_dir) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    src = tmp_path / "in.txt"
    src.write_text("\n".join(LINES) + "\n")
    tb = tmp_path / "tb"
    code, text = _run(capfd, "generate", str(model_dir), "--input", str(src), "--max-new-tokens", "4",
                      "--min-new-tokens", "4", "--batch-size", "2", "--output", str(tmp_path / "o.jsonl"),
                      "--tensorboard", str(tb))  # fmt: skip
    assert code == 0, text
    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert {"generate/requests", "generate/requests_per_s", "generate/new_tokens_per_s"} <= set(acc.Tags()["scalars"])
    assert [(e.step, e.value) for e in acc.Scalars("generate/requests")] == [(1, 2), (2, 4), (3, 5)]
    assert all(e.value > 0 for e in acc.Scalars("generate/new_tokens_per_s"))
