"""What an exported classifier needs to read raw text the way it was trained: written as `harness.json` beside
the weights in `best/` and `final/`, applied by default by harness/predict.py.

A plain Hugging Face model folder (no harness.json) is served as transformers would: head truncation at the
model's limit, softmax over the classes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.config import ExperimentConfig

SERVING_FILE = "harness.json"


@dataclass(frozen=True)
class ServingSpec:
    problem_type: str
    labels: list[str]
    """Class names in output order (regression: none)."""
    max_length: int
    truncation: str
    head_tokens: int
    text_column: str
    text_pair_column: str | None
    """Set for a model trained on text pairs: the JSON field (and data column) of the second text."""
    threshold: float
    """multi_label: the probability from which a label is predicted."""
    long_documents: str
    """How the run read validation and test texts: truncate, or windows."""
    window_stride: int
    window_pooling: str
    batch_size: int
    """The run's evaluation batch size: served in the same length-sorted batches, the outputs are the run's."""

    @classmethod
    def of(cls, cfg: ExperimentConfig, labels: list[str]) -> ServingSpec:
        d, e = cfg.data, cfg.eval
        return cls(cfg.task.problem_type, labels, d.max_length, d.truncation, d.head_tokens, d.text_column,
                   d.text_pair_column, e.threshold, e.long_documents, e.window_stride, e.window_pooling,
                   e.batch_size)  # fmt: skip

    def write(self, folder: Path) -> None:
        (folder / SERVING_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, folder: Path) -> ServingSpec | None:
        path = Path(folder) / SERVING_FILE
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: unreadable ({exc}); re-export the model or remove the file") from exc
