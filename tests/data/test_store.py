"""Pretokenization and the memory-mapped store: contents, resume after interruption, empty/bad input, workers."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from flasht5.data import store as S
from flasht5.data.store import TokenStore, build_store, pretokenize
from flasht5.data.tokenizer import load_tokenizer


@pytest.fixture
def two_inputs(tmp_path: Path, corpus_docs: list[str]) -> list[Path]:
    a, b = tmp_path / "a.txt", tmp_path / "b.jsonl"
    a.write_text("\n".join(corpus_docs[:40]) + "\n\n")  # a trailing empty document
    import json

    b.write_text("\n".join(json.dumps({"text": d}) for d in ["", *corpus_docs[40:70]]) + "\n")
    return [a, b]


def _bytes(out: Path) -> tuple[bytes, bytes]:
    return (out / "tokens.bin").read_bytes(), (out / "offsets.npy").read_bytes()


def test_store_holds_the_tokenized_documents(tmp_path, two_inputs, tiny_tokenizer_dir, corpus_docs) -> None:
    stats = pretokenize(two_inputs, tiny_tokenizer_dir, tmp_path / "st", progress=False, batch_docs=16)
    st = TokenStore.open(tmp_path / "st")
    tok = load_tokenizer(tiny_tokenizer_dir)
    assert len(st) == 70 and stats["documents"] == 70 and stats["empty_documents"] == 2
    assert stats["input_documents"] == 72 and stats["tokens"] == st.num_tokens == int(st.lengths.sum())
    for i in (0, 39, 40, 69):
        np.testing.assert_array_equal(st[i], tok(corpus_docs[i], add_special_tokens=False).input_ids)
    assert st[0].dtype == np.int32 and st.dtype == np.uint16 and st.vocab_size == len(tok)
    np.testing.assert_array_equal(st.read(3, 5, 9), st[3][5:9])
    clone = pickle.loads(pickle.dumps(st))
    assert len(pickle.dumps(st)) < 500 and np.array_equal(clone[7], st[7])  # pickles the path, not the tokens
    with pytest.raises(IndexError):
        st[70]


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, two_inputs, tiny_tokenizer_dir, monkeypatch):
    pretokenize(two_inputs, tiny_tokenizer_dir, tmp_path / "full", progress=False, batch_docs=8)
    real_encode = S._encode
    calls = {"n": 0}

    def crashing_encode(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # inside the second input (the first takes 6 batches of 8 documents)
            raise KeyboardInterrupt
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(S, "_encode", crashing_encode)
    with pytest.raises(KeyboardInterrupt):
        pretokenize(two_inputs, tiny_tokenizer_dir, tmp_path / "part", progress=False, batch_docs=8, commit_every=0)
    monkeypatch.setattr(S, "_encode", real_encode)
    part = tmp_path / "part"
    assert (part / "progress.json").exists() and not (part / "meta.json").exists()
    with pytest.raises(ValueError, match="interrupted"):
        TokenStore(part)
    with open(part / "tokens.bin", "ab") as f:  # a write that happened after the last commit
        f.write(b"\x07" * 10)
    stats = pretokenize(two_inputs, tiny_tokenizer_dir, part, progress=False, batch_docs=8)
    assert stats["resumed_from_documents"] == 40 and stats["documents"] == 70 and stats["empty_documents"] == 2
    assert _bytes(part) == _bytes(tmp_path / "full")


def test_resume_checks_settings_and_complete_store(tmp_path, two_inputs, tiny_tokenizer_dir) -> None:
    out = tmp_path / "st"
    first = pretokenize(two_inputs, tiny_tokenizer_dir, out, progress=False)
    again = pretokenize(two_inputs, tiny_tokenizer_dir, out, progress=False)
    assert again["already_complete"] and again["tokens"] == first["tokens"]
    with pytest.raises(ValueError, match="append_eos"):
        pretokenize(two_inputs, tiny_tokenizer_dir, out, progress=False, append_eos=True)
    redo = pretokenize(two_inputs, tiny_tokenizer_dir, out, progress=False, append_eos=True, resume=False)
    st = TokenStore(out)
    assert redo["tokens"] == first["tokens"] + 70 and all(st[i][-1] == 1 for i in range(len(st)))


def test_workers_give_the_same_store(tmp_path, two_inputs, tiny_tokenizer_dir) -> None:
    pretokenize(two_inputs, tiny_tokenizer_dir, tmp_path / "w1", progress=False, batch_docs=8)
    stats = pretokenize(two_inputs, tiny_tokenizer_dir, tmp_path / "w2", progress=False, batch_docs=8, workers=2)
    assert stats["workers"] == 2 and _bytes(tmp_path / "w1") == _bytes(tmp_path / "w2")


def test_empty_and_non_utf8_inputs(tmp_path, tiny_tokenizer_dir) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "bad.txt").write_bytes(b"In the beginning\n\xc3\x28 was the word\n\n")
    with pytest.raises(ValueError, match="bad.txt: line 2: invalid UTF-8"):
        pretokenize([tmp_path / "empty.txt", tmp_path / "bad.txt"], tiny_tokenizer_dir, tmp_path / "st", progress=False)
    stats = pretokenize(
        [tmp_path / "empty.txt", tmp_path / "bad.txt"],
        tiny_tokenizer_dir,
        tmp_path / "st",
        progress=False,
        encoding_errors="replace",
    )
    assert stats["empty_files"] == 1 and stats["replaced_documents"] == 1 and stats["empty_documents"] == 1
    assert len(TokenStore(tmp_path / "st")) == 2
    only_empty = pretokenize([tmp_path / "empty.txt"], tiny_tokenizer_dir, tmp_path / "st0", progress=False)
    st0 = TokenStore(tmp_path / "st0")
    assert only_empty["documents"] == 0 and len(st0) == 0 and st0.num_tokens == 0


def test_cli_pretokenize(tmp_path, two_inputs, tiny_tokenizer_dir, capsys) -> None:
    from flasht5.cli import main

    assert (
        main(
            [
                "pretokenize",
                *map(str, two_inputs),
                "--tokenizer",
                str(tiny_tokenizer_dir),
                "--out",
                str(tmp_path / "st"),
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "70 documents" in out and "tokens/s" in out and "skipped 2 empty documents" in out


def test_build_store_and_bad_stores(tmp_path) -> None:
    st = build_store(tmp_path / "b", [[5, 6, 7], [], np.array([9]), range(70000, 70005)], vocab_size=80000)
    assert len(st) == 3 and st.dtype == np.int32 and st[2].tolist() == list(range(70000, 70005))
    with pytest.raises(ValueError, match="vocab_size"):
        build_store(tmp_path / "c", [[5, 100]], vocab_size=100)
    with pytest.raises(ValueError, match="not a complete token store"):
        TokenStore(tmp_path)
    with pytest.raises(ValueError, match="workers"):
        pretokenize([tmp_path], tmp_path, tmp_path / "x", workers=0)
