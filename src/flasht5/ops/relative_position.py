"""T5's relative-position buckets in plain PyTorch, shared by the model's reference paths and the flash kernel.

:func:`t5_bias_lut` turns a bucket table into the per-head lookup by distance that the flash-attention kernels read;
it lives here (not in ``attention.py``) so that the model can build it once per stack forward without importing
Triton.
"""

from __future__ import annotations

import math

import torch

__all__ = ["relative_position_bucket", "t5_bias_lut", "lut_buckets"]


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


def check_bucket_config(num_buckets: int, bidirectional: bool, max_distance: object) -> None:
    """Raise a ``ValueError`` unless (num_buckets, bidirectional, max_distance) is a usable T5 bucket configuration."""
    max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    if max_exact < 1:
        raise ValueError(f"rel_table: num_buckets={num_buckets} too small (need >= {4 if bidirectional else 2})")
    if type(max_distance) is not int or max_distance <= max_exact:
        raise ValueError(
            f"rel_max_distance must be an int > {max_exact} (num_buckets={num_buckets}), got {max_distance!r}"
        )


_BUCKET_CACHE: dict[tuple, tuple[torch.Tensor, int]] = {}
_VALUE_CACHE: dict[tuple, tuple[tuple[int, ...], int]] = {}


def _bucket_values(
    device: torch.device, bidirectional: bool, num_buckets: int, max_distance: int
) -> tuple[tuple[int, ...], int]:
    """(buckets of the distances -Re..Re, Re) as Python ints; run eagerly even while torch.compile traces (its host
    syncs must not enter a graph), cached per configuration."""
    key = (device, bidirectional, num_buckets, max_distance)
    hit = _VALUE_CACHE.get(key)
    if hit is None:
        check_bucket_config(num_buckets, bidirectional, max_distance)
        R = max_distance
        r = torch.arange(-11 * R, 11 * R + 1, device=device)
        full = relative_position_bucket(r, bidirectional, num_buckets, max_distance).cpu()
        if bool((full < 0).any() | (full >= num_buckets).any()):  # pragma: no cover - excluded by validation
            raise ValueError("rel_max_distance: degenerate bucket formula for this num_buckets / max distance")
        # the kernel clamps |distance| to Re: exact only where the bucket has saturated on both sides
        left = full[: 10 * R + 1]  # distances -11R .. -R
        right = full[12 * R :]  # distances R .. 11R
        if bool((left != left[0]).any() | (right != right[-1]).any()):  # pragma: no cover
            raise ValueError("rel_max_distance: the bucket formula does not saturate at rel_max_distance")
        mid = full[10 * R : 12 * R + 1]  # distances -R .. R
        lo_change = int((mid != mid[0]).nonzero().min()) if bool((mid != mid[0]).any()) else R
        hi_change = int((mid != mid[-1]).nonzero().max()) if bool((mid != mid[-1]).any()) else R
        Re = max(1, R - lo_change + 1, hi_change + 1 - R)  # buckets constant for d <= -Re and d >= Re
        hit = _VALUE_CACHE[key] = (tuple(mid[R - Re : R + Re + 1].tolist()), Re)
    return hit


# torch.compile treats the result as a constant (what torch.compiler.assume_constant_result marks, by this attribute:
# the decorator itself imports torch._dynamo, and with it Triton, at import time, which this module must not do).
_bucket_values._dynamo_marked_constant = True  # type: ignore[attr-defined]


def lut_buckets(
    device: torch.device, bidirectional: bool, num_buckets: int, max_distance: int
) -> tuple[torch.Tensor, int]:
    """Buckets of the distances ``-Re..Re`` (int64, ``(2 Re + 1,)``, on ``device``) and ``Re``, the radius beyond
    which the bucket is constant on both sides (``1 <= Re <= max_distance``; 91 for T5's bidirectional 32 buckets /
    128, whose last log bucket starts at 91; 113 for the causal ones).

    Computed with HF's formula on ``device`` (bucket boundaries fall on integers, so the device's ``log`` decides
    them, as it does in HF's model), once per configuration (one host sync the first time, then cached; under
    ``torch.compile`` the buckets enter the graph as a constant)."""
    key = (device, bidirectional, num_buckets, max_distance)
    hit = _BUCKET_CACHE.get(key)
    if hit is None:
        values, Re = _bucket_values(device, bidirectional, num_buckets, max_distance)
        hit = (torch.tensor(values, dtype=torch.int64, device=device), Re)
        if not torch.compiler.is_compiling():
            _BUCKET_CACHE[key] = hit
    return hit


def t5_bias_lut(rel_table: torch.Tensor, bidirectional: bool = True, max_distance: int = 128) -> torch.Tensor:
    """The T5 bias as a per-head lookup by distance: ``lut[h, d + Re] = rel_table[bucket(d), h]`` for
    ``d = key_pos - query_pos`` in ``[-Re, Re]`` (fp32, ``(H, 2 Re + 1)``, contiguous; ``Re`` from
    :func:`lut_buckets`). Every distance beyond ``Re`` has the bucket of ``±Re``, so
    ``lut[h, clamp(d, -Re, Re) + Re]`` is the exact T5 bias for any distance; that is what the flash kernels read
    (``flash_attention(..., rel_lut=lut)``).

    ``rel_table``: ``(num_buckets, H)``, any float dtype. Differentiable w.r.t. ``rel_table`` by plain autograd
    (cast, transpose and an index_select; the backward is one index_add in fp32, then a cast to the table's dtype).
    A stack whose layers share the table builds the lookup once per forward and hands it to every layer.
    """
    if not isinstance(rel_table, torch.Tensor) or rel_table.dim() != 2 or not rel_table.is_floating_point():
        got = f"{rel_table.dtype} {tuple(rel_table.shape)}" if isinstance(rel_table, torch.Tensor) else rel_table
        raise ValueError(f"rel_table must be a (num_buckets, H) floating-point tensor, got {got}")
    buckets, _ = lut_buckets(rel_table.device, bool(bidirectional), rel_table.shape[0], max_distance)
    # cast first: the index_select's backward (an index_add over 2Re+1 rows) then accumulates in fp32
    return rel_table.t().to(torch.float32).index_select(1, buckets)  # (H, num_buckets) -> (H, 2Re+1), contiguous
