"""Generation and encoder inference on one GPU: flasht5 against transformers' T5 and nai-t5, same weights, same run.

Every implementation holds the same random T5 v1.1-base weights (flasht5's core T5 built with a fixed seed and
exported with flasht5's converter; transformers and nai-t5 load that state dict), cast to bf16, in eval mode.

Generation (issue 11's setting): 512 input tokens (dense rows, no mask: as a user at their best would pass them),
128 new tokens, greedy, ``min_new_tokens=128`` (every row decodes all 128), batch 1 and 32; optionally beam search
(``--beams``: 4 beams, batch 8), a ragged batch (``--ragged``: 32 inputs of 64-512 tokens, right-padded with an
attention mask; flasht5's encoder runs them padding-free) and a long input (``--long``: 16384 tokens, batch 1,
flasht5 and transformers sdpa).

  transformers eager / sdpa  ``T5ForConditionalGeneration.generate`` (its dynamic cache); the faster is the
                             baseline of the speedup column
  nai-t5                     NovelAI's T5, greedy over its preallocated self-attention cache and precomputed
                             cross-attention K/V, as its examples/t5_decoder_fast.py does (one eager step per token)
  flasht5                    ``FlashT5ForConditionalGeneration.generate`` (flash backend: flasht5's fast loop,
                             static cache, CUDA-graph decode step, flash_decode)

Columns: new tok/s = batch x 128 / wall time of one whole ``generate`` call (encoder included; the median of
``--reps`` calls after one warm-up call); ms/token = that time / 128; GPU busy = the union of the device activity
in a profiler trace of one call / its unprofiled wall time; peak GiB = max_memory_allocated during the warm-up call
above what was allocated before (the weights are not counted); same tokens = the fraction of generated tokens equal
to transformers sdpa's (bf16: greedy paths drift apart once two logits are within rounding; a low value on a
random model is not a bug by itself, the fp32 GPU tests check exactness).

Encoder only: 32 x 512 and 8 x 2048 input tokens (dense; ``--encoder-shapes``), input tok/s of one forward
(``triton.testing.do_bench`` median):
``FlashT5EncoderModel`` (flash backend), transformers' ``T5EncoderModel`` (eager, sdpa), nai-t5's SDPA encoder and
its Flex encoder under ``torch.compile`` (norm scales fused, as its benchmark_encoder.py does).

Writes ``<out>/generate.md`` (the table, command, versions), ``generate.json`` (raw numbers), ``generate.png``.

GPU (from the repo root; nai-t5 wheels carried in .wheels/, see ../shared/wheels/README.md), < 4 minutes:
  python3 -m pip install -q --no-index --no-deps --target .wheels/site .wheels/*.whl
  PYTHONPATH=src:.wheels/site python3 benchmarks/bench_generate.py --beams --ragged --out $OUT/bench_generate
CPU smoke test (tiny config, 8 new tokens, flasht5 on sdpa, no nai-t5 compile):
  PYTHONPATH=src python benchmarks/bench_generate.py --dry-run --out /tmp/bench_generate
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import flasht5_reference_state, hf_model, nai_available, nai_model, tiny_config  # noqa: E402
from utils import bench, gpu_busy_fraction, markdown_table, median, versions  # noqa: E402

GEN_IMPLS = ("flasht5", "hf-sdpa", "hf-eager", "nai-t5")  # flasht5 first: never cut by the time budget
LABELS = {"hf-eager": "transformers eager", "hf-sdpa": "transformers sdpa", "nai-t5": "nai-t5",
          "flasht5": "flasht5", "nai-t5-flex": "nai-t5 Flex (compiled)"}  # fmt: skip
TARGETS = {  # issue 11: (new tok/s ratio to the best transformers row, to nai-t5)
    "batch 1": (10.0, 8.0),
    "batch 32": (5.0, None),
    "beams 4 x batch 8": (4.0, None),
}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# The models, each with the shared weights
# ----------------------------------------------------------------------------------------------------------------


def flasht5_lm(cfg, state: dict, device: str, dtype: torch.dtype, backend: str):
    from flasht5.modeling import FlashT5ForConditionalGeneration

    with torch.device(device):
        model = FlashT5ForConditionalGeneration(cfg)
    model.model.load_state_dict(state)
    model.model.set_backend(backend)
    return model.to(dtype).eval()


def flasht5_encoder(cfg, state: dict, device: str, dtype: torch.dtype, backend: str):
    from flasht5.modeling import FlashT5EncoderModel

    with torch.device(device):
        model = FlashT5EncoderModel(cfg)
    enc_state = {k: v for k, v in state.items() if k.startswith(("shared.", "encoder."))}
    model.model.load_state_dict(enc_state)
    model.model.set_backend(backend)
    return model.to(dtype).eval()


def hf_encoder(hf_kwargs: dict, hf_state: dict, impl: str, device: str, dtype: torch.dtype):
    import transformers

    with torch.device(device):
        model = transformers.T5EncoderModel(transformers.T5Config(**hf_kwargs, attn_implementation=impl))
    enc_state = {k: v for k, v in hf_state.items() if k.startswith(("shared.", "encoder."))}
    missing, unexpected = model.load_state_dict(enc_state, strict=False)
    if unexpected or set(missing) - {"encoder.embed_tokens.weight"}:
        raise RuntimeError(f"transformers T5 encoder load: missing {missing}, unexpected {unexpected}")
    return model.to(dtype).eval()


def nai_encoder(hf_kwargs: dict, hf_state: dict, n_tokens: int, device: str, dtype: torch.dtype, *, flex: bool):
    import transformers
    from nai_t5 import hf_to_based_t5_enc_state, to_based_config
    from nai_t5.t5_common import T5AttnImpl
    from nai_t5.t5_encoder import T5EncoderStack

    update = dict(emb_weight_dtype=dtype, linear_weight_dtype=dtype, norm_weight_dtype=dtype)
    if flex:
        update["attn_impl"] = T5AttnImpl.Flex
    cfg = to_based_config(transformers.T5Config(**hf_kwargs), n_tokens=n_tokens).model_copy(update=update)
    with torch.device(device):
        enc = T5EncoderStack(cfg).eval()
    enc.load_state_dict(hf_to_based_t5_enc_state(hf_state, cfg))
    if flex:
        from nai_t5.fuse_norm_scales import fuse_norm_scales_enc

        fuse_norm_scales_enc(enc)
        with torch.inference_mode():
            enc.bind_score_mods(n_tokens)
    return enc


# ----------------------------------------------------------------------------------------------------------------
# One generate call per implementation
# ----------------------------------------------------------------------------------------------------------------


def hf_like_generate(
    model, ids: torch.Tensor, new: int, beams: int, mask: torch.Tensor | None = None
) -> Callable[[], torch.Tensor]:
    """transformers' generate API (transformers' T5 and flasht5 alike): the new tokens (B * beams?, new)."""
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=beams)

    def run() -> torch.Tensor:
        return model.generate(input_ids=ids, attention_mask=mask, **kw)[:, 1:]

    return run


def nai_generate(model, ids: torch.Tensor, new: int) -> Callable[[], torch.Tensor]:
    """nai-t5's cached greedy decoding (../shared/wheels/README.md): precomputed cross K/V, preallocated cache."""

    @torch.inference_mode()
    def run() -> torch.Tensor:
        enc = model.encoder(ids)
        cross_kv = model.decoder.get_cross_kv(enc)
        B = ids.shape[0]
        kv = model.decoder.get_kv_cache(batch_size=B, length=new + 1, dtype=enc.dtype, device=enc.device)
        tok = ids.new_full((B, 1), model.config.decoder_start_token_id)
        out = []
        for t in range(new):
            h = model.decoder(model.encoder.vocab_embed(tok), enc, input_mask=None, cross_mask=None,
                              self_past_kv=kv[:, :, :, :, : t + 1, :], cross_kv=cross_kv)  # fmt: skip
            tok = model.lm_head(h)[:, -1].argmax(-1, keepdim=True)
            out.append(tok)
        return torch.cat(out, dim=1)

    return run


def wall_ms(fn: Callable[[], object], reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure_generate(fn: Callable[[], torch.Tensor], *, reps: int, profile: bool) -> dict:
    """Warm-up call (peak memory), ``reps`` timed calls, one profiled call (GPU busy)."""
    cuda = torch.cuda.is_available()
    _sync()
    base = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tokens = fn()
    _sync()
    peak = (torch.cuda.max_memory_allocated() - base) if cuda else 0
    ms = median(wall_ms(fn, reps))
    busy = gpu_busy_fraction(fn, steps=1, step_ms=ms) if (cuda and profile) else float("nan")
    return dict(ms=ms, peak_gib=peak / 2**30, busy=busy, tokens=tokens.cpu())


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def _row(case: str, impl: str, r: dict, batch: int, new: int, base_ms: float | None, nai_ms: float | None) -> dict:
    if "error" in r:
        return {"case": case, "implementation": LABELS[impl], "new tok/s": r["error"]}
    tok_s = batch * new / (r["ms"] / 1e3)
    row = {"case": case, "implementation": LABELS[impl], "new tok/s": tok_s, "ms/token": r["ms"] / new,
           "vs transformers": (base_ms / r["ms"]) if base_ms else "", "vs nai-t5": (nai_ms / r["ms"]) if nai_ms else "",
           "GPU busy": r["busy"], "peak GiB": r["peak_gib"], "same tokens": r.get("same", "")}  # fmt: skip
    return row


def _same(a: torch.Tensor, b: torch.Tensor) -> float:
    n = min(a.shape[1], b.shape[1])
    if a.shape[0] != b.shape[0] or n == 0:
        return float("nan")
    return float((a[:, :n] == b[:, :n]).float().mean())


def plot(gen_rows: list[dict], enc_rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in gen_rows))
    fig, axes = plt.subplots(1, len(cases) + 1, figsize=(4.2 * (len(cases) + 1), 3.8), squeeze=False)
    axes = axes[0]
    colours = {"transformers eager": "#999999", "transformers sdpa": "#555555", "nai-t5": "#2a9d8f",
               "nai-t5 Flex (compiled)": "#264653", "flasht5": "#d62828"}  # fmt: skip
    for ax, case in zip(axes, cases):
        rs = [r for r in gen_rows if r["case"] == case and isinstance(r.get("new tok/s"), float)]
        ax.bar([r["implementation"].replace(" ", "\n", 1) for r in rs], [r["new tok/s"] for r in rs],
               color=[colours.get(r["implementation"], "#888888") for r in rs])  # fmt: skip
        ax.set_title(f"generate, {case}")
        ax.set_ylabel("new tokens / s")
        ax.tick_params(axis="x", labelsize=7)
    ax = axes[-1]
    rs = [r for r in enc_rows if isinstance(r.get("input tok/s"), float)]
    ax.bar([f"{r['shape']}\n{r['implementation'].split(' (')[0]}" for r in rs], [r["input tok/s"] / 1e6 for r in rs],
           color=[colours.get(r["implementation"].split(" (")[0], "#888888") for r in rs])  # fmt: skip
    ax.set_title("encoder only")
    ax.set_ylabel("M input tokens / s")
    ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="t5-v1_1-base")
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,32", help="comma list of greedy batch sizes ('' = none)")
    parser.add_argument("--impls", default=",".join(GEN_IMPLS), help=f"comma list of {GEN_IMPLS}")
    parser.add_argument("--beams", action="store_true", help="also beam search, 4 beams, batch 8 (no nai-t5)")
    parser.add_argument("--ragged", action="store_true", help="also 32 inputs of L/8..L tokens in one batch (no nai)")
    parser.add_argument("--long", action="store_true", help="also 16384 input tokens, batch 1 (flasht5, hf-sdpa)")
    parser.add_argument("--no-encoder", action="store_true", help="skip the encoder-only rows")
    parser.add_argument("--encoder-shapes", default="32x512,8x2048", help="comma list of BxL encoder-only shapes")
    parser.add_argument("--no-flex", action="store_true", help="skip nai-t5's compiled Flex encoder")
    parser.add_argument("--reps", type=int, default=2, help="timed generate calls per row (median)")
    parser.add_argument("--budget-s", type=float, default=200, help="skip the remaining rows after this many s")
    parser.add_argument("--out", default="bench_generate", help="output folder (generate.md / .json / .png)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny config, 8 new tokens, flasht5 on sdpa")
    args = parser.parse_args()
    t0 = time.perf_counter()
    say = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)  # noqa: E731

    from flasht5.config import FlashT5Config
    from flasht5.convert import config_to_hf

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("no GPU: run with --dry-run for the CPU smoke test")
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    backend = "flash" if cuda else "sdpa"
    cfg = tiny_config() if args.dry_run else FlashT5Config.from_preset(args.preset, dropout_rate=0.0)
    L = 32 if args.dry_run else args.input_len
    new = 8 if args.dry_run else args.new_tokens
    impls = [i for i in args.impls.split(",") if i]
    if unknown := set(impls) - set(GEN_IMPLS):
        raise SystemExit(f"unknown --impls {sorted(unknown)}; known: {GEN_IMPLS}")
    has_nai = nai_available()
    if "nai-t5" in impls and not has_nai:
        say("nai-t5 is not importable: its rows are skipped")
        impls.remove("nai-t5")
    hf_kwargs = {k: v for k, v in config_to_hf(cfg, "T5ForConditionalGeneration").items() if k != "model_type"}
    ours_state, hf_state = flasht5_reference_state(cfg, seed=0)
    n_params = sum(v.numel() for v in ours_state.values())
    say(f"{'tiny' if args.dry_run else args.preset}: {n_params / 1e6:.1f}M parameters, {dtype}, {device}")

    cases = [(f"batch {b}", b, 1, L, False) for b in (int(x) for x in args.batches.split(",") if x)]
    if args.ragged:
        cases.append((f"ragged 32 x {L // 8}-{L}", 32, 1, L, True))
    if args.beams:
        cases.append(("beams 4 x batch 8", 8, 4, L, False))
    if args.long:
        n_long = 16384 if not args.dry_run else 256
        cases.append((f"{n_long} in, batch 1", 1, 1, n_long, False))
    g = torch.Generator().manual_seed(0)
    max_len = max((c[3] for c in cases), default=L)
    gen_rows, raw = [], []
    models: dict[str, object] = {}

    def model_for(impl: str):
        if impl not in models:
            _free()
            if impl.startswith("hf-"):
                models[impl] = hf_model(hf_kwargs, hf_state, impl=impl[3:], device=device).to(dtype).eval()
            elif impl == "nai-t5":
                models[impl] = nai_model(hf_kwargs, hf_state, max_len + new + 1, device=device, dtype=dtype).eval()
            else:
                models[impl] = flasht5_lm(cfg, ours_state, device, dtype, backend)
        return models[impl]

    for case, batch, beams, length, ragged in cases:
        ids = torch.randint(2, cfg.vocab_size, (batch, length), generator=g)
        mask = None
        if ragged:  # input lengths spread evenly over [L/8, L], shuffled; right padding with an attention mask
            lens = torch.linspace(length // 8, length, batch).long()[torch.randperm(batch, generator=g)]
            mask = (torch.arange(length)[None] < lens[:, None]).long()
            ids, mask = (ids * mask).to(device), mask.to(device)
        ids = ids.to(device)
        results: dict[str, dict] = {}
        for impl in impls:
            if impl == "nai-t5" and (beams > 1 or ragged):
                continue  # nai-t5 is greedy only
            if length > 4096 and impl not in ("flasht5", "hf-sdpa"):
                continue
            if time.perf_counter() - t0 > args.budget_s:
                results[impl] = {"error": "skipped (time budget)"}
                continue
            try:
                m = model_for(impl)
                fn = nai_generate(m, ids, new) if impl == "nai-t5" else hf_like_generate(m, ids, new, beams, mask)
                with torch.inference_mode():
                    results[impl] = measure_generate(fn, reps=max(1, args.reps if beams == 1 else 1), profile=cuda)
            except torch.OutOfMemoryError:
                results[impl] = {"error": "OOM"}
            except Exception as e:  # a broken row must not lose the others
                traceback.print_exc()
                results[impl] = {"error": f"error: {type(e).__name__}: {e}"[:120]}
            _free()
            shown = {k: v for k, v in results[impl].items() if k != "tokens"}
            say(f"{case:>18} {impl:>9}: {shown}")
        ref = results.get("hf-sdpa", {}).get("tokens")
        for r in results.values():
            if ref is not None and "tokens" in r:
                r["same"] = _same(r["tokens"], ref)
        hf_ms = [results[i]["ms"] for i in ("hf-eager", "hf-sdpa") if "ms" in results.get(i, {})]
        base = min(hf_ms) if hf_ms else None
        nai_ms = results.get("nai-t5", {}).get("ms")
        for impl, r in results.items():
            gen_rows.append(_row(case, impl, r, batch, new, base, nai_ms))
            raw.append(dict(case=case, batch=batch, beams=beams, input_len=length, new_tokens=new, impl=impl,
                            **{k: v for k, v in r.items() if k != "tokens"}))  # fmt: skip
    models.clear()
    _free()

    enc_rows: list[dict] = []

    def write(final: bool) -> None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        title = f"T5 {'tiny (dry run)' if args.dry_run else args.preset} inference, {versions().split(', GPU ')[-1]}"
        (out / "generate.json").write_text(
            json.dumps(dict(preset=args.preset, versions=versions(), rows=raw), indent=1)
        )
        plot(gen_rows, enc_rows, out / "generate.png", title)
        verdict = []
        for case, (vs_hf, vs_nai) in TARGETS.items():
            row = next((r for r in gen_rows if r["case"] == case and r["implementation"] == "flasht5"), None)
            if row and isinstance(row.get("vs transformers"), float):
                line = f"- {case}: flasht5 {row['vs transformers']:.1f}x transformers (target >= {vs_hf:g}x)"
                if vs_nai and isinstance(row.get("vs nai-t5"), float):
                    line += f", {row['vs nai-t5']:.1f}x nai-t5 (target >= {vs_nai:g}x)"
                verdict.append(line)
        cmd = " ".join(["python3", *sys.argv])
        body = (
            f"# Generation and encoder inference\n\nCommand: `{cmd}`\n\nVersions: {versions()}\n\n"
            f"Model `{'tiny dry-run config' if args.dry_run else args.preset}` ({n_params / 1e6:.1f}M parameters), the "
            f"same random weights in every row, {str(dtype).replace('torch.', '')}; {L} input tokens, {new} new "
            f"tokens, greedy, min_new_tokens={new}. Column definitions: benchmarks/bench_generate.py's docstring.\n\n"
            "## Generate\n\n"
            + markdown_table(
                gen_rows,
                [
                    "case",
                    "implementation",
                    "new tok/s",
                    "ms/token",
                    "vs transformers",
                    "vs nai-t5",
                    "GPU busy",
                    "peak GiB",
                    "same tokens",
                ],
            )  # fmt: skip
            + ("\n" + "\n".join(verdict) + "\n" if verdict else "")
            + "\n## Encoder only\n\n"
            + markdown_table(
                enc_rows, ["shape", "implementation", "input tok/s", "ms", "vs transformers", "vs nai-t5 Flex"]
            )
            + "\n![generate](generate.png)\n"
        )
        (out / "generate.md").write_text(body)
        say(f"wrote {out / 'generate.md'}, generate.json, generate.png")
        if final:
            print(body)

    write(final=False)  # the generation rows are safe even if the encoder rows do not finish

    def encoder_builders(ids: torch.Tensor, Le: int) -> dict[str, Callable[[], Callable[[], object]]]:
        """Per implementation, a builder of its encoder call on ``ids`` (built only when its row runs)."""
        last = lambda m: lambda: m(input_ids=ids).last_hidden_state
        builders = {
            "flasht5": lambda: last(flasht5_encoder(cfg, ours_state, device, dtype, backend)),
            "hf-eager": lambda: last(hf_encoder(hf_kwargs, hf_state, "eager", device, dtype)),
            "hf-sdpa": lambda: last(hf_encoder(hf_kwargs, hf_state, "sdpa", device, dtype)),
        }
        if has_nai:
            builders["nai-t5"] = lambda: (lambda m: lambda: m(ids))(
                nai_encoder(hf_kwargs, hf_state, Le, device, dtype, flex=False)
            )
            if cuda and not args.no_flex:
                builders["nai-t5-flex"] = lambda: (lambda m: lambda: m(ids, block_mask=None))(
                    torch.compile(nai_encoder(hf_kwargs, hf_state, Le, device, dtype, flex=True), dynamic=False,
                                  fullgraph=True))  # fmt: skip
        return builders

    shapes = (
        [(4, 32)] if args.dry_run else [tuple(int(x) for x in sh.split("x")) for sh in args.encoder_shapes.split(",")]
    )
    for B, Le in [] if args.no_encoder else shapes:
        builders = encoder_builders(torch.randint(2, cfg.vocab_size, (B, Le), generator=g).to(device), Le)
        enc_ms: dict[str, float] = {}
        shape = f"{B} x {Le}"
        for impl, build in builders.items():
            if time.perf_counter() - t0 > args.budget_s + 60:
                enc_rows.append(
                    {"shape": shape, "implementation": LABELS[impl], "input tok/s": "skipped (time budget)"}
                )
                continue
            try:
                with torch.inference_mode():
                    fn = build()
                    fn()  # compile / autotune outside the timing
                    enc_ms[impl] = bench(fn, warmup=5, rep=40)
            except Exception as e:
                traceback.print_exc()
                enc_rows.append(
                    {"shape": shape, "implementation": LABELS[impl], "input tok/s": f"error: {type(e).__name__}"}
                )
                continue
            finally:
                _free()
            say(f"encoder {shape} {impl:>12}: {enc_ms[impl]:.3f} ms")
        best_hf = min([enc_ms[i] for i in ("hf-eager", "hf-sdpa") if i in enc_ms], default=None)
        for impl, ms in enc_ms.items():
            flex = enc_ms.get("nai-t5-flex")
            enc_rows.append({"shape": shape, "implementation": LABELS[impl], "input tok/s": B * Le / (ms / 1e3),
                             "ms": ms, "vs transformers": (best_hf / ms) if best_hf else "",
                             "vs nai-t5 Flex": (flex / ms) if flex else ""})  # fmt: skip
            raw.append(dict(case=f"encoder {shape}", impl=impl, ms=ms))
        write(final=False)

    write(final=True)


if __name__ == "__main__":
    main()
