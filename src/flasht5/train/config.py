"""Typed training configuration: YAML in, ``--section.key=value`` overrides, every field checked.

A run is described by five sections (see ``configs/pretrain/demo.yaml`` for every key, commented)::

    model:  which architecture (a FlashT5Config preset + overrides) or which checkpoint to start from
    data:   corpus -> tokenizer -> pretokenized store -> denoisers -> packed batches
    optim:  AdamWScale or AdamW, learning-rate schedule, clipping
    train:  steps, device, precision, logging, evaluation, checkpoints
    dist:   data parallelism under torchrun (DDP / FSDP2); see flasht5.train.dist
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

OPTIMIZERS = ("adamwscale", "adamw")  # optim.name
SCHEDULES = ("cosine", "linear", "constant")  # optim.schedule (flasht5.train.optim.lr_at)


@dataclass
class ModelConfig:
    preset: str = "demo"  # a FlashT5Config preset (flasht5.config.PRESETS)
    overrides: dict[str, Any] = field(default_factory=dict)  # FlashT5Config fields that differ from the preset
    init_from: str | None = None  # a local flasht5 / Hugging Face T5 folder to start from, or "hf:ORG/NAME" (Hub)
    attn_implementation: str | None = None  # eager | sdpa | flash; None = flash on CUDA, sdpa on CPU (the backend)


@dataclass
class DataConfig:
    corpus: list[str] = field(default_factory=list)  # training files (txt / txt.gz / jsonl / parquet), folders, globs
    heldout: list[str] = field(default_factory=list)  # held-out files for evaluation (same forms)
    text_key: str = "text"  # field holding the text in JSONL / Parquet
    tokenizer: str = "runs/tokenizer"  # tokenizer folder; trained on `corpus` if it does not exist
    vocab_size: int = 4096  # SentencePiece pieces of a tokenizer trained here (the 100 sentinels come on top)
    tokenizer_sample: int | None = None  # train the tokenizer on this many sampled sentences (None: all)
    store: str | None = None  # pretokenized store folder; default: <train.out_dir>/store
    objective: str = "t5"  # denoiser mixture: "t5", "ul2", "fat5" (flasht5.data.ul2.PRESETS)
    denoisers: list[dict[str, Any]] | None = None  # a custom mixture instead of `objective`
    max_input_len: int = 256  # encoder tokens per example (EOS included)
    max_target_len: int = 64  # decoder tokens per example (EOS included)
    max_tokens: int = 4096  # encoder-token budget of one batch
    max_target_tokens: int | None = None  # decoder-token budget of one batch (default: scaled from max_tokens)
    mode: str = "varlen"  # "varlen" (padding-free) or "padded" (rows packed with segment ids)
    row_len: int | None = None  # padded mode: encoder row length (None: max_input_len; ~4x suits ul2/fat5)
    row_target_len: int | None = None  # padded mode: decoder row length (None: max_target_len)
    num_workers: int | None = None  # DataLoader worker processes; None = 2 on CUDA (batches built ahead), 0 on CPU
    max_docs: int | None = None  # varlen: documents per batch for static shapes (CUDA graphs); None = auto
    eval_batches: int = 8  # held-out batches evaluated each time


@dataclass
class OptimConfig:
    # "adamwscale" (AdamW with each tensor's step scaled by its RMS, as nanoT5; lr is relative, ~1e-2 for
    # pretraining, ~5e-4 for fine-tuning) or "adamw" (plain AdamW with decoupled weight decay, the update of
    # torch.optim.AdamW and transformers' Trainer; lr is absolute, e.g. 1e-4)
    name: str = "adamwscale"
    lr: float = 2e-2  # peak learning rate (relative to each tensor's RMS under adamwscale, absolute under adamw)
    weight_decay: float = 0.0  # decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's moment decay rates
    eps: float = 1e-8  # Adam's epsilon
    warmup_steps: int = 100  # linear warm-up steps
    # after the linear warm-up: "cosine" or "linear" decay to final_lr_ratio * lr at the last step, or "constant";
    # linear with final_lr_ratio 0 is transformers' get_linear_schedule_with_warmup (its warm-up is one step behind)
    schedule: str = "cosine"
    final_lr_ratio: float = 0.1  # learning rate at the last step, as a fraction of `lr`
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    # Weights and optimizer-state precision (flasht5.train.optim): "fp32" (fp32 weights, bf16 autocast on CUDA),
    # "bf16" (pure bf16 weights and moments), "bf16_kahan" (pure bf16 + a bf16 Kahan compensation buffer),
    # "fp32_master" (bf16 weights, fp32 master copy and moments in the optimizer)
    precision: str = "fp32"


@dataclass
class RunConfig:
    out_dir: str = "runs/demo"  # everything this run writes: checkpoints, metrics.jsonl, loss.png, final/
    steps: int = 300  # optimizer steps
    device: str = "auto"  # "auto" (cuda if present), "cpu", "cuda", "cuda:1"
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16", "fp32"
    seed: int = 0  # seeds the model init, the data order and dropout
    log_every: int = 10  # metrics.jsonl rows and progress-bar refresh
    eval_every: int = 100  # evaluate every N steps (and at step 0 and the end): held-out loss (+ fine-tuning metrics)
    save_every: int = 200  # checkpoint every N steps (and at the end); 0 = only at the end
    keep_checkpoints: int = 2  # how many step checkpoints to keep (>= 1)
    resume: bool = True  # continue from the newest checkpoint in out_dir if there is one
    compile: bool = False  # torch.compile the model
    cuda_graphs: bool | None = None  # replay the whole step from one CUDA graph; None = on for CUDA + varlen batches
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (less memory)
    threads: int = 0  # CPU threads for torch (0 = torch's default)
    samples: int = 3  # generations printed at the end (span filling; fine-tuning: held-out predictions)
    progress: bool = True  # show a progress bar
    grad_accum: int = 1  # micro-batches (of data.max_tokens each) per optimizer step and rank
    # write <out_dir>/steps.jsonl: per optimizer step its loss, lr, token counts and the [epoch, document, chunk]
    # key of every example it trained on (fine-tuning: document = the example's index in data.train); with several
    # ranks, rank 0's examples
    record_steps: bool = False


@dataclass
class DistConfig:
    # "auto" = ddp under torchrun, none outside; none = one process; ddp = DistributedDataParallel; fsdp = FSDP2
    strategy: str = "auto"
    bucket_mb: float = 25.0  # ddp: all-reduce bucket size (MiB)
    reduce_dtype: str = "fp32"  # fsdp: gradient reduce-scatter dtype, "fp32" or "bf16"
    cpu_offload: bool = False  # fsdp: sharded parameters, gradients and optimizer state in host memory
    reshard_after_forward: bool = True  # fsdp: free each block's gathered weights after its forward (ZeRO-3)
    shard_size: int = 0  # fsdp: shard over groups of this many ranks, replicate across them (HSDP); 0 = all ranks
    meta_init: bool = False  # fsdp: build on the meta device, allocate and initialise only each rank's shards
    timeout_s: float = 1800.0  # collective timeout (a rank that dies makes the others fail after this long)


@dataclass
class LogConfig:
    tensorboard: bool = True  # TensorBoard event files in <train.out_dir>/tensorboard (when tensorboard is installed)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _number(value: Any) -> int | float | None:
    """``value`` as a number: ints and floats as they are, and strings such as ``"1e-3"`` or ``"5e-4"`` (PyYAML
    reads exponents without a dot as strings; a quoted number is a string too); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            return None
    return None


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a field's type (the few kinds the configs use) and convert where lossless."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if origin is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, args[0], where) for v in value] if args else list(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if annotation is int:
        number = _number(value)
        if isinstance(number, int):
            return number
        if isinstance(number, float) and number.is_integer():
            return int(number)
        raise ValueError(f"{where} must be an integer, got {value!r}")
    if annotation is float:
        number = _number(value)
        if number is None:
            raise ValueError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(number):
            raise ValueError(f"{where} must be a finite number, got {value!r}")
        return float(number)
    if annotation is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise ValueError(f"{where} must be a string, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names, key=str)
    if unknown:
        hints_ = _did_you_mean(unknown, names)
        place = f"section {where!r}" if where else "the top level (sections)"
        raise ValueError(f"unknown key(s) {unknown} in {place}{hints_}; known: {sorted(names)}")
    kwargs = {}
    for name, value in values.items():
        sub = hints[name]
        if dataclasses.is_dataclass(sub):
            kwargs[name] = _build(sub, value or {}, f"{where}.{name}" if where else name)
        else:
            kwargs[name] = _coerce(value, sub, f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _did_you_mean(unknown: list[Any], known: Iterable[str]) -> str:
    known = list(known)
    pairs = [(u, difflib.get_close_matches(str(u), known, n=1)) for u in unknown]
    pairs = [f"{u!r} -> {m[0]!r}" for u, m in pairs if m]
    return f" (did you mean {', '.join(pairs)}?)" if pairs else ""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load`` that also reads ``1e-3`` and ``5e-4`` as numbers (YAML 1.2 does; PyYAML's YAML 1.1 rules
    want a dot, ``1.0e-3``, and return the string ``'1e-3'`` otherwise)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str, what: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass: no Python objects
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{what} is not valid YAML{where}: {problem}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["--train.steps=10", "data.mode=padded"]`` -> nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.removeprefix("--").partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like --section.key=value")
        _set_dotted(tree, key, _yaml(raw, f"override {item!r}") if raw != "" else "")
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: nested mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    check_paths_too: bool = True,
    schema: type = Config,
) -> Any:
    """A ``Config`` from a YAML file (or the defaults) plus overrides; unknown keys, bad types and out-of-range
    values raise a ``ValueError`` naming the key (:func:`check`), and so do input paths that cannot work
    (:func:`check_paths`, skipped with ``check_paths_too=False``). All of it before anything expensive runs.
    ``schema``: :class:`Config` (``flasht5 train``) or :class:`FinetuneConfig` (``flasht5 finetune``)."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ValueError(f"config file {str(path)!r} does not exist")
        if p.is_dir():
            raise ValueError(f"config file {str(path)!r} is a folder; give a YAML file")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"config file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        raw = _yaml(text, f"config file {str(path)!r}") or {}
        if not isinstance(raw, dict):
            names = ", ".join(f.name for f in dataclasses.fields(schema))
            raise ValueError(f"{path} must hold a mapping of sections ({names})")
    raw = _merge(raw, parse_overrides(overrides or []))
    cfg = _build(schema, raw, "")
    finetune = isinstance(cfg, FinetuneConfig)
    (check_finetune if finetune else check)(cfg)
    if check_paths_too:
        (check_finetune_paths if finetune else check_paths)(cfg)
    return cfg


def _range(
    where: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    none_ok: bool = False,
    note: str = "",
) -> None:
    """Raise ``ValueError`` unless ``lo <= value <= hi`` (``<`` where open), naming the key and the valid range."""
    if value is None and none_ok:
        return
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if below or above:
        if lo is not None and hi is not None:
            valid = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        elif lo is not None:
            valid = f"{'>' if lo_open else '>='} {lo}"
        else:
            valid = f"{'<' if hi_open else '<='} {hi}"
        extra = " or null" if none_ok else ""
        raise ValueError(f"{where} must be {valid}{extra}, got {value!r}{note}")


def _one_of(where: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{where} must be one of {choices}, got {value!r}{_did_you_mean([value], map(str, choices))}")


def check(cfg: Config) -> None:
    """Every value's range and the cross-field rules, each error naming the key and what would be valid.

    Cheap: runs before the tokenizer, the store or the model is built (no file is read here; see
    :func:`check_paths`)."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    _check_model(m)

    _one_of("data.mode", d.mode, ("varlen", "padded"))
    if not d.text_key:
        raise ValueError("data.text_key must be a non-empty string")
    if not d.tokenizer:
        raise ValueError("data.tokenizer must be a folder path (trained on data.corpus if it does not exist)")
    _range("data.vocab_size", d.vocab_size, 11, note=" (SentencePiece pieces incl. <pad> </s> <unk> and 6 mode tokens)")
    _range("data.tokenizer_sample", d.tokenizer_sample, 1, none_ok=True)
    _check_batch_shape(d)
    _range("data.eval_batches", d.eval_batches, 1, note=" (leave data.heldout empty for no evaluation)")
    _check_mixture(d)

    _check_optim(o)
    _check_run(t)
    _check_dist(cfg)


def _check_batch_shape(d: Any) -> None:
    """The batch-shape keys that the pre-training and fine-tuning data sections share."""
    _range("data.max_input_len", d.max_input_len, 2, note=" (one token and EOS)")
    _range("data.max_target_len", d.max_target_len, 2, note=" (one token and EOS)")
    _range("data.max_tokens", d.max_tokens, d.max_input_len, note=" (data.max_input_len: one example per batch)")
    _range("data.max_target_tokens", d.max_target_tokens, d.max_target_len, none_ok=True,
           note=" (data.max_target_len: one example per batch)")  # fmt: skip
    _range("data.row_len", d.row_len, d.max_input_len, none_ok=True, note=" (data.max_input_len)")
    _range("data.row_target_len", d.row_target_len, d.max_target_len, none_ok=True, note=" (data.max_target_len)")
    if d.mode != "padded" and (d.row_len is not None or d.row_target_len is not None):
        raise ValueError("data.row_len / data.row_target_len apply to data.mode=padded only; set them to null")
    _range("data.num_workers", d.num_workers, 0, none_ok=True)
    _range("data.max_docs", d.max_docs, 1, none_ok=True)


def _check_optim(o: OptimConfig) -> None:
    _range("optim.lr", o.lr, 0)
    _range("optim.weight_decay", o.weight_decay, 0)
    for i, b in enumerate(o.betas):
        _range(f"optim.betas[{i}]", b, 0, 1, hi_open=True)
    _range("optim.eps", o.eps, 0, lo_open=True)
    _range("optim.warmup_steps", o.warmup_steps, 0)
    _one_of("optim.name", o.name, OPTIMIZERS)
    _one_of("optim.schedule", o.schedule, SCHEDULES)
    _range("optim.final_lr_ratio", o.final_lr_ratio, 0, 1)
    _range("optim.grad_clip", o.grad_clip, 0, note=" (0 disables clipping)")
    _one_of("optim.precision", o.precision, ("fp32", "bf16", "bf16_kahan", "fp32_master"))


def _check_run(t: RunConfig) -> None:
    if not t.out_dir:
        raise ValueError("train.out_dir must be a folder path")
    for name in ("steps", "log_every", "eval_every"):
        _range(f"train.{name}", getattr(t, name), 1)
    _range("train.save_every", t.save_every, 0, note=" (0: only at the end)")
    _range("train.keep_checkpoints", t.keep_checkpoints, 1)
    _range("train.seed", t.seed, 0, 2**32 - 1)
    _range("train.threads", t.threads, 0, note=" (0: torch's default)")
    _range("train.samples", t.samples, 0)
    _one_of("train.precision", t.precision, ("auto", "bf16", "fp32"))
    _check_device(t.device)
    _range("train.grad_accum", t.grad_accum, 1)


def _check_dist(cfg: Config | FinetuneConfig) -> None:
    x, t = cfg.dist, cfg.train
    _one_of("dist.strategy", x.strategy, ("auto", "none", "ddp", "fsdp"))
    _range("dist.bucket_mb", x.bucket_mb, 0, lo_open=True)
    _one_of("dist.reduce_dtype", x.reduce_dtype, ("fp32", "bf16"))
    _range("dist.timeout_s", x.timeout_s, 0, lo_open=True)
    _range("dist.shard_size", x.shard_size, 0, note=" (0: shard over all ranks)")
    if x.cpu_offload and x.strategy != "fsdp":
        raise ValueError("dist.cpu_offload applies to dist.strategy=fsdp only")
    if x.meta_init and x.strategy != "fsdp":
        raise ValueError("dist.meta_init applies to dist.strategy=fsdp only")
    if x.meta_init and cfg.model.init_from is not None:
        raise ValueError(
            "dist.meta_init builds the model from model.preset; with model.init_from every rank loads the whole "
            "checkpoint anyway: set dist.meta_init=false"
        )
    if x.strategy == "fsdp" and t.cuda_graphs:
        raise ValueError(
            "train.cuda_graphs=true with dist.strategy=fsdp: FSDP2 steps cannot be replayed from a CUDA graph "
            "(its all-gathers are driven from host-side hooks); leave train.cuda_graphs null"
        )
    if t.cuda_graphs and t.grad_accum > 1:
        raise ValueError("train.cuda_graphs=true with train.grad_accum > 1: accumulated steps run eagerly")


def _check_model(m: ModelConfig) -> None:
    from flasht5.config import PRESETS, FlashT5Config

    if m.attn_implementation is not None:
        _one_of("model.attn_implementation", m.attn_implementation, ("eager", "sdpa", "flash"))
    if m.init_from is not None:
        if not m.init_from:
            raise ValueError("model.init_from must be a checkpoint folder, 'hf:ORG/NAME' or null")
        if m.overrides:
            raise ValueError(
                f"model.overrides {sorted(m.overrides)} would be ignored: with model.init_from the architecture "
                "comes from the checkpoint's config.json; remove the overrides (or model.init_from)"
            )
        return
    _one_of("model.preset", m.preset, sorted(PRESETS))
    from transformers import PretrainedConfig

    fields = {f.name: f for f in dataclasses.fields(FlashT5Config)}
    unknown = sorted(set(m.overrides) - set(fields), key=str)
    if unknown:
        base = {f.name for f in dataclasses.fields(PretrainedConfig)}  # transformers' generic ones: not listed
        raise ValueError(
            f"unknown key(s) {unknown} in model.overrides{_did_you_mean(unknown, fields)}: not FlashT5Config fields "
            f"(known: {sorted(set(fields) - base)})"
        )
    for key, value in list(m.overrides.items()):
        kinds = set(re.findall(r"\w+", str(fields[key].type)))
        number = _number(value) if isinstance(value, str) and kinds & {"int", "float"} else None
        if number is not None:  # "1e-1" (a string to PyYAML's YAML 1.1 rules)
            m.overrides[key] = number if "float" in kinds or isinstance(number, int) else value
    try:
        # vocab_size comes from the tokenizer later; the preset's stands in for it here. Builds no weights.
        FlashT5Config.from_preset(m.preset, **m.overrides)
    except (ValueError, TypeError) as e:
        raise ValueError(f"model.overrides: {e}") from None


def _check_mixture(d: DataConfig) -> None:
    from flasht5.data.ul2 import PRESETS, max_chunk_length, resolve_mixture

    if d.denoisers is None:
        _one_of("data.objective", d.objective, sorted(PRESETS))
    where = "data.denoisers" if d.denoisers is not None else "data.objective"
    try:
        mixture = resolve_mixture(d.denoisers if d.denoisers is not None else d.objective)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None
    for denoiser, _ in mixture:
        prefix = 1 if denoiser.prefix else 0  # a mode token: one id with our tokenizers (more with stock T5's)
        try:
            longest = max_chunk_length(
                denoiser, max_input_len=d.max_input_len, max_target_len=d.max_target_len, num_prefix_tokens=prefix
            )
        except ValueError as e:
            longest, why = 0, str(e)
        else:
            why = ""
        if longest < 2:  # a 1-token chunk hides nothing: its target would be EOS alone
            raise ValueError(
                f"data.max_input_len={d.max_input_len} / data.max_target_len={d.max_target_len} leave no room for a "
                f"target with the {where} denoiser {denoiser}: every example would be a 1-token chunk whose target "
                f"is EOS alone{f' ({why})' if why else ''}; raise data.max_target_len (and data.max_input_len)"
            )


def _check_device(name: str) -> None:
    if name == "auto":
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"train.device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"train.device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"train.device={name!r} but no CUDA device is available (use auto or cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"train.device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
            )


def check_paths(cfg: Config) -> None:
    """The inputs a run reads exist and are what they must be, before anything is built or written: corpus and
    held-out files (globs expanded), an existing tokenizer folder holds tokenizer files, ``model.init_from`` is a
    local checkpoint folder (nothing is downloaded unless it is ``hf:ORG/NAME``), ``train.out_dir`` is not a file."""
    from flasht5.data.text import expand_inputs
    from flasht5.data.tokenizer import check_tokenizer_path

    d = cfg.data
    if not d.corpus:
        raise ValueError("data.corpus is empty: give the training text files (or folders, or globs)")
    for key in ("corpus", "heldout"):
        if getattr(d, key):
            try:
                expand_inputs(getattr(d, key))
            except ValueError as e:
                raise ValueError(f"data.{key}: {e}") from None
    if Path(d.tokenizer).exists():
        try:
            check_tokenizer_path(d.tokenizer)
        except ValueError as e:
            raise ValueError(
                f"data.tokenizer: {e} (a folder that does not exist yet is trained on the corpus)"
            ) from None
        info = Path(d.tokenizer) / "flasht5_tokenizer.json"  # how `flasht5 tokenizer train` made it
        needs_sentinels = d.denoisers is not None or d.objective in ("t5", "ul2", "fat5")
        if info.is_file() and needs_sentinels and json.loads(info.read_text()).get("num_sentinels") == 0:
            raise ValueError(
                f"data.tokenizer={d.tokenizer!r} has no <extra_id_N> sentinels (trained with --num-sentinels 0); "
                "span corruption needs them: train one with the default 100"
            )
    for key, value in (("train.out_dir", cfg.train.out_dir), ("data.store", d.store)):
        if value is not None and Path(value).exists() and not Path(value).is_dir():
            raise ValueError(f"{key}={value!r} is a file, not a folder")
    _check_init_from(cfg.model.init_from)


def _check_init_from(init: str | None) -> None:
    if init is not None and not init.startswith("hf:"):
        p = Path(init).expanduser()
        if not p.is_dir():
            raise ValueError(
                f"model.init_from={init!r} is not a local folder; nothing is downloaded unless you ask for a "
                f"Hugging Face Hub id with 'hf:ORG/NAME' (e.g. hf:google/flan-t5-small)"
            )
        if not (p / "config.json").is_file():
            raise ValueError(f"model.init_from={init!r} is not a checkpoint folder (no config.json there)")


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning (`flasht5 finetune`): the same model / optim / train / log sections, its own data and eval sections
# ----------------------------------------------------------------------------------------------------------------

TASKS = ("seq2seq", "classification")
SEQ2SEQ_METRICS = ("rouge1", "rouge2", "rougeL", "exact_match", "bleu")
CLASSIFICATION_METRICS = ("accuracy", "f1")
_METRIC_PACKAGES = {"rouge1": "rouge_score", "rouge2": "rouge_score", "rougeL": "rouge_score", "bleu": "sacrebleu"}
_PIP_NAMES = {"rouge_score": "rouge-score", "sacrebleu": "sacrebleu"}


@dataclass
class FinetuneDataConfig:
    train: list[str] = field(default_factory=list)  # training examples: JSONL / CSV / TSV files (.gz too), folders
    # saved by datasets' save_to_disk, or globs
    eval: list[str] = field(default_factory=list)  # held-out examples (same forms); empty: no evaluation
    input_key: str = "input"  # the field holding the input text
    target_key: str = "target"  # the field holding the target text (classification: the label, a name or an integer)
    prefix: str = ""  # text put before every input, e.g. "summarize: " (T5's task prefixes)
    labels: list[str] | None = None  # classification: the class names in label-id order; null = the sorted distinct
    # values of the training labels
    tokenizer: str | None = None  # tokenizer folder; null = model.init_from's folder; trained on the training inputs
    # and targets if the folder does not exist
    vocab_size: int = 4096  # SentencePiece pieces of a tokenizer trained here (the 100 sentinels come on top)
    max_input_len: int = 512  # encoder tokens per example (EOS included); longer inputs are cut (and counted)
    max_target_len: int = 128  # decoder tokens per example (EOS included); longer targets are cut (seq2seq)
    max_tokens: int = 8192  # encoder-token budget of one packed batch
    max_target_tokens: int | None = None  # decoder-token budget of one batch; null = the data's target/input ratio +25%
    mode: str = "varlen"  # varlen (padding-free, cu_seqlens) | padded (rows packed with segment ids)
    row_len: int | None = None  # padded mode: encoder row length (null: max_input_len)
    row_target_len: int | None = None  # padded mode: decoder row length (null: from the data's target/input ratio)
    num_workers: int | None = None  # DataLoader worker processes; null = 2 on CUDA, 0 on CPU
    max_docs: int | None = None  # varlen: examples per static batch (CUDA graphs); null = auto


@dataclass
class EvalConfig:
    max_examples: int | None = 500  # held-out examples evaluated each time (the first N of data.eval); null = all
    metrics: list[str] | None = None  # seq2seq generation metrics: rouge1 rouge2 rougeL exact_match bleu (null =
    # rougeL exact_match bleu); classification: accuracy f1 (macro), always both
    max_new_tokens: int = 64  # tokens generated per held-out input (greedy)
    batch_size: int = 32  # held-out inputs per generate call
    best_metric: str = "loss"  # what picks <train.out_dir>/best: loss (lower is better) or one of the metrics
    # (higher is better)
    keep_best: bool = True  # keep the best evaluated model (and its tokenizer) in <train.out_dir>/best
    predictions: bool = True  # write every evaluation's predictions to <train.out_dir>/predictions/step-N.jsonl


@dataclass
class FinetuneConfig:
    task: str = "seq2seq"  # seq2seq (text to text, generation metrics) | classification (a label per input)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=5e-4, warmup_steps=50, schedule="constant", final_lr_ratio=1.0)
    )
    train: RunConfig = field(
        default_factory=lambda: RunConfig(out_dir="runs/finetune", steps=1000, eval_every=200, save_every=500)
    )
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def metrics(self) -> list[str]:
        """The evaluation metrics of the task (``eval.metrics`` or the task's default)."""
        if self.task == "classification":
            return list(CLASSIFICATION_METRICS)
        return list(self.eval.metrics) if self.eval.metrics is not None else ["rougeL", "exact_match", "bleu"]


def check_finetune(cfg: FinetuneConfig) -> None:
    """:func:`check` for a fine-tuning config: every value's range and the cross-field rules, cheap, no file read."""
    import importlib.util

    _one_of("task", cfg.task, TASKS)
    m, d, e = cfg.model, cfg.data, cfg.eval
    _check_model(m)
    for key in ("input_key", "target_key"):
        if not getattr(d, key):
            raise ValueError(f"data.{key} must be a non-empty string")
    if d.tokenizer is None and m.init_from is None:
        raise ValueError(
            "data.tokenizer is null and there is no model.init_from to take the tokenizer from: give a tokenizer "
            "folder (one that does not exist yet is trained on the training examples)"
        )
    if d.tokenizer == "":
        raise ValueError("data.tokenizer must be a folder path or null")
    _range("data.vocab_size", d.vocab_size, 11, note=" (SentencePiece pieces incl. <pad> </s> <unk> and 6 mode tokens)")
    _one_of("data.mode", d.mode, ("varlen", "padded"))
    _check_batch_shape(d)
    if d.labels is not None:
        if cfg.task != "classification":
            raise ValueError("data.labels applies to task=classification only; set it to null")
        if len(d.labels) < 2 or len(set(d.labels)) != len(d.labels):
            raise ValueError(f"data.labels must name at least 2 distinct classes, got {d.labels!r}")

    _range("eval.max_examples", e.max_examples, 1, none_ok=True)
    _range("eval.max_new_tokens", e.max_new_tokens, 1)
    _range("eval.batch_size", e.batch_size, 1)
    if cfg.task == "classification":
        if e.metrics is not None and set(e.metrics) - set(CLASSIFICATION_METRICS):
            raise ValueError(
                f"eval.metrics {e.metrics} for task=classification: accuracy and f1 are always computed; set it to null"
            )
    else:
        for name in e.metrics or []:
            _one_of("eval.metrics", name, SEQ2SEQ_METRICS)
        if e.metrics is not None and not e.metrics:
            raise ValueError("eval.metrics is empty: list at least one metric, or null for the defaults")
    for name in cfg.metrics():
        package = _METRIC_PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise ValueError(
                f"eval.metrics asks for {name}, which needs the {_PIP_NAMES[package]} package (pip install "
                f"{_PIP_NAMES[package]}); install it or leave {name} out of eval.metrics"
            )
    _one_of("eval.best_metric", e.best_metric, ["loss", *cfg.metrics()])
    if e.keep_best and cfg.dist.strategy == "fsdp":
        raise ValueError(
            "eval.keep_best with dist.strategy=fsdp: best/ would need the sharded weights gathered at every new best; "
            "set eval.keep_best=false (final/ and the checkpoints are written as usual)"
        )
    _check_optim(cfg.optim)
    _check_run(cfg.train)
    _check_dist(cfg)


def check_finetune_paths(cfg: FinetuneConfig) -> None:
    """:func:`check_paths` for a fine-tuning config: the example files exist and are of a known kind, a tokenizer
    can be found, ``model.init_from`` is a local checkpoint folder, ``train.out_dir`` is not a file."""
    from flasht5.data.tokenizer import check_tokenizer_path
    from flasht5.train.finetune import expand_example_inputs

    d = cfg.data
    if not d.train:
        raise ValueError("data.train is empty: give the training examples (JSONL / CSV / TSV files or folders)")
    for key in ("train", "eval"):
        if getattr(d, key):
            try:
                expand_example_inputs(getattr(d, key))
            except ValueError as e:
                raise ValueError(f"data.{key}: {e}") from None
    _check_init_from(cfg.model.init_from)
    tok = d.tokenizer
    if tok is None and not str(cfg.model.init_from).startswith("hf:"):
        try:
            check_tokenizer_path(cfg.model.init_from)
        except ValueError as e:
            raise ValueError(
                f"data.tokenizer is null, so the tokenizer comes from model.init_from, but: {e}; give data.tokenizer"
            ) from None
    elif tok is not None and Path(tok).exists():
        try:
            check_tokenizer_path(tok)
        except ValueError as e:
            raise ValueError(
                f"data.tokenizer: {e} (a folder that does not exist yet is trained on data.train)"
            ) from None
    out = cfg.train.out_dir
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"train.out_dir={out!r} is a file, not a folder")


# ----------------------------------------------------------------------------------------------------------------
# Every key with its type, default and meaning: `--help` and the docs read them from the dataclasses above (the
# comment after each field is its meaning), so there is one source of truth
# ----------------------------------------------------------------------------------------------------------------


def _field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment in the class source: the comment after it, continued on the comment-only lines
    that follow; a field without a comment of its own takes the comment-only lines just above it."""
    import inspect

    comments: dict[str, str] = {}
    last, pending = None, []
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"^    (\w+)\s*:[^#]*?(?:#\s*(.*))?$", line)
        if m and not line.lstrip().startswith("#"):
            own = (m.group(2) or "").strip()
            if own and last is not None and pending:  # the lines above continue the previous field's comment
                comments[last] = " ".join([comments[last], *pending]).strip()
            last = m.group(1)
            comments[last] = own or " ".join(pending)
            pending = []
            continue
        m = re.match(r"^    #\s*(.*)$", line)
        if m:
            pending.append(m.group(1).strip())
        elif line.strip() and not line.startswith("        "):
            if last is not None and pending:
                comments[last] = " ".join([comments[last], *pending]).strip()
            last, pending = None, []  # a method or decorator ends the fields
    if last is not None and pending:
        comments[last] = " ".join([comments[last], *pending]).strip()
    return {k: re.sub(r"``?([^`]+?)``?", r"\1", v) for k, v in comments.items()}


def config_keys(schema: type = Config) -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, meaning) of every key of ``schema`` (:class:`Config` or :class:`FinetuneConfig`);
    defaults are the schema's own (a section may default differently in the two schemas)."""
    out: list[tuple[str, str, Any, str]] = []

    def walk(obj: Any, prefix: str) -> None:
        comments = _field_comments(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out.append((f"{prefix}{f.name}", str(f.type), value, comments.get(f.name, "")))

    walk(schema(), "")
    return out


def _yaml_value(value: Any) -> str:
    value = json.loads(json.dumps(value))  # tuples as lists
    if isinstance(value, str):
        return json.dumps(value) if value == "" or value != value.strip() else value
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def format_config_help(schema: type = Config) -> str:
    """The config keys as ``--help`` lists them: per section, ``key: type = default`` and its meaning."""
    import textwrap

    lines = ["config keys (YAML sections; override any with --section.key=value):"]
    section = None
    for key, kind, default, meaning in config_keys(schema):
        head = key.split(".")[0] if "." in key else ""
        if head != section:
            section = head
            lines.append("")
            if head:
                lines.append(f"{head}:")
        lines.append(f"  {key}: {kind} = {_yaml_value(default)}")
        if meaning:
            lines.extend(textwrap.wrap(meaning, width=110, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def config_yaml(cfg: Any) -> str:
    """The resolved config as YAML (what ``--print-config`` prints)."""
    return yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(cfg))), sort_keys=False, width=1000)
