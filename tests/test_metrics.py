"""Metrics against scikit-learn / SciPy references and hand-computed entity F1."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from metalm.tasks import metrics

SEEDS = [0, 1, 2, 3, 4]


def _labels(seed: int, n: int, classes: int, agree: float = 0.6):
    rng = np.random.default_rng(seed)
    refs = rng.integers(0, classes, size=n)
    noise = rng.integers(0, classes, size=n)
    preds = np.where(rng.random(n) < agree, refs, noise)  # correlated but imperfect
    return preds, refs


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_metrics_match_sklearn(seed):
    preds, refs = _labels(seed, 200, 2)
    assert metrics.accuracy(preds, refs) == pytest.approx(accuracy_score(refs, preds), abs=1e-12)
    assert metrics.f1(preds, refs) == pytest.approx(f1_score(refs, preds), abs=1e-12)
    assert metrics.f1(preds, refs, positive=0) == pytest.approx(f1_score(refs, preds, pos_label=0), abs=1e-12)
    assert metrics.matthews(preds, refs) == pytest.approx(matthews_corrcoef(refs, preds), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("classes", [3, 5])
def test_multiclass_metrics_match_sklearn(seed, classes):
    preds, refs = _labels(seed, 300, classes)
    assert metrics.accuracy(preds, refs) == pytest.approx(accuracy_score(refs, preds), abs=1e-12)
    assert metrics.macro_f1(preds, refs) == pytest.approx(f1_score(refs, preds, average="macro"), abs=1e-12)
    assert metrics.matthews(preds, refs) == pytest.approx(matthews_corrcoef(refs, preds), abs=1e-12)


def test_macro_f1_counts_a_class_only_predicted():
    # class 2 never occurs in the references but is predicted: sklearn averages over it (F1 0).
    preds, refs = [0, 1, 2, 1, 0], [0, 1, 1, 1, 0]
    assert metrics.macro_f1(preds, refs) == pytest.approx(f1_score(refs, preds, average="macro"))
    assert metrics.macro_f1(preds, refs) == pytest.approx((1 + 0.8 + 0) / 3)


def test_degenerate_cases():
    # a constant predictor: sklearn returns 0 for MCC; no positives at all: F1 0
    refs = [0, 1, 1, 0, 1]
    assert metrics.matthews([1] * 5, refs) == pytest.approx(matthews_corrcoef(refs, [1] * 5)) == 0.0
    assert metrics.f1([0, 0, 0], [0, 0, 0]) == 0.0
    assert metrics.matthews(refs, refs) == pytest.approx(1.0)
    assert metrics.matthews([1 - r for r in refs], refs) == pytest.approx(-1.0)
    assert metrics.pearson([1.0, 1.0, 1.0], [0.0, 1.0, 2.0]) == 0.0
    assert metrics.spearman([0.0, 1.0, 2.0], [3.0, 3.0, 3.0]) == 0.0
    # The "constant mean" reference: many copies of a mean whose std comes out as 4e-16, not 0
    # (the xue study's STS-B row printed nan from this before).
    constant = [2.7] * 1500
    assert np.asarray(constant).std() > 0
    assert metrics.pearson(constant, np.linspace(0, 5, 1500)) == 0.0
    assert metrics.spearman(constant, np.linspace(0, 5, 1500)) == 0.0


@pytest.mark.parametrize("seed", SEEDS)
def test_correlations_match_scipy(seed):
    rng = np.random.default_rng(seed)
    refs = rng.uniform(0, 5, size=150)
    preds = refs + rng.normal(0, 1.5, size=150)
    preds[:10] = preds[:10] ** 2  # some non-linearity so Pearson and Spearman differ
    assert metrics.pearson(preds, refs) == pytest.approx(stats.pearsonr(preds, refs)[0], abs=1e-12)
    assert metrics.spearman(preds, refs) == pytest.approx(stats.spearmanr(preds, refs)[0], abs=1e-12)
    assert metrics.pearson(preds, refs) != pytest.approx(metrics.spearman(preds, refs), abs=1e-6)


def test_spearman_handles_ties_like_scipy():
    preds = [1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0]
    refs = [0.5, 1.0, 3.0, 2.0, 4.0, 4.0, 1.0]
    assert metrics.spearman(preds, refs) == pytest.approx(stats.spearmanr(preds, refs)[0], abs=1e-12)


def test_entity_spans():
    assert metrics.entity_spans(["B-PER", "I-PER", "O", "B-LOC"]) == {(0, 2, "PER"), (3, 4, "LOC")}
    # an I- without a B- starts a span; an I- of another type starts a new one
    assert metrics.entity_spans(["I-PER", "I-PER", "O", "B-LOC", "I-ORG", "I-ORG"]) == {
        (0, 2, "PER"), (3, 4, "LOC"), (4, 6, "ORG")}
    # B- right after B- of the same type: two entities; a span running to the end is closed
    assert metrics.entity_spans(["B-PER", "B-PER", "I-PER"]) == {(0, 1, "PER"), (1, 3, "PER")}
    assert metrics.entity_spans(["O", "O"]) == set()
    # types with a hyphen (WNUT's geo-loc) keep their full name
    assert metrics.entity_spans(["B-geo-loc", "I-geo-loc"]) == {(0, 2, "geo-loc")}


def test_entity_f1_hand_computed():
    # gold: PER (0-2), LOC (3-4), ORG (5-6) = 3 entities
    gold = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG"]]
    # predicted: PER (0-2) exact; (3-4) with the wrong type = 2 entities, 1 correct
    pred = [["B-PER", "I-PER", "O", "B-ORG", "O", "O"]]
    assert metrics.entity_f1(pred, gold) == pytest.approx(2 * 1 / (3 + 2))
    # a span with the wrong boundary earns nothing; micro-averaged over sentences
    pred2 = [["B-PER", "O", "O", "B-LOC", "O", "B-ORG"], ["B-MISC", "I-MISC"]]
    gold2 = gold + [["B-MISC", "I-MISC"]]
    # gold 3 + 1 = 4, predicted 3 + 1 = 4, correct LOC, ORG, MISC = 3 -> 2*3/8
    assert metrics.entity_f1(pred2, gold2) == pytest.approx(0.75)
    assert metrics.entity_f1([["O"]], [["O"]]) == 0.0


def test_compute_runs_named_metrics_in_order():
    out = metrics.compute(["f1", "accuracy"], [1, 0, 1, 1], [1, 0, 0, 1])
    assert list(out) == ["f1", "accuracy"]
    assert out == {"f1": pytest.approx(0.8), "accuracy": pytest.approx(0.75)}
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        metrics.compute(["bleu"], [0], [0])
