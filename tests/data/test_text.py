"""Readers: every input format, empty files and documents, invalid UTF-8, and clear errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from flasht5.data.text import ReadStats, expand_inputs, iter_documents, iter_file_documents


def test_text_formats_and_splits(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("zipped one\nzipped two\n")
    (tmp_path / "c.txt").write_text("para one\nstill one\n\n\npara two\n")
    stats = ReadStats()
    docs = list(iter_documents([tmp_path / "a.txt", tmp_path / "b.txt.gz"], stats=stats))
    assert docs == ["first doc", "second doc", "zipped one", "zipped two"]
    assert stats.documents == 5 and stats.empty_documents == 1 and stats.files == 2
    assert list(iter_documents(tmp_path / "c.txt", text_split="paragraph")) == ["para one\nstill one", "para two"]
    assert list(iter_documents(tmp_path / "c.txt", text_split="file")) == [(tmp_path / "c.txt").read_text()]
    # A folder is read file by file in sorted order.
    assert expand_inputs(tmp_path) == sorted([tmp_path / "a.txt", tmp_path / "b.txt.gz", tmp_path / "c.txt"])


def test_jsonl_parquet_and_datasets(tmp_path: Path) -> None:
    rows = [{"text": "alpha", "id": 1}, {"text": "", "id": 2}, {"text": "gamma", "id": 3}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["p1", None, "p3"]}), tmp_path / "d.parquet")
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["d1", "d2"]}).save_to_disk(str(tmp_path / "ds"))
    stats = ReadStats()
    assert list(iter_documents(tmp_path / "d.jsonl", stats=stats)) == ["alpha", "gamma"]
    assert stats.empty_documents == 1
    assert list(iter_documents(tmp_path / "d.parquet", text_key="body")) == ["p1", "p3"]
    assert list(iter_documents(tmp_path / "ds")) == ["d1", "d2"]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="DatasetDict"):
        list(iter_documents(tmp_path / "dd"))
    assert list(iter_documents(tmp_path / "dd" / "train")) == ["x"]


def test_empty_file_is_counted_not_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("\n  \n")
    stats = ReadStats()
    assert list(iter_documents([tmp_path / "empty.txt", tmp_path / "blank.txt"], stats=stats)) == []
    assert stats.empty_files == 2 and stats.empty_documents == 2


def test_invalid_utf8_is_a_clear_error_or_replaced(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_bytes(b"good line\nbad \xff byte\n")
    with pytest.raises(ValueError, match=r"bad.txt: line 2: invalid UTF-8 byte 0xff at byte 4"):
        list(iter_documents(tmp_path / "bad.txt"))
    stats = ReadStats()
    assert list(iter_documents(tmp_path / "bad.txt", encoding_errors="replace", stats=stats)) == [
        "good line",
        "bad \ufffd byte",
    ]
    assert stats.replaced_documents == 1


@pytest.mark.parametrize(
    "content, kwargs, match",
    [
        (b'{"body": "x"}\n', {}, "no text_key 'text'"),
        (b"{not json\n", {}, "not valid JSON"),
        (b'{"text": 3}\n', {}, "not a string"),
        (b"x\n", {"text_split": "sentence"}, "text_split"),
        (b"x\n", {"encoding_errors": "ignore"}, "encoding_errors"),
    ],
)
def test_bad_input(tmp_path: Path, content: bytes, kwargs: dict, match: str) -> None:
    path = tmp_path / "f.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        list(iter_file_documents(path, **kwargs))


def test_missing_input_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        expand_inputs([tmp_path / "nope.txt"])


def test_globs_expand_as_documented(tmp_path: Path) -> None:
    """D15: `data.corpus` and `flasht5 pretokenize` take globs (documented); they failed with "does not exist"."""
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    for name in ("a_train.txt.gz", "b_train.txt.gz", "heldout.txt.gz", "sub/c_train.txt.gz", "sub/deep/d.txt"):
        (tmp_path / name).write_bytes(b"x\n")
    assert expand_inputs(str(tmp_path / "*_train*.gz")) == [tmp_path / "a_train.txt.gz", tmp_path / "b_train.txt.gz"]
    assert expand_inputs([str(tmp_path / "**" / "*_train.txt.gz")]) == [
        tmp_path / "a_train.txt.gz", tmp_path / "b_train.txt.gz", tmp_path / "sub" / "c_train.txt.gz",
    ]  # fmt: skip
    every = expand_inputs(str(tmp_path / "sub" / "**"))  # folders matched by ** do not repeat their files
    assert every == [tmp_path / "sub" / "c_train.txt.gz", tmp_path / "sub" / "deep" / "d.txt"]
    with pytest.raises(ValueError, match="matches no files"):
        expand_inputs(str(tmp_path / "*.parquet"))
    literal = tmp_path / "odd[1].txt"  # a file whose name holds glob characters is taken as written
    literal.write_text("y\n")
    assert expand_inputs(str(literal)) == [literal]


def test_gzip_inputs_leave_no_file_open(tmp_path: Path) -> None:
    """D20: every .gz input left its file object open (a ResourceWarning per input with warnings on)."""
    import gc
    import warnings

    with gzip.open(tmp_path / "a.txt.gz", "wt") as f:
        f.write("one\ntwo\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert list(iter_documents(tmp_path / "a.txt.gz")) == ["one", "two"]
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
