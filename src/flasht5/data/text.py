"""Document readers: plain text (optionally gzip), JSON Lines, Parquet and local Hugging Face ``datasets`` folders.

Every reader yields ``str`` documents in a fixed order, so that pretokenization can resume by counting documents.
Plain text files hold one document per line by default (``text_split="line"``); ``"paragraph"`` splits on blank
lines and ``"file"`` makes the whole file one document. Invalid UTF-8 is an error naming the file, line and byte
(``encoding_errors="strict"``) unless ``encoding_errors="replace"`` substitutes U+FFFD; empty files and empty or
whitespace-only documents are yielded as ``""`` so the caller counts them (see :class:`ReadStats`).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

TEXT_SPLITS = ("line", "paragraph", "file")
ENCODING_ERRORS = ("strict", "replace")


@dataclass
class ReadStats:
    """Counters a reader fills while it yields documents."""

    files: int = 0
    empty_files: int = 0
    documents: int = 0
    empty_documents: int = 0
    replaced_documents: int = 0  # documents in which invalid UTF-8 was replaced (encoding_errors="replace")
    bytes: int = 0
    per_file: dict[str, int] = field(default_factory=dict)


def input_kind(path: str | Path) -> str:
    """``"datasets"``, ``"parquet"``, ``"jsonl"`` or ``"text"`` for a path, judged by its name or folder layout."""
    p = Path(path)
    if p.is_dir():
        if (p / "dataset_dict.json").exists():
            splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
            raise ValueError(
                f"{p} is a DatasetDict folder; pass one split folder instead, e.g. {p / 'train'} (splits: {splits})"
            )
        if (p / "state.json").exists() or (p / "dataset_info.json").exists():
            return "datasets"
        raise ValueError(f"{p} is a folder but not a `datasets` save_to_disk folder; pass its files instead")
    name = p.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    return "text"


def _glob(pattern: str) -> list[Path]:
    """Files and folders a shell-style pattern matches (``*``, ``?``, ``[...]``, ``**`` for any depth), sorted."""
    import glob

    return sorted(Path(m) for m in glob.glob(os.path.expanduser(pattern), recursive=True))


def _is_datasets_folder(p: Path) -> bool:
    return (p / "state.json").exists() or (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()


def _folder_files(p: Path, allow_empty: bool = False) -> list[Path]:
    files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    if not files and not allow_empty:
        raise ValueError(f"input folder {p} holds no files")
    return files


def expand_inputs(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    """Resolve input paths: files, `datasets` folders, plain folders (their files, in sorted order) and glob patterns
    (``data/*.jsonl.gz``, ``shards/**/*.parquet``: the matches in sorted order, each file once). A path that exists
    as written is taken literally even if its name holds glob characters; ``~`` is expanded."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    out: list[Path] = []
    for item in inputs:
        p = Path(os.path.expanduser(str(item)))
        if not p.exists() and glob_magic(str(item)):
            matches = _glob(str(item))
            if not matches:
                raise ValueError(f"input pattern {str(item)!r} matches no files")
            found: dict[Path, None] = {}  # ordered set: `**` matches a folder and the files in it
            for m in matches:
                for f in [m] if m.is_file() or _is_datasets_folder(m) else _folder_files(m, allow_empty=True):
                    found.setdefault(f, None)
            if not found:
                raise ValueError(f"input pattern {str(item)!r} matches only empty folders")
            out.extend(found)
        elif not p.exists():
            raise ValueError(f"input {str(item)!r} does not exist")
        elif p.is_dir() and not _is_datasets_folder(p):
            out.extend(_folder_files(p))
        else:
            out.append(p)
    if not out:
        raise ValueError("no inputs given")
    return out


def glob_magic(text: str) -> bool:
    """Whether ``text`` holds glob characters (``*``, ``?`` or ``[``)."""
    return re.search(r"[*?\[]", text) is not None


def _open_binary(path: Path) -> io.BufferedIOBase:
    f = open(path, "rb")  # noqa: SIM115 - handed to the caller
    if f.read(2) == b"\x1f\x8b":
        f.close()  # a GzipFile over a file object would not close it (an unclosed-file ResourceWarning per input)
        return gzip.open(path, "rb")  # type: ignore[return-value]
    f.seek(0)
    return f


def _decode(raw: bytes, path: Path, line_no: int, errors: str, stats: ReadStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "strict":
            raise ValueError(
                f"{path}: line {line_no}: invalid UTF-8 byte 0x{raw[e.start]:02x} at byte {e.start} of the line; "
                "fix the file, or substitute U+FFFD with encoding_errors='replace' (`flasht5 pretokenize` and "
                "`flasht5 tokenizer train`: --encoding-errors replace; for `flasht5 train`, pretokenize the corpus "
                "that way into the folder that data.store names first)"
            ) from None
        stats.replaced_documents += 1
        return raw.decode("utf-8", errors="replace")


def _iter_text(path: Path, split: str, errors: str, stats: ReadStats) -> Iterator[str]:
    with _open_binary(path) as f:
        if split == "file":
            raw = f.read()
            stats.bytes += len(raw)
            yield _decode(raw, path, 1, errors, stats)
            return
        para: list[str] = []
        for line_no, raw in enumerate(f, start=1):
            stats.bytes += len(raw)
            text = _decode(raw, path, line_no, errors, stats).rstrip("\r\n")
            if split == "line":
                yield text
            elif text.strip():
                para.append(text)
            elif para:
                yield "\n".join(para)
                para = []
        if split == "paragraph" and para:
            yield "\n".join(para)


def json_object(line: str, where: str) -> dict:
    """The JSON object on one JSON Lines line, or a ``ValueError`` that names ``where`` (the file and line)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not JSON ({e.msg}, column {e.colno}); give one object per line") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where} is a JSON {type(obj).__name__}, not an object")
    return obj


def _iter_jsonl(path: Path, text_key: str, errors: str, stats: ReadStats) -> Iterator[str]:
    with _open_binary(path) as f:
        for line_no, raw in enumerate(f, start=1):
            stats.bytes += len(raw)
            if not raw.strip():
                continue  # blank separator lines are not documents in JSON Lines
            try:
                obj = json.loads(_decode(raw, path, line_no, errors, stats))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or text_key not in obj:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise ValueError(f"{path}: line {line_no}: no text_key {text_key!r} (found {keys})")
            text = obj[text_key]
            if text is None:
                text = ""
            if not isinstance(text, str):
                raise ValueError(f"{path}: line {line_no}: {text_key!r} holds {type(text).__name__}, not a string")
            yield text


def _iter_parquet(path: Path, text_key: str, stats: ReadStats) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_key not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column text_key {text_key!r} (columns: {pf.schema_arrow.names})")
    stats.bytes += path.stat().st_size
    for batch in pf.iter_batches(columns=[text_key], batch_size=4096):
        for text in batch.column(0).to_pylist():
            yield "" if text is None else text


def _iter_datasets(path: Path, text_key: str, stats: ReadStats) -> Iterator[str]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if text_key not in ds.column_names:
        raise ValueError(f"{path}: no column text_key {text_key!r} (columns: {ds.column_names})")
    col = ds.select_columns([text_key])
    for batch in col.iter(batch_size=4096):
        for text in batch[text_key]:
            yield "" if text is None else text


def iter_file_documents(
    path: str | Path,
    *,
    text_key: str = "text",
    text_split: str = "line",
    encoding_errors: str = "strict",
    stats: ReadStats | None = None,
) -> Iterator[str]:
    """Documents of one input (file or `datasets` folder), empty ones included (as ``""``) and counted."""
    if text_split not in TEXT_SPLITS:
        raise ValueError(f"text_split must be one of {TEXT_SPLITS}, got {text_split!r}")
    if encoding_errors not in ENCODING_ERRORS:
        raise ValueError(f"encoding_errors must be 'strict' or 'replace', got {encoding_errors!r}")
    stats = stats if stats is not None else ReadStats()
    p = Path(path)
    kind = input_kind(p)
    if kind == "datasets":
        it = _iter_datasets(p, text_key, stats)
    elif kind == "parquet":
        it = _iter_parquet(p, text_key, stats)
    elif kind == "jsonl":
        it = _iter_jsonl(p, text_key, encoding_errors, stats)
    else:
        it = _iter_text(p, text_split, encoding_errors, stats)
    stats.files += 1
    n = nonempty = 0
    for text in it:
        n += 1
        stats.documents += 1
        if text.strip():
            nonempty += 1
        else:
            stats.empty_documents += 1
        yield text
    stats.per_file[str(p)] = n
    if nonempty == 0:
        stats.empty_files += 1  # no text at all: worth a warning, not an error (a shard may be empty)


def iter_documents(
    inputs: str | Path | Sequence[str | Path],
    *,
    text_key: str = "text",
    text_split: str = "line",
    encoding_errors: str = "strict",
    skip_empty: bool = True,
    stats: ReadStats | None = None,
) -> Iterator[str]:
    """Documents of all inputs in order; empty documents are skipped (and counted) unless ``skip_empty=False``."""
    for path in expand_inputs(inputs):
        for text in iter_file_documents(
            path, text_key=text_key, text_split=text_split, encoding_errors=encoding_errors, stats=stats
        ):
            if skip_empty and not text.strip():
                continue
            yield text


def add_reader_arguments(parser: argparse.ArgumentParser) -> None:
    """The input arguments every command that reads documents takes: ``inputs``, ``--text-key``,
    ``--text-split``, ``--encoding-errors`` (``flasht5 tokenizer train`` and ``flasht5 pretokenize``)."""
    parser.add_argument(
        "inputs",
        nargs="+",
        help="text (.txt[.gz], one document per line), JSONL, Parquet files, "
        "folders of them, or `datasets` save_to_disk folders",
    )
    parser.add_argument("--text-key", default="text", help="JSONL/Parquet/datasets column holding the text")
    parser.add_argument(
        "--text-split", choices=TEXT_SPLITS, default="line", help="what one document is in a plain text file"
    )
    parser.add_argument(
        "--encoding-errors",
        choices=ENCODING_ERRORS,
        default="strict",
        help="invalid UTF-8: fail with the file and line (strict) or substitute U+FFFD",
    )
