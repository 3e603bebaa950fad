"""Paired bootstrap confidence intervals for corpus-level metrics. Knows nothing of runs, models or files.

A corpus metric (WER, CER, BLEU) is a function of per-utterance sufficient statistics summed over the corpus
(errors and reference units; BLEU's lengths and n-gram matches/totals, see part.evaluation.metrics). Resampling
utterances with replacement is then a matrix product: counts [R, n] (how often each utterance is drawn in each
resample) times statistics [n, k], so 1000 resamples of a few hundred utterances take milliseconds, and each
resample's metric is exactly the corpus metric of that resampled corpus.

Paired: both systems are scored on the same resampled utterances, so the interval of the difference A - B
reflects only how the systems differ on the same inputs (Koehn 2004), not the variance of the test set twice.
Several groups (languages, directions) are resampled independently (stratified), and their macro average is
averaged per resample, matching how the tables average per-language values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

Score = Callable[[np.ndarray], np.ndarray]  # summed statistics [..., k] -> metric values [...]


@dataclass(frozen=True)
class Interval:
    """A point estimate (on the full sample) and its percentile bootstrap interval."""

    value: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class Paired:
    """System A, system B and the difference A - B, each with its interval; n utterances (summed over groups)."""

    a: Interval
    b: Interval
    diff: Interval
    n: int

    def to_dict(self) -> dict:
        return {"a": self.a.to_dict(), "b": self.b.to_dict(), "diff": self.diff.to_dict(), "n": self.n}


def error_rate_score(sums: np.ndarray) -> np.ndarray:
    """WER / CER in percent from summed (errors, reference units)."""
    sums = np.asarray(sums, dtype=np.float64)
    return 100.0 * sums[..., 0] / sums[..., 1]


def resample_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, n] int counts: how many times each of n items is drawn in each resample of n draws."""
    draws = rng.integers(0, n, size=(resamples, n))
    offsets = (np.arange(resamples) * n)[:, None]  # one bincount for all resamples
    return np.bincount((draws + offsets).ravel(), minlength=resamples * n).reshape(resamples, n)


def _interval(point: float, samples: np.ndarray, confidence: float) -> Interval:
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    return Interval(float(point), float(low), float(high))


def _scores(stats: np.ndarray, counts: np.ndarray, score: Score) -> tuple[float, np.ndarray]:
    """The metric on the full sample and on each resample."""
    return float(score(stats.sum(axis=0)[None])[0]), np.asarray(score(counts @ stats), dtype=np.float64)


def paired_bootstrap(groups: Mapping[str, tuple[ArrayLike, ArrayLike]], score: Score, resamples: int = 1000,
                     seed: int = 0, confidence: float = 0.95, average: str | None = "average") -> dict[str, Paired]:
    """Paired percentile bootstrap of a corpus metric, per group and for the groups' macro average.

    `groups` maps a name to (stats_a, stats_b): per-utterance sufficient statistics [n, k] of systems A and B,
    row i of both being the same utterance. `score` turns summed statistics [..., k] into metric values (e.g.
    `error_rate_score`, or BLEU). Each group is resampled `resamples` times (n draws with replacement, the same
    draws for A and B); with `average` set, the key `average` holds the unweighted mean over the groups (equal to
    the group itself when there is one), computed per resample. Deterministic for a given seed and group order.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    results: dict[str, Paired] = {}
    per_group: list[tuple[float, np.ndarray, float, np.ndarray]] = []
    total = 0
    for name, (stats_a, stats_b) in groups.items():
        a = np.asarray(stats_a, dtype=np.float64)
        b = np.asarray(stats_b, dtype=np.float64)
        if a.ndim != 2 or a.shape != b.shape or len(a) == 0:
            raise ValueError(f"group {name!r}: need two non-empty [n, k] arrays of one shape, got {a.shape}, {b.shape}")
        counts = resample_counts(len(a), resamples, rng).astype(np.float64)
        point_a, samples_a = _scores(a, counts, score)
        point_b, samples_b = _scores(b, counts, score)
        per_group.append((point_a, samples_a, point_b, samples_b))
        total += len(a)
        results[name] = Paired(_interval(point_a, samples_a, confidence), _interval(point_b, samples_b, confidence),
                               _interval(point_a - point_b, samples_a - samples_b, confidence), len(a))
    if average is not None and per_group:
        point_a, samples_a, point_b, samples_b = (np.mean([g[i] for g in per_group], axis=0) for i in range(4))
        results[average] = Paired(_interval(point_a, samples_a, confidence),
                                  _interval(point_b, samples_b, confidence),
                                  _interval(point_a - point_b, samples_a - samples_b, confidence), total)
    return results
