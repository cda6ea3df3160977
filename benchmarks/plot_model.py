"""Plot of bench_model.py: training tokens/s against encoder length, one line per implementation.

Lines join the dense shapes of one token budget per batch (the largest batch at each length, 16k tokens at the
defaults: 512 x 32, 2048 x 8, 8192 x 2, 16384 x 1); other dense batches (512 x 16) are hollow markers, the ragged
batch a star at its mean encoder length. OOM / failed rows are left out of the lines.

Replot from the raw numbers: python3 benchmarks/plot_model.py results/<date>-h200-model.json [out.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STYLE = {  # implementation -> (colour, line style)
    "hf-eager": ("#999999", ":"),
    "hf-sdpa": ("#555555", "--"),
    "nai-t5": ("#2a9d8f", "-."),
    "flasht5-eager": ("#f4a261", "-"),
    "flasht5-graph": ("#d62828", "-"),
    "flasht5-bf16": ("#7b2cbf", "-"),
}


def plot(rows: list[dict], path: str | Path, title: str = "T5 training step") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "ms" in r]
    fig, ax = plt.subplots(figsize=(8, 5))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    # The line's batch at each length: the one with the most tokens among the dense shapes of that length.
    dense = [r for r in rows if not r["ragged"]]
    line_n = {L: max(r["n"] for r in dense if r["L"] == L) for L in {r["L"] for r in dense}}
    for impl in impls:
        color, ls = STYLE.get(impl, (None, "-"))
        mine = [r for r in ok if r["impl"] == impl]
        label = next(r["label"] for r in rows if r["impl"] == impl)
        line = sorted(
            (r["L"], r["real_tokens"] / r["ms"] * 1e3) for r in mine if not r["ragged"] and r["n"] == line_n[r["L"]]
        )
        if line:
            ax.plot(*zip(*line), ls, marker="o", color=color, label=label)
        other = [
            (r["L"], r["real_tokens"] / r["ms"] * 1e3) for r in mine if not r["ragged"] and r["n"] != line_n[r["L"]]
        ]
        if other:
            ax.plot(*zip(*other), "o", mfc="none", color=color)
        for r in mine:
            if r["ragged"]:
                ax.plot(r["mean_enc_len"], r["real_tokens"] / r["ms"] * 1e3, "*", ms=12, color=color)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("encoder length L (tokens; decoder length = L for the dense shapes)")
    ax.set_ylabel("training tokens/s (real encoder + decoder tokens)")
    ax.set_title(title + "\nline: largest batch per L; hollow: smaller batch; star: ragged batch at its mean L")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def main() -> None:
    src = Path(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else src.with_suffix(".png")
    data = json.loads(src.read_text())
    print(plot(data["rows"], out, title=f"T5 {data.get('preset', '')} training step"))


if __name__ == "__main__":
    main()
