"""What a classifier's logits mean, per problem type (task.problem_type): the training loss, the evaluation loss
and metrics, and the per-example predictions.

| problem type | logits | training loss (summed over examples) | predictions | metrics (shipped `evaluate` modules) |
|---|---|---|---|---|
| single_label | [n, classes] | cross-entropy (x class weight) | argmax, softmax | accuracy, precision, recall, macro / micro F1 |
| multi_label | [n, labels] | binary cross-entropy, mean over labels | sigmoid >= eval.threshold | subset accuracy, micro / macro F1, F1 per label |
| regression | [n, 1] | squared error of standardised targets | the number | MSE, MAE, Pearson, Spearman |

Regression trains on standardised targets, (y - mean) / std over the training split: with Adam, whose steps
are about lr per weight whatever the loss's scale, a head starting near zero cannot grow to outputs of IMDB's
rating spread (std 3.5) in a few hundred steps (measured: predictions stuck at the mean, std 0.05). The model
outputs standardised numbers while it trains; predictions are turned back into the targets' units, and the
export folds mean and std into the head's last layer (`fold_regression_head`), so `best/` predicts in units.

Evaluation works on logits gathered from every rank and put back in example order (harness/evaluation.py), so
every number here is computed on the host from the same arrays on every rank: equal to one process's.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from harness.config import LOWER_IS_BETTER

METRIC_MODULES = {name: Path(__file__).parent / "metrics" / f"{file}.py" for name, file in
                  (("single_label", "classification"), ("multi_label", "multilabel"), ("regression", "regression"))}  # fmt: skip
HF_PROBLEM_TYPES = {"single_label": "single_label_classification", "multi_label": "multi_label_classification",
                    "regression": "regression"}  # fmt: skip
"""transformers' names (config.problem_type): pipelines pick softmax, sigmoid or none by them."""


@functools.cache
def load_metric(module: Path):
    """A metric module shipped with the package (by path: `evaluate.load` of a hub name needs the network),
    loaded once per process, at the first evaluation: importing `evaluate` costs a process about a second."""
    import evaluate

    # evaluate copies the module into its cache under a file lock, so every rank may load it at once;
    # keep_in_memory: predictions are kept in memory, not in Arrow files beside it.
    return evaluate.load(str(module), keep_in_memory=True)


@dataclass(frozen=True)
class Objective:
    problem_type: str
    label_names: tuple[str, ...]
    threshold: float = 0.5
    class_weights: tuple[float, ...] | None = None
    target_mean: float = 0.0
    """regression: the training targets' mean and standard deviation (the model's outputs are standardised)."""
    target_std: float = 1.0

    # -- training --------------------------------------------------------------------------------------------
    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The micro-batch's summed loss (fp32), to be divided by the step's `weight_of` its examples."""
        logits = logits.float()
        if self.problem_type == "single_label":
            weight = None if self.class_weights is None else _weights_on(self.class_weights, logits.device)
            return F.cross_entropy(logits, labels, weight=weight, reduction="sum")
        if self.problem_type == "multi_label":
            return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=-1).sum()
        return F.mse_loss(logits.squeeze(-1), (labels - self.target_mean) / self.target_std, reduction="sum")

    def weight_of(self, labels: np.ndarray) -> float:
        """What a step's summed loss is divided by: its examples, or with class weights their weights' sum (the
        weighted mean torch's cross_entropy takes)."""
        if self.class_weights is None:
            return float(len(labels))
        return float(np.asarray(self.class_weights, dtype=np.float64)[labels].sum())

    # -- evaluation ------------------------------------------------------------------------------------------
    def values(self, logits: np.ndarray) -> np.ndarray:
        """Regression: the predicted numbers, in the targets' units."""
        return logits[:, 0].astype(np.float64) * self.target_std + self.target_mean

    def scores(self, logits: np.ndarray, labels: np.ndarray) -> dict:
        """Loss (unweighted mean per example; regression: MSE in the targets' units) and the problem type's
        metrics, from every example's logits."""
        logits = logits.astype(np.float64)
        metric = load_metric(METRIC_MODULES[self.problem_type])
        if self.problem_type == "single_label":
            log_probs = logits - _logsumexp(logits)
            loss = -log_probs[np.arange(len(labels)), labels].mean()
            scores = metric.compute(predictions=logits.argmax(-1), references=labels, num_labels=len(self.label_names))
        elif self.problem_type == "multi_label":
            # log(1 + e^x) - y x, stably
            loss = (np.logaddexp(0.0, logits) - labels * logits).mean()
            predicted = (_sigmoid(logits) >= self.threshold).astype(np.int8)
            scores = metric.compute(predictions=predicted, references=labels.astype(np.int8),
                                    label_names=list(self.label_names))  # fmt: skip
        else:
            loss = np.mean((self.values(logits) - labels) ** 2)
            scores = metric.compute(predictions=self.values(logits), references=labels)
        return {"loss": float(loss), **scores}

    def predictions(self, logits: np.ndarray, labels: np.ndarray | None = None) -> list[dict]:
        """Per example: the prediction in the labels' terms, with probabilities (classification), and the true
        label when given."""
        logits = logits.astype(np.float64)
        rows = []
        if self.problem_type == "single_label":
            probabilities = np.exp(logits - _logsumexp(logits))
            for p in probabilities:
                rows.append({"prediction": self.label_names[int(p.argmax())], "score": float(p.max()),
                             "probabilities": dict(zip(self.label_names, p.tolist(), strict=True))})  # fmt: skip
        elif self.problem_type == "multi_label":
            for p in _sigmoid(logits):
                rows.append({"prediction": [n for n, q in zip(self.label_names, p, strict=True) if q >= self.threshold],
                             "probabilities": dict(zip(self.label_names, p.tolist(), strict=True))})  # fmt: skip
        else:
            rows = [{"prediction": float(value)} for value in self.values(logits)]
        if labels is not None:
            for row, label in zip(rows, labels, strict=True):
                row["label"] = self.describe(label)
        return rows

    def describe(self, label) -> object:
        """A target in the labels' terms: a name, a list of names, or a number."""
        if self.problem_type == "single_label":
            return self.label_names[int(label)]
        if self.problem_type == "multi_label":
            return [n for n, on in zip(self.label_names, label, strict=True) if on]
        return float(label)


def target_statistics(labels: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of regression targets (std 1 for constant targets)."""
    std = float(np.std(labels))
    return float(np.mean(labels)), std if std > 0 else 1.0


def fold_regression_head(state: dict[str, torch.Tensor], mean: float, std: float) -> dict[str, torch.Tensor]:
    """Weights whose outputs are in the targets' units: the head's last layer (the last [1, k] weight and its
    bias) scaled by std and shifted by mean, so that W'x + b' = (Wx + b) std + mean."""
    last = [key for key, value in state.items() if key.endswith("weight") and value.ndim == 2 and value.shape[0] == 1][
        -1
    ]
    bias = last[: -len("weight")] + "bias"
    folded = dict(state)
    folded[last] = state[last] * std
    folded[bias] = state[bias] * std + mean
    return folded


def unfold_regression_head(model: torch.nn.Module, mean: float, std: float) -> None:
    """In place, the inverse of `fold_regression_head`: a model exported in the targets' units (a previous run's
    best/, evaluated or trained further) made to output standardised numbers again."""
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1][-1]
    with torch.no_grad():
        head.weight.div_(std)
        head.bias.sub_(mean).div_(std)


def pool_windows(logits: np.ndarray, document: np.ndarray, documents: int, how: str) -> np.ndarray:
    """Each text's logits from its windows' (eval.window_pooling): their mean, or their elementwise max."""
    pooled = np.full((documents, logits.shape[1]), -np.inf if how == "max" else 0.0)
    if how == "max":
        np.maximum.at(pooled, document, logits)
        return pooled
    np.add.at(pooled, document, logits)
    return pooled / np.bincount(document, minlength=documents)[:, None]


@functools.cache
def _weights_on(weights: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """Class weights as a tensor on `device`, copied there once: a copy per micro-batch would make the host wait
    for the GPU every step."""
    return torch.tensor(weights, dtype=torch.float32, device=device)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=-1, keepdims=True)
    return top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def is_improvement(value: float, best: float | None, metric: str) -> bool:
    """Whether `value` beats `best`; a non-finite value never does (a NaN from an fp16 overflow would otherwise
    be chosen once and never replaced: every comparison with it is false)."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best
