"""Denoisers: exact reconstruction, realised (r, mu), sentinel order, mode tokens, length limits, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from flasht5.data import ul2
from flasht5.data.ul2 import (
    PRESETS,
    Denoiser,
    apply_denoiser,
    denoised_lengths,
    max_chunk_length,
    merge_denoised,
    random_spans_noise_mask,
    resolve_mixture,
)

SENTINELS = np.arange(32099, 31999, -1)  # <extra_id_0> is the highest id, as in T5
PREFIX = {"": [], "[R]": [3], "[S]": [4], "[X]": [5, 6]}  # a two-token mode prefix exercises the general case
ALL = sorted({d for mix in PRESETS.values() for d, _ in mix}, key=repr)


def _ids(d: Denoiser) -> str:
    return f"{d.prefix or 'none'}-mu{d.mu:g}-r{d.r:g}-n{d.max_spans}"


@pytest.mark.parametrize("d", ALL, ids=_ids)
def test_reconstruction_sentinel_order_and_prefix(d: Denoiser) -> None:
    rng = np.random.default_rng(0)
    for _ in range(150):
        length = int(rng.integers(0, 600))  # X (3, 0.5) needs <= 100 sentinels up to 602
        tokens = rng.integers(7, 31000, size=length).astype(np.int32)
        prefix = PREFIX[d.prefix]
        inputs, targets = apply_denoiser(tokens, d, sentinel_ids=SENTINELS, rng=rng, prefix_ids=prefix)
        assert inputs.dtype == tokens.dtype and targets.dtype == tokens.dtype
        assert inputs[: len(prefix)].tolist() == prefix
        np.testing.assert_array_equal(merge_denoised(inputs, targets, SENTINELS, len(prefix)), tokens)
        in_s = inputs[np.isin(inputs, SENTINELS)]
        tg_s = targets[np.isin(targets, SENTINELS)]
        np.testing.assert_array_equal(in_s, SENTINELS[: len(in_s)])  # <extra_id_0> first, then in order
        np.testing.assert_array_equal(tg_s, in_s)
        if length >= 2:
            assert targets[0] == SENTINELS[0] and inputs[-1] == SENTINELS[len(in_s) - 1]  # T5: ends on noise
        else:
            assert len(targets) == 0
        worst_in, worst_tg, worst_spans = denoised_lengths(length, d, len(prefix))
        assert len(inputs) <= worst_in and len(targets) <= worst_tg and len(in_s) <= worst_spans
        if d.is_prefix_lm and length >= 2:
            assert len(in_s) == 1  # S: one visible prefix, one sentinel, the continuation as target


@pytest.mark.parametrize("d", [d for d in ALL if not d.is_prefix_lm], ids=_ids)
def test_realised_density_and_span_length(d: Denoiser) -> None:
    rng = np.random.default_rng(1)
    noise = spans = total = 0
    for _ in range(200):
        length = int(rng.integers(2048, 4096))
        inputs, targets = apply_denoiser(np.arange(length) + 10, d, sentinel_ids=np.arange(-1, -1001, -1), rng=rng)
        k = int((targets < 0).sum())
        noise += len(targets) - k
        spans += k
        total += length
    assert abs(noise / total - d.r) <= 0.1 * d.r
    assert abs(noise / spans - d.mu) <= 0.1 * d.mu


@pytest.mark.parametrize("d", [d for d in ALL if d.is_prefix_lm], ids=_ids)
def test_prefix_lm_split_is_random_suffix(d: Denoiser) -> None:
    rng = np.random.default_rng(2)
    shares = []
    for _ in range(2000):
        length = int(rng.integers(64, 512))
        tokens = np.arange(length) + 10
        inputs, targets = apply_denoiser(tokens, d, sentinel_ids=SENTINELS, rng=rng)
        cut = len(inputs) - 1
        np.testing.assert_array_equal(inputs[:-1], tokens[:cut])  # visible prefix, in order
        np.testing.assert_array_equal(targets[1:], tokens[cut:])  # the continuation
        shares.append((length - cut) / length)
    assert abs(np.mean(shares) - d.density) <= 0.1 * d.density
    assert np.std(shares) > 0.05  # the split point moves


def test_noise_mask_matches_t5_structure() -> None:
    rng = np.random.default_rng(3)
    for length in (2, 3, 10, 111, 568):
        mask = random_spans_noise_mask(length, 0.15, 3.0, rng)
        noise = min(max(round(length * 0.15), 1), length - 1)
        starts = np.flatnonzero(mask & ~np.r_[False, mask[:-1]])
        assert mask.sum() == noise and not mask[0] and mask[-1]
        assert len(starts) == min(max(round(noise / 3.0), 1), noise, length - noise)


def test_random_segmentation_is_uniform() -> None:
    rng = np.random.default_rng(4)
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(6000):
        key = tuple(ul2._random_segmentation(5, 3, rng).tolist())
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 6  # the compositions of 5 into 3 positive parts
    assert all(abs(c - 1000) < 5 * np.sqrt(1000) for c in counts.values())


def test_scalar_and_vector_span_counts_agree() -> None:
    lengths = np.arange(2, 3000)
    for d in ALL:
        if d.is_prefix_lm:
            vec, sc = ul2._prefix_lm_range(lengths, d), [ul2._prefix_lm_range_int(int(n), d) for n in lengths]
        else:
            vec, sc = ul2._span_counts(lengths, d), [ul2._span_counts_int(int(n), d) for n in lengths]
        np.testing.assert_array_equal(np.stack(vec, 1), np.array(sc))


def test_chunk_length_matches_t5_random_spans_helper() -> None:
    # T5's random_spans_helper(inputs_length=512, noise_density=0.15, mean_noise_span_length=3) -> (568, 114).
    t5 = PRESETS["t5"][0][0]
    assert max_chunk_length(t5, max_input_len=512, max_target_len=114) == 568
    assert denoised_lengths(568, t5)[1] + 1 == 114
    # A tighter target limit shortens the chunk; the prefix token costs input room.
    assert max_chunk_length(t5, max_input_len=512, max_target_len=60) < 568
    assert max_chunk_length(t5, max_input_len=512, max_target_len=114, num_prefix_tokens=1) == 567


@pytest.mark.parametrize("limits", [(512, 114), (128, 128), (64, 16), (1024, 256)])
def test_lengths_never_above_limits(limits: tuple[int, int]) -> None:
    max_in, max_tg = limits
    rng = np.random.default_rng(5)
    for d in ALL:
        prefix = PREFIX[d.prefix]
        n = max_chunk_length(
            d, max_input_len=max_in, max_target_len=max_tg, num_prefix_tokens=len(prefix), num_sentinels=len(SENTINELS)
        )
        inp, tgt, sp = denoised_lengths(n + 1, d, len(prefix))
        assert inp + 1 > max_in or tgt + 1 > max_tg or sp > len(SENTINELS)  # n is the longest that fits
        for length in [*range(1, min(n, 40) + 1), *rng.integers(1, n + 1, size=40).tolist(), n]:
            for _ in range(3):
                inputs, targets = apply_denoiser(
                    np.arange(length) + 10, d, sentinel_ids=SENTINELS, rng=rng, prefix_ids=prefix
                )
                assert len(inputs) + 1 <= max_in and len(targets) + 1 <= max_tg


def test_presets_are_the_issue_mixtures() -> None:
    fat5 = [(d.mu, d.r, d.max_spans, d.prefix, p) for d, p in PRESETS["fat5"]]
    assert fat5 == [
        (3.0, 0.15, None, "[R]", 0.165),
        (8.0, 0.15, None, "[R]", 0.165),
        (4.0, 0.0, 1, "[S]", 0.34),
        (3.0, 0.5, None, "[X]", 0.0825),
        (8.0, 0.15, None, "[X]", 0.0825),
        (64.0, 0.15, None, "[X]", 0.0825),
        (64.0, 0.5, None, "[X]", 0.0825),
    ]
    spans = sorted((d.prefix, d.mu, d.r) for d, _ in PRESETS["ul2"] if not d.is_prefix_lm)
    assert spans == [
        ("[R]", 3, 0.15),
        ("[R]", 8, 0.15),
        ("[X]", 3, 0.5),
        ("[X]", 8, 0.5),
        ("[X]", 64, 0.15),
        ("[X]", 64, 0.5),
    ]
    for mix in PRESETS.values():
        assert abs(sum(p for _, p in mix) - 1.0) < 1e-12


def test_resolve_mixture_from_yaml_like_lists() -> None:
    mix = resolve_mixture([{"mu": 3, "r": 0.15, "proportion": 3}, {"mu": 4, "r": 0, "max_spans": 1, "prefix": "[S]"}])
    assert mix == [(Denoiser(3.0, 0.15), 0.75), (Denoiser(4.0, 0.0, 1, "[S]"), 0.25)]
    assert resolve_mixture("ul2") == PRESETS["ul2"]
    assert resolve_mixture([Denoiser(3, 0.15)]) == [(Denoiser(3.0, 0.15), 1.0)]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Denoiser(0.5, 0.15), "mu"),
        (lambda: Denoiser(3, 1.0), "r"),
        (lambda: Denoiser(3, 0.0), "r=0"),
        (lambda: Denoiser(3, 0.15, 0), "max_spans"),
        (lambda: resolve_mixture("t6"), "preset"),
        (lambda: resolve_mixture([{"mu": 3}]), "needs keys"),
        (lambda: resolve_mixture([{"mu": 3, "r": 0.1, "proportion": -1}]), "proportion"),
        (
            lambda: apply_denoiser(
                np.zeros((2, 3), int), Denoiser(3, 0.15), sentinel_ids=SENTINELS, rng=np.random.default_rng()
            ),
            "tokens",
        ),
        (
            lambda: apply_denoiser(
                np.arange(1000), Denoiser(1, 0.5), sentinel_ids=SENTINELS[:10], rng=np.random.default_rng()
            ),
            "sentinel_ids",
        ),
        (
            lambda: max_chunk_length(
                Denoiser(3, 0.15, None, "[R]"), max_input_len=2, max_target_len=8, num_prefix_tokens=2
            ),
            "no room",
        ),
    ],
)
def test_bad_input_raises(make, match) -> None:
    with pytest.raises(ValueError, match=match):
        make()
