"""Shared benchmark harness: timing, throughput, memory, and the results-file writer.

Every benchmark measures its competitors in the same process and run (DESIGN.md §6) and writes a markdown
table to ``benchmarks/results/<date>-<gpu>.md`` (or to ``--out``), headed by the exact command and versions.
"""

from __future__ import annotations

import datetime as _dt
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def bench(fn: Callable[[], object], *, warmup: int = 10, rep: int = 50) -> float:
    """Median milliseconds of ``fn()`` on the GPU (``triton.testing.do_bench``), CPU wall time otherwise."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    import time

    for _ in range(max(1, warmup // 5)):
        fn()
    times = []
    for _ in range(max(3, rep // 10)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak CUDA bytes allocated while running ``fn()`` once, above what was allocated before (0 on CPU)."""
    if not torch.cuda.is_available():
        fn()
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def attention_flops(batch: int, heads: int, lq: int, lk: int, head_dim: int, *, causal: bool, mode: str) -> float:
    """FLOPs of attention as flash-attention counts them (causal halves the work; backward = 2.5x forward)."""
    f = 4.0 * batch * heads * lq * lk * head_dim
    if causal:
        f /= 2
    return {"fwd": f, "bwd": 2.5 * f, "fwd_bwd": 3.5 * f}[mode]


def gpu_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace("NVIDIA ", "").replace(" ", "-").lower()
    return "cpu"


def versions() -> str:
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for mod in ("triton", "transformers"):
        try:
            parts.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            parts.append(f"{mod} -")
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name()}")
    return ", ".join(parts)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = columns or list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(title: str, body: str, out: str | Path | None = None) -> Path:
    """Append a section (title, command, versions, body) to the results file and return its path."""
    path = Path(out) if out else RESULTS_DIR / f"{_dt.date.today().isoformat()}-{gpu_name()}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = " ".join(["python3", *sys.argv])
    section = f"\n## {title}\n\nCommand: `{cmd}`\n\nVersions: {versions()}\n\n{body}\n"
    with path.open("a") as f:
        f.write(section)
    return path
