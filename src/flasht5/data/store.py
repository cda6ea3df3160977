"""Pretokenization into a memory-mapped token store — ``flasht5 pretokenize``.

A store is a folder:

- ``tokens.bin``: every document's token ids back to back (``uint16`` when the vocabulary fits, else ``int32``);
- ``offsets.npy``: ``int64`` (num_docs + 1,) document boundaries into ``tokens.bin``;
- ``meta.json``: dtype, counts, tokenizer, inputs and the pretokenization statistics.

While it is being written the folder holds ``lengths.bin`` (one ``int64`` per document) and ``progress.json``, the
last committed position (input file, documents read from it, documents and tokens written). A commit flushes and
fsyncs the data files before it atomically replaces ``progress.json``; a resumed run truncates the data files back
to the committed sizes and re-reads the current input from the committed document on, so an interrupted and
resumed run writes the same bytes as an uninterrupted one. Documents keep their boundaries and their input order;
empty documents (and ones that tokenize to nothing) are skipped and counted.

One writer at a time: a writer holds an exclusive ``fcntl.flock`` on ``<store>/.lock`` (which names its pid), so a
second ``pretokenize`` into the same folder (two ``flasht5 train`` runs sharing a store, say) refuses at once; the
kernel drops the lock when the holder dies, even by ``kill -9``. A store is complete only when its files match
``meta.json`` (document and token counts, file sizes, offsets), checked on every open. The record of the inputs
holds each file's size, modification time and a hash of its first and last MiB, so an edited input is noticed
even when its size did not change.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flasht5.data.text import ReadStats, add_reader_arguments, expand_inputs, iter_file_documents
from flasht5.fs import fsync

FORMAT_VERSION = 1
_DATA_FILES = ("tokens.bin", "lengths.bin", "offsets.npy", "meta.json", "progress.json")
LOCK_NAME = ".lock"
_END_BYTES = 1 << 20  # an input's first and last MiB are hashed into the store's record
_HELD_LOCKS: list[Any] = []  # lock files this process holds; forked tokenizer workers close their copies
_RESTART_HINT = (
    "start over with `flasht5 pretokenize ... --no-resume` (pretokenize(resume=False)), delete the folder, or choose "
    "another output folder (flasht5 train: data.store)"
)


@contextlib.contextmanager
def store_lock(folder: str | Path) -> Iterator[Path]:
    """Hold the exclusive writer's lock of a store folder (created if needed) for the ``with`` block.

    A second writer gets a ``ValueError`` at once that names the folder and the holder's pid. ``flock`` locks belong
    to the open file, so the kernel releases this one when the process exits in any way (``kill -9`` included);
    nothing stale is ever left to clean up by hand.
    """
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise ValueError(f"store output {str(out)!r} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    f = open(path, "a+")  # noqa: SIM115 - held for the block, closed in finally
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise ValueError(
                f"{out} is being written by another process (pid {holder}, lock file {path}): wait for it to "
                "finish or stop it, or choose another output folder"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        _HELD_LOCKS.append(f)
        try:
            yield out
        finally:
            _HELD_LOCKS.remove(f)
    finally:
        f.close()  # releases the lock


class TokenStore:
    """Read-only view of a pretokenized store; ``store[i]`` is document i as an ``int32`` array.

    Opening is O(1) (memory maps). Pickling carries only the path, so a store can be handed to DataLoader workers
    without copying the tokens.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.exists():
            hint = (
                " (pretokenization was interrupted: run it again to resume)"
                if (self.path / "progress.json").exists()
                else ""
            )
            raise ValueError(f"{self.path} is not a complete token store: no meta.json{hint}")
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text())
            if self.meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{self.path}: unsupported store format {self.meta.get('format_version')!r}")
            self.dtype = np.dtype(self.meta["dtype"])
            self.num_tokens = int(self.meta["num_tokens"])
            num_docs = int(self.meta["num_docs"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{self.path} is not a complete token store: meta.json is unreadable ({e})") from None
        # The files must match the record: a store cut short or mixed by two writers is refused, not read.
        bad = self._mismatch(num_docs)
        if bad:
            raise ValueError(f"{self.path} is not a complete token store: {bad}; {_RESTART_HINT}")
        self._offsets = np.load(self.path / "offsets.npy", mmap_mode="r")
        if self.num_tokens:
            self._tokens = np.memmap(self.path / "tokens.bin", dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        else:
            self._tokens = np.zeros(0, dtype=self.dtype)
        if int(self._offsets[0]) != 0 or int(self._offsets[-1]) != self.num_tokens:
            raise ValueError(
                f"{self.path} is not a complete token store: offsets.npy runs from {int(self._offsets[0])} to "
                f"{int(self._offsets[-1])}, meta.json records {self.num_tokens} tokens; {_RESTART_HINT}"
            )
        self._lengths: np.ndarray | None = None

    def _mismatch(self, num_docs: int) -> str:
        """What in the folder contradicts meta.json (O(1): file sizes and the offsets header), or ``""``."""
        stats = self.meta.get("stats") or {}
        for key, value in (("documents", num_docs), ("tokens", self.num_tokens)):
            if key in stats and int(stats[key]) != value:
                return f"meta.json counts {value} {key} but its statistics say {stats[key]}"
        tokens = self.path / "tokens.bin"
        size = tokens.stat().st_size if tokens.is_file() else None
        want = self.num_tokens * self.dtype.itemsize
        if size is None and self.num_tokens:
            return "tokens.bin is missing"
        if size is not None and size != want:
            return f"tokens.bin holds {size} bytes, meta.json records {self.num_tokens} tokens ({want} bytes)"
        try:
            offsets = np.load(self.path / "offsets.npy", mmap_mode="r")
        except (OSError, ValueError) as e:
            return f"offsets.npy is unreadable ({e})"
        if offsets.ndim != 1 or len(offsets) != num_docs + 1:
            return f"offsets.npy has shape {offsets.shape}, meta.json records {num_docs} documents"
        return ""

    def verify(self) -> None:
        """The full check (O(documents)): offsets never decrease. ``pretokenize`` runs it before reusing a store."""
        if self.num_tokens and np.any(np.diff(np.asarray(self._offsets)) < 0):
            raise ValueError(f"{self.path} is not a complete token store: offsets.npy decreases; {_RESTART_HINT}")

    @classmethod
    def open(cls, path: str | Path) -> TokenStore:
        return cls(path)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.read(i)

    def read(self, i: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Tokens ``start:stop`` of document ``i`` (a copy, int32)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for a store of {n} documents")
        i %= n
        lo, hi = int(self._offsets[i]), int(self._offsets[i + 1])
        s, e, _ = slice(start, stop).indices(hi - lo)
        return np.asarray(self._tokens[lo + s : lo + max(s, e)], dtype=np.int32)

    @property
    def lengths(self) -> np.ndarray:
        """(num_docs,) int64 document lengths in tokens."""
        if self._lengths is None:
            self._lengths = np.diff(np.asarray(self._offsets))
        return self._lengths

    @property
    def offsets(self) -> np.ndarray:
        return self._offsets

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"TokenStore({str(self.path)!r}, documents={len(self)}, tokens={self.num_tokens})"


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def _finalize(out: Path, meta: dict[str, Any]) -> None:
    lengths = np.fromfile(out / "lengths.bin", dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    with open(out / "offsets.npy", "wb") as f:
        np.save(f, offsets)
        f.flush()
        os.fsync(f.fileno())
    meta = {**meta, "num_docs": int(len(lengths)), "num_tokens": int(offsets[-1])}
    _atomic_write_json(out / "meta.json", meta)  # the commit point: before it the store is partial
    (out / "lengths.bin").unlink()
    (out / "progress.json").unlink(missing_ok=True)
    fsync(out)


def _atomic_write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_store(
    out_dir: str | Path,
    docs: Iterable[Sequence[int] | np.ndarray],
    *,
    vocab_size: int,
    eos_id: int = 1,
    pad_id: int = 0,
    extra_meta: dict[str, Any] | None = None,
) -> TokenStore:
    """Write a store from token arrays directly (tests, benchmarks, already-tokenized data); empty docs skipped."""
    dtype = _dtype_for(vocab_size)
    with store_lock(out_dir) as out:
        (out / "meta.json").unlink(missing_ok=True)
        with open(out / "tokens.bin", "wb") as ft, open(out / "lengths.bin", "wb") as fl:
            for doc in docs:
                arr = np.asarray(doc)
                if arr.size == 0:
                    continue
                if arr.min() < 0 or arr.max() >= vocab_size:
                    raise ValueError(f"docs hold ids outside [0, vocab_size={vocab_size})")
                ft.write(arr.astype(dtype).tobytes())
                fl.write(np.int64(arr.size).tobytes())
            for f in (ft, fl):
                f.flush()
                os.fsync(f.fileno())
        meta = {
            "format_version": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": int(vocab_size),
            "eos_id": eos_id,
            "pad_id": pad_id,
            **(extra_meta or {}),
        }
        _finalize(out, meta)
    return TokenStore(out)


# ---------------------------------------------------------------------------------------------------------------
# Pretokenization.

_worker_tok: Any = None


def _worker_init(tokenizer_dir: str, parent_pid: int | None = None) -> None:
    # A forked worker inherits the parent's store lock: close this copy (the parent's stays held), so that a worker
    # that outlived a killed parent cannot keep the store locked.
    for f in _HELD_LOCKS:
        f.close()
    _HELD_LOCKS.clear()
    _die_with_parent(parent_pid)
    # One process per core: the Rust tokenizer's own thread pool would oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from flasht5.data.tokenizer import load_tokenizer

    global _worker_tok
    _worker_tok = load_tokenizer(tokenizer_dir)


def _die_with_parent(parent_pid: int | None) -> None:
    """Linux: have the kernel kill this worker when the process that forked it dies (``kill -9`` included). A pool
    worker otherwise waits forever on a task queue whose other end it holds itself."""
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:  # the parent died before the call
        os._exit(1)


def _encode(tok: Any, texts: list[str], eos_id: int | None, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(flat tokens, per-document lengths) of a batch; empty documents get length 0 (skipped by the writer)."""
    ids = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
    if eos_id is not None:
        ids = [x + [eos_id] if x else x for x in ids]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


def _worker_encode(job: tuple[list[str], int | None, str]) -> tuple[np.ndarray, np.ndarray]:
    texts, eos_id, dtype = job
    return _encode(_worker_tok, texts, eos_id, np.dtype(dtype))


def _fingerprint(tokenizer_dir: Path) -> str:
    h = hashlib.sha256()
    files = (
        [tokenizer_dir]
        if tokenizer_dir.is_file()
        else sorted(f for f in tokenizer_dir.iterdir() if f.is_file() and f.suffix in (".json", ".model"))
    )
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _batches(docs: Iterator[str], batch_docs: int, batch_chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= batch_docs or chars >= batch_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _ordered_map(pool: Any, jobs: Iterator[Any], window: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``pool.imap`` with back-pressure: at most ``window`` batches in flight (imap would read the whole input)."""
    from collections import deque

    pending: deque = deque()
    for job in jobs:
        pending.append(pool.apply_async(_worker_encode, (job,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def pretokenize(
    inputs: str | Path | Sequence[str | Path],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    workers: int = 1,
    text_key: str = "text",
    resume: bool = True,
    append_eos: bool = False,
    progress: bool = True,
    text_split: str = "line",
    encoding_errors: str = "strict",
    batch_docs: int = 256,
    commit_every: float = 30.0,
    tensorboard: str | Path | None = None,
) -> dict[str, Any]:
    """Tokenize documents into a :class:`TokenStore` at ``out_dir`` and return the statistics.

    ``workers`` > 1 tokenizes in that many processes (order preserved); 1 tokenizes here (the Rust tokenizer may
    still use several threads). With ``resume`` a partial store in ``out_dir`` made from the same inputs, tokenizer
    and settings is continued from its last commit (every ``commit_every`` seconds and at the end of each input),
    and a complete one is returned as is; without it ``out_dir`` is started over. ``tensorboard``: a folder that
    receives ``pretokenize/tokens``, ``pretokenize/documents`` and ``pretokenize/tokens_per_s`` at every commit
    (step = seconds since the start).
    """
    from flasht5.data.tokenizer import check_tokenizer_path

    if int(workers) != workers or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    paths = expand_inputs(inputs)
    check_tokenizer_path(tokenizer_dir)
    with store_lock(out_dir) as out:
        return _pretokenize_locked(
            paths, Path(tokenizer_dir), out, workers=workers, text_key=text_key, resume=resume, append_eos=append_eos,
            progress=progress, text_split=text_split, encoding_errors=encoding_errors, batch_docs=batch_docs,
            commit_every=commit_every, tensorboard=tensorboard,
        )  # fmt: skip


def _pretokenize_locked(
    paths: list[Path],
    tok_path: Path,
    out: Path,
    *,
    workers: int,
    text_key: str,
    resume: bool,
    append_eos: bool,
    progress: bool,
    text_split: str,
    encoding_errors: str,
    batch_docs: int,
    commit_every: float,
    tensorboard: str | Path | None = None,
) -> dict[str, Any]:
    from flasht5.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_path)
    vocab_size = len(tok)
    dtype = _dtype_for(vocab_size)
    eos_id = tok.eos_token_id
    if append_eos and eos_id is None:
        raise ValueError("append_eos=True but the tokenizer has no EOS token")
    settings = {
        "inputs": [_input_record(p) for p in paths],
        "tokenizer": str(tok_path.resolve()),
        "tokenizer_fingerprint": _fingerprint(tok_path),
        "text_key": text_key,
        "text_split": text_split,
        "encoding_errors": encoding_errors,
        "append_eos": append_eos,
        "dtype": dtype.name,
    }
    meta_base = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "pad_id": tok.pad_token_id,
        "settings": settings,
    }
    state = {"input_index": 0, "docs_in_input": 0, "num_docs": 0, "num_tokens": 0, "stats": {}}
    if resume and (out / "meta.json").exists():
        store = TokenStore(out)  # refuses a store whose files do not match its record
        _check_same(store.meta.get("settings"), settings, out)
        store.verify()
        for name in ("lengths.bin", "progress.json"):  # left by a kill between the commit and the clean-up
            (out / name).unlink(missing_ok=True)
        return {**store.meta["stats"], "already_complete": True}
    if resume and (out / "progress.json").exists():
        try:
            state = json.loads((out / "progress.json").read_text())
        except ValueError as e:
            raise ValueError(f"{out / 'progress.json'} is unreadable ({e}); {_RESTART_HINT}") from None
        _check_same(state.get("settings"), settings, out)
    else:
        for name in _DATA_FILES:
            (out / name).unlink(missing_ok=True)
    # Drop whatever was written after the last commit.
    with open(out / "tokens.bin", "ab") as f:
        f.truncate(state["num_tokens"] * dtype.itemsize)
    with open(out / "lengths.bin", "ab") as f:
        f.truncate(state["num_docs"] * 8)

    counters = {
        k: 0 for k in ("input_documents", "empty_documents", "empty_files", "replaced_documents", "bytes", "files")
    }
    counters.update(state["stats"])
    resumed_docs, resumed_tokens = state["num_docs"], state["num_tokens"]
    t0 = time.perf_counter()
    pool = None
    if workers > 1:
        import multiprocessing as mp

        # fork where there is one: a spawned worker re-imports torch and transformers (seconds each). Safe here
        # because this process has not run the Rust tokenizer (whose thread pool must not be forked).
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        pool = mp.get_context(method).Pool(workers, initializer=_worker_init, initargs=(str(tok_path), os.getpid()))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=None,
            unit="tok",
            unit_scale=True,
            desc="pretokenize",
            file=sys.stderr,
            initial=state["num_tokens"],
            dynamic_ncols=True,
        )
    ft = open(out / "tokens.bin", "ab")  # noqa: SIM115 - closed in finally
    fl = open(out / "lengths.bin", "ab")  # noqa: SIM115
    last_commit = time.perf_counter()

    from flasht5.events import Scalars

    scalars = Scalars(tensorboard)

    def commit() -> None:
        for f in (ft, fl):
            f.flush()
            os.fsync(f.fileno())
        _atomic_write_json(out / "progress.json", {**state, "settings": settings, "stats": counters})
        elapsed = time.perf_counter() - t0
        scalars.add(round(elapsed), {
            "pretokenize/tokens": state["num_tokens"], "pretokenize/documents": state["num_docs"],
            "pretokenize/tokens_per_s": (state["num_tokens"] - resumed_tokens) / max(elapsed, 1e-9),
        })  # fmt: skip

    try:
        for index in range(state["input_index"], len(paths)):
            path = paths[index]
            skip = state["docs_in_input"] if index == state["input_index"] else 0
            read = ReadStats()
            docs = iter_file_documents(
                path, text_key=text_key, text_split=text_split, encoding_errors=encoding_errors, stats=read
            )
            docs = itertools.islice(docs, skip, None)
            state.update(input_index=index, docs_in_input=skip)
            batches = _batches(docs, batch_docs, batch_chars=batch_docs * 4096)
            eos = eos_id if append_eos else None
            if pool is not None:
                jobs = ((b, eos, dtype.name) for b in batches)
                results: Iterator[tuple[np.ndarray, np.ndarray]] = _ordered_map(pool, jobs, 2 * workers)
            else:
                results = (_encode(tok, b, eos, dtype) for b in batches)
            for flat, lengths in results:
                keep = lengths > 0
                ft.write(flat.tobytes())
                fl.write(lengths[keep].tobytes())
                state["docs_in_input"] += len(lengths)
                state["num_docs"] += int(keep.sum())
                state["num_tokens"] += int(flat.size)
                counters["input_documents"] += len(lengths)
                if bar is not None:
                    bar.update(int(flat.size))
                    bar.set_postfix_str(f"file {index + 1}/{len(paths)}, {state['num_docs']} docs", refresh=False)
                if time.perf_counter() - last_commit >= commit_every:
                    commit()
                    last_commit = time.perf_counter()
            # Empty documents come back as length 0: the reader counted them, including those skipped on resume.
            counters["files"] += 1
            counters["bytes"] += read.bytes
            counters["empty_files"] += read.empty_files
            counters["replaced_documents"] += read.replaced_documents
            counters["empty_documents"] = counters["input_documents"] - state["num_docs"]
            state.update(input_index=index + 1, docs_in_input=0)
            commit()
            last_commit = time.perf_counter()
    finally:
        ft.close()
        fl.close()
        scalars.close()
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    new_tokens = state["num_tokens"] - resumed_tokens
    stats = {
        "documents": state["num_docs"],
        "tokens": state["num_tokens"],
        **counters,
        "resumed_from_documents": resumed_docs,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(new_tokens / seconds, 1) if seconds > 0 else 0.0,
        "workers": workers,
    }
    _finalize(out, {**meta_base, "stats": stats})
    return stats


def _input_record(p: Path) -> dict[str, Any]:
    """What identifies an input's content cheaply: size, modification time (ns) and a hash of its first and last
    MiB (``datasets`` folders: of every file in them). An edit that keeps the size changes the time (and, near
    either end, the hash even if the time is put back); a copy with a new time counts as a change too: a store is
    rebuilt or refused, never silently stale."""
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    h = hashlib.sha256()
    size = mtime = 0
    for f in files:
        st = f.stat()
        size += st.st_size
        mtime = max(mtime, st.st_mtime_ns)
        h.update(f"{f.relative_to(p) if f != p else f.name}:{st.st_size}:".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_END_BYTES))
            if st.st_size > 2 * _END_BYTES:
                fh.seek(st.st_size - _END_BYTES)
            h.update(fh.read(_END_BYTES))
    return {"path": str(p.resolve()), "bytes": size, "mtime_ns": mtime, "ends_sha256": h.hexdigest()[:32]}


def _check_same(old: dict[str, Any] | None, new: dict[str, Any], out: Path) -> None:
    """Refuse to continue or reuse a store made from other inputs or settings, naming what changed."""
    old = old or {}
    # encoding_errors may change between runs: documents already written decoded cleanly under either setting.
    diff = sorted(k for k in new if k not in ("encoding_errors", "inputs") and old.get(k) != new[k])
    changes = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in diff]
    old_inputs, new_inputs = old.get("inputs") or [], new["inputs"]
    if [i.get("path") for i in old_inputs] != [i["path"] for i in new_inputs]:
        changes.append(
            f"inputs: {len(old_inputs)} files {[i.get('path') for i in old_inputs][:3]}... -> "
            f"{len(new_inputs)} files {[i['path'] for i in new_inputs][:3]}..."
        )
    else:
        for o, n in zip(old_inputs, new_inputs):
            what = [k for k in ("bytes", "mtime_ns", "ends_sha256") if o.get(k) != n[k]]
            if what:
                why = "size" if "bytes" in what else ("content" if "ends_sha256" in what else "modification time")
                if "ends_sha256" not in o:
                    why = "record from an older flasht5 (no modification time or content hash)"
                changes.append(f"input {n['path']} changed since the store was made ({why})")
    if changes:
        shown = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
        raise ValueError(f"{out} holds a store made from other inputs or settings: {shown}. {_RESTART_HINT[0].upper()}"
                         f"{_RESTART_HINT[1:]}")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# CLI: flasht5 pretokenize INPUT... --tokenizer DIR --out DIR


def _cli(args: argparse.Namespace) -> int:
    stats = pretokenize(
        args.inputs,
        args.tokenizer,
        args.out,
        workers=args.workers,
        text_key=args.text_key,
        resume=not args.no_resume,
        append_eos=args.append_eos,
        progress=not args.no_progress,
        text_split=args.text_split,
        encoding_errors=args.encoding_errors,
        tensorboard=args.tensorboard,
    )
    if stats.get("already_complete"):
        print(f"{args.out} is already complete: {stats['documents']} documents, {stats['tokens']} tokens")
        return 0
    print(
        f"wrote {args.out}: {stats['documents']} documents, {stats['tokens']} tokens from {stats['files']} inputs "
        f"in {stats['seconds']:.1f} s ({stats['tokens_per_s']:,.0f} tokens/s, {stats['workers']} workers)"
    )
    if stats["empty_documents"] or stats["empty_files"] or stats["replaced_documents"]:
        print(
            f"note: skipped {stats['empty_documents']} empty documents; {stats['empty_files']} inputs had no "
            f"text; {stats['replaced_documents']} documents had invalid UTF-8 replaced"
        )
    if stats["resumed_from_documents"]:
        print(f"resumed after {stats['resumed_from_documents']} documents")
    return 0


def configure_cli(parser: argparse.ArgumentParser) -> None:
    """Add the ``flasht5 pretokenize`` arguments to the given subparser."""
    add_reader_arguments(parser)
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (ours or any T5 tokenizer folder)")
    parser.add_argument("--out", required=True, help="output store folder")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    parser.add_argument("--append-eos", action="store_true", help="store EOS after every document")
    parser.add_argument("--no-resume", action="store_true", help="start over even if --out holds a partial store")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--tensorboard", metavar="DIR", default=None, help="TensorBoard scalars (tokens, documents, tokens/s) in DIR"
    )
    parser.set_defaults(func=_cli)
