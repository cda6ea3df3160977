"""UL2's mixture of denoisers on 1-D token arrays: T5 span corruption (R, X) and prefix LM (S).

One typed definition, :class:`Denoiser`, covers the three paradigms of UL2 (Tay et al., "UL2: Unifying Language
Learning Paradigms", arXiv:2205.05131, §3.1):

- span corruption with mean span length ``mu`` and noise density ``r`` (R: regular, X: extreme). Span placement is
  T5's ``random_spans_noise_mask`` (Raffel et al. 2020, ``t5/data/preprocessors.py``): ``round(L * r)`` noise
  tokens (at least 1, at most L - 1) cut into ``round(noise / mu)`` spans (at least 1, at most ``max_spans``), the
  noise and non-noise tokens each partitioned uniformly at random into that many non-empty spans and interleaved,
  starting with non-noise, so the chunk always ends inside a noise span;
- prefix LM (S) is the one-span case ``max_spans == 1``: the single noise span is the suffix, so the input is a
  visible prefix plus one sentinel and the target is that sentinel plus the continuation. The split point is drawn
  at random (T5's ``random_prefix_noise_mask`` generalised): the number of target tokens is uniform on the widest
  window centred on ``density * L`` that stays inside ``[1, L - 1]``. ``density`` is ``r``; ``r == 0`` selects
  FAT5's parameterisation of the S-denoiser, in which the visible prefix is ``1 / mu`` of the chunk on average
  (``mu=4`` -> 75 % of the chunk is target). With ``r = 0.5`` the split is uniform over the whole chunk, as in the
  UL2 paper's appendix code (``prefix_lm`` with ``noise_density=0.5``).

``apply_denoiser`` never appends EOS (the collator does). ``max_chunk_length`` is T5's ``random_spans_helper`` made
exact for both limits: the longest raw chunk whose encoded input *and* target (including EOS, mode tokens and
sentinels) fit for every chunk length up to it, so that nothing is ever truncated after denoising.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Denoiser",
    "PRESETS",
    "UL2_CHECKPOINT_MODE_TOKENS",
    "MODE_TOKENS",
    "apply_denoiser",
    "denoised_lengths",
    "max_chunk_length",
    "merge_denoised",
    "random_spans_noise_mask",
    "resolve_mixture",
]

# UL2 paper's paradigm tokens, and the ones the released google/ul2 checkpoints were trained with.
MODE_TOKENS: tuple[str, ...] = ("[R]", "[S]", "[X]", "[NLU]", "[NLG]", "[S2S]")
UL2_CHECKPOINT_MODE_TOKENS: dict[str, str] = {"[R]": "[NLU]", "[X]": "[NLG]", "[S]": "[S2S]"}


@dataclass(frozen=True)
class Denoiser:
    """One denoising task.

    Args:
        mu: mean noise-span length in tokens (>= 1). For a prefix-LM denoiser with ``r == 0`` it sets the target
            share instead: ``1 - 1 / mu`` (FAT5's convention).
        r: noise density, the expected fraction of the chunk's tokens that move to the target, in ``[0, 1)``;
            0 is allowed only for prefix LM.
        max_spans: cap on the number of noise spans; ``1`` makes the denoiser a prefix LM (S-denoiser).
        prefix: mode token prepended to the input (``"[R]"``, ``"[S]"``, ``"[X]"``, ...); ``""`` for none.
    """

    mu: float
    r: float
    max_spans: int | None = None
    prefix: str = ""

    def __post_init__(self) -> None:
        try:
            mu, r = float(self.mu), float(self.r)
        except (TypeError, ValueError) as e:
            raise ValueError(f"Denoiser mu and r must be numbers, got mu={self.mu!r}, r={self.r!r}") from e
        if not np.isfinite(mu) or mu < 1.0:
            raise ValueError(f"Denoiser mu must be a finite number >= 1, got {self.mu!r}")
        if not 0.0 <= r < 1.0:
            raise ValueError(f"Denoiser r must be in [0, 1), got {self.r!r}")
        ms = self.max_spans
        if ms is not None and (isinstance(ms, bool) or int(ms) != ms or ms < 1):
            raise ValueError(f"Denoiser max_spans must be None or an integer >= 1, got {ms!r}")
        if not isinstance(self.prefix, str):
            raise ValueError(f"Denoiser prefix must be a string, got {self.prefix!r}")
        # Normalise YAML ints so that equal denoisers compare and hash equal.
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "r", r)
        object.__setattr__(self, "max_spans", None if ms is None else int(ms))
        if r == 0.0 and not self.is_prefix_lm:
            raise ValueError("Denoiser r=0 is only meaningful for a prefix LM (max_spans=1)")
        if r == 0.0 and mu == 1.0:
            raise ValueError("Denoiser with r=0 and mu=1 would have an empty target (target share 1 - 1/mu)")

    @property
    def is_prefix_lm(self) -> bool:
        """True for the S-denoiser: one noise span, which is always the suffix of the chunk."""
        return self.max_spans == 1

    @property
    def density(self) -> float:
        """Expected fraction of a chunk's tokens that end up in the target."""
        if self.is_prefix_lm and self.r == 0.0:
            return 1.0 - 1.0 / self.mu
        return self.r


# The mixtures named by the issue. Proportions sum to 1.
PRESETS: dict[str, list[tuple[Denoiser, float]]] = {
    # T5 span corruption (Raffel et al. 2020, §3.1.4): no mode token.
    "t5": [(Denoiser(3.0, 0.15, None, ""), 1.0)],
    # UL2's seven denoisers (arXiv:2205.05131 §3.1.2 and Table 1): R (3, .15), (8, .15); S; X (3, .5), (8, .5),
    # (64, .15), (64, .5), with the paper's paradigm tokens. Shares: S 20 %, R 40 % and X 40 %, each split evenly
    # inside its group -- the paper's §4.5 recommendation as public UL2 reproductions apply it (the appendix code
    # takes the rates as an argument). S is a prefix LM with a uniform split point (r = 0.5, as the appendix's
    # prefix_lm; mu = 2 gives the same share under the r = 0 convention). UL2_CHECKPOINT_MODE_TOKENS maps the
    # tokens to the [NLU]/[NLG]/[S2S] of the released checkpoints.
    "ul2": [
        (Denoiser(3.0, 0.15, None, "[R]"), 0.2),
        (Denoiser(8.0, 0.15, None, "[R]"), 0.2),
        (Denoiser(2.0, 0.5, 1, "[S]"), 0.2),
        (Denoiser(3.0, 0.5, None, "[X]"), 0.1),
        (Denoiser(8.0, 0.5, None, "[X]"), 0.1),
        (Denoiser(64.0, 0.15, None, "[X]"), 0.1),
        (Denoiser(64.0, 0.5, None, "[X]"), 0.1),
    ],
    # FAT5's seed mixture, exactly (including its X (8, 0.15), which differs from the paper's X (8, 0.5)).
    "fat5": [
        (Denoiser(3.0, 0.15, None, "[R]"), 0.165),
        (Denoiser(8.0, 0.15, None, "[R]"), 0.165),
        (Denoiser(4.0, 0.0, 1, "[S]"), 0.34),
        (Denoiser(3.0, 0.5, None, "[X]"), 0.0825),
        (Denoiser(8.0, 0.15, None, "[X]"), 0.0825),
        (Denoiser(64.0, 0.15, None, "[X]"), 0.0825),
        (Denoiser(64.0, 0.5, None, "[X]"), 0.0825),
    ],
}


def resolve_mixture(spec: str | Sequence[Any] | Mapping[str, Any]) -> list[tuple[Denoiser, float]]:
    """Turn a preset name or a custom list (e.g. from YAML) into ``[(Denoiser, proportion), ...]`` summing to 1.

    Accepted items: ``(Denoiser, p)``, a bare ``Denoiser`` (weight 1), or a mapping with keys ``mu``, ``r``,
    ``max_spans`` (optional), ``prefix`` (optional) and ``proportion`` (or ``weight``; default 1).
    """
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"unknown denoiser preset {spec!r}; choose one of {sorted(PRESETS)} or give a list")
        return list(PRESETS[spec])
    if isinstance(spec, Mapping) or not isinstance(spec, Sequence) or len(spec) == 0:
        raise ValueError(f"denoisers must be a preset name or a non-empty list, got {spec!r}")
    out: list[tuple[Denoiser, float]] = []
    for item in spec:
        if isinstance(item, Denoiser):
            d, w = item, 1.0
        elif isinstance(item, Mapping):
            extra = set(item) - {"mu", "r", "max_spans", "prefix", "proportion", "weight"}
            if extra or "mu" not in item or "r" not in item:
                raise ValueError(
                    f"denoiser entry {dict(item)!r} needs keys mu, r (optional max_spans, prefix, "
                    f"proportion); unknown keys: {sorted(extra)}"
                )
            w = item.get("proportion", item.get("weight", 1.0))
            d = Denoiser(item["mu"], item["r"], item.get("max_spans"), item.get("prefix", ""))
        elif isinstance(item, Sequence) and len(item) == 2 and isinstance(item[0], Denoiser):
            d, w = item
        else:
            raise ValueError(f"cannot read denoiser entry {item!r}")
        w = float(w)
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"denoiser proportion must be a finite number >= 0, got {w!r}")
        out.append((d, w))
    total = sum(w for _, w in out)
    if total <= 0:
        raise ValueError("denoiser proportions sum to 0")
    return [(d, w / total) for d, w in out]


# ---------------------------------------------------------------------------------------------------------------
# Span counts and lengths (vectorised over chunk lengths so max_chunk_length can scan them all at once).


def _span_counts(length: np.ndarray, d: Denoiser) -> tuple[np.ndarray, np.ndarray]:
    """(noise tokens, noise spans) of a span-corruption denoiser for chunk lengths >= 2 (deterministic, as T5)."""
    noise = np.clip(np.round(length * d.r), 1, length - 1)
    spans = np.maximum(np.round(noise / d.mu), 1)
    if d.max_spans is not None:
        spans = np.minimum(spans, d.max_spans)
    # Every noise and non-noise span must hold at least one token.
    spans = np.minimum(spans, np.minimum(noise, length - noise))
    return noise.astype(np.int64), spans.astype(np.int64)


def _prefix_lm_range(length: np.ndarray, d: Denoiser) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive range of target-token counts of a prefix-LM denoiser for chunk lengths >= 2."""
    dens = d.density
    half = min(dens, 1.0 - dens) * length
    lo = np.maximum(np.round(dens * length - half), 1)
    hi = np.minimum(np.round(dens * length + half), length - 1)
    return lo.astype(np.int64), np.maximum(hi, lo).astype(np.int64)


def denoised_lengths(
    length: int | np.ndarray, denoiser: Denoiser, num_prefix_tokens: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Worst-case (input length, target length, number of sentinels) of a chunk, EOS not included."""
    length = np.asarray(length, dtype=np.int64)
    safe = np.maximum(length, 2)
    if denoiser.is_prefix_lm:
        lo, hi = _prefix_lm_range(safe, denoiser)
        inp, tgt, spans = safe - lo + 1, hi + 1, np.ones_like(safe)
    else:
        noise, spans = _span_counts(safe, denoiser)
        inp, tgt = safe - noise + spans, noise + spans
    # A chunk of fewer than 2 tokens has nothing to hide (T5 behaves the same way): all of it is input.
    short = length < 2
    inp = np.where(short, length, inp) + num_prefix_tokens
    tgt = np.where(short, 0, tgt)
    spans = np.where(short, 0, spans)
    return inp, tgt, spans


def max_chunk_length(
    denoiser: Denoiser,
    *,
    max_input_len: int,
    max_target_len: int,
    num_prefix_tokens: int = 0,
    num_sentinels: int | None = None,
    eos: bool = True,
) -> int:
    """Longest raw chunk such that every chunk up to that length encodes within both limits.

    ``max_input_len`` and ``max_target_len`` include the EOS the collator appends (when ``eos``), mode tokens and
    sentinels. ``num_sentinels`` caps the number of spans (a chunk that would need more sentinels than the
    tokenizer has is never produced, instead of reusing ordinary ids as T5's code silently does).
    """
    for name, v in (("max_input_len", max_input_len), ("max_target_len", max_target_len)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    extra = 1 if eos else 0
    lengths = np.arange(1, max_input_len + max_target_len + 1, dtype=np.int64)
    inp, tgt, spans = denoised_lengths(lengths, denoiser, num_prefix_tokens)
    fits = (inp + extra <= max_input_len) & (tgt + extra <= max_target_len)
    if num_sentinels is not None:
        fits &= spans <= num_sentinels
    if not fits[0]:
        raise ValueError(
            f"max_input_len={max_input_len} / max_target_len={max_target_len} leave no room for even a 1-token "
            f"chunk with {denoiser} ({num_prefix_tokens} prefix tokens, EOS={eos})"
        )
    bad = np.flatnonzero(~fits)
    return int(lengths[-1] if bad.size == 0 else lengths[bad[0] - 1])


# ---------------------------------------------------------------------------------------------------------------
# Noise masks and the denoiser itself.


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Uniformly random composition of ``num_items`` into ``num_segments`` positive parts (T5's helper: shuffle
    ``num_segments - 1`` segment starts among the ``num_items - 1`` inner boundaries)."""
    if num_segments == 1:
        return np.array([num_items], dtype=np.int64)
    is_start = np.zeros(num_items - 1, dtype=bool)
    is_start[: num_segments - 1] = True
    is_start = rng.permuted(is_start)
    bounds = np.empty(num_segments + 1, dtype=np.int64)
    bounds[0], bounds[-1] = 0, num_items
    bounds[1:-1] = is_start.nonzero()[0]  # the method: np.flatnonzero's wrapper costs more than the work here
    bounds[1:-1] += 1
    return bounds[1:] - bounds[:-1]


def _span_counts_int(length: int, d: Denoiser) -> tuple[int, int]:
    """Scalar twin of :func:`_span_counts` (Python's round is numpy's: half to even), for the hot path."""
    noise = min(max(round(length * d.r), 1), length - 1)
    spans = max(round(noise / d.mu), 1)
    if d.max_spans is not None:
        spans = min(spans, d.max_spans)
    return noise, min(spans, noise, length - noise)


def _prefix_lm_range_int(length: int, d: Denoiser) -> tuple[int, int]:
    """Scalar twin of :func:`_prefix_lm_range`."""
    dens = d.density
    half = min(dens, 1.0 - dens) * length
    lo = max(round(dens * length - half), 1)
    return lo, max(min(round(dens * length + half), length - 1), lo)


def _span_lengths(length: int, d: Denoiser, rng: np.random.Generator) -> np.ndarray:
    """Interleaved span lengths ``[non-noise 0, noise 0, non-noise 1, noise 1, ...]`` of a chunk (length >= 2)."""
    if d.is_prefix_lm:
        lo, hi = _prefix_lm_range_int(length, d)
        noise = int(rng.integers(lo, hi + 1))
        return np.array([length - noise, noise], dtype=np.int64)
    noise, spans = _span_counts_int(length, d)
    out = np.empty(2 * spans, dtype=np.int64)
    out[1::2] = _random_segmentation(noise, spans, rng)
    out[0::2] = _random_segmentation(length - noise, spans, rng)
    return out


def random_spans_noise_mask(
    length: int,
    noise_density: float,
    mean_noise_span_length: float,
    rng: np.random.Generator,
    max_spans: int | None = None,
) -> np.ndarray:
    """T5's ``random_spans_noise_mask`` (without ``random_roll``) in numpy: boolean (length,), True = noise."""
    if length < 2:
        return np.zeros(max(length, 0), dtype=bool)
    lengths = _span_lengths(length, Denoiser(mean_noise_span_length, noise_density, max_spans), rng)
    return _alternating(len(lengths) // 2).repeat(lengths)


def apply_denoiser(
    tokens: np.ndarray | Sequence[int],
    denoiser: Denoiser,
    *,
    sentinel_ids: np.ndarray | Sequence[int],
    rng: np.random.Generator,
    prefix_ids: np.ndarray | Sequence[int] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Corrupt one chunk: ``inputs = prefix_ids + tokens with each noise span replaced by one sentinel``,
    ``targets = each sentinel followed by the span it replaced``, in order, ``sentinel_ids[0]`` first.

    Returns 1-D arrays of the dtype of ``tokens``; EOS is not appended. A chunk of fewer than 2 tokens is returned
    whole as input with an empty target (nothing can be hidden while keeping some context, as in T5).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D array of token ids, got shape {tokens.shape}")
    if tokens.dtype.kind not in "iu":
        if tokens.size:
            raise ValueError(f"tokens must hold integer ids, got dtype {tokens.dtype}")
        tokens = tokens.astype(np.int64)
    dtype = tokens.dtype
    prefix = np.asarray(prefix_ids, dtype=dtype).reshape(-1)
    sentinels = np.asarray(sentinel_ids).astype(dtype, copy=False).reshape(-1)
    return _corrupt(tokens, denoiser, rng, sentinels, prefix, tokens[:0])


@functools.cache
def _alternating(num_spans: int) -> np.ndarray:
    """[False, True] * num_spans (read-only, cached: the hot path builds one per chunk)."""
    out = np.tile(np.array([False, True]), num_spans)
    out.setflags(write=False)
    return out


def _corrupt(
    tokens: np.ndarray,
    denoiser: Denoiser,
    rng: np.random.Generator,
    sentinels: np.ndarray,
    prefix: np.ndarray,
    eos: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The body of :func:`apply_denoiser` on validated arrays of one dtype, with ``eos`` (``[eos_id]`` or empty)
    appended to both outputs; the dataset calls it directly to skip the per-call conversions."""
    length = tokens.shape[0]
    if length < 2:
        return np.concatenate([prefix, tokens, eos]), np.concatenate([tokens[:0], eos])
    lengths = _span_lengths(length, denoiser, rng)
    num_spans = lengths.shape[0] // 2
    if sentinels.shape[0] < num_spans:
        raise ValueError(
            f"sentinel_ids has {sentinels.shape[0]} ids but this {length}-token chunk needs {num_spans} spans; "
            "use max_chunk_length(..., num_sentinels=len(sentinel_ids)) to size chunks"
        )
    sentinels = sentinels[:num_spans]
    noise_starts = np.cumsum(lengths)[0::2]  # first index of noise span i (non-noise span i ends just before)
    mask = _alternating(num_spans).repeat(lengths)  # (length,) True = noise
    # Input: the first token of each noise span becomes its sentinel, the rest of the span is dropped.
    buf = tokens.copy()
    buf[noise_starts] = sentinels
    keep = ~mask
    keep[noise_starts] = True
    inputs = np.concatenate([prefix, buf[keep], eos])
    # Target: the last token of each non-noise span becomes the sentinel, the rest of that span is dropped.
    buf = tokens.copy()
    buf[noise_starts - 1] = sentinels
    mask[noise_starts - 1] = True
    return inputs, np.concatenate([buf[mask], eos])


def merge_denoised(
    inputs: np.ndarray,
    targets: np.ndarray,
    sentinel_ids: np.ndarray | Sequence[int],
    num_prefix_tokens: int = 0,
) -> np.ndarray:
    """Inverse of :func:`apply_denoiser`: put each target span back at its sentinel (EOS must not be included).

    Raises ValueError when the sentinels of inputs and targets do not pair up in order.
    """
    inputs = np.asarray(inputs)[num_prefix_tokens:]
    targets = np.asarray(targets)
    sentinels = np.asarray(sentinel_ids)
    in_pos = np.flatnonzero(np.isin(inputs, sentinels))
    tg_pos = np.flatnonzero(np.isin(targets, sentinels))
    if len(in_pos) != len(tg_pos) or not np.array_equal(inputs[in_pos], targets[tg_pos]):
        raise ValueError("inputs and targets do not hold the same sentinels in the same order")
    if len(tg_pos) and tg_pos[0] != 0:
        raise ValueError("targets must start with a sentinel")
    pieces = []
    start = 0
    tg_bounds = np.append(tg_pos, len(targets))
    for k, p in enumerate(in_pos):
        pieces.append(inputs[start:p])
        pieces.append(targets[tg_bounds[k] + 1 : tg_bounds[k + 1]])
        start = p + 1
    pieces.append(inputs[start:])
    return np.concatenate(pieces) if pieces else inputs[:0]
