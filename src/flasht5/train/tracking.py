"""Run tracking besides ``metrics.jsonl`` and ``loss.png``: TensorBoard scalars, and MFU on NVIDIA GPUs.

:class:`Tracker` mirrors every metrics row into TensorBoard event files in ``<out_dir>/tensorboard``
(``log.tensorboard``, when ``torch.utils.tensorboard`` imports, i.e. the ``tensorboard`` package is installed;
otherwise one warning and nothing else). Tags: ``train/loss``, ``train/lr``, ``train/grad_norm``,
``train/tokens_per_s``, ``train/mfu`` and ``train/peak_mem_gb`` (GPU), ``train/z_loss``, ``eval/loss`` and
``eval/<metric>`` (fine-tuning: ``eval/rougeL``, ``eval/accuracy``, ...), and the packer's ``data/*`` fill
statistics. A resumed run purges the events after its checkpoint's step (TensorBoard's ``purge_step``), as
``metrics.jsonl`` is cut back, so the curves show each step once.

MFU (model FLOPs utilisation): the matmul FLOPs of a step -- 6 x (weights each token passes through), forward and
backward, attention scores and softmax left out, as in the PaLM paper's MFU without its attention term -- per second,
over the GPU's dense bf16 peak (the datasheet value of the GPUs listed in :data:`PEAK_BF16`; others report none).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from flasht5.events import open_writer

# Dense bf16 tensor-core peak (FLOP/s, no sparsity) by device-name fragment; the first match counts.
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "H800": 989.4e12, "GH200": 989.4e12, "A100": 312e12,
             "A800": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}  # fmt: skip


def _tag(key: str) -> str | None:
    if key == "eval_loss":
        return "eval/loss"
    if key.startswith("eval_"):
        return f"eval/{key[5:]}"
    if key.startswith("data_"):
        return f"data/{key[5:]}"
    if key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "z_loss", "peak_mem_gb"):
        return f"train/{key}"
    return None


class Tracker:
    """TensorBoard writer for the loop's metrics rows (a no-op when disabled or when tensorboard is missing)."""

    def __init__(self, out_dir: str | Path, enabled: bool, *, purge_step: int | None = None) -> None:
        self.writer = None
        self.log_dir = Path(out_dir) / "tensorboard"
        if enabled:
            self.writer = open_writer(self.log_dir, "log.tensorboard", purge_step=purge_step)

    def log(self, row: dict[str, Any]) -> None:
        """One metrics row (``{"step": N, "loss": ..., ...}``): every number with a known tag becomes a scalar."""
        if self.writer is None:
            return
        step = int(row["step"])
        for key, value in row.items():
            tag = _tag(key)
            if tag is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def matmul_flops(config: Any, input_tokens: int, target_tokens: int) -> float:
    """Training FLOPs of one step's matmuls (forward + backward = 3 x 2 x multiply-adds) for a batch of
    ``input_tokens`` encoder and ``target_tokens`` decoder tokens of a FlashT5Config model."""
    d, inner, ff = config.d_model, config.num_heads * config.d_kv, config.d_ff
    gated = str(getattr(config, "feed_forward_proj", "")).startswith("gated")
    mlp = d * ff * (3 if gated else 2)
    attn = 4 * d * inner  # q, k, v, o
    n_dec = config.num_decoder_layers if config.num_decoder_layers is not None else config.num_layers
    per_enc_token = config.num_layers * (attn + mlp) + n_dec * 2 * d * inner  # + cross-attention k, v
    per_dec_token = n_dec * (attn + 2 * d * inner + mlp) + d * config.vocab_size  # + cross q, o; LM head
    return 6.0 * (input_tokens * per_enc_token + target_tokens * per_dec_token)


def peak_flops(device: Any) -> float | None:
    """The dense bf16 peak of a CUDA device (None: not CUDA, or a GPU not in :data:`PEAK_BF16`)."""
    import torch

    if getattr(device, "type", None) != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)
