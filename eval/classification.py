"""Classification metrics as pure functions of predicted and true class ids.

Accuracy for every task; macro-F1 for imbalanced multi-class tasks (TREC-6); Matthews correlation for
binary tasks with skewed classes (CoLA-style, also informative on RTE). MCC is the multi-class form
(Gorodkin 2004), equal to the usual binary formula with two classes.
"""

from __future__ import annotations

import numpy as np


def confusion(predicted, actual, num_labels: int) -> np.ndarray:
    """(num_labels, num_labels) counts, rows = true class, columns = predicted class."""
    counts = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(counts, (np.asarray(actual, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return counts


def accuracy(counts: np.ndarray) -> float:
    return float(np.trace(counts) / max(counts.sum(), 1))


def macro_f1(counts: np.ndarray) -> float:
    """Mean per-class F1 over the classes that occur in the labels or the predictions (scikit-learn's
    `f1_score(average="macro")`); a class absent from both would otherwise count as a meaningless 0."""
    tp = np.diag(counts).astype(np.float64)
    predicted, actual = counts.sum(0), counts.sum(1)
    present = (predicted + actual) > 0
    f1 = np.divide(2 * tp, predicted + actual, out=np.zeros_like(tp), where=(predicted + actual) > 0)
    return float(f1[present].mean()) if present.any() else 0.0


def matthews(counts: np.ndarray) -> float:
    c = counts.astype(np.float64)
    total, correct = c.sum(), np.trace(c)
    predicted, actual = c.sum(0), c.sum(1)
    numerator = correct * total - predicted @ actual
    denominator = np.sqrt(total**2 - predicted @ predicted) * np.sqrt(total**2 - actual @ actual)
    return float(numerator / denominator) if denominator > 0 else 0.0


def classification_metrics(predicted, actual, num_labels: int) -> dict[str, float]:
    counts = confusion(predicted, actual, num_labels)
    return {"accuracy": accuracy(counts), "macro_f1": macro_f1(counts), "mcc": matthews(counts)}
