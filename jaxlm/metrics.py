"""Calibration metrics of stated confidences ``q_i ∈ [0, 1]`` against correctness ``c_i ∈ {0, 1}``.

    accuracy = mean_i c_i
    Brier    = mean_i (q_i − c_i)²
    ECE      = Σ_b (n_b / n) · |mean_{i∈b} c_i − mean_{i∈b} q_i|     (equal-width bins on [0, 1])
    AUROC    = P(q_i > q_j) + ½ P(q_i = q_j)  for a random correct i and wrong j

Bin b of ``n_bins`` holds ``b/n_bins <= q < (b+1)/n_bins``; the last bin also holds ``q = 1``.
AUROC is the Mann–Whitney statistic (ties count one half); it is NaN when all answers are right or all
wrong. ``reliability_diagram`` plots each bin's accuracy against its mean confidence.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxlm.errors import require


def _as_pair(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``[n]`` confidences in [0, 1] and ``[n]`` 0/1 correctness, checked."""
    confidence = np.asarray(confidence, np.float64).reshape(-1)  # [n]
    correct = np.asarray(correct, np.float64).reshape(-1)  # [n]
    require(confidence.shape == correct.shape, "correct", f"{correct.size} values",
            f"one per confidence ({confidence.size})")
    require(confidence.size > 0, "confidence", "[]", "at least one prediction")
    require(bool(np.all((confidence >= 0) & (confidence <= 1))), "confidence",
            f"values in [{confidence.min():g}, {confidence.max():g}]", "numbers in [0, 1]")
    require(bool(np.all((correct == 0) | (correct == 1))), "correct", np.unique(correct)[:5].tolist(),
            "booleans or 0/1 values")
    return confidence, correct


def accuracy(correct) -> float:
    """``mean_i c_i``."""
    correct = np.asarray(correct, np.float64).reshape(-1)  # [n]
    require(correct.size > 0, "correct", "[]", "at least one prediction")
    return float(correct.mean())


def brier_score(confidence, correct) -> float:
    """``mean_i (q_i − c_i)²``."""
    confidence, correct = _as_pair(confidence, correct)
    return float(np.mean((confidence - correct) ** 2))


@dataclasses.dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics, arrays ``[n_bins]``; empty bins have count 0 and NaN means."""

    edges: np.ndarray  # [n_bins + 1]
    count: np.ndarray  # [n_bins]
    mean_confidence: np.ndarray  # [n_bins]
    accuracy: np.ndarray  # [n_bins]


def reliability_bins(confidence, correct, n_bins: int = 10) -> ReliabilityBins:
    """Group predictions into ``n_bins`` equal-width confidence bins: ``b = min(floor(q · n_bins), n_bins − 1)``."""
    require(isinstance(n_bins, int) and n_bins > 0, "n_bins", n_bins, "a positive integer")
    confidence, correct = _as_pair(confidence, correct)
    index = np.minimum(np.floor(confidence * n_bins).astype(np.int64), n_bins - 1)  # [n]
    count = np.bincount(index, minlength=n_bins).astype(np.float64)  # [n_bins]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=n_bins) / count
        bin_accuracy = np.bincount(index, weights=correct, minlength=n_bins) / count
    return ReliabilityBins(edges=np.linspace(0.0, 1.0, n_bins + 1), count=count,
                          mean_confidence=mean_confidence, accuracy=bin_accuracy)


def expected_calibration_error(confidence, correct, n_bins: int = 10) -> float:
    """``Σ_b (n_b / n) |acc_b − conf_b|`` over ``n_bins`` equal-width bins (empty bins add nothing)."""
    bins = reliability_bins(confidence, correct, n_bins)
    filled = bins.count > 0
    gaps = np.abs(bins.accuracy[filled] - bins.mean_confidence[filled])  # [filled bins]
    return float(np.sum(bins.count[filled] * gaps) / np.sum(bins.count))


def auroc(confidence, correct) -> float:
    """Area under the ROC curve of ``q`` predicting correctness (Mann–Whitney U / (n_correct · n_wrong)).

    With average ranks ``r_i`` of the confidences (ties share their mean rank) and ``n₁`` correct answers:
    ``AUROC = (Σ_{i correct} r_i − n₁(n₁ + 1)/2) / (n₁ n₀)``. NaN when ``n₁ = 0`` or ``n₀ = 0``.
    """
    confidence, correct = _as_pair(confidence, correct)
    n_correct = int(correct.sum())
    n_wrong = correct.size - n_correct
    if n_correct == 0 or n_wrong == 0:
        return float("nan")
    order = np.argsort(confidence, kind="mergesort")
    sorted_confidence = confidence[order]  # [n]
    ranks = np.empty(confidence.size)  # [n], 1-based average ranks
    start = 0
    while start < confidence.size:
        stop = start
        while stop + 1 < confidence.size and sorted_confidence[stop + 1] == sorted_confidence[start]:
            stop += 1
        ranks[order[start:stop + 1]] = (start + stop) / 2 + 1
        start = stop + 1
    rank_sum = ranks[correct == 1].sum()
    return float((rank_sum - n_correct * (n_correct + 1) / 2) / (n_correct * n_wrong))


def calibration_summary(confidence, correct, n_bins: int = 10) -> dict[str, float]:
    """``accuracy``, ``ece``, ``brier``, ``auroc`` and ``mean_confidence`` of one set of predictions."""
    confidence, correct = _as_pair(confidence, correct)
    return {
        "accuracy": accuracy(correct),
        "ece": expected_calibration_error(confidence, correct, n_bins),
        "brier": brier_score(confidence, correct),
        "auroc": auroc(confidence, correct),
        "mean_confidence": float(confidence.mean()),
    }


def reliability_diagram(confidence, correct, *, n_bins: int = 10, title: str = "", ax=None):
    """Bars of each bin's accuracy at its position on [0, 1], the diagonal of perfect calibration and the ECE.

    Draws on ``ax`` (a new figure when None) and returns the matplotlib ``Axes``.
    """
    import matplotlib.pyplot as plt

    bins = reliability_bins(confidence, correct, n_bins)
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    width = 1.0 / n_bins
    filled = bins.count > 0
    ax.bar(bins.edges[:-1][filled], bins.accuracy[filled], width=width, align="edge", edgecolor="black",
           alpha=0.7, label="accuracy")
    ax.plot(bins.mean_confidence[filled], bins.accuracy[filled], "o", color="tab:red", label="mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ece = expected_calibration_error(confidence, correct, n_bins)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=f"{title} ECE={ece:.3f}".strip())
    ax.legend(loc="upper left", fontsize="small")
    return ax
