"""Classification metrics as an `evaluate` module shipped with the package (evaluate.load of a hub name
needs the network; loading this file by path does not)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy, precision, recall, macro F1 and micro F1 of single-label classification."
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted label ids.
    references: true label ids.
    num_labels: number of classes (2 means binary: precision and recall of label 1).
Returns:
    accuracy, precision, recall, f1_macro, f1_micro, and confusion_matrix (rows: true label, columns: predicted).
"""


class Classification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, num_labels=2):
        pred = np.asarray(predictions, dtype=np.int64)
        ref = np.asarray(references, dtype=np.int64)
        classes = np.arange(num_labels)
        tp = np.array([np.sum((pred == c) & (ref == c)) for c in classes], dtype=np.float64)
        fp = np.array([np.sum((pred == c) & (ref != c)) for c in classes], dtype=np.float64)
        fn = np.array([np.sum((pred != c) & (ref == c)) for c in classes], dtype=np.float64)
        precision_c = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
        recall_c = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=(tp + fn) > 0)
        denom = precision_c + recall_c
        f1_c = np.divide(2 * precision_c * recall_c, denom, out=np.zeros_like(tp), where=denom > 0)
        # Binary: the positive class (label 1), as sklearn's average="binary"; otherwise macro averages.
        precision = precision_c[1] if num_labels == 2 else precision_c.mean()
        recall = recall_c[1] if num_labels == 2 else recall_c.mean()
        micro_p = tp.sum() / max(1.0, tp.sum() + fp.sum())
        micro_r = tp.sum() / max(1.0, tp.sum() + fn.sum())
        f1_micro = 0.0 if micro_p + micro_r == 0 else 2 * micro_p * micro_r / (micro_p + micro_r)
        return {
            "accuracy": float(np.mean(pred == ref)) if len(ref) else 0.0,
            "precision": float(precision),
            "recall": float(recall),
            "f1_macro": float(f1_c.mean()),
            "f1_micro": float(f1_micro),
            "confusion_matrix": [[int(np.sum((ref == t) & (pred == p))) for p in classes] for t in classes],
        }
