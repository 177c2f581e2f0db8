"""Regression metrics as an `evaluate` module shipped with the package (loaded by path)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Mean squared and absolute error, Pearson and Spearman correlation of predicted numbers."
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted numbers.
    references: true numbers.
Returns:
    mse, mae, pearson, spearman (Spearman: Pearson of the ranks, ties sharing their average rank; a correlation
    with a constant side is 0).
"""


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values get the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


class Regression(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),  # fmt: skip
        )

    def _compute(self, predictions, references):
        pred = np.asarray(predictions, dtype=np.float64)
        ref = np.asarray(references, dtype=np.float64)
        error = pred - ref
        return {
            "mse": float(np.mean(error**2)),
            "mae": float(np.mean(np.abs(error))),
            "pearson": _pearson(pred, ref),
            "spearman": _pearson(_ranks(pred), _ranks(ref)),
        }
