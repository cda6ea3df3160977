"""Plot of call A/B's decode tables: us per call vs Lk, per batch (T5 lookup): the lane kernel (call B's main table),
the tensor-core kernel (decode-mma.md), the previous decode path and SDPA without bias.

  python3 benchmarks/results/2026-12-02-h200-d/plot_decode.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent


def table(name: str) -> list[dict]:
    """The first table's rows: B, Lk, bias, ours, current, sdpa (by position: a header holds a '|')."""
    lines = [ln for ln in (HERE / name).read_text().splitlines() if ln.startswith("|")]
    rows = []
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if not cells[0].isdigit():
            break
        rows.append(dict(B=cells[0], Lk=cells[1], bias=cells[2], ours=cells[5], current=cells[7], sdpa=cells[8]))
    return rows


lanes = [r for r in table("decode-sweep.md") if r["bias"] == "t5"]
mma = [r for r in table("decode-mma.md") if r["bias"] == "t5"]
fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
for ax, B in zip(axes, ("1", "8", "32")):
    for rows, col, label, colour in ((mma, "ours", "tensor-core split kernel (now)", "#d62828"),
                                     (lanes, "ours", "lane split kernel (before)", "#f4a261"),
                                     (mma, "current", "previous path (flash_attention, Lq=1)", "#555555"),
                                     (mma, "sdpa", "SDPA default, no bias", "#2a9d8f")):  # fmt: skip
        rs = [r for r in rows if r["B"] == B]
        ax.plot([int(r["Lk"]) for r in rs], [float(r[col]) for r in rs], "o-", label=label, color=colour)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title(f"decode step, batch {B} (H=12, D=64, T5 lookup)", fontsize=9)
    ax.set_xlabel("cached keys")
    ax.set_ylabel("us per call (CUDA graph, cold L2)")
axes[0].legend(fontsize=7)
fig.tight_layout()
fig.savefig(HERE / "decode.png", dpi=120)
