"""Fetch transformers' own test harness (``tests/`` of its source release) for tests/hf_suite.

The source distribution of the installed transformers version comes from the package index through pip
(``pip download --no-binary``) and only its ``tests/`` folder is kept, under ``.venv/hf-tests/transformers-X/``
(``make test`` runs this once; nothing of it is committed). Offline, it says so and exits 0: the suite then skips
itself with that reason. Usage: ``python tests/hf_suite/fetch_upstream.py [DEST]``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def upstream_dir(version: str, base: Path | None = None) -> Path:
    return (base or ROOT / ".venv" / "hf-tests") / f"transformers-{version}" / "tests"


def fetch(version: str, base: Path | None = None) -> Path:
    dest = upstream_dir(version, base)
    if (dest / "test_modeling_common.py").is_file():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", tmp,
               f"transformers=={version}"]  # fmt: skip
        subprocess.run(cmd, check=True, timeout=600)
        (sdist,) = Path(tmp).glob("transformers-*.tar.gz")
        prefix = f"transformers-{version}/tests/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
            tar.extractall(tmp, members=members, filter="data")
        part = dest.with_name(dest.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        part.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(Path(tmp) / prefix), part)
        part.replace(dest)
    return dest


def main() -> int:
    import transformers

    base = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    try:
        print(f"transformers {transformers.__version__} test harness in {fetch(transformers.__version__, base)}")
    except Exception as e:  # offline: tests/hf_suite skips itself, naming this reason
        print(f"could not fetch transformers' test harness ({e!r}); tests/hf_suite will be skipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
