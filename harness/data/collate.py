"""Dynamic padding: each batch is padded to its own longest example only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PadCollator:
    pad_token_id: int
    pad_to_multiple_of: int | None = None
    """Round the padded length up (8 suits GPU tensor cores; None pads to the exact longest)."""

    def __call__(self, examples: list[tuple[int, np.ndarray, int]]) -> dict[str, torch.Tensor]:
        longest = max(len(ids) for _, ids, _ in examples)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
        for row, (_, ids, _) in enumerate(examples):
            input_ids[row, : len(ids)] = torch.from_numpy(np.asarray(ids, dtype=np.int64))
            attention_mask[row, : len(ids)] = 1
        return {
            "input_ids": input_ids,  # [batch, longest]
            "attention_mask": attention_mask,  # [batch, longest], 1 for real tokens
            "labels": torch.tensor([label for _, _, label in examples], dtype=torch.long),
            "index": torch.tensor([index for index, _, _ in examples], dtype=torch.long),
        }
