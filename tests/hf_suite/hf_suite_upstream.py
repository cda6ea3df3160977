"""Makes transformers' own ``tests/`` folder importable as the package ``hf_upstream`` (see conftest.py)."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import transformers

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from fetch_upstream import upstream_dir  # noqa: E402

UPSTREAM = Path(os.environ.get("FLASHT5_HF_TESTS") or upstream_dir(transformers.__version__))
PACKAGE = "hf_upstream"  # the upstream tests/ folder, imported as this package

# Upstream modules that the source distribution does not ship -> the stand-in's attributes (empty mixins).
MISSING = {
    "exporters.test_export": ("ExportTesterMixin",),  # torch.export tests: not run
    "generation.test_utils": ("GenerationTesterMixin",),  # generate tests: tests/test_generation.py covers generate
}


def _install() -> str | None:
    """Make ``hf_upstream`` importable; returns why not, or None."""
    if not (UPSTREAM / "test_modeling_common.py").is_file():
        return f"transformers' tests/ folder not found at {UPSTREAM} (run `make test`, or set FLASHT5_HF_TESTS)"
    if PACKAGE in sys.modules:
        return None
    pkg = types.ModuleType(PACKAGE)
    pkg.__path__ = [str(UPSTREAM)]
    sys.modules[PACKAGE] = pkg
    for name, attrs in MISSING.items():
        parts = name.split(".")
        if (UPSTREAM.joinpath(*parts[:-1]) / f"{parts[-1]}.py").is_file():
            continue  # a full checkout has the real one
        for i in range(1, len(parts) + 1):
            full = ".".join([PACKAGE, *parts[:i]])
            if full not in sys.modules:
                mod = types.ModuleType(full)
                if i < len(parts):
                    mod.__path__ = []
                sys.modules[full] = mod
        leaf = sys.modules[".".join([PACKAGE, *parts])]
        for attr in attrs:
            setattr(leaf, attr, type(attr, (), {}))
    return None


WHY_NOT = _install()
