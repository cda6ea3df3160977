"""Shared benchmark harness: timing, throughput, memory, and the results-file writer.

Every benchmark measures its competitors in the same process and run (DESIGN.md §6) and writes a markdown
table to ``benchmarks/results/<date>-<gpu>.md`` (or to ``--out``), headed by the exact command and versions.
"""

from __future__ import annotations

import datetime as _dt
import platform
import sys
import time
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


def graph_us(calls: list, target_ms: float = 15.0, replays: int = 7) -> float:
    """Median microseconds per call of ``calls`` (zero-argument callables) captured in a CUDA graph, in turn."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: compiles, caches launch configs, cuBLAS/cuDNN state
        for c in calls[:2]:
            c()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    def capture(rounds: int) -> torch.cuda.CUDAGraph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(rounds):
                for c in calls:
                    c()
        return g

    def replay_ms(g: torch.cuda.CUDAGraph) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    g = capture(1)
    replay_ms(g)
    once = min(replay_ms(g) for _ in range(3))
    rounds = max(1, min(int(target_ms / max(once, 1e-3)), max(1, 4000 // len(calls))))
    if rounds > 1:
        del g
        g = capture(rounds)
        replay_ms(g)
    times = sorted(replay_ms(g) for _ in range(replays))
    return times[len(times) // 2] * 1e3 / (rounds * len(calls))


def host_us(fn: Callable[[], object], *, n: int = 500, warmup: int = 20, repeats: int = 3) -> float:
    """Wall microseconds per call of ``fn`` (CUDA synchronised before and after each repeat of ``n`` calls, the
    fastest repeat, the garbage collector paused): on tiny inputs that is the call's host overhead."""
    import gc
    import time

    for _ in range(warmup):
        fn()
    best = float("inf")
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - t0) / n * 1e6)
    finally:
        gc.enable()
    return best


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


def write_sections(title: str, sections: list[tuple[str, str]], out: str | Path | None, t_start: float) -> None:
    """:func:`write_results` of ``### title`` sections plus the benchmark's wall time; prints them too."""
    body = "\n".join(f"### {t}\n\n{b}" for t, b in sections)
    body += f"\nTotal benchmark wall time: {time.perf_counter() - t_start:.0f} s\n"
    path = write_results(title, body, out=out)
    print(body)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------------------------
# Whole-model training benchmarks: step timing, FLOPs, matmul peak, GPU-busy fraction
# ----------------------------------------------------------------------------------------------------------------


def step_times(step_fn: Callable[[], object], iters: int) -> list[float]:
    """Milliseconds of each of ``iters`` back-to-back calls of ``step_fn``.

    On the GPU every call is bracketed by CUDA events and nothing synchronises between calls, so a host-bound step
    shows up as GPU idle time inside its bracket (steady-state throughput either way); one synchronisation at the
    end. On the CPU: wall time per call.
    """
    if torch.cuda.is_available():
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        torch.cuda.synchronize()
        for start, end in events:
            start.record()
            step_fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]
    import time

    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step_fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def matmul_peak_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16, reps: int = 30) -> float:
    """The dense matmul ceiling measured now: median TFLOP/s of an ``n x n @ n x n`` ``torch.mm`` on random data.

    Random normal inputs (not zeros: tensor cores draw less power on zeros and clock higher). The denominator of
    MFU, measured in the same run as the model so that clocks and the GPU's state are the ones the model saw.
    On the CPU it runs a small fp32 product (only to exercise the code path).
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        n, dtype, reps = min(n, 256), torch.float32, min(reps, 3)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    ms = median(step_times(lambda: torch.mm(a, b, out=out), reps))
    return tflops(2.0 * n**3, ms)


def t5_train_flops(cfg, enc_lens, dec_lens) -> float:
    """Model FLOPs of one T5 training step (forward + backward) over documents of these lengths.

    ``cfg``: a flasht5 or transformers T5 config (``d_model``, ``d_kv``, ``num_heads``, ``d_ff``, ``num_layers``,
    ``num_decoder_layers``, ``vocab_size``, ``feed_forward_proj``). ``enc_lens[i]`` / ``dec_lens[i]``: the real
    (non-padding) encoder / decoder length of document i; a dense batch is B documents of the same lengths, a
    packed batch is its documents. Padding is not model work: a padded implementation gets the same count.

    Matmuls: 6 FLOPs (2 forward, 4 backward) per parameter per token that goes through it:
      encoder layer, per encoder token: q, k, v, o (4 d*inner) + MLP ((2 if gated else 1) * d*d_ff + d_ff*d);
      decoder layer, per decoder token: self q, k, v, o (4 d*inner) + cross q, o (2 d*inner) + MLP;
      decoder layer, per *encoder* token: the cross-attention k, v projections (2 d*inner);
      LM head, per decoder token: d*vocab (tied or not, it is a matmul). Embedding lookups and norms: 0.
    Attention scores and values: forward 4 * Lq * Lk * inner per layer (QK^T and PV, 2 FLOPs per MAC), backward
    twice the forward, so 12 * Lq * Lk * inner per layer and document: encoder self (Le, Le), decoder self
    (Ld, Ld) counted half (causal), cross (Ld, Le). inner = num_heads * d_kv.
    """
    d, inner, dff, vocab = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, cfg.vocab_size
    n_enc = cfg.num_layers
    n_dec = getattr(cfg, "num_decoder_layers", None) or cfg.num_layers
    n_in = 2 if "gated" in cfg.feed_forward_proj else 1
    mlp = n_in * d * dff + dff * d
    enc_layer = 4 * d * inner + mlp  # params applied to each encoder token, per encoder layer
    dec_layer = 6 * d * inner + mlp  # per decoder token, per decoder layer (self q,k,v,o + cross q,o + MLP)
    cross_kv = 2 * d * inner  # per encoder token, per decoder layer
    enc_lens = [int(x) for x in enc_lens]
    dec_lens = [int(x) for x in dec_lens]
    if len(enc_lens) != len(dec_lens):
        raise ValueError(f"enc_lens and dec_lens must pair up documents: {len(enc_lens)} != {len(dec_lens)}")
    te, td = sum(enc_lens), sum(dec_lens)
    matmul_params_tokens = te * (n_enc * enc_layer + n_dec * cross_kv) + td * (n_dec * dec_layer + d * vocab)
    attn = 0.0
    for le, ld in zip(enc_lens, dec_lens):
        attn += n_enc * le * le + n_dec * (0.5 * ld * ld + ld * le)
    return 6.0 * matmul_params_tokens + 12.0 * inner * attn


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the union of ``(start, end)`` intervals (overlaps counted once)."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def device_intervals_us(prof, device: str = "cuda") -> list[tuple[float, float]]:
    """(start, end) in microseconds of every activity on ``device`` in a finished ``torch.profiler`` trace.

    On CUDA that is every device-side record (kernels, also those replayed from CUDA graphs, memcpy, memset).
    Reads the raw Kineto records, which skips the slow FunctionEvent tree building of ``prof.events()``.
    """
    want = torch.autograd.DeviceType.CUDA if device == "cuda" else torch.autograd.DeviceType.CPU
    try:
        raw = prof.profiler.kineto_results.events()
    except AttributeError:  # a torch without the raw records: the parsed (slower) event list
        return [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == want]
    return [
        (e.start_ns() / 1e3, e.end_ns() / 1e3) for e in raw if e.device_type() == want and e.end_ns() > e.start_ns()
    ]


def gpu_busy_fraction(step_fn: Callable[[], object], steps: int = 5, step_ms: float | None = None) -> float:
    """Fraction of wall time during which the GPU runs something, over ``steps`` calls of ``step_fn``.

    = union of the device activity intervals in a ``torch.profiler`` trace (CUDA activity only, so the host side
    is not slowed by CPU-op recording) / wall time of those steps. ``step_ms``: take the wall time as
    ``steps * step_ms`` (a step time measured without the profiler) instead of the profiled steps' own host wall
    time, which CUPTI's per-launch overhead inflates for launch-bound code; the result is capped at 1.
    NaN on the CPU or when the trace holds no device records.
    """
    if not torch.cuda.is_available():
        return float("nan")
    import time

    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step_fn()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    busy = union_length(device_intervals_us(prof, "cuda"))
    if step_ms is not None:
        wall_us = steps * step_ms * 1e3
    if busy <= 0 or wall_us <= 0:
        return float("nan")
    return min(1.0, busy / wall_us)
