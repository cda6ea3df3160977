"""Typed training configuration: YAML in, ``--section.key=value`` overrides, every field checked.

A run is described by four sections (see ``configs/pretrain/demo.yaml`` for every key, commented)::

    model:  which architecture (a FlashT5Config preset + overrides) or which checkpoint to start from
    data:   corpus -> tokenizer -> pretokenized store -> denoisers -> packed batches
    optim:  AdamWScale, learning-rate schedule, clipping
    train:  steps, device, precision, logging, evaluation, checkpoints
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelConfig:
    preset: str = "demo"  # a FlashT5Config preset (flasht5.config.PRESETS)
    overrides: dict[str, Any] = field(default_factory=dict)  # FlashT5Config fields that differ from the preset
    init_from: str | None = None  # a flasht5 or Hugging Face T5 folder to start from instead of random weights
    attn_implementation: str | None = None  # eager | sdpa | flash; None = flash on CUDA, sdpa on CPU (the backend)


@dataclass
class DataConfig:
    corpus: list[str] = field(default_factory=list)  # training text files (txt / txt.gz / jsonl / parquet) or globs
    heldout: list[str] = field(default_factory=list)  # held-out files for evaluation (same formats)
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
    lr: float = 2e-2  # peak learning rate (AdamWScale scales it by each tensor's RMS, as in nanoT5)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = "cosine"  # "cosine" or "constant" after the linear warm-up
    final_lr_ratio: float = 0.1  # learning rate at the last step, as a fraction of `lr`
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping


@dataclass
class RunConfig:
    out_dir: str = "runs/demo"  # everything this run writes: checkpoints, metrics.jsonl, loss.png, final/
    steps: int = 300  # optimizer steps
    device: str = "auto"  # "auto" (cuda if present), "cpu", "cuda", "cuda:1"
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16", "fp32"
    seed: int = 0
    log_every: int = 10  # metrics.jsonl rows and progress-bar refresh
    eval_every: int = 100  # held-out loss every N steps (and at step 0 and the end)
    save_every: int = 200  # checkpoint every N steps (and at the end); 0 = only at the end
    keep_checkpoints: int = 2  # how many step checkpoints to keep
    resume: bool = True  # continue from the newest checkpoint in out_dir if there is one
    compile: bool = False  # torch.compile the model
    cuda_graphs: bool | None = None  # replay the whole step from one CUDA graph; None = on for CUDA + varlen batches
    gradient_checkpointing: bool = False
    threads: int = 0  # CPU threads for torch (0 = torch's default)
    samples: int = 3  # span-filling generations printed at the end
    progress: bool = True  # show a progress bar


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{where} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{where} must be a number, got {value!r}")
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
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; known: {sorted(names)}")
    kwargs = {}
    for name, value in values.items():
        sub = hints[name]
        if dataclasses.is_dataclass(sub):
            kwargs[name] = _build(sub, value or {}, f"{where}.{name}" if where else name)
        else:
            kwargs[name] = _coerce(value, sub, f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["--train.steps=10", "data.mode=padded"]`` -> nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.removeprefix("--").partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like --section.key=value")
        _set_dotted(tree, key, yaml.safe_load(raw) if raw != "" else "")
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: nested mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """A ``Config`` from a YAML file (or the defaults) plus overrides; unknown keys and bad types raise."""
    raw: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a mapping of sections (model, data, optim, train)")
    raw = _merge(raw, parse_overrides(overrides or []))
    cfg = _build(Config, raw, "")
    check(cfg)
    return cfg


def check(cfg: Config) -> None:
    """Cross-field checks, each naming the key."""
    if cfg.data.mode not in ("varlen", "padded"):
        raise ValueError(f"data.mode must be 'varlen' or 'padded', got {cfg.data.mode!r}")
    if cfg.train.precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train.precision must be auto, bf16 or fp32, got {cfg.train.precision!r}")
    if cfg.optim.schedule not in ("cosine", "constant"):
        raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {cfg.optim.schedule!r}")
    for name in ("steps", "log_every", "eval_every"):
        if getattr(cfg.train, name) < 1:
            raise ValueError(f"train.{name} must be >= 1")
    if cfg.data.max_tokens < cfg.data.max_input_len:
        raise ValueError("data.max_tokens must be at least data.max_input_len (one example per batch)")
    if not 0 <= cfg.optim.final_lr_ratio <= 1:
        raise ValueError("optim.final_lr_ratio must be in [0, 1]")
