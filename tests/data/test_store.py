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


# ---------------------------------------------------------------------------------------------------------------
# Reliability (issue 14): one writer per store, contents checked against the record, edited inputs noticed.


def test_second_writer_refuses_at_once_naming_folder_and_pid(tmp_path, two_inputs, tiny_tokenizer_dir) -> None:
    """D1: two pretokenize runs into one folder interleaved their documents; now the second refuses."""
    import os

    out = tmp_path / "st"
    with S.store_lock(out):  # what a running writer holds
        with pytest.raises(ValueError, match=rf"{out} is being written by another process \(pid {os.getpid()}"):
            pretokenize(two_inputs, tiny_tokenizer_dir, out, progress=False)
        with pytest.raises(ValueError, match="being written"):
            build_store(out, [[1, 2]], vocab_size=10)
    assert not (out / "tokens.bin").exists()  # the refused writer touched nothing
    stats = pretokenize(two_inputs, tiny_tokenizer_dir, out, progress=False)  # released: works
    assert stats["documents"] == 70


def test_lock_of_a_killed_writer_is_released(tmp_path) -> None:
    """D1: the lock cannot go stale: kill -9 of the holder frees the folder for the next run."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "st"
    code = (
        "import sys, time; from flasht5.data.store import store_lock\n"
        f"with store_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(S.__file__).parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"pid {proc.pid}"), S.store_lock(out):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with S.store_lock(out):  # free again
        pass


def test_store_that_does_not_match_its_record_is_refused(tmp_path, two_inputs, tiny_tokenizer_dir) -> None:
    """D1: a store cut short (or mixed by two writers) under a meta.json that claims more was reused silently."""
    import json

    out = tmp_path / "st"
    pretokenize(two_inputs, tiny_tokenizer_dir, out, progress=False)
    full = (out / "tokens.bin").read_bytes()
    with open(out / "tokens.bin", "r+b") as f:
        f.truncate(len(full) // 2)
    with pytest.raises(ValueError, match="not a complete token store: tokens.bin holds"):
        TokenStore(out)
    with pytest.raises(ValueError, match="not a complete token store"):  # not "already complete"
        pretokenize(two_inputs, tiny_tokenizer_dir, out, progress=False)
    (out / "tokens.bin").write_bytes(full)
    meta = json.loads((out / "meta.json").read_text())
    meta["stats"]["documents"] += 1
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="statistics say 71"):
        TokenStore(out)
    meta["stats"]["documents"] -= 1
    meta["num_docs"] -= 1
    meta["stats"]["documents"] -= 1
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="offsets.npy has shape"):
        TokenStore(out)
    stats = pretokenize(two_inputs, tiny_tokenizer_dir, out, progress=False, resume=False)  # the way out it names
    assert stats["documents"] == 70 and len(TokenStore(out)) == 70


def test_edited_input_of_the_same_size_is_noticed(tmp_path, tiny_tokenizer_dir) -> None:
    """D11: an in-place edit that kept the size left the old tokens in a store reported as complete."""
    import os

    src = tmp_path / "e.txt"
    src.write_text("the first document\nthe second document\n")
    out = tmp_path / "st"
    pretokenize([src], tiny_tokenizer_dir, out, progress=False)
    assert pretokenize([src], tiny_tokenizer_dir, out, progress=False)["already_complete"]
    st = os.stat(src)
    src.write_text("THE FIRST DOCUMENT\nthe second document\n")
    assert src.stat().st_size == st.st_size
    with pytest.raises(ValueError, match=r"e.txt changed since the store was made \(content\)"):
        pretokenize([src], tiny_tokenizer_dir, out, progress=False)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old modification time put back
    with pytest.raises(ValueError, match=r"changed since the store was made \(content\)"):
        pretokenize([src], tiny_tokenizer_dir, out, progress=False)
    # An edit in the middle of a long file (outside the hashed ends) changes the modification time.
    big = tmp_path / "big.txt"
    line = "in the beginning was the word " * 10 + "\n"
    big.write_text(line * (3 * (1 << 20) // len(line)))
    pretokenize([big], tiny_tokenizer_dir, tmp_path / "big", progress=False)
    data = bytearray(big.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 3] = b"THE" if data[mid : mid + 3] != b"THE" else b"the"
    os.utime(big, ns=(1, 1))
    big.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"big.txt changed since the store was made \(modification time\)"):
        pretokenize([big], tiny_tokenizer_dir, tmp_path / "big", progress=False)


def test_output_that_is_a_file_and_globbed_inputs(tmp_path, two_inputs, tiny_tokenizer_dir) -> None:
    """D18: --out an existing file was a FileExistsError traceback; D15: globs as documented."""
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        pretokenize(two_inputs, tiny_tokenizer_dir, tmp_path / "f", progress=False)
    stats = pretokenize([str(tmp_path / "*.txt"), str(tmp_path / "b.json*")], tiny_tokenizer_dir, tmp_path / "g",
                        progress=False)  # fmt: skip
    assert stats["documents"] == 70 and stats["files"] == 2


def test_forked_workers_do_not_inherit_the_lock(tmp_path, tiny_tokenizer_dir) -> None:
    """D1: a tokenizer worker that outlives its killed parent must not keep the store locked."""
    import multiprocessing as mp
    import os

    out = tmp_path / "st"
    held = S.store_lock(out)
    held.__enter__()
    pool = mp.get_context("fork").Pool(1, initializer=S._worker_init, initargs=(str(tiny_tokenizer_dir),))
    try:
        assert pool.apply(os.getpid) != os.getpid()  # the worker is up and initialised, holding forked fds
        held.__exit__(None, None, None)  # the parent lets go, as a kill -9 would
        with S.store_lock(out):  # the worker's inherited copy does not keep the folder locked
            pass
    finally:
        pool.terminate()
        pool.join()


def test_tokenizer_worker_dies_with_a_killed_parent() -> None:
    """kill -9 of `flasht5 pretokenize --workers N` left pool workers waiting forever on their task queue (3 of 10
    two-worker kills in the attack); a worker now asks the kernel for SIGKILL when its parent dies."""
    import signal
    import sys
    import time

    if sys.platform != "linux":
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    import os

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # stands for the pretokenize process
        try:
            worker = os.fork()
            if worker == 0:
                try:
                    os.write(w, b"ready\n")
                    S._die_with_parent(os.getppid())
                    time.sleep(30)
                finally:
                    os._exit(0)
            os.write(w, f"{worker}\n".encode())
            time.sleep(30)
        finally:
            os._exit(0)
    reader = os.fdopen(r)
    lines = {reader.readline().strip(), reader.readline().strip()}
    worker = int(next(x for x in lines if x != "ready"))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)

    def alive(p: int) -> bool:
        try:
            return Path(f"/proc/{p}/stat").read_text().split(") ")[1][0] != "Z"
        except (OSError, IndexError):
            return False

    deadline = time.monotonic() + 5
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(worker)


def test_pretokenize_writes_tensorboard_scalars_at_every_commit(two_inputs, tiny_tokenizer_dir, tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stats = pretokenize(two_inputs, tiny_tokenizer_dir, tmp_path / "st", progress=False, tensorboard=tmp_path / "tb")
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert {"pretokenize/tokens", "pretokenize/documents", "pretokenize/tokens_per_s"} <= set(acc.Tags()["scalars"])
    assert acc.Scalars("pretokenize/tokens")[-1].value == stats["tokens"]  # one commit per input, the last = total
    assert acc.Scalars("pretokenize/documents")[-1].value == stats["documents"]
    assert not (tmp_path / "st" / "tensorboard").exists()  # the store itself holds only its own files
