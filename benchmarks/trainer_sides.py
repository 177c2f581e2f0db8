"""The two Hugging Face Trainer sides, on the harness's examples and token ids, from the same saved weights:

* ``trainer-best``: dynamic padding (``DataCollatorWithPadding``), length-grouped sampling
  (``train_sampling_strategy="group_by_length"``), on CUDA padding to a multiple of 8;
* ``trainer-default``: every example padded to max_length (what ``tokenizer(..., padding="max_length")``
  gives), random sampling.

Both carry the experiment's hyperparameters (transformers 5 names) and count the tokens their collator hands
out, so padding is measured rather than estimated.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from benchmarks.sides import ChildSpec, SideResult, peak_memory_mib
from benchmarks.workloads import data_fingerprint, pad_multiple, tokenized_splits
from harness.config import ExperimentConfig, load_config
from harness.families import family_of

if TYPE_CHECKING:
    from harness.data.tokenize import TokenizedSplit


class CountingCollator:
    """Wraps a collator and counts the tokens it hands out: all of them, and the real (unmasked) ones."""

    def __init__(self, inner: Callable[[list], dict[str, Any]]) -> None:
        self.inner = inner
        self.real_tokens = 0
        self.padded_tokens = 0

    def __call__(self, features: list) -> dict[str, Any]:
        batch = self.inner(features)
        self.real_tokens += int(batch["attention_mask"].sum())
        self.padded_tokens += batch["input_ids"].numel()
        return batch


def as_hf_dataset(split: TokenizedSplit, pad_to: int | None, pad_id: int):
    """A `datasets.Dataset` of the harness's token ids, as a Trainer user would hold it: input_ids,
    attention_mask, label; padded to `pad_to` (what `tokenizer(..., padding="max_length")` gives) or not."""
    import datasets

    ids = [row.tolist() for row in split.input_ids]
    mask = [[1] * len(row) for row in ids]
    if pad_to is not None:
        mask = [m + [0] * (pad_to - len(m)) for m in mask]
        ids = [row + [pad_id] * (pad_to - len(row)) for row in ids]
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": mask, "label": split.labels.tolist()})


def trainer_arguments(cfg: ExperimentConfig, spec: ChildSpec, best: bool):
    """TrainingArguments carrying the experiment's hyperparameters (transformers 5 names)."""
    from transformers import TrainingArguments

    from harness.optim import warmup_steps

    t = cfg.train
    scheduler = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[t.scheduler]
    return TrainingArguments(
        output_dir=spec.out_dir,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=cfg.eval.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=scheduler,
        # transformers 5 dropped warmup_ratio: the same integer the harness derives from it.
        warmup_steps=warmup_steps(t, spec.total_steps),
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_eps,
        max_grad_norm=t.max_grad_norm,
        optim="adamw_torch_fused",  # the harness's optimizer (also the Trainer's default on torch >= 2.8)
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        use_cpu=spec.device == "cpu",
        train_sampling_strategy="group_by_length" if best else "random",
        dataloader_num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        eval_strategy="no",  # like the harness's timed span: no validation while training
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=cfg.logging.every_steps,
        report_to="none",
        disable_tqdm=True,
    )


def run_trainer_side(spec: ChildSpec, best: bool) -> SideResult:
    """The Trainer on the harness's examples and token ids, from the same saved initial weights."""
    import numpy as np
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
    )
    from transformers.utils import logging as hf_logging

    from harness.model import model_class, resolve_attention

    hf_logging.set_verbosity_warning()
    cfg = load_config(spec.config, spec.overrides)
    if cfg.data.num_workers:
        raise SystemExit("the Trainer sides count tokens in the collator: run them with data.num_workers=0")
    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    train, test = tokenized_splits(cfg, tokenizer)
    train_ds = as_hf_dataset(train, None if best else cfg.data.max_length, tokenizer.pad_token_id)
    # Test: longest first with dynamic padding on both Trainer sides; evaluation is not timed, and the same
    # inputs make the accuracies compare the trained models only.
    by_length = np.argsort(-test.lengths, kind="stable")
    test_ds = as_hf_dataset(test, None, tokenizer.pad_token_id).select(by_length.tolist())

    # The attention kernel the harness resolves for this model (model.attn_implementation may be `auto`).
    config = AutoConfig.from_pretrained(spec.model_dir)
    attention = resolve_attention(cfg.model.attn_implementation, model_class("classifier", config), config)
    model = AutoModelForSequenceClassification.from_pretrained(
        spec.model_dir, attn_implementation=attention, dtype=torch.float32
    )
    # Tensor-core friendly shapes on a GPU are a best practice the harness follows too.
    multiple = pad_multiple(spec.device) if best else None
    collator = CountingCollator(DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple))

    class TrainClock(TrainerCallback):
        """Times the training loop only: after dataloader and optimizer setup, until the last step."""

        start = end = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            if spec.device == "cuda":
                torch.cuda.synchronize()  # host sync: the last step's kernels finish inside the timed span
            self.end = time.perf_counter()

    clock = TrainClock()
    trainer = Trainer(model=model, args=trainer_arguments(cfg, spec, best), train_dataset=train_ds,
                      data_collator=collator, processing_class=tokenizer, callbacks=[clock])  # fmt: skip
    trainer.train()
    steps = trainer.state.global_step
    if steps != spec.total_steps:
        raise RuntimeError(f"the Trainer ran {steps} optimizer steps, the harness plan has {spec.total_steps}")
    trainer.data_collator = DataCollatorWithPadding(tokenizer)
    prediction = trainer.predict(test_ds)
    predicted = np.asarray(prediction.predictions).argmax(axis=-1)
    references = np.asarray(prediction.label_ids)
    if len(references) != len(test):
        raise RuntimeError(f"the Trainer predicted {len(references)} of {len(test)} test examples")
    return SideResult(
        side=spec.side,
        train_seconds=clock.end - clock.start,
        train_examples=len(train) * cfg.train.epochs,
        real_tokens=collator.real_tokens,
        padded_tokens=collator.padded_tokens,
        optimizer_steps=steps,
        test_accuracy=float((predicted == references).mean()),
        test_samples=len(references),
        peak_memory_mib=peak_memory_mib(spec.device),
        data_sha256=data_fingerprint(train, test),
        extra={
            "trainer_train_runtime": trainer.state.log_history[-1].get("train_runtime"),
            "mixed_precision": str(trainer.accelerator.mixed_precision),
            "warmup_steps": trainer.args.warmup_steps,
            # The encoder's dropout under its family's own names (DistilBERT and ModernBERT have no hidden_dropout_prob).
            **{key: getattr(model.config, key) for key in family_of(model).dropout_keys},
        },
    )
