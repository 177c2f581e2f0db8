"""Masked-language-model pre-training's task: the corpus, whole-word masking, cross-entropy per masked token.

Masking is a pure function of (seed, epoch, example index): every rank can count the masked tokens of a whole
global step without communicating, so the step's loss is averaged over exactly its masked tokens whatever the
world size and accumulation; a resumed run masks the same tokens; validation masks are fixed across epochs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from harness.config import MLMConfig, PretrainConfig
from harness.data import prepare_pretraining_splits
from harness.data.collate import attention_mask_for, pad_rows
from harness.data.tokenize import NO_WORD, TokenizedSplit, tokenize_split
from harness.evaluation import gather_example_records, model_inputs
from harness.model import IGNORE, load_model
from harness.tasks import Evaluation, TaskSetup

EVAL_EPOCH = 2**31 - 1
"""Mask stream for validation: the same masks at every evaluation."""


class WholeWordMasker:
    """BERT's masking, optionally by whole words: pick words until ~mask_probability of the tokens are
    covered; of the picked tokens 80% become [MASK], 10% a random token, 10% stay (all still predicted)."""

    def __init__(self, cfg: MLMConfig, seed: int, tokenizer, split: TokenizedSplit):
        self.probability = cfg.mask_probability
        self.whole_word = cfg.whole_word_masking
        self.seed = seed
        self.split = split
        self.mask_id = tokenizer.mask_token_id
        self.special_ids = np.asarray(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
        self.random_ids = np.setdiff1d(np.arange(len(tokenizer)), self.special_ids)

    def _rng(self, index: int, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, int(index)])

    def _select(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """Positions to predict, sorted."""
        ids = self.split.input_ids[index]
        words = self.split.word_ids[index] if self.split.word_ids is not None else None
        candidates = np.flatnonzero(
            ~np.isin(ids, self.special_ids) & ((words != NO_WORD) if words is not None else True)
        )
        if len(candidates) == 0:
            return candidates
        if self.whole_word and words is not None:
            # Consecutive candidate tokens with the same word index form one unit.
            starts = np.flatnonzero(np.r_[True, np.diff(words[candidates]) != 0])
            units = np.split(candidates, starts[1:])
        else:
            units = [np.asarray([p]) for p in candidates]
        target = max(1, int(round(len(candidates) * self.probability)))
        chosen, covered = [], 0
        for u in rng.permutation(len(units)):
            if covered + len(units[u]) > target:
                continue  # a word that would overshoot is skipped, as in BERT's whole-word masking
            chosen.append(units[u])
            covered += len(units[u])
            if covered == target:
                break
        if not chosen:  # every word is longer than the target (a very short text): take one anyway
            chosen = [units[int(rng.integers(len(units)))]]
        return np.sort(np.concatenate(chosen))

    def count(self, index: int, epoch: int) -> int:
        return len(self._select(index, self._rng(index, epoch)))

    def mask(self, index: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(input ids with masking applied, labels: the original id at predicted positions, IGNORE elsewhere)."""
        rng = self._rng(index, epoch)
        positions = self._select(index, rng)
        ids = np.array(self.split.input_ids[index], dtype=np.int64)
        labels = np.full(len(ids), IGNORE, dtype=np.int64)
        labels[positions] = ids[positions]
        action = rng.random(len(positions))
        ids[positions[action < 0.8]] = self.mask_id
        randomised = positions[(action >= 0.8) & (action < 0.9)]
        ids[randomised] = rng.choice(self.random_ids, size=len(randomised))
        return ids, labels


@dataclass
class MaskedLMCollator:
    """Masks each example (by index and epoch) and pads the batch to its longest example."""

    masker: WholeWordMasker
    epoch: int
    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[tuple]) -> dict[str, torch.Tensor]:
        masked = [self.masker.mask(example[0], self.epoch) for example in examples]
        input_ids = pad_rows([ids for ids, _ in masked], self.pad_token_id, self.pad_to_multiple_of)
        labels = pad_rows([labels for _, labels in masked], IGNORE, self.pad_to_multiple_of)
        attention_mask = attention_mask_for([ids for ids, _ in masked], input_ids.shape[1])
        predicted = (labels.flatten() != IGNORE).nonzero().squeeze(1)  # here, on the host: no device sync later
        return {
            "input_ids": input_ids,  # [batch, longest], masked
            "attention_mask": attention_mask,  # [batch, longest]
            "labels": labels,  # [batch, longest]: original ids where predicted, IGNORE elsewhere
            "predicted": predicted,  # [predicted]: flat indices of the predicted positions, row-major
            "targets": labels.flatten()[predicted],  # [predicted]: their original ids
            "index": torch.tensor([example[0] for example in examples], dtype=torch.long),
        }


def predicted_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Logits at the batch's predicted positions, [predicted, vocab], in the order of `batch["predicted"]`."""
    return model(**model_inputs(batch), predicted=batch["predicted"]).logits.float()


def masked_lm_scores(model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Per example: summed loss, predicted tokens and correct predictions."""
    labels, targets = batch["labels"], batch["targets"]
    logits = predicted_logits(model, batch)
    rows = batch["predicted"] // labels.shape[1]  # the example of each predicted token
    per_token = F.cross_entropy(logits, targets, reduction="none").double()
    zeros = torch.zeros(len(labels), dtype=torch.float64, device=labels.device)
    return {
        "loss_sum": zeros.index_add(0, rows, per_token),
        "predicted": zeros.index_add(0, rows, torch.ones_like(per_token)),
        "correct": zeros.index_add(0, rows, (logits.argmax(-1) == targets).double()),
    }


@dataclass
class MaskedLMSetup(TaskSetup):
    maskers: dict[str, WholeWordMasker]
    """Per split."""


class MaskedLMTask:
    """Masked-language modelling on train (+ unlabelled) texts; validation on held-out texts; no test split."""

    name = "masked-lm"

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg

    def setup(self, accelerator, place) -> MaskedLMSetup:
        cfg = self.cfg
        tokenizer, model = load_model(cfg.model, "masked-lm", seed=cfg.seed)
        texts = prepare_pretraining_splits(cfg)
        # Every rank at once: one fills each cache entry under its lock, the others wait for it and read it.
        splits = {
            name: tokenize_split(split, tokenizer, cfg.data, with_word_ids=cfg.mlm.whole_word_masking)
            for name, split in texts.items()
        }
        maskers = {name: WholeWordMasker(cfg.mlm, cfg.seed, tokenizer, split) for name, split in splits.items()}
        return MaskedLMSetup(tokenizer, model, splits, accelerator, place, None, None, maskers)

    @staticmethod
    def collator(setup: MaskedLMSetup, split: str, epoch: int) -> MaskedLMCollator:
        return MaskedLMCollator(setup.maskers[split], epoch, setup.tokenizer.pad_token_id, setup.place.pad_multiple)

    def train_collator(self, setup: MaskedLMSetup, epoch: int) -> MaskedLMCollator:
        return self.collator(setup, "train", epoch)

    def step_weight(self, setup: MaskedLMSetup, global_step: list[list[int]], epoch: int) -> int:
        """The loss of a step is averaged over its predicted tokens (all micro-batches on all ranks)."""
        masker = setup.maskers["train"]
        return sum(masker.count(i, epoch) for micro_batch in global_step for i in micro_batch)

    def loss_sum(self, setup: MaskedLMSetup, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return F.cross_entropy(predicted_logits(model, batch), batch["targets"], reduction="sum")

    def evaluate(self, setup: MaskedLMSetup, model: torch.nn.Module, split: str,
                 interrupt: Callable[[], None] | None = None) -> Evaluation:  # fmt: skip
        records = gather_example_records(
            model, setup.splits[split], self.collator(setup, split, EVAL_EPOCH), setup.accelerator,
            self.cfg.eval.batch_size, masked_lm_scores, self.cfg.data.num_workers, setup.place.pin_memory, interrupt,
        )  # fmt: skip
        predicted = records["predicted"].sum()
        loss = float(records["loss_sum"].sum() / predicted)
        return Evaluation({
            "loss": loss,
            "accuracy": float(records["correct"].sum() / predicted),
            "perplexity": float(np.exp(loss)),
            "predicted_tokens": int(predicted),
            "samples": len(setup.splits[split]),
        })  # fmt: skip

    @staticmethod
    def summary(scores: dict) -> str:
        return (
            f"loss {scores['loss']:.4f} masked-token accuracy {scores['accuracy']:.4f} "
            f"perplexity {scores['perplexity']:.2f}"
        )
