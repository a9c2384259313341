"""Calibration metrics against hand-computed values, brute-force definitions and scikit-learn."""

import itertools

import numpy as np
import pytest

from jaxlm.errors import ConfigError
from jaxlm.metrics import (accuracy, auroc, brier_score, calibration_summary, expected_calibration_error,
                           reliability_bins, reliability_diagram)


def test_hand_computed_values():
    confidence = [0.05, 0.15, 0.15, 0.95, 1.0]
    correct = [0, 1, 0, 1, 1]
    # Bins: {0.05: wrong} gap .05; {0.15, 0.15: one right} gap |.5 − .15| = .35 twice; {0.95, 1.0} gap .025 twice.
    assert expected_calibration_error(confidence, correct) == pytest.approx((0.05 + 2 * 0.35 + 2 * 0.025) / 5)
    assert brier_score(confidence, correct) == pytest.approx((0.05**2 + 0.85**2 + 0.15**2 + 0.05**2 + 0) / 5)
    assert accuracy(correct) == pytest.approx(0.6)
    # Pairs (right, wrong): 0.15>0.05, 0.15=0.15 (½), 0.95 and 1.0 beat both → (1 + .5 + 4) / 6.
    assert auroc(confidence, correct) == pytest.approx(5.5 / 6)


def test_ece_and_auroc_match_brute_force_definitions_on_random_inputs():
    rng = np.random.default_rng(0)
    confidence = np.round(rng.random(300), 2)  # rounding makes ties
    correct = rng.random(300) < confidence
    gaps = 0.0
    for b in range(10):
        low, high = b / 10, (b + 1) / 10
        members = [i for i, q in enumerate(confidence) if low <= q < high or (b == 9 and q == 1.0)]
        if members:
            gaps += len(members) * abs(correct[members].mean() - confidence[members].mean())
    assert expected_calibration_error(confidence, correct) == pytest.approx(gaps / 300)
    right, wrong = confidence[correct], confidence[~correct]
    pairs = [1.0 if r > w else 0.5 if r == w else 0.0 for r, w in itertools.product(right, wrong)]
    assert auroc(confidence, correct) == pytest.approx(np.mean(pairs))
    bins = reliability_bins(confidence, correct, n_bins=5)
    assert bins.count.sum() == 300 and bins.edges.tolist() == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])


def test_against_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    confidence = np.round(rng.random(200), 1)
    correct = rng.random(200) < 0.6
    assert auroc(confidence, correct) == pytest.approx(sklearn_metrics.roc_auc_score(correct, confidence))
    assert brier_score(confidence, correct) == pytest.approx(sklearn_metrics.brier_score_loss(correct, confidence))


def test_perfectly_calibrated_bins_have_zero_ece_and_summary_keys():
    confidence = [0.25] * 4 + [0.75] * 4
    correct = [1, 0, 0, 0, 1, 1, 1, 0]
    summary = calibration_summary(confidence, correct)
    assert summary["ece"] == pytest.approx(0.0)
    assert summary["mean_confidence"] == pytest.approx(0.5) and summary["accuracy"] == pytest.approx(0.5)
    assert np.isnan(auroc([0.2, 0.9], [1, 1]))


@pytest.mark.parametrize("confidence, correct, match", [
    ([0.5, 1.2], [1, 0], "numbers in \\[0, 1\\]"),
    ([0.5], [1, 0], "one per confidence"),
    ([0.5, 0.4], [1, 2], "0/1"),
    ([], [], "at least one"),
])
def test_bad_inputs_are_rejected(confidence, correct, match):
    with pytest.raises(ConfigError, match=match):
        brier_score(confidence, correct)


def test_reliability_diagram_draws_the_bins():
    import matplotlib

    matplotlib.use("Agg")
    ax = reliability_diagram([0.1, 0.15, 0.9], [0, 1, 1], title="toy")
    assert len(ax.patches) == 2  # two non-empty bins
    assert "ECE=" in ax.get_title()
