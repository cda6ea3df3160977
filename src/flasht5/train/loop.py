"""The one training loop: corpus -> tokenizer -> pretokenized store -> denoised, packed batches -> AdamWScale.

The loop drives pretraining (``flasht5 train``) and fine-tuning (``flasht5 finetune``) alike; what differs -- the
data source and the evaluation -- is a task object (:class:`PretrainTask` here, :class:`flasht5.train.finetune.
FinetuneTask` for fine-tuning; the methods the loop calls are listed on :class:`PretrainTask`).

``train(cfg)`` prepares whatever is missing (it trains the tokenizer and pretokenizes the corpus on first use),
then trains with a progress bar (loss, tokens/s), writes ``metrics.jsonl`` and ``loss.png``, evaluates on held-out
text, checkpoints periodically (and resumes from the newest checkpoint), saves ``final/`` and prints span-filling
samples. On a CUDA machine it trains on the GPU in bf16 autocast with the flash kernels, the step replayed from a
CUDA graph (:class:`flasht5.train.step.TrainStep`) on static varlen batches that DataLoader workers build ahead into
pinned memory; the loop itself reads the device only to log.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flasht5.config import FlashT5Config
from flasht5.data.packing import ResumableLoader
from flasht5.modeling import FlashT5ForConditionalGeneration
from flasht5.train import checkpoint as ckpt
from flasht5.train import dist as tdist
from flasht5.train.config import Config
from flasht5.train.optim import AdamWScale, lr_at
from flasht5.train.step import TrainStep
from flasht5.train.tracking import Tracker, matmul_flops, peak_flops

_QUIET = False  # set on the ranks other than 0 of a data-parallel run


def log(msg: str) -> None:
    if not _QUIET:
        print(f"[flasht5] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but no CUDA device is available")
    return device


def prepare_data(cfg: Config) -> tuple[Any, Any, Any | None]:
    """(tokenizer, train store, held-out store or None), building the tokenizer and stores when missing."""
    from flasht5.data.store import TokenStore, pretokenize
    from flasht5.data.tokenizer import load_tokenizer, train_tokenizer

    d = cfg.data
    out = Path(cfg.train.out_dir)
    if not d.corpus:
        raise ValueError("data.corpus is empty: give the training text files")
    tok_dir = Path(d.tokenizer)
    if not tok_dir.exists():
        log(f"training a {d.vocab_size}-piece SentencePiece tokenizer on {d.corpus} -> {tok_dir}")
        train_tokenizer(
            d.corpus, tok_dir, vocab_size=d.vocab_size, text_key=d.text_key, seed=cfg.train.seed,
            max_sentences=d.tokenizer_sample,
        )  # fmt: skip
    tokenizer = load_tokenizer(tok_dir)
    store_dir = Path(d.store) if d.store else out / "store"
    stats = pretokenize(d.corpus, tok_dir, store_dir, text_key=d.text_key, progress=cfg.train.progress)
    log(f"train store {store_dir}: {stats.get('documents', '?')} documents, {stats.get('tokens', '?')} tokens")
    heldout = None
    if d.heldout:
        held_dir = store_dir.parent / (store_dir.name + "-heldout")
        pretokenize(d.heldout, tok_dir, held_dir, text_key=d.text_key, progress=False)
        heldout = TokenStore(held_dir)
    return tokenizer, TokenStore(store_dir), heldout


def make_dataset(
    store: Any, tokenizer: Any, cfg: Config, *, seed: int, static: bool = False, rank: int = 0, world_size: int = 1
):
    """The UL2 stream of ``cfg.data``; ``static``: fixed batch shapes (varlen), so a CUDA graph can replay the step."""
    from flasht5.data.packing import UL2Dataset

    d = cfg.data
    max_docs = None
    if static and d.mode == "varlen":
        # Room for examples averaging half the longest input, plus padding documents for a quarter of the budget;
        # a batch that needs more (e.g. the last one of a finite stream) runs eagerly.
        max_docs = d.max_docs or 2 * -(-d.max_tokens // d.max_input_len) + -(-d.max_tokens // d.max_input_len) // 4 + 1
    return UL2Dataset.from_tokenizer(
        store,
        tokenizer,
        denoisers=d.denoisers if d.denoisers is not None else d.objective,
        max_input_len=d.max_input_len,
        max_target_len=d.max_target_len,
        max_tokens=d.max_tokens,
        max_target_tokens=d.max_target_tokens,
        mode=d.mode,
        row_len=d.row_len,
        row_target_len=d.row_target_len,
        seed=seed,
        rank=rank,
        world_size=world_size,
        max_docs=max_docs,
    )


def build_model(
    cfg: Config, vocab_size: int, device: torch.device, *, meta: bool = False
) -> FlashT5ForConditionalGeneration:
    """The model of ``cfg.model`` on ``device``; ``meta``: on the meta device (no memory, no values: FSDP2 shards it,
    then :func:`flasht5.train.dist.materialize` allocates and initialises each rank's shards)."""
    m = cfg.model
    if meta:
        with torch.device("meta"):
            model = build_model(cfg, vocab_size, torch.device("meta"))
        return model
    kwargs = {} if m.attn_implementation is None else {"attn_implementation": m.attn_implementation}
    if m.init_from:
        model = FlashT5ForConditionalGeneration.from_pretrained(m.init_from, **kwargs)
        if model.config.vocab_size < vocab_size:
            raise ValueError(
                f"model.init_from has vocab_size {model.config.vocab_size} < the tokenizer's {vocab_size} ids"
            )
    else:
        # Round the vocabulary up to a multiple of 128 (tensor-core friendly, as T5's 32128 = 32100 rounded).
        config = FlashT5Config.from_preset(m.preset, **{"vocab_size": -(-vocab_size // 128) * 128, **m.overrides})
        if config.vocab_size < vocab_size:
            raise ValueError(f"model.overrides.vocab_size={config.vocab_size} < the tokenizer's {vocab_size} ids")
        model = FlashT5ForConditionalGeneration(config)
        if m.attn_implementation is not None:
            model.set_attn_implementation(m.attn_implementation)
    return model.to(device)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation, samples, checkpoints
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, batches: list[tuple[Any, int]], autocast) -> float:
    """Token-weighted mean loss over fixed held-out batches, given as (Batch on the device, target tokens); ``model``
    is the core :class:`flasht5.model.T5` (the LM head fused into the loss on the flash backend)."""
    was_training = model.training
    model.eval()
    losses = []
    for b, _ in batches:
        with autocast():
            losses.append(
                model(b.input_ids, b.decoder_input_ids, b.labels, enc=b.enc, dec=b.dec, return_logits=False).loss
            )
    model.train(was_training)
    values = torch.stack(losses).tolist()  # one host sync per evaluation, not one per batch
    total = sum(v * n for v, (_, n) in zip(values, batches))
    return total / max(sum(n for _, n in batches), 1)


@torch.no_grad()
def span_filling_samples(model, tokenizer, store, n: int, device: torch.device, seed: int) -> list[dict[str, str]]:
    """Corrupt held-out passages with T5 span corruption and let the model fill the sentinels."""
    from flasht5.data.tokenizer import sentinel_ids
    from flasht5.data.ul2 import PRESETS, apply_denoiser

    rng = np.random.default_rng(seed)
    denoiser = PRESETS["t5"][0][0]
    sentinels = sentinel_ids(tokenizer)
    model.eval()
    out = []
    for i in range(min(n, len(store))):
        tokens = np.asarray(store[i][:48], dtype=np.int64)
        if len(tokens) < 8:
            continue
        inputs, targets = apply_denoiser(tokens, denoiser, sentinel_ids=sentinels, rng=rng, prefix_ids=[])
        ids = torch.tensor([*inputs, tokenizer.eos_token_id], device=device)[None]
        gen = model.generate(ids, max_new_tokens=len(targets) + 8, do_sample=False, num_beams=1)
        out.append(
            {
                "input": tokenizer.decode(inputs),
                "truth": tokenizer.decode(targets),
                "model": tokenizer.decode(gen[0], skip_special_tokens=False).replace("<pad>", "").strip(),
            }
        )
    return out


def plot_losses(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(png.name + ".tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(png)  # an interrupted plot leaves the previous one


# ----------------------------------------------------------------------------------------------------------------
# What the loop trains on and how it evaluates: the task
# ----------------------------------------------------------------------------------------------------------------


class PretrainTask:
    """Pretraining's data source and evaluation: the UL2 stream of a pretokenized corpus, held-out loss, span-filling
    samples. Fine-tuning's :class:`flasht5.train.finetune.FinetuneTask` has the same methods."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.eval_batches: list[tuple[Any, int]] = []

    def prepare(self) -> Any:
        """Build what the data needs (tokenizer, stores); returns the tokenizer."""
        self.tokenizer, self.store, self.heldout = prepare_data(self.cfg)
        return self.tokenizer

    def build_model(self, device: torch.device, *, meta: bool = False) -> torch.nn.Module:
        """The Hugging Face wrapper (saved in checkpoints, generates); ``meta``: on the meta device (FSDP2)."""
        return build_model(self.cfg, len(self.tokenizer), device, meta=meta)

    def core(self, model: torch.nn.Module) -> torch.nn.Module:
        """What the training step drives: ``core(input_ids, decoder_input_ids, labels, enc=, dec=)`` -> ``.loss``."""
        return model.model

    def train_dataset(self, static: bool, rank: int = 0, world_size: int = 1) -> Any:
        """The training stream (``static``: fixed batch shapes, for the CUDA-graph step); ``rank`` of ``world_size``
        streams reading disjoint shards."""
        return make_dataset(self.store, self.tokenizer, self.cfg, seed=self.cfg.train.seed, static=static, rank=rank,
                            world_size=world_size)  # fmt: skip

    @property
    def has_eval(self) -> bool:
        return self.heldout is not None

    def prepare_eval(self, device: torch.device) -> None:
        """The held-out batches are fixed: moved to the device and counted once, not at every evaluation."""
        self.eval_batches = []
        if self.heldout is None:
            return
        for item in make_dataset(self.heldout, self.tokenizer, self.cfg, seed=self.cfg.train.seed + 1):
            self.eval_batches.append((item["batch"].to(device), item["stats"]["target_tokens"]))
            if len(self.eval_batches) >= self.cfg.data.eval_batches:
                break

    def evaluate(self, model: torch.nn.Module, core: torch.nn.Module, autocast: Any, step: int) -> dict[str, float]:
        """The metrics row of one evaluation (``eval_loss`` first)."""
        return {"eval_loss": evaluate(core, self.eval_batches, autocast)}

    def after_eval(self, step: int, metrics: dict[str, float], save_model: Any) -> None:
        """Called after each evaluation, with ``save_model(folder, extra=None)`` (fine-tuning keeps its best here)."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the task (numbers and strings)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def samples(self, model: torch.nn.Module, device: torch.device) -> list[dict[str, str]]:
        t = self.cfg.train
        if not t.samples:
            return []
        return span_filling_samples(model, self.tokenizer, self.heldout or self.store, t.samples, device, t.seed)

    def summary(self) -> dict[str, Any]:
        """Extra entries of ``summary.json``."""
        return {}


def _fmt_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in metrics.items())


def save_model_dir(path: Path, model: Any, tokenizer: Any, extra: dict[str, str] | None = None) -> None:
    """``model`` and ``tokenizer`` (and ``extra`` files: name -> text) into ``path``, atomically."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)

    ckpt.write_dir_atomically(path, write, need=ckpt.nbytes(model.state_dict()))


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


def _config_record(cfg: Config) -> dict[str, Any]:
    """The config as ``config.json`` stores it (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(asdict(cfg), default=str))


def check_resume(cfg: Config, out: Path, found: ckpt.Checkpoint) -> list[str]:
    """Config differences between ``found`` and ``cfg`` (reported); a checkpoint past ``train.steps`` is refused."""
    saved = found.trainer.get("config")
    if saved is None and (out / "config.json").is_file():  # a checkpoint written before configs were saved in it
        saved = (out / "config.json").read_text()
    try:
        diff = ckpt.config_diff(json.loads(saved), _config_record(cfg)) if saved else []
    except ValueError:
        diff = []
    if diff:
        log(f"warning: resuming {found.path} with a config that differs from its own: {'; '.join(diff)}")
    if found.step > cfg.train.steps:
        raise ckpt.RunDirError(
            f"the newest checkpoint {found.path} is at step {found.step}, past train.steps={cfg.train.steps}: "
            "raise train.steps to train on, or choose another train.out_dir"
        )
    return diff


def load_weights(found: ckpt.Checkpoint, model, diff: list[str]) -> None:
    """The ``save_pretrained`` weights of a single-process checkpoint into the (not yet sharded) model."""
    try:
        model.load_state_dict(found.weights)
    except RuntimeError as e:
        raise ckpt.RunDirError(
            f"checkpoint {found.path} does not fit the configured model ({str(e).strip().splitlines()[-1].strip()})"
            + (f"; the config differs from the checkpoint's: {'; '.join(diff)}" if diff else "")
        ) from e


def resume_from_checkpoint(cfg: Config, out: Path, model, optimizer) -> ckpt.Checkpoint | None:
    """Load the newest intact checkpoint of ``out`` into ``model`` and ``optimizer`` (None: there is none). Config
    differences against the checkpoint's are reported; a checkpoint past ``train.steps`` or one that does not fit
    the model is refused. (One process; :func:`train` also resumes sharded checkpoints and data-parallel runs.)"""
    found = ckpt.load_latest(out)
    if found is None:
        return None
    diff = check_resume(cfg, out, found)
    if found.weights is None:
        ckpt.load_sharded(found.path, model.model, optimizer, cfg.optim.lr)
    else:
        load_weights(found, model, diff)
        ckpt.load_optimizer_state(optimizer, found.trainer["optimizer"], cfg.optim.lr)
    log(f"resumed from {found.path} at step {found.step}")
    return found


def restore_run_state(
    state: dict[str, Any], device: torch.device, losses: deque, z_terms: deque, world: tdist.World | None = None
) -> None:
    """What the uninterrupted run would have in memory at the checkpoint's step: the RNG (dropout draws from it) and
    the losses of the current log window."""
    world = world or tdist.World()
    rngs = state.get("rngs")  # one per rank (data-parallel checkpoints)
    if rngs is not None and len(rngs) != world.world_size:
        log(f"warning: the checkpoint was saved by {len(rngs)} ranks, this run has {world.world_size}: the data "
            "stream continues exactly, but dropout draws differ from the uninterrupted run")  # fmt: skip
        torch.manual_seed(state["step"] * 1_000_003 + world.rank)
    elif rngs is not None:
        ckpt.set_rng_state(rngs[world.rank], device)
    elif state.get("rng") is not None:
        ckpt.set_rng_state(state["rng"], device)
    else:
        log("warning: this checkpoint has no RNG state (saved by an older flasht5): with dropout, the resumed steps "
            "differ from an uninterrupted run")  # fmt: skip
    window = state.get("log_window") or {}
    for dq, key in ((losses, "loss"), (z_terms, "z_loss")):
        if window.get(key) is not None:
            # The window holds global losses; each rank's deque holds its share (summed at log time): rank 0 takes
            # the values, the others zeros, so that the sum is exact.
            values = window[key].to(device)
            dq.extend((values if world.main else torch.zeros_like(values)).unbind())


def trainer_state(
    step: int, optimizer, loader: ResumableLoader | list[ResumableLoader], device: torch.device, losses: deque,
    z_terms: deque, config: str, task_state: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """``trainer.pt``: everything besides the weights that the next steps depend on; tensors, numbers, strings,
    lists and dicts only, so that it loads with ``torch.load(weights_only=True)``. ``loader``: one per data stream
    (gradient accumulation reads one stream per micro-batch)."""
    stack = lambda dq: torch.stack(list(dq)).cpu() if dq else None
    loaders = loader if isinstance(loader, list) else [loader]
    return {
        "format": ckpt.FORMAT,
        "step": step,
        "optimizer": optimizer.state_dict(),
        "data": loaders[0].state_dict(),
        **({"data_streams": {str(i): ld.state_dict() for i, ld in enumerate(loaders)}} if len(loaders) > 1 else {}),
        "rng": ckpt.rng_state(device),
        "log_window": {"loss": stack(losses), "z_loss": stack(z_terms)},
        "config": config,
        "task": task_state or {},
    }


def sharded_trainer_state(
    step: int, streams: dict[str, Any], world: tdist.World, device: torch.device, losses, z_terms, config: str,
    task_state: dict[str, Any] | None = None,
) -> dict[str, Any] | None:  # fmt: skip
    """``trainer.pt`` of a data-parallel checkpoint (collective; rank 0 gets it, the others None): every rank's RNG
    and every data stream's position, gathered; the log window holds the global losses (summed over the ranks)."""
    rngs = tdist.gather_objects(ckpt.rng_state(device), world)
    all_streams = tdist.gather_objects(streams, world)
    window = {}
    for key, dq in (("loss", losses), ("z_loss", z_terms)):
        window[key] = tdist.all_reduce_sum(torch.stack(list(dq)), world).cpu() if dq else None
    if not world.main:
        return None
    return {
        "format": ckpt.FORMAT,
        "step": step,
        "data_streams": {k: v for part in all_streams for k, v in part.items()},
        "rngs": rngs,
        "world_size": world.world_size,
        "log_window": window,
        "config": config,
        "task": task_state or {},
    }


@contextlib.contextmanager
def _no_transformers_progress_bars():
    """The run has its own progress bar: no "Writing model shards" bar at every checkpoint (restored after)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def train(cfg: Config, task: Any = None) -> dict[str, Any]:
    """Train as configured; returns a summary (losses, paths, samples). Holds ``train.out_dir``'s lock throughout
    (rank 0 of a data-parallel run): a second run on the same folder is refused at once. Under torchrun every rank
    calls this (see :mod:`flasht5.train.dist`). ``task``: the data source and evaluation (default: the pretraining
    :class:`PretrainTask` of ``cfg``; fine-tuning passes its own)."""
    out = Path(cfg.train.out_dir)
    world, device = tdist.init(cfg.dist.strategy, cfg.train.device, cfg.dist.timeout_s)
    try:
        with contextlib.ExitStack() as stack:
            tdist.on_main(lambda: stack.enter_context(ckpt.RunLock(out)) and None, world)
            stack.enter_context(_no_transformers_progress_bars())
            try:
                return _train(cfg, out, world, device, task if task is not None else PretrainTask(cfg))
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise ckpt.no_space_error(Path(e.filename) if e.filename else out, whole=False) from e
                raise
    finally:
        tdist.shutdown(world)


def _next(iters: list, loaders: list, i: int) -> dict[str, Any]:
    try:
        return next(iters[i])
    except StopIteration:  # the dataset ended an epoch: start the next one
        iters[i] = iter(loaders[i])
        return next(iters[i])


def _train(cfg: Config, out: Path, world: tdist.World, device: torch.device, task: Any) -> dict[str, Any]:
    from tqdm.auto import tqdm

    global _QUIET
    _QUIET = not world.main  # one voice: rank 0 logs
    t = cfg.train

    def check_out_dir() -> None:
        ckpt.remove_interrupted_saves(out)
        ckpt.refuse_used_out_dir(out, t.resume)  # before any expensive set-up

    tdist.on_main(check_out_dir, world)
    torch.manual_seed(t.seed)  # the same on every rank: every rank initialises the same weights
    if t.threads:
        torch.set_num_threads(t.threads)
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else (lambda: contextlib.nullcontext())
    )

    # Rank 0 trains the tokenizer and pretokenizes; the others then open what it built.
    built: list[Any] = []
    tdist.on_main(lambda: built.append(task.prepare()), world)
    tokenizer = built[0] if built else task.prepare()
    meta = cfg.dist.meta_init and world.strategy == "fsdp"
    model = task.build_model(device, meta=meta)
    if cfg.optim.precision != "fp32":  # pure bf16 weights (the optimizer keeps what optim.precision says)
        model.to(torch.bfloat16)
    core = task.core(model)  # the training step drives the core model; the wrapper saves and generates
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    n_params = sum(p.numel() for p in model.parameters())
    accum = t.grad_accum
    graphs = device.type == "cuda" and cfg.data.mode == "varlen" and not t.compile
    graphs = graphs and world.strategy != "fsdp" and accum == 1
    graphs = graphs if t.cuda_graphs is None else t.cuda_graphs

    # The newest checkpoint: rank 0 picks it (moving unreadable ones aside), every rank reads it.
    found_path = tdist.on_main(lambda: getattr(ckpt.load_latest(out), "path", None) if t.resume else None, world)
    resumed = ckpt.read_checkpoint(found_path) if found_path is not None else None
    diff = check_resume(cfg, out, resumed) if resumed is not None else []
    if resumed is not None and resumed.weights is not None and not meta:  # single-process checkpoint: whole weights
        load_weights(resumed, model, diff)
    start_step = resumed.step if resumed else 0

    param_dtype = torch.bfloat16 if bf16 and cfg.optim.precision == "fp32" else None
    train_module = tdist.wrap(
        core, world, param_dtype=param_dtype,
        reduce_dtype=torch.bfloat16 if cfg.dist.reduce_dtype == "bf16" else torch.float32,
        bucket_mb=cfg.dist.bucket_mb, cpu_offload=cfg.dist.cpu_offload,
        reshard_after_forward=cfg.dist.reshard_after_forward, shard_size=cfg.dist.shard_size,
    )  # fmt: skip
    if meta:  # every rank allocates and initialises its own shards only
        tdist.materialize(core, device, seed=t.seed, rank=world.rank)
        if resumed is not None and resumed.weights is not None:
            ckpt.load_full_model_state(model, resumed.weights)
    if world.world_size > 1:
        torch.manual_seed(t.seed + 7919 * world.rank)  # weights are built: dropout draws differ between ranks
    log(
        f"model: {n_params / 1e6:.1f}M parameters, backend {core.backend}, device {device}, "
        f"{'bf16 autocast' if bf16 else 'fp32'}{', CUDA-graph step' if graphs else ''}, "
        f"{'fp32' if cfg.optim.precision == 'fp32' else 'bf16'} weights, "
        f"optimizer {cfg.optim.name} {cfg.optim.precision}"
        + (f", {world.strategy} on {world.world_size} ranks" if world.active else "")
        + (f", {accum} micro-batches per step" if accum > 1 else "")
    )
    optimizer = AdamWScale(
        core.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay, precision=cfg.optim.precision,
        scale_by_rms=cfg.optim.name == "adamwscale",
    )  # fmt: skip
    if resumed is not None:
        if resumed.weights is None:
            ckpt.load_sharded(resumed.path, core, optimizer, cfg.optim.lr)
        elif world.strategy == "fsdp":
            ckpt.load_full_optimizer_state(core, optimizer, resumed.trainer["optimizer"], cfg.optim.lr)
        else:
            ckpt.load_optimizer_state(optimizer, resumed.trainer["optimizer"], cfg.optim.lr)
        log(f"resumed from {resumed.path} at step {start_step}")

    # The held-out batches are fixed (the task moves them to the device once). Every rank evaluates all of them
    # (FSDP2's forward is collective), rank 0 writes the result.
    if resumed is not None:
        task.load_state_dict(resumed.trainer.get("task") or {})
    task.prepare_eval(device)
    save_model = lambda path, extra=None: tdist.on_main(lambda: save_model_dir(path, model, tokenizer, extra), world)

    step_fn = TrainStep(
        torch.compile(train_module) if t.compile else train_module, optimizer,
        amp_dtype=torch.bfloat16 if bf16 else None, grad_clip=cfg.optim.grad_clip, cuda_graph=graphs,
        world=world, **({"warmup": 11} if graphs and world.strategy == "ddp" else {}),
    )  # fmt: skip
    # Data: world_size x grad_accum streams, stream r * grad_accum + i feeding micro-batch i of rank r, each one
    # shard of the documents (flasht5.data.packing). The stream depends on that product only, so a run resumed on
    # another number of ranks with grad_accum scaled to match sees exactly the batches of the uninterrupted run.
    # The loader's state (every worker's position) is what a checkpoint stores. Workers build batches ahead, into
    # pinned memory on CUDA. The DataLoader gets its own generator: by default it draws its workers' seed from the
    # global one, which a resumed run would then draw once more than the uninterrupted run (and its dropout masks
    # would shift).
    n_streams = world.world_size * accum
    workers = cfg.data.num_workers if cfg.data.num_workers is not None else (2 if device.type == "cuda" else 0)
    loaders, stream_ids = [], [world.rank * accum + i for i in range(accum)]
    for sid in stream_ids:
        dataset = task.train_dataset(static=graphs, rank=sid, world_size=n_streams)
        dataset.emit_example_keys = t.record_steps and world.main  # items carry their examples' keys
        extra = dict(prefetch_factor=4, persistent_workers=True, generator=torch.Generator().manual_seed(t.seed))
        extra = extra if workers else {}
        loaders.append(ResumableLoader(dataset, num_workers=workers, pin_memory=device.type == "cuda", **extra))
    if resumed is not None:
        saved = resumed.trainer.get("data_streams")
        if saved is None and resumed.trainer.get("data") is not None:
            saved = {"0": resumed.trainer["data"]}  # a single-process checkpoint: one stream
        if saved is not None:
            if len(saved) != n_streams:
                raise ckpt.RunDirError(
                    f"checkpoint {resumed.path} holds {len(saved)} data streams (its world size x train.grad_accum), "
                    f"this run has {n_streams} ({world.world_size} ranks x {accum}): set train.grad_accum="
                    f"{len(saved) // world.world_size if len(saved) % world.world_size == 0 else '?'} to continue "
                    "the same batches"
                )
            for sid, loader in zip(stream_ids, loaders):
                loader.load_state_dict(saved[str(sid)])

    # Set-up succeeded: only now is the run's record rewritten and the curve cut back to the checkpoint.
    config_json = json.dumps(_config_record(cfg), indent=2)
    metrics_path = out / "metrics.jsonl"
    metrics = None
    prior: list[dict[str, Any]] = []
    if world.main:
        ckpt.write_text_atomically(out / "config.json", config_json)
        prior = ckpt.cut_metrics(metrics_path, start_step if resumed else None)
        metrics = metrics_path.open("a")
    # train.record_steps: one row per step, written with the log rows (whose one sync gives the losses) and before
    # a checkpoint, so that a resumed run's record continues exactly. Every rank counts the pending steps (the
    # losses of several ranks are summed in one collective), rank 0 has the examples and writes.
    steps_file = None
    if t.record_steps and world.main:
        ckpt.cut_metrics(out / "steps.jsonl", start_step if resumed else None)
        steps_file = (out / "steps.jsonl").open("a")
    pending_steps: list[dict[str, Any]] = []

    def write_steps(values: list[float] | None = None) -> None:
        """The pending rows with their losses: ``values`` (the log window's, rank-summed) or read here."""
        if not pending_steps:
            return
        if values is None:
            values = tdist.all_reduce_sum(torch.stack(list(losses)).to(torch.float64), world).tolist()
        first = len(values) - len(pending_steps)  # the pending steps are the window's last losses
        if steps_file is not None:
            rows = ({"step": r["step"], "loss": values[first + j], **r} for j, r in enumerate(pending_steps))
            steps_file.writelines(json.dumps(r) + "\n" for r in rows)
            steps_file.flush()
        pending_steps.clear()

    tracker = Tracker(out, cfg.log.tensorboard and world.main, purge_step=start_step + 1 if resumed else None)
    peak = peak_flops(device) if bf16 else None  # MFU only against the bf16 peak
    flops = lambda enc_tokens, dec_tokens: matmul_flops(model.config, enc_tokens, dec_tokens)
    prior_evals = [r["eval_loss"] for r in prior if "eval_loss" in r]
    if resumed is None:
        first_eval = math.nan
        if task.has_eval:
            first = task.evaluate(model, core, autocast, 0)
            first_eval = first["eval_loss"]
            if metrics is not None:
                metrics.write(json.dumps({"step": 0, **first}) + "\n")
                tracker.log({"step": 0, **first})
                log(f"held-out at step 0: {_fmt_metrics(first)}")
            task.after_eval(0, first, save_model)
    else:  # the step-0 evaluation is in the kept rows; evaluating again would add a row the curve does not have
        first_eval = next((r["eval_loss"] for r in prior if "eval_loss" in r and r["step"] == 0), math.nan)
    last_eval = prior_evals[-1] if resumed and prior_evals else first_eval

    model.train()
    show = t.progress and world.main
    bar = tqdm(total=t.steps, initial=start_step, desc="train", disable=not show, dynamic_ncols=True)
    step, window_tokens, window_t0 = start_step, 0, time.perf_counter()
    window_enc = window_dec = 0  # the window's encoder and decoder tokens (this rank's), for MFU
    # The last log window only, on the device (a deque keeps long runs from holding every step's scalar).
    losses: deque[torch.Tensor] = deque(maxlen=t.log_every)
    z_terms: deque[torch.Tensor] = deque(maxlen=t.log_every)
    last_loss = math.nan
    if resumed is not None:
        restore_run_state(resumed.trainer, device, losses, z_terms, world)  # the RNG last: nothing may draw after it
        if start_step == t.steps:
            log(f"the run already reached train.steps={t.steps}: nothing to train; writing {out / 'final'} again")
    iters = [iter(loader) for loader in loaders]
    while step < t.steps:
        items = [_next(iters, loaders, i) for i in range(accum)]
        stats = items[0]["stats"]  # the collator's token counts (real, non-padding tokens) and mixture counts
        lr = cfg.optim.lr * lr_at(
            step, total=t.steps, warmup=cfg.optim.warmup_steps, schedule=cfg.optim.schedule,
            final_ratio=cfg.optim.final_lr_ratio,
        )  # fmt: skip
        step_fn.set_lr(lr)
        res = step_fn(items[0]["batch"] if accum == 1 else [it["batch"] for it in items])
        step += 1
        window_tokens += sum(it["stats"]["input_tokens"] + it["stats"]["target_tokens"] for it in items)
        window_enc += sum(it["stats"]["input_tokens"] for it in items)
        window_dec += sum(it["stats"]["target_tokens"] for it in items)
        # Not converted here: that would wait for the GPU every step; the log rows sync once.
        losses.append(res.loss)
        if t.record_steps:
            pending_steps.append({
                "step": step, "lr": lr,
                "input_tokens": sum(it["stats"]["input_tokens"] for it in items),
                "target_tokens": sum(it["stats"]["target_tokens"] for it in items),
                "examples": [key for it in items for key in it.get("examples", [])],
            })  # fmt: skip
        if res.z_loss is not None:
            z_terms.append(res.z_loss)
        bar.update(1)
        if step % t.log_every == 0 or step == t.steps:
            # The one sync per log window; with several ranks one all-reduce of the window's shares and tokens.
            window = torch.stack([*losses, *z_terms, torch.tensor(float(window_tokens), device=res.loss.device)])
            window = tdist.all_reduce_sum(window.to(torch.float64), world).tolist()
            row_loss = sum(window[: len(losses)]) / len(losses)
            last_loss = window[len(losses) - 1]
            elapsed = time.perf_counter() - window_t0
            row = {
                "step": step,
                "loss": row_loss,
                "lr": lr,
                "grad_norm": float(res.grad_norm),
                **({"z_loss": sum(window[len(losses) : -1]) / len(z_terms)} if z_terms else {}),
                "tokens_per_s": window[-1] / max(elapsed, 1e-9),
                **({"mfu": flops(window_enc, window_dec) / max(elapsed, 1e-9) / peak} if peak else {}),
                **({"peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30} if device.type == "cuda" else {}),
                "graphed": step_fn.graphed,
                **{f"data_{k}": v for k, v in stats.items() if isinstance(v, (int, float))},
            }
            if metrics is not None:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                tracker.log(row)
            write_steps(window[: len(losses)])
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", lr=f"{row['lr']:.2e}")
            window_tokens, window_t0 = 0, time.perf_counter()
            window_enc = window_dec = 0
        if task.has_eval and (step % t.eval_every == 0 or step == t.steps):
            evaluated = task.evaluate(model, core, autocast, step)
            last_eval = evaluated["eval_loss"]
            if metrics is not None:
                metrics.write(json.dumps({"step": step, **evaluated}) + "\n")
                metrics.flush()
                tracker.log({"step": step, **evaluated})
            bar.write(f"step {step}: held-out {_fmt_metrics(evaluated)}") if show else None
            task.after_eval(step, evaluated, save_model)
            window_t0 = time.perf_counter()  # evaluation time is not training throughput
        if (t.save_every and step % t.save_every == 0) or step == t.steps:
            if metrics is not None:
                metrics.flush()
                os.fsync(metrics.fileno())  # the rows up to a checkpoint outlive a power loss with it
            write_steps()  # steps since the last log row (one more sync, at a checkpoint only)
            if world.active:
                streams = {str(sid): loader.state_dict() for sid, loader in zip(stream_ids, loaders)}
                state = sharded_trainer_state(
                    step, streams, world, device, losses, z_terms, config_json, task.state_dict()
                )
                ckpt.save_sharded(out, step, core, optimizer, state, t.keep_checkpoints, world)
            else:
                state = trainer_state(step, optimizer, loaders, device, losses, z_terms, config_json, task.state_dict())
                ckpt.save_checkpoint(out, step, model, state, t.keep_checkpoints)
            window_t0 = time.perf_counter()
    bar.close()
    if metrics is not None:
        metrics.close()
    if steps_file is not None:
        steps_file.close()
    tracker.close()
    if step_fn.eager_batches:
        log(f"{step_fn.eager_batches} batches did not fit the CUDA graph's shapes and ran eagerly")

    final = out / "final"
    # The final folder is rank 0's; under FSDP2 the whole weights are first gathered to its CPU (collective), into a
    # CPU copy of the model that then also generates the samples.
    final_model = model
    if world.strategy == "fsdp":
        full = ckpt.full_model_state(core, world)
        if world.main:
            final_model = task.build_model(torch.device("cpu"))
            if cfg.optim.precision != "fp32":
                final_model.to(torch.bfloat16)
            task.core(final_model).load_state_dict(full)  # the core the step trained (T5 or the classifier)

    def finish() -> dict[str, Any]:
        save_model_dir(final, final_model, tokenizer)
        plot_losses(metrics_path, out / "loss.png")
        samples: list[dict[str, str]] = []
        if t.samples:  # under FSDP2 on the gathered copy, moved to rank 0's device (train.samples=0 for XL / XXL)
            samples = task.samples(final_model.to(device), device)
        summary = {
            "steps": step,
            "initial_eval_loss": first_eval,
            "final_eval_loss": last_eval,
            "final_train_loss": last_loss if not math.isnan(last_loss) else (float(losses[-1]) if losses else math.nan),
            "model_dir": str(final),
            "metrics": str(metrics_path),
            "loss_plot": str(out / "loss.png"),
            "samples": samples,
            **task.summary(),
        }
        ckpt.write_text_atomically(out / "summary.json", json.dumps(summary, indent=2))
        return summary

    return tdist.on_main(finish, world)  # every rank returns rank 0's summary (or raises its error)
