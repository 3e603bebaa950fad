"""Tests for part.evaluation.bootstrap: paired percentile bootstrap of corpus metrics from per-utterance statistics."""

from __future__ import annotations

import random

import numpy as np
import pytest

from part.evaluation.bootstrap import Interval, error_rate_score, paired_bootstrap, resample_counts
from part.evaluation.metrics import bleu_from_statistics, bleu_statistics, error_counts

WORDS = "the a cat dog sat ran on under mat house red blue big small quickly slowly and or but with".split()


def sentences(n: int, length: int = 10, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(length)) for _ in range(n)]


def random_counts(n: int, seed: int) -> np.ndarray:
    """Per-utterance (errors, reference words): 5-15 words, each wrong with probability 0.3."""
    rng = np.random.default_rng(seed)
    units = rng.integers(5, 16, size=n)
    return np.stack([rng.binomial(units, 0.3), units], axis=1)


def test_resample_counts_draw_n_per_resample():
    counts = resample_counts(50, 200, np.random.default_rng(0))
    assert counts.shape == (200, 50) and counts.dtype.kind == "i"
    assert (counts.sum(axis=1) == 50).all() and (counts >= 0).all()
    assert np.array_equal(counts, resample_counts(50, 200, np.random.default_rng(0)))
    assert 0.3 < (counts == 0).mean() < 0.45  # about 1/e of the items are left out of a resample


def test_known_difference_is_found():
    """A perfect system vs one with 50% WER (every other utterance empty): the interval of the difference
    excludes 0 and contains the true -50; the perfect system's interval is [0, 0]."""
    refs = sentences(100)
    perfect = error_counts(refs, refs, "en")
    half = error_counts(refs, [r if i % 2 == 0 else "" for i, r in enumerate(refs)], "en")
    result = paired_bootstrap({"en": (perfect, half)}, error_rate_score, resamples=1000, seed=0)["en"]
    assert result.n == 100
    assert result.a == Interval(0.0, 0.0, 0.0)
    assert result.b.value == pytest.approx(50.0) and result.b.low < 50.0 < result.b.high
    assert result.diff.value == pytest.approx(-50.0)
    assert result.diff.excludes_zero() and result.diff.high < 0
    assert result.diff.low <= -50.0 <= result.diff.high
    assert 5.0 < result.diff.high - result.diff.low < 40.0  # a real interval, neither degenerate nor huge


def test_identical_systems_differ_by_exactly_zero():
    groups = {f"l{i}": (random_counts(80, i), random_counts(80, i)) for i in range(3)}
    results = paired_bootstrap(groups, error_rate_score, resamples=300, seed=1)
    assert set(results) == {"l0", "l1", "l2", "average"}
    for r in results.values():
        assert r.diff == Interval(0.0, 0.0, 0.0) and not r.diff.excludes_zero()
        assert r.a == r.b and r.a.low < r.a.high

    refs = sentences(60, seed=3)
    hyps = sentences(60, seed=4)
    stats = bleu_statistics(refs, hyps, "en")
    bleu = paired_bootstrap({"de→en": (stats, stats)}, bleu_from_statistics, resamples=100)["de→en"]
    assert bleu.diff == Interval(0.0, 0.0, 0.0) and bleu.a.value > 0


def test_intervals_contain_the_point_estimate_and_the_average_is_the_mean():
    groups = {f"l{i}": (random_counts(100, i), random_counts(100, 10 + i)) for i in range(8)}
    results = paired_bootstrap(groups, error_rate_score, resamples=1000, seed=0)
    for r in results.values():
        for interval in (r.a, r.b, r.diff):
            assert interval.low <= interval.value <= interval.high
    for name, (a, _) in groups.items():  # the point estimate is the corpus rate on the full sample
        assert results[name].a.value == pytest.approx(100 * a[:, 0].sum() / a[:, 1].sum())
    average = results["average"]
    assert average.n == 800
    assert average.a.value == pytest.approx(np.mean([results[g].a.value for g in groups]))
    assert average.diff.value == pytest.approx(average.a.value - average.b.value)
    # Averaging 8 independent languages narrows the interval compared with a single language.
    widths = [results[g].a.high - results[g].a.low for g in groups]
    assert average.a.high - average.a.low < min(widths)
    # One group: its average is the group itself.
    single = paired_bootstrap({"l0": groups["l0"]}, error_rate_score, resamples=200, seed=0)
    assert single["average"] == single["l0"]


def test_determinism_and_the_seed():
    groups = {"en": (random_counts(50, 0), random_counts(50, 1)), "de": (random_counts(40, 2), random_counts(40, 3))}
    first = paired_bootstrap(groups, error_rate_score, resamples=500, seed=7)
    assert paired_bootstrap(groups, error_rate_score, resamples=500, seed=7) == first
    other = paired_bootstrap(groups, error_rate_score, resamples=500, seed=8)
    assert other["en"].a.value == first["en"].a.value and other["en"].a != first["en"].a
    assert first["en"].to_dict()["diff"] == {"value": first["en"].diff.value, "low": first["en"].diff.low,
                                             "high": first["en"].diff.high}


def test_bleu_resamples_are_exact_corpus_bleu():
    """Summed sentence statistics give exactly sacrebleu's corpus BLEU of the resampled corpus."""
    from part.evaluation.metrics import bleu

    refs = sentences(30, seed=5)
    hyps = [" ".join(r.split()[: 4 + i % 7]) for i, r in enumerate(refs)]
    stats = np.asarray(bleu_statistics(refs, hyps, "en"))
    assert float(bleu_from_statistics(stats.sum(axis=0))) == bleu(refs, hyps, "en")["value"]
    counts = resample_counts(len(refs), 5, np.random.default_rng(0))
    scores = bleu_from_statistics(counts @ stats)
    assert scores.shape == (5,)
    for row, score in zip(counts, scores):
        picked = [i for i, c in enumerate(row) for _ in range(c)]
        assert score == bleu([refs[i] for i in picked], [hyps[i] for i in picked], "en")["value"]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="one shape"):
        paired_bootstrap({"en": (random_counts(5, 0), random_counts(6, 0))}, error_rate_score)
    with pytest.raises(ValueError, match="non-empty"):
        paired_bootstrap({"en": (np.zeros((0, 2)), np.zeros((0, 2)))}, error_rate_score)
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap({"en": (random_counts(5, 0), random_counts(5, 0))}, error_rate_score, confidence=1.0)
