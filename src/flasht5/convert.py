"""Hugging Face T5 / mT5 / umT5 (also ByT5, UL2, FLAN-T5: same formats) checkpoints in and out.

One declarative table, :data:`KEY_MAP`, pairs every Hugging Face key pattern with the flasht5 key it becomes;
the export direction is derived from it. Loading accepts ``model.safetensors``, sharded safetensors with an
index, and ``pytorch_model.bin`` (sharded or not). A missing, unexpected or mis-shaped weight is an error that
names it.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from flasht5.config import HF_MODEL_TYPES, FlashT5Config

# (Hugging Face pattern, flasht5 pattern). {i}: layer index; {p}: attention projection; {w}: MLP weight.
KEY_MAP: list[tuple[str, str]] = [
    ("shared.weight", "model.shared.weight"),
    ("lm_head.weight", "model.lm_head.weight"),
    ("{stack}.final_layer_norm.weight", "model.{stack}.final_norm.weight"),
    ("{stack}.block.{i}.layer.0.layer_norm.weight", "model.{stack}.layers.{i}.attn_norm.weight"),
    ("{stack}.block.{i}.layer.0.SelfAttention.{p}.weight", "model.{stack}.layers.{i}.attn.{p}.weight"),
    # The stack owns its position table(s): block 0's for T5 / mT5, one per block for umT5.
    (
        "{stack}.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight",
        "model.{stack}.pos_bias.tables.{i}.weight",
    ),
    ("encoder.block.{i}.layer.1.layer_norm.weight", "model.encoder.layers.{i}.ffn_norm.weight"),
    ("encoder.block.{i}.layer.1.DenseReluDense.{w}.weight", "model.encoder.layers.{i}.mlp.{w}.weight"),
    ("decoder.block.{i}.layer.1.layer_norm.weight", "model.decoder.layers.{i}.cross_norm.weight"),
    ("decoder.block.{i}.layer.1.EncDecAttention.{p}.weight", "model.decoder.layers.{i}.cross_attn.{p}.weight"),
    ("decoder.block.{i}.layer.2.layer_norm.weight", "model.decoder.layers.{i}.ffn_norm.weight"),
    ("decoder.block.{i}.layer.2.DenseReluDense.{w}.weight", "model.decoder.layers.{i}.mlp.{w}.weight"),
    # Task heads keep their transformers names.
    ("classification_head.{lin}.{wb}", "classification_head.{lin}.{wb}"),
    ("classifier.{wb}", "head.classifier.{wb}"),
    ("qa_outputs.{wb}", "head.qa_outputs.{wb}"),
]
_FIELDS = {
    "stack": "encoder|decoder",
    "i": r"\d+",
    "p": "q|k|v|o",
    "w": "wi|wi_0|wi_1|wo",
    "lin": "dense|out_proj",
    "wb": "weight|bias",
}
# Hugging Face keys that carry no information of their own: tied copies of `shared`, and a cross-attention
# position table that old checkpoints hold but never use.
HF_REDUNDANT = re.compile(
    r"^(encoder\.embed_tokens\.weight|decoder\.embed_tokens\.weight|"
    r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight)$"
)
# Heads of transformers wrap the base model under `transformer.` (sequence / token classification).
HF_PREFIX = "transformer."
GENERATION_CONFIG = "generation_config.json"


def _compile(pattern: str) -> re.Pattern:
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}", pattern):
        out += re.escape(pattern[pos : m.start()]) + f"(?P<{m.group(1)}>{_FIELDS[m.group(1)]})"
        pos = m.end()
    return re.compile("^" + out + re.escape(pattern[pos:]) + "$")


_TO_OURS = [(_compile(hf), ours) for hf, ours in KEY_MAP]
_TO_HF = [(_compile(ours), hf) for hf, ours in KEY_MAP]


def _translate(key: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for regex, target in table:
        m = regex.match(key)
        if m:
            return target.format(**m.groupdict())
    return None


def hf_key_to_ours(key: str) -> str | None:
    """flasht5 name of a Hugging Face key; None for redundant keys. Unknown keys raise."""
    key = key.removeprefix(HF_PREFIX)
    if HF_REDUNDANT.match(key):
        return None
    ours = _translate(key, _TO_OURS)
    if ours is None:
        raise ValueError(f"unexpected weight {key!r} in the Hugging Face checkpoint: no flasht5 parameter holds it.")
    return ours


def our_key_to_hf(key: str) -> str:
    hf = _translate(key, _TO_HF)
    if hf is None:
        raise ValueError(f"flasht5 weight {key!r} has no Hugging Face T5 equivalent.")
    return hf


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no config.json")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


LOADABLE_MODEL_TYPES = ("flasht5", *HF_MODEL_TYPES)


def local_checkpoint(path: str | Path, hub_kwargs: dict[str, Any] | None = None) -> str:
    """The local checkpoint folder ``path`` names, after checking it is one flasht5 can load.

    Nothing is downloaded unless asked for: ``"hf:ORG/NAME"`` fetches that Hugging Face Hub repository (its config,
    weights and tokenizer files, through the Hub cache; ``hub_kwargs`` such as ``revision``, ``cache_dir``,
    ``token``, ``local_files_only`` go to ``huggingface_hub.snapshot_download``). Anything else must be a local
    folder holding a ``config.json`` of a T5-family model; a path that does not exist is an error, not a Hub lookup
    (transformers would spend tens of seconds retrying huggingface.co for a typo).
    """
    text = str(path)
    if text.startswith("hf:"):
        from huggingface_hub import snapshot_download

        repo = text.removeprefix("hf:").strip("/")
        allow = ["*.json", "*.safetensors", "*.model", "*.txt", "pytorch_model*.bin"]
        text = snapshot_download(repo, allow_patterns=allow, **(hub_kwargs or {}))
    p = Path(text).expanduser()
    if not p.exists():
        raise ValueError(
            f"{text!r} is not a local folder (it does not exist); nothing is downloaded unless you ask for a Hugging "
            f"Face Hub id: pass 'hf:ORG/NAME' (e.g. 'hf:google/flan-t5-small')"
        )
    if not p.is_dir():
        raise ValueError(f"{text!r} is a file; give the checkpoint folder that holds config.json and the weights")
    model_type = read_config(p).get("model_type")
    if model_type not in LOADABLE_MODEL_TYPES:
        raise ValueError(
            f"{p} is not a T5 checkpoint: its config.json has model_type {model_type!r}; flasht5 loads "
            f"{', '.join(LOADABLE_MODEL_TYPES)} folders"
        )
    weight_files(p)  # weights present, and an index's shard names confined to the folder (transformers reads it too)
    return str(p)


def safe_copy(src: str | Path, dst: str | Path) -> bool:
    """Copy the file ``src`` to ``dst`` unless that would leak or clobber something; returns whether it copied.

    A symbolic link is followed only when its target lies inside ``src``'s folder or, for a Hugging Face cache
    snapshot (``models--ORG--NAME/snapshots/REV/``), inside that repository's ``blobs/``: a checkpoint folder
    cannot make a copy carry another file of this machine (a key, a password file) into an export. Copying a file
    onto itself (converting in place) is skipped.
    """
    import shutil

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        return False
    if dst.exists() and src.resolve() == dst.resolve():
        return False
    if src.is_symlink():
        folder = src.parent.resolve()
        target = src.resolve()
        allowed = [folder]
        if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
            allowed.append(folder.parent.parent / "blobs")
        if not any(target.is_relative_to(a) for a in allowed):
            import warnings

            warnings.warn(
                f"not copying {src}: it is a symbolic link to {target}, outside the checkpoint folder",
                stacklevel=2,
            )
            return False
    shutil.copyfile(src, dst)
    return True


def is_hf_t5_folder(path: str | Path) -> bool:
    """A local folder whose config.json is a stock transformers T5 / mT5 / umT5 config."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and read_config(p).get("model_type") in HF_MODEL_TYPES


# Where the weights are, in transformers' order of preference (modeling_utils._get_resolved_checkpoint_files), so
# that flasht5 and transformers read the same files from any folder, stale leftovers included.
WEIGHT_NAMES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)  # fmt: skip
_SHARD = re.compile(r"^(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin)$")


def _shard_names(index: Path) -> list[str]:
    """The shard files an index lists, each confined to the index's folder (no absolute paths, no ``..``)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise ValueError(f"{index} is not a valid weight index (a JSON object with a weight_map): {e}") from None
    for name in names:
        parts = Path(name).parts if isinstance(name, str) else ()
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in parts or "\\" in name:
            raise ValueError(
                f"{index} lists the shard {name!r}, which is not a file name inside {index.parent}: refused"
            )
    return names


def weight_files(folder: str | Path) -> list[Path]:
    """The checkpoint's weight files, in the formats transformers writes and in its order of preference."""
    folder = Path(folder)
    for name in WEIGHT_NAMES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        shards = _shard_names(path)
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ValueError(f"{path} lists shards that are not in {folder}: {missing}")
        return [folder / s for s in shards]
    raise ValueError(
        f"no weights in {folder}: expected model.safetensors, model.safetensors.index.json (+ shards), "
        "pytorch_model.bin or pytorch_model.bin.index.json (+ shards)."
    )


def remove_weight_files(folder: str | Path) -> list[Path]:
    """Delete every weight file and index a checkpoint writer may have left in ``folder`` (as ``save_pretrained``
    does for its own shards), so that a new export is the only model the folder holds. Returns what was removed."""
    folder = Path(folder)
    doomed: set[Path] = set()
    for name in WEIGHT_NAMES:
        path = folder / name
        if name.endswith(".index.json") and path.is_file():
            with contextlib.suppress(ValueError):  # a broken or hostile index: remove it, nothing it names
                doomed.update(folder / s for s in _shard_names(path) if s.endswith((".safetensors", ".bin")))
        doomed.add(path)
    if folder.is_dir():
        doomed.update(f for f in folder.iterdir() if _SHARD.match(f.name))
    removed = []
    for path in sorted(doomed):
        if path.is_file() or path.is_symlink():
            path.unlink()  # safe for a model still memory-mapping it: the data lives until it is unmapped
            removed.append(path)
    return removed


def load_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(folder):
        try:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file

                part = load_file(str(f))
            else:
                part = torch.load(f, map_location="cpu", weights_only=True)  # never unpickles code
        except Exception as e:  # SafetensorError, UnpicklingError, EOFError, RuntimeError: name the file
            raise ValueError(f"cannot read the weights in {f}: {type(e).__name__}: {e}") from None
        dup = state.keys() & part.keys()
        if dup:
            raise ValueError(f"weights {sorted(dup)[:5]} appear in more than one shard of {folder}")
        state.update(part)
    return state


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------

_HF_CONFIG_FIELDS = (
    "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
    "relative_attention_num_buckets", "relative_attention_max_distance", "dropout_rate", "layer_norm_epsilon",
    "initializer_factor", "feed_forward_proj", "pad_token_id", "eos_token_id", "decoder_start_token_id",
    "classifier_dropout", "use_cache", "id2label", "label2id", "problem_type",
)  # fmt: skip


def config_from_hf(hf: dict[str, Any], state: dict[str, torch.Tensor] | None = None) -> FlashT5Config:
    """A ``FlashT5Config`` from a transformers T5 / mT5 / umT5 ``config.json`` dict.

    Whether the output projection is tied is read from the weights when given (transformers >= 5 writes
    ``tie_word_embeddings: true`` for every T5 it saves, and a separate ``lm_head`` when they differ); the
    d_model**-0.5 rescale follows ``scale_decoder_outputs`` where transformers 5 wrote it, else the original
    ``tie_word_embeddings`` (T5 v1.0 semantics).
    """
    model_type = hf.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"config model_type {model_type!r} is not one of {HF_MODEL_TYPES}")
    kw = {k: hf[k] for k in _HF_CONFIG_FIELDS if k in hf and hf[k] is not None}
    declared_tie = hf.get("tie_word_embeddings", model_type == "t5")
    tie = declared_tie
    if state is not None:
        head = state.get("lm_head.weight")
        tie = head is None or (head.shape == state["shared.weight"].shape and torch.equal(head, state["shared.weight"]))
    if "scale_decoder_outputs" in hf:
        scale = bool(hf["scale_decoder_outputs"])
    elif model_type == "mt5":  # transformers' mT5 never rescales
        scale = False
    else:  # T5 v1.0 semantics; also transformers 5's umT5, which rescales whenever the config says "tied"
        scale = bool(declared_tie)
    kw.setdefault("decoder_start_token_id", 0)
    return FlashT5Config(
        **kw,
        tie_word_embeddings=bool(tie),
        scale_decoder_outputs=scale,
        relative_attention_per_layer=model_type == "umt5",
        hf_model_type=model_type,
        position_encoding="t5",
    )


def config_to_hf(cfg: FlashT5Config, architecture: str) -> dict[str, Any]:
    if cfg.position_encoding != "t5":
        raise ValueError(
            f"position_encoding={cfg.position_encoding!r} has no Hugging Face T5 equivalent; only 't5' exports."
        )
    if cfg.relative_attention_per_layer != (cfg.hf_model_type == "umt5"):
        raise ValueError(
            "relative_attention_per_layer=True exports only as umT5 (hf_model_type='umt5') and umT5 needs it; "
            f"got relative_attention_per_layer={cfg.relative_attention_per_layer}, hf_model_type={cfg.hf_model_type!r}."
        )
    out = {k: getattr(cfg, k) for k in _HF_CONFIG_FIELDS if getattr(cfg, k, None) is not None}
    out.update(
        model_type=cfg.hf_model_type,
        architectures=[architecture],
        is_encoder_decoder=True,
        tie_word_embeddings=bool(cfg.tie_word_embeddings),
        scale_decoder_outputs=bool(cfg.scale_decoder_outputs),
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Checking what a load did
# ----------------------------------------------------------------------------------------------------------------


def _head_owned(key: str) -> bool:
    return key.startswith(("classification_head.", "head.", "model.lm_head."))


def _ignorable_extra(cls: type, key: str) -> bool:
    """Weights a checkpoint may hold beyond what ``cls`` uses: other heads, and the decoder for encoder models."""
    return _head_owned(key) or (not cls.has_decoder and key.startswith("model.decoder."))


def check_keys(
    cls: type, expected: Iterable[str], found: dict[str, torch.Tensor], shapes: dict[str, torch.Size]
) -> None:
    """Raise for missing, unexpected or mis-shaped weights (task-head weights may be absent or extra)."""
    expected = set(expected)
    missing = sorted(k for k in expected - found.keys() if not _head_owned(k))
    unexpected = sorted(k for k in found.keys() - expected if not _ignorable_extra(cls, k))
    if missing:
        raise ValueError(
            f"checkpoint is missing weights {missing[:8]}{' ...' if len(missing) > 8 else ''} for {cls.__name__}"
        )
    if unexpected:
        raise ValueError(
            f"checkpoint has unexpected weights {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
            f"for {cls.__name__} (is the config right?)"
        )
    for k in expected & found.keys():
        if tuple(found[k].shape) != tuple(shapes[k]):
            raise ValueError(f"weight {k!r} has shape {tuple(found[k].shape)}, the model expects {tuple(shapes[k])}")


class CheckpointMismatchError(ValueError, RuntimeError):
    """A checkpoint that does not fit the model: a ``ValueError`` (flasht5's rule for bad input) that is also the
    ``RuntimeError`` transformers raises for mis-shaped weights, so code written for either catches it."""


def check_loading_info(cls: type, info: dict[str, Any], *, ignore_mismatched_sizes: bool = False) -> None:
    """The same rule for transformers' own ``from_pretrained`` on flasht5 folders (it only warns). With
    ``ignore_mismatched_sizes`` mis-shaped weights are allowed: transformers initialises them afresh (a new head)."""
    missing = sorted(k for k in info.get("missing_keys", ()) if not _head_owned(k))
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not _ignorable_extra(cls, k))
    mismatched = [] if ignore_mismatched_sizes else list(info.get("mismatched_keys", ()))
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(
            f"checkpoint does not fit {cls.__name__}: missing {missing[:8]}, unexpected {unexpected[:8]}, "
            f"mis-shaped {mismatched[:8]}"
        )


# ----------------------------------------------------------------------------------------------------------------
# In and out
# ----------------------------------------------------------------------------------------------------------------


def from_hf(
    src: str | Path,
    cls: type,
    *,
    dtype: torch.dtype | str | None = None,
    torch_dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    device: str | torch.device | None = None,
    device_map: str | torch.device | None = None,
    **config_overrides: Any,
):
    """Load a stock transformers T5-family folder as the flasht5 class ``cls`` (e.g.
    ``FlashT5ForConditionalGeneration``). ``dtype=torch.float16`` keeps ``wo`` in fp32 and bfloat16 does not, as
    transformers does for T5 (``_keep_in_fp32_modules = ["wo"]`` applies to fp16 only) and as it does for a folder
    flasht5 saved. The folder's ``generation_config.json`` becomes the model's generation config."""
    hf_cfg = read_config(src)
    raw = load_state_dict(src)
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        ours = hf_key_to_ours(key)
        if ours is not None:
            state[ours] = value
    cfg = config_from_hf(hf_cfg, {k.removeprefix(HF_PREFIX): v for k, v in raw.items()})
    for k, v in config_overrides.items():
        if not hasattr(cfg, k):
            raise ValueError(f"unknown argument {k!r} for from_hf / from_pretrained")
        setattr(cfg, k, v)
    cfg.check()
    if cfg.tie_word_embeddings:
        state.pop("model.lm_head.weight", None)
    if attn_implementation is not None:
        cfg._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = cls(cfg)
    expected = model.state_dict()
    check_keys(cls, expected.keys(), state, {k: v.shape for k, v in expected.items()})
    state = {k: v for k, v in state.items() if k in expected}
    dtype = dtype or torch_dtype
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    target = device or (device_map if isinstance(device_map, (str, torch.device)) else None) or "cpu"
    for k, v in list(state.items()):
        keep_fp32 = k.endswith("wo.weight") and dtype == torch.float16
        if isinstance(dtype, torch.dtype) and v.is_floating_point() and not keep_fp32:
            v = v.to(dtype)
        elif keep_fp32:
            v = v.float()
        state[k] = v.to(target)
    model.load_state_dict(state, strict=False, assign=True)
    _init_fresh(model, target)
    if (Path(src) / GENERATION_CONFIG).is_file() and getattr(model, "generation_config", None) is not None:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(src)
    model.eval()
    return model


def _init_fresh(model: torch.nn.Module, device: str | torch.device) -> None:
    """Materialise and initialise the parameters a base checkpoint lacks (a new task head), as transformers does
    for fine-tuning; loaded tensors are flagged so the initialisers leave them alone."""
    for p in model.parameters():
        if not p.is_meta:
            p._is_hf_initialized = True
    if not any(p.is_meta for p in model.parameters()):
        return
    for module in model.modules():
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device=device, recurse=False)
    for module in reversed(list(model.modules())):  # children first, so a head's own init has the last word
        model._init_weights(module)


def to_hf(model: Any, out_dir: str | Path, *, safe_serialization: bool = True) -> Path:
    """Write a folder that stock transformers loads with no remote code (``T5ForConditionalGeneration``,
    ``MT5ForConditionalGeneration`` or ``UMT5ForConditionalGeneration`` by ``config.hf_model_type``)."""
    cfg: FlashT5Config = model.config
    family = {"t5": "T5", "mt5": "MT5", "umt5": "UMT5"}[cfg.hf_model_type]
    head = type(model).__name__.removeprefix("FlashT5")
    hf_cfg = config_to_hf(cfg, f"{family}{head}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {str(out)!r} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in model.state_dict().items():
        hf = our_key_to_hf(k)
        if head in ("ForSequenceClassification", "ForTokenClassification") and not _head_owned(k):
            hf = HF_PREFIX + hf
        state[hf] = v.detach().contiguous().cpu()
    # Stale weights (an earlier sharded export, a .bin) would otherwise be what some reader picks. Each file is
    # written under a temporary name and renamed, so converting a folder in place never rewrites a file that the
    # loaded model may still memory-map.
    remove_weight_files(out)
    name = "model.safetensors" if safe_serialization else "pytorch_model.bin"
    tmp = out / f".{name}.tmp"
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(state, str(tmp), metadata={"format": "pt"})
    else:
        torch.save(state, tmp)
    tmp.replace(out / name)
    tmp_cfg = out / ".config.json.tmp"
    tmp_cfg.write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))
    tmp_cfg.replace(out / "config.json")
    generation = getattr(model, "generation_config", None) if model.can_generate() else None
    if generation is not None:  # what save_pretrained writes for a model that generates (decoding defaults)
        tmp_gen = out / f".{GENERATION_CONFIG}.tmp"
        tmp_gen.write_text(generation.to_json_string(use_diff=True))
        tmp_gen.replace(out / GENERATION_CONFIG)
    return out
