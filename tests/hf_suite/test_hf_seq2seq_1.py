"""transformers' own common model tests (``ModelTesterMixin`` of the installed release, assertions untouched) on
flasht5's seq2seq classes, part 2 of 3 (see conftest.py and hf_suite_common.py)."""

from __future__ import annotations

import pytest
from hf_suite_upstream import WHY_NOT

if WHY_NOT:
    pytest.skip(WHY_NOT, allow_module_level=True)

import hf_suite_common  # noqa: E402

FlashT5ModelTest = hf_suite_common.seq2seq_suite(1, 3)
