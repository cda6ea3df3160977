"""Rebuild kjv_train.txt.gz / kjv_heldout.txt.gz from the verse dump of Debian's bible-kjv (see README.md).

One document per line = one chapter (its verses joined by spaces, verse numbers dropped). Every 20th chapter
(chapter index % 20 == 19, counted over the whole book) goes to the held-out file. gzip mtime is 0 so the output
is byte-identical on every run.
"""

from __future__ import annotations

import gzip
import re
import sys
from pathlib import Path

VERSE = re.compile(r"^(?P<book>[1-3]?[A-Za-z]+)(?P<chapter>\d+):(?P<verse>\d+) (?P<text>.*)$")


def main(src: str, out_dir: str) -> None:
    chapters: list[list[str]] = []
    key = None
    for line in Path(src).read_text(encoding="ascii").splitlines():
        m = VERSE.match(line)
        if m is None:
            raise ValueError(f"unexpected line in {src}: {line!r}")
        if (m["book"], m["chapter"]) != key:
            key = (m["book"], m["chapter"])
            chapters.append([])
        chapters[-1].append(m["text"].strip())
    out = Path(out_dir)
    splits = {"train": [], "heldout": []}
    for i, verses in enumerate(chapters):
        splits["heldout" if i % 20 == 19 else "train"].append(" ".join(verses))
    for name, docs in splits.items():
        with open(out / f"kjv_{name}.txt.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write(("\n".join(docs) + "\n").encode("utf-8"))
        print(f"{name}: {len(docs)} chapters")


if __name__ == "__main__":
    main(*sys.argv[1:3])
