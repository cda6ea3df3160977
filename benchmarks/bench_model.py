"""Whole T5 training step on one GPU: flasht5 against transformers' T5 and nai-t5, same weights, same run.

One step = forward, loss, backward, gradient clipping (max norm 1.0), optimizer step (fused AdamW), zero_grad.
Every implementation starts from the same random T5 v1.1-base weights: flasht5's core T5 is built with a fixed
seed and exported with flasht5's converter; transformers and nai-t5 load that state dict.

Rows:
  transformers eager / sdpa  T5ForConditionalGeneration, bf16 autocast over fp32 weights; the faster of the two
                             is the baseline of the speedup column
  nai-t5                     NovelAI's T5 (SDPA with a materialised bias), bf16 weights (no fp32 master copy),
                             F.cross_entropy on its logits (it has no loss)
  flasht5 eager / graph      flasht5's TrainStep without / with CUDA-graph capture, bf16 autocast, fp32 weights
  flasht5 bf16 weights       the graph-captured step on bf16 weights and optimizer state, no autocast (nai-t5's
                             setting: no per-step weight casts, half the gradient traffic)

Shapes (encoder length = decoder length unless stated): 512 x B16, 512 x B32, 2048 x B8, a ragged fine-tuning
batch (32 examples, inputs 64-512 tokens, targets 8-114; transformers and nai-t5 get it padded to the longest,
flasht5 packed without padding), 8192 x B2, 16384 x B1.

Columns: tok/s counts real (non-padding) encoder + decoder tokens; step ms is the median over CUDA-event-timed
steps; MFU = utils.t5_train_flops / step time / the bf16 8192^3 matmul peak measured at the start of the run;
GPU busy = utils.gpu_busy_fraction; peak GiB = max_memory_allocated from a reset before the first step (weights,
grads, optimizer state and activations; for a graph row, its capture).

GPU (from the repo root, nai-t5 wheels carried in .wheels/, see ../shared/wheels/README.md):
  python3 -m pip install -q --no-index --no-deps --target .wheels/site .wheels/*.whl
  PYTHONPATH=src:.wheels/site python3 benchmarks/bench_model.py --out-dir $OUT
CPU smoke test of everything but the flasht5 rows (tiny config, 2 steps):
  PYTHONPATH=src python benchmarks/bench_model.py --dry-run --out-dir /tmp/bench_model
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from utils import (
    RESULTS_DIR,
    gpu_busy_fraction,
    gpu_name,
    markdown_table,
    matmul_peak_tflops,
    median,
    step_times,
    t5_train_flops,
    write_results,
)

IMPLS = {
    "hf-eager": ("transformers eager", "bf16 autocast, fp32 weights, fused AdamW"),
    "hf-sdpa": ("transformers sdpa", "bf16 autocast, fp32 weights, fused AdamW"),
    "nai-t5": ("nai-t5", "bf16 weights (no fp32 master), fused AdamW"),
    "flasht5-eager": ("flasht5 eager", "bf16 autocast, fp32 weights, fused AdamW"),
    "flasht5-graph": ("flasht5 CUDA graph", "bf16 autocast, fp32 weights, fused AdamW, graph-captured step"),
    "flasht5-bf16": (
        "flasht5 CUDA graph, bf16 weights",
        "bf16 weights (no fp32 master, as nai-t5), fused AdamW, graph",
    ),
}
PADDED_IMPLS = ("hf-eager", "hf-sdpa", "nai-t5")  # get the ragged batch padded to the longest example
GRAD_CLIP = 1.0
LR = 1e-4


# ----------------------------------------------------------------------------------------------------------------
# Shapes and batches
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    name: str
    n: int  # examples
    enc: tuple[int, int]  # encoder length range (lo == hi: dense)
    dec: tuple[int, int]  # decoder (target) length range

    @property
    def ragged(self) -> bool:
        return self.enc[0] != self.enc[1] or self.dec[0] != self.dec[1]

    def describe(self) -> str:
        if not self.ragged:
            return f"B={self.n}, L={self.enc[1]}/{self.dec[1]}"
        return f"ragged: {self.n} ex., inputs {self.enc[0]}-{self.enc[1]}, targets {self.dec[0]}-{self.dec[1]}"


def dense(L: int, B: int) -> Shape:
    return Shape(f"{L}x{B}", B, (L, L), (L, L))


SHAPES = [
    dense(512, 16),
    dense(512, 32),
    dense(2048, 8),
    Shape("ragged", 32, (64, 512), (8, 114)),
    dense(8192, 2),
    dense(16384, 1),
]
DRY_SHAPES = [dense(32, 2), dense(32, 4), dense(64, 2), Shape("ragged", 8, (8, 64), (2, 16)), dense(128, 1)]


@dataclass
class Data:
    """One batch in both forms: padded to the longest example (transformers, nai-t5) and packed (flasht5)."""

    enc_lens: list[int]
    dec_lens: list[int]
    input_ids: torch.Tensor  # (B, Le) padded with 0
    attention_mask: torch.Tensor  # (B, Le) bool
    labels: torch.Tensor  # (B, Ld), -100 past each target
    decoder_mask: torch.Tensor  # (B, Ld) bool
    packed: dict = field(default_factory=dict)  # input_ids (1, T), labels (1, Td), cu_seqlens, max_seqlen, ...

    @property
    def real_tokens(self) -> int:
        return sum(self.enc_lens) + sum(self.dec_lens)

    @property
    def padded(self) -> bool:
        return not bool(self.attention_mask.all() and self.decoder_mask.all())


def make_data(shape: Shape, vocab: int, seed: int = 0) -> Data:
    g = torch.Generator().manual_seed(seed)
    n = shape.n
    enc_lens = torch.randint(shape.enc[0], shape.enc[1] + 1, (n,), generator=g)
    dec_lens = torch.randint(shape.dec[0], shape.dec[1] + 1, (n,), generator=g)
    Le, Ld = int(enc_lens.max()), int(dec_lens.max())
    ids = torch.randint(2, vocab, (n, Le), generator=g)
    labels = torch.randint(2, vocab, (n, Ld), generator=g)
    mask = torch.arange(Le)[None] < enc_lens[:, None]
    dmask = torch.arange(Ld)[None] < dec_lens[:, None]
    ids[~mask] = 0
    labels[~dmask] = -100

    def cu(lens: torch.Tensor) -> torch.Tensor:
        return F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)

    packed = dict(
        input_ids=ids[mask][None], labels=labels[dmask][None],  # (1, T), (1, Td): documents back to back
        cu_seqlens=cu(enc_lens), max_seqlen=Le, decoder_cu_seqlens=cu(dec_lens), decoder_max_seqlen=Ld,
    )  # fmt: skip
    return Data(enc_lens.tolist(), dec_lens.tolist(), ids, mask, labels, dmask, packed)


def _to(x, device):
    return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x


# ----------------------------------------------------------------------------------------------------------------
# flasht5-specific code (the lead adapts these two functions to the rebuilt API at merge time)
# ----------------------------------------------------------------------------------------------------------------


def flasht5_reference_state(cfg, seed: int = 0) -> tuple[dict, dict]:
    """The shared random weights: flasht5's core T5 state dict (CPU, fp32) and the same tensors under transformers
    T5 names. ``flasht5.convert.our_key_to_hf`` maps ``FlashT5ForConditionalGeneration`` names (prefix "model.");
    the core T5's names are the same without that prefix, hence the "model." + k.
    """
    from flasht5.convert import our_key_to_hf
    from flasht5.model import T5

    torch.manual_seed(seed)
    ours = {k: v.detach().clone() for k, v in T5(cfg).state_dict().items()}
    hf = {our_key_to_hf("model." + k): v for k, v in ours.items()}
    return ours, hf


def flasht5_step(
    cfg, state: dict, data: Data, *, graph: bool, bf16_weights: bool = False
) -> tuple[Callable[[], object], list]:
    """flasht5's training step on ``data`` (dense batch if unpadded, else packed varlen). Returns the step function
    (returns the loss tensor, no host sync) and the objects to keep alive / free. ``bf16_weights``: bf16 parameters
    and optimizer state, no autocast (nai-t5's setting: no weight casts, half the gradient traffic)."""
    from flasht5.layout import Batch
    from flasht5.model import T5
    from flasht5.train.step import TrainStep

    model = T5(cfg).cuda()
    model.load_state_dict(state)
    model.train()
    if bf16_weights:
        model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True, capturable=True)
    amp = None if bf16_weights else torch.bfloat16
    step = TrainStep(model, opt, grad_clip=GRAD_CLIP, amp_dtype=amp, cuda_graph=graph)
    if data.padded:
        p = {k: _to(v, "cuda") for k, v in data.packed.items()}
        batch = Batch.varlen(
            p["input_ids"], p["labels"], p["cu_seqlens"], p["max_seqlen"], p["decoder_cu_seqlens"],
            p["decoder_max_seqlen"],
        )  # fmt: skip
    else:
        batch = Batch.dense(_to(data.input_ids, "cuda"), _to(data.labels, "cuda"))
    return (lambda: step(batch).loss), [model, opt, step, batch]


# ----------------------------------------------------------------------------------------------------------------
# Competitors
# ----------------------------------------------------------------------------------------------------------------


def _optimizer_tail(params: list[torch.Tensor], opt: torch.optim.Optimizer) -> None:
    torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)  # no host sync (error_if_nonfinite=False)
    opt.step()
    opt.zero_grad(set_to_none=True)


def hf_model(hf_kwargs: dict, hf_state: dict, *, impl: str, device: str):
    """transformers' T5ForConditionalGeneration holding the shared weights."""
    import transformers

    # The implementation goes into the config before the stacks copy it.
    hf_cfg = transformers.T5Config(**hf_kwargs, attn_implementation=impl)
    with torch.device(device):  # random init on the device (fast), then overwritten
        model = transformers.T5ForConditionalGeneration(hf_cfg)
        if not hf_kwargs["tie_word_embeddings"]:
            # transformers 5 ties every freshly built T5's LM head to the embedding; v1.1 has a head of its own.
            model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))
    if model.config.scale_decoder_outputs != hf_kwargs["scale_decoder_outputs"]:
        raise RuntimeError(f"transformers T5 config: scale_decoder_outputs {model.config.scale_decoder_outputs}")
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    tied = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}  # views of shared.weight
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"transformers T5 load: missing {set(missing) - tied}, unexpected {unexpected}")
    return model


def hf_step(hf_kwargs: dict, hf_state: dict, data: Data, *, impl: str, device: str):
    model = hf_model(hf_kwargs, hf_state, impl=impl, device=device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, fused=True)
    inputs = dict(input_ids=_to(data.input_ids, device), labels=_to(data.labels, device))
    if data.padded:  # a dense batch is passed without masks, as a user at their best would
        inputs.update(
            attention_mask=_to(data.attention_mask.long(), device),
            decoder_attention_mask=_to(data.decoder_mask.long(), device),
        )

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(**inputs).loss
        loss.backward()
        _optimizer_tail(params, opt)
        return loss.detach()

    return step, [model, opt, inputs]


def nai_available() -> bool:
    try:
        import nai_t5  # noqa: F401
    except ImportError:
        return False
    return True


def nai_model(hf_kwargs: dict, hf_state: dict, n_tokens: int, *, device: str, dtype: torch.dtype = torch.bfloat16):
    """nai-t5 with the shared weights, loaded as its README does it (../shared/wheels/README.md)."""
    import transformers
    from nai_t5 import T5, hf_to_based_t5_state, to_based_config

    cfg = to_based_config(transformers.T5Config(**hf_kwargs), n_tokens=n_tokens).model_copy(
        update=dict(emb_weight_dtype=dtype, linear_weight_dtype=dtype, norm_weight_dtype=dtype)
    )
    with torch.device(device):
        model = T5(cfg)
    model.load_state_dict(hf_to_based_t5_state(hf_state, cfg))
    return model


def nai_loss(model, data: Data, device: str) -> Callable[[], torch.Tensor]:
    """The loss closure: nai-t5 has no loss, so F.cross_entropy on its logits (fp32, mean over the targets)."""
    from nai_t5 import labels_to_decoder_input_ids

    c = model.config
    ids, labels = _to(data.input_ids, device), _to(data.labels, device)
    dec_ids = labels_to_decoder_input_ids(labels, c.pad_token_id, c.decoder_start_token_id, c.label_ignore_index)
    B, Ld = labels.shape
    if data.padded:
        enc_mask, dmask = _to(data.attention_mask, device), _to(data.decoder_mask, device)
        # Decoder input 0 is the start token, so the input mask is the target mask shifted right by one with
        # position 0 visible (nai_t5.label_mask_to_decoder_mask); cross-attention sees the real encoder tokens.
        dec_mask = torch.cat([dmask.new_ones(B, 1), dmask[:, :-1]], dim=1)
        cross = enc_mask[:, None, :].expand(B, Ld, enc_mask.shape[1])
        kw = dict(encoder_input_mask=enc_mask, decoder_input_mask=dec_mask, decoder_cross_mask=cross)
    else:  # nai-t5 needs an explicit decoder mask when B > 1 (its README)
        kw = dict(decoder_input_mask=torch.ones_like(dec_ids, dtype=torch.bool))

    def loss_fn() -> torch.Tensor:
        logits = model(encoder_input_ids=ids, decoder_input_ids=dec_ids, **kw)  # (B, Ld, V) in the weight dtype
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)

    return loss_fn


def nai_step(hf_kwargs: dict, hf_state: dict, data: Data, *, device: str):
    model = nai_model(hf_kwargs, hf_state, max(data.input_ids.shape[1], data.labels.shape[1]), device=device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, fused=True)
    loss_fn = nai_loss(model, data, device)

    def step():
        loss = loss_fn()
        loss.backward()
        _optimizer_tail(params, opt)
        return loss.detach()

    return step, [model, opt]


# ----------------------------------------------------------------------------------------------------------------
# Measuring one row
# ----------------------------------------------------------------------------------------------------------------


def _free(keep: list | None) -> None:
    if keep is not None:
        keep.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def measure(build: Callable[[], tuple[Callable[[], object], list]], *, warmup: int, quick: bool) -> dict:
    """Build, warm up (peak memory over these steps), time, profile. Raises OutOfMemoryError through."""
    cuda = torch.cuda.is_available()
    keep = None
    try:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        step, keep = build()
        first_loss = float(step())  # one host sync, outside the timing: a same-weights sanity value
        for _ in range(warmup - 1):
            step()
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        probe = median(step_times(step, 2))
        slow = probe > 300
        iters = 2 if quick else (10 if slow else 20)
        ms = median(step_times(step, iters))
        busy = gpu_busy_fraction(step, steps=1 if quick else (3 if slow else 5), step_ms=ms)
        return dict(ms=ms, iters=iters, peak_gib=peak, busy=busy, first_loss=first_loss)
    finally:
        _free(keep)


def _fmt_row(shape: Shape, impl: str, r: dict, data: Data, base_ms: float | None, flops: float, peak_tf: float):
    name, regime = IMPLS[impl]
    layout = ""
    if shape.ragged:
        Le, Ld = data.input_ids.shape[1], data.labels.shape[1]
        if impl in PADDED_IMPLS:
            layout = f" (padded {shape.n}x{Le}/{Ld})"
        else:
            layout = f" (packed {sum(data.enc_lens)}/{sum(data.dec_lens)} tok)"
    row = {"shape": shape.describe(), "implementation": name + layout, "regime": regime}
    if "error" in r:
        row.update({"tok/s (k)": r["error"]})
        return row
    ms = r["ms"]
    row.update({
        "tok/s (k)": data.real_tokens / ms,  # tokens per ms = thousands per second
        "step ms": ms,
        "speedup": f"{base_ms / ms:.2f}x" if base_ms else "-",
        "MFU": f"{100 * flops / (ms * 1e-3) / (peak_tf * 1e12):.1f}%",
        "GPU busy": "-" if math.isnan(r["busy"]) else f"{100 * r['busy']:.0f}%",
        "peak GiB": r["peak_gib"],
        "loss (1st step)": f"{r['first_loss']:.4f}",
    })  # fmt: skip
    return row


COLUMNS = ["shape", "implementation", "regime", "tok/s (k)", "step ms", "speedup", "MFU", "GPU busy", "peak GiB"]
COLUMNS += ["loss (1st step)"]


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def tiny_config():
    from flasht5.config import FlashT5Config

    return FlashT5Config.from_preset(
        "t5-v1_1-small", d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, num_decoder_layers=2,
        vocab_size=256, dropout_rate=0.0,
    )  # fmt: skip


def check_flops(hf_kwargs: dict, hf_state: dict) -> str:
    """CPU checks of utils.t5_train_flops: a hand count, and torch's FlopCounterMode on transformers' T5."""
    from types import SimpleNamespace

    from torch.utils.flop_counter import FlopCounterMode

    # Hand count, T5 v1.1-base shapes, 1 encoder + 1 decoder layer, one document of 512 input / 114 target tokens.
    base = SimpleNamespace(d_model=768, d_kv=64, num_heads=12, d_ff=2048, num_layers=1, num_decoder_layers=1,
                           vocab_size=32128, feed_forward_proj="gated-gelu")  # fmt: skip
    enc_layer = 4 * 768 * 768 + 3 * 768 * 2048  # q k v o + wi_0 wi_1 wo = 7_077_888 per encoder token
    dec_layer = 6 * 768 * 768 + 3 * 768 * 2048  # self q k v o, cross q o, MLP = 8_257_536 per decoder token
    cross_kv, head = 2 * 768 * 768, 768 * 32128  # per encoder token; LM head per decoder token
    attn = 512 * 512 + 0.5 * 114 * 114 + 114 * 512  # encoder self, causal decoder self (half), cross
    hand = 6 * (512 * (enc_layer + cross_kv) + 114 * (dec_layer + head)) + 12 * 768 * attn
    got = t5_train_flops(base, [512], [114])
    if got != hand or hand != 50_906_253_312:
        raise AssertionError(f"t5_train_flops {got} != hand count {hand}")
    # Every matmul transformers' T5 (eager) runs in a forward + backward, counted by torch; transformers computes the
    # causal self-attention in full, so add back the half that t5_train_flops leaves out.
    m = hf_model(hf_kwargs, hf_state, impl="eager", device="cpu")
    B, Le, Ld = 2, 12, 8
    with FlopCounterMode(display=False) as fc:
        m(input_ids=torch.randint(2, 200, (B, Le)), labels=torch.randint(2, 200, (B, Ld))).loss.backward()
    c = m.config
    ours = t5_train_flops(c, [Le] * B, [Ld] * B) + B * c.num_decoder_layers * 12 * c.num_heads * c.d_kv * 0.5 * Ld**2
    if ours != fc.get_total_flops():
        raise AssertionError(f"t5_train_flops {ours} != FlopCounterMode {fc.get_total_flops()}")
    return f"hand count {hand:.6g} (1+1 base layers, 512/114) and FlopCounterMode {ours:.6g} (tiny) agree"


def check_same_weights(hf_kwargs: dict, hf_state: dict, data: Data) -> str:
    """CPU fp32, no step: transformers' T5 and nai-t5 built from the exported state give the same loss on ``data``."""
    m = hf_model(hf_kwargs, hf_state, impl="eager", device="cpu")
    kw = dict(attention_mask=data.attention_mask.long(), decoder_attention_mask=data.decoder_mask.long())
    with torch.no_grad():
        ref = float(m(input_ids=data.input_ids, labels=data.labels, **kw).loss)
    msg = f"transformers fp32 loss {ref:.6f}"
    if nai_available():
        nai = nai_model(hf_kwargs, hf_state, data.input_ids.shape[1], device="cpu", dtype=torch.float32)
        with torch.no_grad():
            got = float(nai_loss(nai, data, "cpu")())
        msg += f", nai-t5 fp32 loss {got:.6f}"
        if abs(got - ref) > 1e-4 * max(1.0, abs(ref)):
            raise AssertionError(f"nai-t5 does not hold the same weights: {msg}")
    return msg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="t5-v1_1-base")
    parser.add_argument("--shapes", default=None, help=f"comma list of {[s.name for s in SHAPES]} (default all)")
    parser.add_argument("--impls", default=None, help=f"comma list of {list(IMPLS)} (default all)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=480, help="skip the remaining rows after this many s")
    parser.add_argument("--out-dir", default=None, help="folder of the results .md/.png/.json (default results/)")
    parser.add_argument("--out", default=None, help="results markdown file (default <out-dir>/<date>-<gpu>.md)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny config, 2 steps, no flasht5 rows")
    args = parser.parse_args()
    t_start = time.perf_counter()

    from flasht5.config import FlashT5Config
    from flasht5.convert import config_to_hf

    cuda = torch.cuda.is_available() and not args.dry_run
    device = "cuda" if cuda else "cpu"
    if not cuda and not args.dry_run:
        raise SystemExit("no GPU: run with --dry-run for the CPU smoke test")
    cfg = tiny_config() if args.dry_run else FlashT5Config.from_preset(args.preset, dropout_rate=0.0)
    shapes = DRY_SHAPES if args.dry_run else SHAPES
    if args.shapes:
        want = args.shapes.split(",")
        shapes = [s for s in shapes if s.name in want]
    impls = args.impls.split(",") if args.impls else list(IMPLS)
    if unknown := set(impls) - set(IMPLS):
        raise SystemExit(f"unknown --impls {sorted(unknown)}; known: {list(IMPLS)}")
    if args.dry_run:
        impls = [i for i in impls if not i.startswith("flasht5")]
    if "nai-t5" in impls and not nai_available():
        print("nai-t5 is not importable: its rows are skipped", flush=True)
        impls.remove("nai-t5")

    hf_kwargs = {k: v for k, v in config_to_hf(cfg, "T5ForConditionalGeneration").items() if k != "model_type"}
    ours_state, hf_state = flasht5_reference_state(cfg, seed=0)
    n_params = sum(v.numel() for v in ours_state.values())
    peak_tf = matmul_peak_tflops()
    print(f"[{time.perf_counter() - t_start:6.1f}s] {args.preset if not args.dry_run else 'tiny'}: "
          f"{n_params / 1e6:.1f}M parameters; bf16 matmul peak {peak_tf:.0f} TFLOP/s", flush=True)  # fmt: skip
    if args.dry_run:
        print("FLOP check:", check_flops(hf_kwargs, hf_state), flush=True)
        ragged = next(s for s in shapes if s.ragged)
        print("same-weights check:", check_same_weights(hf_kwargs, hf_state, make_data(ragged, cfg.vocab_size)))

    def builder(impl: str, data: Data) -> Callable[[], tuple[Callable[[], object], list]]:
        if impl in ("hf-eager", "hf-sdpa"):
            return lambda: hf_step(hf_kwargs, hf_state, data, impl=impl.split("-")[1], device=device)
        if impl == "nai-t5":
            return lambda: nai_step(hf_kwargs, hf_state, data, device=device)
        return lambda: flasht5_step(
            cfg, ours_state, data, graph=impl != "flasht5-eager", bf16_weights=impl == "flasht5-bf16"
        )

    rows, raw = [], []
    for shape in shapes:
        data = make_data(shape, cfg.vocab_size, seed=0)
        flops = t5_train_flops(cfg, data.enc_lens, data.dec_lens)
        results: dict[str, dict] = {}
        for impl in impls:
            elapsed = time.perf_counter() - t_start
            if elapsed > args.budget_s:
                results[impl] = {"error": "skipped (time budget)"}
                continue
            build = builder(impl, data)
            try:
                results[impl] = measure(build, warmup=1 if args.dry_run else args.warmup, quick=args.dry_run)
            except torch.OutOfMemoryError:
                results[impl] = {"error": "OOM"}
            except Exception as e:  # a broken row must not lose the others
                traceback.print_exc()
                results[impl] = {"error": f"error: {type(e).__name__}"}
            _free(None)
            print(f"[{time.perf_counter() - t_start:6.1f}s] {shape.name:>10} {impl:>14}: {results[impl]}", flush=True)
        hf_ms = [results[i]["ms"] for i in ("hf-eager", "hf-sdpa") if "ms" in results.get(i, {})]
        base = min(hf_ms) if hf_ms else None
        for impl, r in results.items():
            rows.append(_fmt_row(shape, impl, r, data, base, flops, peak_tf))
            raw.append(dict(
                shape=shape.name, L=shape.enc[1], n=shape.n, ragged=shape.ragged, impl=impl, label=IMPLS[impl][0],
                real_tokens=data.real_tokens, mean_enc_len=sum(data.enc_lens) / shape.n, flops=flops, **r,
            ))  # fmt: skip

    out = Path(args.out) if args.out else Path(args.out_dir or RESULTS_DIR) / f"{_dt.date.today()}-{gpu_name()}.md"
    stem = f"{_dt.date.today()}-{'cpu-dry-run' if args.dry_run else gpu_name()}-model"
    png, js = out.parent / f"{stem}.png", out.parent / f"{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps(dict(preset=args.preset, peak_tflops=peak_tf, rows=raw), indent=1))
    from plot_model import plot

    plot(raw, png, title=f"T5 {'tiny (dry run)' if args.dry_run else args.preset} training step, {gpu_name()}")
    warmup = 1 if args.dry_run else args.warmup
    model_name = "tiny dry-run config" if args.dry_run else args.preset
    notes = (
        f"- Model `{model_name}` ({n_params / 1e6:.1f}M parameters), the same random weights in every row, dropout "
        f"0. One step = forward, loss, backward, grad-norm clip {GRAD_CLIP}, fused AdamW step, zero_grad.\n"
        "- tok/s (k): real (non-padding) encoder + decoder tokens, thousands per second. step ms: median of "
        f"CUDA-event-timed back-to-back steps after {warmup} warm-up steps. speedup: vs the faster transformers row "
        "of the same shape.\n"
        "- MFU: `utils.t5_train_flops` (6 x matmul parameters x the real tokens through them + 12 x Lq x Lk x inner "
        "per attention and document, causal self-attention half) / step time / the bf16 8192^3 `torch.mm` peak "
        f"measured in this run ({peak_tf:.0f} TFLOP/s). Padding is not counted as work.\n"
        "- GPU busy: union of the device activity intervals in a profiler trace of 3-5 steps / (those steps x the "
        "unprofiled median step time). peak GiB: `max_memory_allocated` from a reset before the first step "
        "(weights, grads, optimizer state, activations; a graph row's capture included).\n"
        "- Ragged batch: transformers and nai-t5 get it padded to its longest input / target, flasht5 packed "
        "(varlen, no padding). loss (1st step): same weights and batch, so the rows should agree to bf16 "
        f"precision. Plot `{png.name}`, raw numbers `{js.name}`.\n\n"
    )
    body = notes + markdown_table(rows, COLUMNS) + f"\n![tok/s vs L]({png.name})\n"
    path = write_results("Whole T5 training step (fwd + bwd + clip + AdamW) vs transformers and nai-t5", body, out)
    print(f"[{time.perf_counter() - t_start:6.1f}s] wrote {path}, {png}, {js}", flush=True)


if __name__ == "__main__":
    main()
