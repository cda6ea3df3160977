"""T5's relative-position buckets in plain PyTorch, shared by the model's reference paths and the flash kernel."""

from __future__ import annotations

import math

import torch


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """T5's bucket of ``relative_position = key_pos - query_pos``, exactly as Mesh TensorFlow and Hugging Face
    compute it (Raffel et al. 2020).

    Half the buckets are exact small distances, the other half log-spaced up to ``max_distance``; the causal
    variant maps every future position to bucket 0. The float32 ops are Hugging Face's, in the same order, so that
    bucket boundaries (which fall exactly on integers) round identically.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).to(relative_position.dtype) * num_buckets
        relative_position = relative_position.abs()
    else:
        relative_position = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(relative_position.dtype)
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, relative_position, large)
