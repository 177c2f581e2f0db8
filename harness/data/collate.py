"""Dynamic padding: each batch is padded to its own longest example only."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch


def pad_rows(rows: list[np.ndarray], pad_value: int, multiple: int | None = None) -> torch.Tensor:
    """Stack 1-d integer rows into [batch, longest], filling with `pad_value`; the length is rounded up to
    `multiple` when given."""
    longest = max(len(row) for row in rows)
    if multiple:
        longest = -(-longest // multiple) * multiple
    out = torch.full((len(rows), longest), pad_value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.from_numpy(np.asarray(row, dtype=np.int64))
    return out


def attention_mask_for(rows: list[np.ndarray], width: int) -> torch.Tensor:
    """[batch, width]: 1 for the real tokens of each row, 0 for padding."""
    return (torch.arange(width)[None, :] < torch.tensor([len(row) for row in rows])[:, None]).long()


@dataclass
class PadCollator:
    pad_token_id: int
    pad_to_multiple_of: int | None = None
    """Round the padded length up (8 suits GPU tensor cores; None pads to the exact longest)."""
    field_collators: dict[str, Callable[[list], torch.Tensor]] = field(default_factory=dict)
    """How other modalities' fields become batch tensors, by field name (default: stack_rows)."""

    def __call__(self, examples: list[tuple]) -> dict[str, torch.Tensor]:
        """Examples are (index, ids, label) or (index, ids, label, {field: row}) (see TokenizedSplit)."""
        rows = [example[1] for example in examples]
        input_ids = pad_rows(rows, self.pad_token_id, self.pad_to_multiple_of)
        return {
            "input_ids": input_ids,  # [batch, longest]
            "attention_mask": attention_mask_for(rows, input_ids.shape[1]),  # [batch, longest], 1 for real tokens
            "labels": label_batch([example[2] for example in examples]),
            "index": torch.tensor([example[0] for example in examples], dtype=torch.long),
            **self.collate_fields(examples),
        }

    def collate_fields(self, examples: list[tuple]) -> dict[str, torch.Tensor]:
        """The examples' other fields (their 4th item): token types of pairs, padded like the ids; other
        modalities' fields, one batch tensor each."""
        if len(examples[0]) < 4:
            return {}
        collators = {"token_type_ids": lambda rows: pad_rows(rows, 0, self.pad_to_multiple_of), **self.field_collators}
        return {name: collators.get(name, stack_rows)([example[3][name] for example in examples])
                for name in examples[0][3]}  # fmt: skip


def label_batch(labels: list) -> torch.Tensor:
    """[batch] int64 class ids, [batch] float32 numbers, or [batch, labels] float32 multi-hot rows."""
    array = np.asarray(labels)
    return torch.from_numpy(array.astype(np.int64 if np.issubdtype(array.dtype, np.integer) else np.float32))


def stack_rows(rows: list[np.ndarray]) -> torch.Tensor:
    """Fixed-size rows (feature vectors, images) -> [batch, *row shape]."""
    return torch.from_numpy(np.stack(rows))
