"""transformers' own common model tests (``ModelTesterMixin`` of the installed release, assertions untouched) on
flasht5's encoder-only classes (see conftest.py and hf_suite_common.py)."""

from __future__ import annotations

import pytest
from hf_suite_upstream import WHY_NOT

if WHY_NOT:
    pytest.skip(WHY_NOT, allow_module_level=True)

import hf_suite_common  # noqa: E402

FlashT5EncoderOnlyModelTest = hf_suite_common.encoder_suite()


def test_the_parts_cover_the_whole_suite():
    """Guard: the seq2seq parts together hold every common test once, and there are many (not an empty suite)."""
    whole = hf_suite_common.test_names(hf_suite_common.seq2seq_suite(0, 1))
    parts = [hf_suite_common.test_names(hf_suite_common.seq2seq_suite(p, 3)) for p in range(3)]
    assert sorted(n for part in parts for n in part) == whole
    assert len(whole) > 100 and len(hf_suite_common.test_names(FlashT5EncoderOnlyModelTest)) > 100
