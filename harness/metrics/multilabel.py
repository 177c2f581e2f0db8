"""Multi-label classification metrics as an `evaluate` module shipped with the package (loaded by path)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Subset accuracy, micro and macro F1, and F1 per label of multi-label classification."
_KWARGS_DESCRIPTION = """
Args:
    predictions: 0/1 rows, one column per label.
    references: 0/1 rows, one column per label.
    label_names: the labels' names, in column order.
Returns:
    subset_accuracy (every label right), f1_micro, f1_macro, and f1_per_label {name: F1}.
"""


class MultiLabel(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int8")),
                    "references": datasets.Sequence(datasets.Value("int8")),
                }
            ),  # fmt: skip
        )

    def _compute(self, predictions, references, label_names=None):
        pred = np.asarray(predictions, dtype=bool)
        ref = np.asarray(references, dtype=bool)
        tp = (pred & ref).sum(axis=0).astype(np.float64)
        fp = (pred & ~ref).sum(axis=0).astype(np.float64)
        fn = (~pred & ref).sum(axis=0).astype(np.float64)
        denominator = 2 * tp + fp + fn
        per_label = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
        micro_denominator = 2 * tp.sum() + fp.sum() + fn.sum()
        names = label_names or [str(i) for i in range(pred.shape[1])]
        return {
            "subset_accuracy": float(np.mean(np.all(pred == ref, axis=1))) if len(ref) else 0.0,
            "f1_micro": float(2 * tp.sum() / micro_denominator) if micro_denominator else 0.0,
            "f1_macro": float(per_label.mean()),
            "f1_per_label": {name: float(f) for name, f in zip(names, per_label, strict=True)},
        }
