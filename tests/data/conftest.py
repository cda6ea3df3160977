"""Shared fixtures for the data tests: a slice of the shipped corpus and one tiny tokenizer per session."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parents[2] / "data" / "corpus"


@pytest.fixture(scope="session")
def corpus_docs() -> list[str]:
    """The first 120 chapters of the shipped training split (one document each)."""
    with gzip.open(CORPUS / "kjv_train.txt.gz", "rt", encoding="utf-8") as f:
        return [next(f).rstrip("\n") for _ in range(120)]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory, corpus_docs: list[str]) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "kjv_small.txt"
    path.write_text("\n".join(corpus_docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    from flasht5.data.tokenizer import train_tokenizer

    return train_tokenizer(
        [corpus_file], tmp_path_factory.mktemp("tok") / "unigram", vocab_size=400, seed=0, character_coverage=1.0
    )
