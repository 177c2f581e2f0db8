"""Typed experiment configuration: defaults < YAML file < dotted ``key=value`` overrides.

Every section is a dataclass whose fields carry a one-line docstring (the string right below the field).
Unknown keys, wrong types and impossible values are collected and reported together as a `ConfigError`
that names each key and, for a typo, the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config problem a user must fix; the message names every offending key."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"invalid {source}:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class ModelConfig:
    name_or_path: str = "bert-base-uncased"
    """Hub id, local folder, a previous run's `best/`, or `builtin:tiny-bert` / `builtin:all-minilm-l6-v2`."""
    dropout: float | None = None
    """Encoder dropout (hidden and attention probabilities); null keeps the checkpoint's."""
    classifier_dropout: float | None = None
    """Dropout before the classification head; null keeps the checkpoint's hidden dropout."""
    freeze_embeddings: bool = False
    """Freeze the embedding layer."""
    freeze_layers: int = 0
    """Freeze the first K encoder layers."""
    freeze_encoder: bool = False
    """Freeze the whole encoder and train the head only."""
    attn_implementation: Literal[
        "auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"
    ] = "auto"
    """Attention kernel: auto (PyTorch's scaled_dot_product_attention where the family supports it, else eager;
    logged), or one by name (an error where the family or the installed packages cannot provide it)."""
    trust_remote_code: bool = False
    """Run the model's own code (a config with an auto_map); the only way such models load. Read the code first."""
    modalities: list[str] = field(default_factory=lambda: ["text"])
    """Encoders the classifier fuses, by registered name (text, tabular, ...); [text] is a plain classifier."""
    fusion_hidden: int = 128
    """Width of the fusion head and of non-text encoders' outputs (when modalities is not just [text])."""
    modules: list[str] = field(default_factory=list)
    """Python modules imported first: they register their own modalities (harness.multimodal)."""


@dataclass
class TaskConfig:
    problem_type: Literal["single_label", "multi_label", "regression"] = "single_label"
    """single_label: one class per example (cross-entropy); multi_label: any subset of data.labels (BCE); regression:
    one number per example (MSE)."""


@dataclass
class DataConfig:
    source: Literal["imdb", "hub", "path", "synthetic"] = "imdb"
    """Where the data comes from: the hub's stanfordnlp/imdb, any hub dataset (`data.dataset`), a local folder
    (`data.path`), or built-in synthetic reviews."""
    path: str | None = None
    """For source=path: an aclImdb folder, or a folder with train.* and test.* (parquet, csv, jsonl)."""
    dataset: str | None = None
    """For source=hub: the dataset id (or a local folder laid out like a hub dataset repository)."""
    dataset_config: str | None = None
    """For source=hub: the dataset's configuration (subset) name, if it has several."""
    train_split: str = "train"
    """For source=hub: the split to train on."""
    test_split: str = "test"
    """For source=hub: the split to test on."""
    validation_split: str | None = None
    """For source=hub: a split to validate on; null carves data.validation_size examples from train."""
    text_column: str = "text"
    """Column holding the text."""
    text_pair_column: str | None = None
    """Column holding the second text of a pair (NLI, paraphrase); tokenized as a pair, the longer side cut first."""
    label_column: str = "label"
    """Column holding the label: a class (name or id), a list of class names (multi_label), or a number (regression)."""
    label_columns: list[str] = field(default_factory=list)
    """multi_label only: one 0/1 column per label instead of label_column; the column names are the label names."""
    labels: list[str] = field(default_factory=lambda: ["neg", "pos"])
    """Label names in id order; integer labels index this list, string labels must be in it (not for regression)."""
    max_length: int = 512
    """Tokens per example, special tokens included."""
    truncation: Literal["head", "tail", "head_tail"] = "head"
    """Which tokens a long text keeps: the first, the last, or the first `head_tokens` plus the last."""
    head_tokens: int = 128
    """For truncation=head_tail: tokens kept from the start (the rest come from the end)."""
    validation_size: int = 5000
    """Examples carved from train (stratified, seeded) for validation."""
    max_train_samples: int | None = None
    """Cap on training examples (after the validation split); null for all."""
    max_eval_samples: int | None = None
    """Cap on validation and on test examples; null for all."""
    synthetic_train_size: int = 2000
    """For source=synthetic: number of train examples generated."""
    synthetic_test_size: int = 500
    """For source=synthetic: number of test examples generated."""
    cache_dir: str = "~/.cache/harness"
    """Folder for tokenized datasets; keyed by data, tokenizer and length settings."""
    bucket_size_multiplier: int = 50
    """Length bucketing window, in optimizer steps: examples are sorted by length within windows this big."""
    num_workers: int = 0
    """DataLoader worker processes."""
    feature_columns: list[str] = field(default_factory=list)
    """Numeric columns read beside text and label (Parquet/CSV/JSONL), for the `tabular` modality."""


@dataclass
class TrainConfig:
    epochs: int = 3
    """Passes over the training data (ignored when max_steps > 0 is reached first)."""
    max_steps: int = -1
    """Optimizer steps to run: -1 runs `epochs`; 0 only evaluates the initial model."""
    batch_size: int = 16
    """Examples per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step per process."""
    max_tokens_per_batch: int = 0
    """Token budget per micro-batch (examples x longest, padding included): the batch size adapts to length;
    batch_size then only sizes the sorting window. 0: off."""
    lr: float = 2e-5
    """Peak learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay (never applied to biases and LayerNorm weights)."""
    layer_lr_decay: float = 1.0
    """Layer-wise learning-rate decay: the head gets train.lr, encoder layer k of L (bottom k = 0) lr x decay^(L-k),
    the embeddings lr x decay^(L+1); 1.0 is off. The rates used are logged once per run."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warmup."""
    warmup_ratio: float = 0.1
    """Fraction of optimizer steps spent warming up (used when warmup_steps is 0)."""
    warmup_steps: int = 0
    """Warmup steps; overrides warmup_ratio when > 0."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    class_weights: list[float] | Literal["balanced"] | None = None
    """single_label only: per-class loss weights in data.labels order, or `balanced` (n / (classes x count) from the
    training split); the loss is the weighted mean, as torch's cross_entropy computes it."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Mixed precision: auto is bf16 on GPUs that support it (fp16 on older ones), bf16 on CPUs with native bf16,
    fp32 elsewhere (logged, and written to results.json); fp16 uses loss scaling and needs a GPU."""
    tf32: bool = True
    """On CUDA, fp32 matmuls in TF32 (tensor cores; 10-bit mantissa). Logged."""
    compile: bool = False
    """torch.compile the model (inductor, dynamic shapes: batch lengths vary without a recompile per shape)."""
    gradient_checkpointing: bool = False
    """Recompute each encoder layer's activations in backward instead of keeping them (less activation memory,
    about a third more compute); under DDP, ZeRO and FSDP2, for every family."""
    fast_cpu_dropout: bool = True
    """On CPU, draw dropout masks with NumPy's SFC64 (seeded from torch's RNG) and run training attention with
    them in one hand-written function: same probabilities, a quarter less time per step on MiniLM
    (harness/cpu_dropout.py). false: torch's."""


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Validate every N optimizer steps (0: only at each epoch end)."""
    batch_size: int = 64
    """Examples per evaluation batch per process."""
    metric: Literal["loss", "accuracy", "precision", "recall", "f1_macro", "f1_micro", "subset_accuracy", "mse", "mae",
                    "pearson", "spearman"] = "loss"  # fmt: skip
    """Validation metric that selects the best checkpoint (loss, mse and mae are minimised, the rest maximised)."""
    threshold: float = 0.5
    """multi_label: a label is predicted where its probability reaches this."""
    long_documents: Literal["truncate", "windows"] = "truncate"
    """Validation and test texts: cut by data.truncation, or read whole in windows of data.max_length tokens whose
    logits are pooled (eval.window_pooling)."""
    window_stride: int = 128
    """For windows: tokens each window shares with the one before it."""
    window_pooling: Literal["mean", "max"] = "mean"
    """For windows: how a text's window logits become its logits."""
    patience: int = 0
    """Stop after this many validations without improvement (0: never stop early)."""


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save a resumable checkpoint every N optimizer steps (0: off)."""
    every_minutes: float = 0.0
    """Save a resumable checkpoint every M minutes of training (0: off)."""
    at_epoch_end: bool = True
    """Save a resumable checkpoint at the end of each epoch."""
    keep_last: int = 2
    """Complete checkpoints kept in <output_dir>/checkpoints/ (the best one is always kept too)."""
    resume: str = "auto"
    """`auto` (newest complete checkpoint in output_dir, if any), `none`, or a checkpoint folder."""
    export_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Weights of best/ and final/: fp32 (the master weights, also under DeepSpeed bf16/fp16), or halved."""


@dataclass
class RuntimeConfig:
    collective_timeout_s: float = 600.0
    """Seconds a rank waits in a collective (e.g. for a dead or hung peer) before failing."""
    max_nonfinite_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss (each is skipped, not applied)."""
    cpu_threads: int = 0
    """Torch threads per process on CPU; 0: the cores available divided by the processes on this node."""
    keep_freed_cpu_memory: bool = True
    """On CPU (glibc), reuse freed tensor memory instead of unmapping it: no page-fault storm per step
    (harness/distributed.py, keep_freed_cpu_memory). The process keeps its peak memory until it exits."""


@dataclass
class LoggingConfig:
    every_steps: int = 10
    """Optimizer steps between training log lines / metrics.jsonl records."""
    progress: Literal["auto", "rich", "plain"] = "auto"
    """Console display: rich progress on a terminal, plain lines otherwise (auto picks by stdout)."""
    trackers: list[str] = field(default_factory=list)
    """Accelerate trackers to log to as well: tensorboard, mlflow, trackio, wandb (see harness/tracking.py)."""
    project: str | None = None
    """The trackers' project (MLflow experiment, trackio / W&B project) that groups runs; default: the run
    folder's name."""
    network_bytes: bool = False
    """Add this process's network bytes sent and received per step to the train records: the payload of its TCP
    sockets, i.e. what its gloo collectives move (benchmarks/scaling.py checks its model against them; NCCL's
    NVLink / InfiniBand traffic is not counted)."""
    peak_tflops: float = 0.0
    """One process's peak TFLOP/s for MFU (e.g. 989 for an H100's dense bf16); 0: measured at start (short matmul)."""


@dataclass
class HubConfig:
    push_to: str | None = None
    """A Hub repository (user/name) that a completed run's best model (best/, else final/) is pushed to, with its
    model card; checked at start (not offline, a token at hand), pushed by the main process at the end."""
    private: bool = False
    """Create the repository private (when it does not exist yet)."""


@dataclass
class AugmentConfig:
    ops: list[str] = field(default_factory=list)
    """Train-time text augmentations in order, as name:strength (word_dropout, swap, synonym, or registered)."""
    synonyms_path: str | None = None
    """For `synonym`: a text file, one comma-separated group of interchangeable words per line."""
    modules: list[str] = field(default_factory=list)
    """Python modules imported first: they register their own operations (harness.augment)."""


@dataclass
class ExperimentConfig:
    output_dir: str = "runs/default"
    """Folder for config.yaml, metrics.jsonl, results.json, best/ and final/."""
    seed: int = 42
    """Seed for data splits, shuffling, initialisation and dropout."""
    overwrite: bool = False
    """Allow writing into a non-empty output_dir (its previous results are replaced)."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """What is predicted."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Encoder and head."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset, splits, tokenization and batching."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Validation and model selection."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Resumable checkpoints."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Failure handling."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Console and metrics logging."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Train-time text augmentation (fine-tuning)."""
    hub: HubConfig = field(default_factory=HubConfig)
    """Sharing the result on the Hugging Face Hub."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint(self) -> str:
        """Short hash of the resolved config (identifies a run's settings in logs and checkpoints)."""
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()[:16]


@dataclass
class MLMConfig:
    mask_probability: float = 0.15
    """Share of tokens selected for prediction (of those, 80% become [MASK], 10% random, 10% unchanged)."""
    whole_word_masking: bool = True
    """Select whole words: every WordPiece of a chosen word is masked together."""
    include_unlabelled: bool = True
    """Add the unlabelled split (unsup.* files, aclImdb train/unsup, the hub's `unsupervised`) to the corpus."""


@dataclass
class PretrainConfig(ExperimentConfig):
    """`harness/pretrain.py`: masked-language-model pre-training on train (+ unlabelled) texts, never test."""

    mlm: MLMConfig = field(default_factory=MLMConfig)
    """Masked-language-model pre-training (harness/pretrain.py only)."""


# ----------------------------------------------------------------------------------------------------
# Loading and coercion
# ----------------------------------------------------------------------------------------------------

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ValueError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in {"null", "none", "~"}):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{key}: must be one of {', '.join(map(repr, choices))}, got {value!r}{hint}")
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config field type {tp!r} for {key}")


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _resolved_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cls: type | None = None, prefix: str = "") -> list[str]:
    """Every dotted key of the config, e.g. `train.lr`."""
    cls = cls or PretrainConfig  # every key any entry point accepts
    keys = []
    hints = _resolved_types(cls)
    for name in _fields(cls):
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _unknown_key_message(key: str, siblings: list[str]) -> str:
    """Suggest the closest key of the same section first, then the closest dotted key anywhere."""
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    close = difflib.get_close_matches(key, [prefix + s for s in siblings], n=1, cutoff=0.6)
    close = close or difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    return f"{key}: unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")


def _merge(obj: Any, values: dict[str, Any], prefix: str, problems: list[str]) -> None:
    """Apply a nested dict of values onto dataclass `obj`, recording problems instead of stopping."""
    if not isinstance(values, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
        return
    hints = _resolved_types(type(obj))
    fields = _fields(type(obj))
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in fields:
            problems.append(_unknown_key_message(key, list(fields)))
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            _merge(getattr(obj, name), value, f"{key}.", problems)
            continue
        try:
            setattr(obj, name, _coerce(value, tp, key))
        except ValueError as exc:
            problems.append(str(exc))


def parse_overrides(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Turn ['train.lr=3e-5', ...] into a nested dict of raw strings; malformed items become problems."""
    nested: dict[str, Any] = {}
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"{item!r}: overrides are written key=value, e.g. train.lr=3e-5")
            continue
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            existing = node.setdefault(part, {})
            if not isinstance(existing, dict):
                problems.append(f"{key}: {part} is not a section")
                break
            node = existing
        else:
            node[parts[-1]] = raw
    return nested, problems


def validate(cfg: ExperimentConfig) -> list[str]:
    """Value checks that types alone cannot express; returns every problem found, section by section."""
    problems = [] if cfg.output_dir else ["output_dir: must not be empty"]
    checks = (
        _check_task,
        _check_train,
        _check_data,
        _check_eval_and_checkpoint,
        _check_runtime_and_logging,
        _check_model,
    )
    for check in checks:
        problems += check(cfg)
    if isinstance(cfg, PretrainConfig):
        problems += _check_pretraining(cfg)
    return problems


def _check_train(cfg: ExperimentConfig) -> list[str]:
    p = []
    t, d = cfg.train, cfg.data
    if t.lr <= 0:
        p.append(f"train.lr: must be > 0, got {t.lr}")
    if t.batch_size < 1:
        p.append(f"train.batch_size: must be >= 1, got {t.batch_size}")
    if t.max_tokens_per_batch < 0 or 0 < t.max_tokens_per_batch < d.max_length:
        p.append(f"train.max_tokens_per_batch: 0 (off) or at least data.max_length ({d.max_length}) so that "
                 f"the longest example fits, got {t.max_tokens_per_batch}")  # fmt: skip
    if t.grad_accum < 1:
        p.append(f"train.grad_accum: must be >= 1, got {t.grad_accum}")
    if t.epochs < 1:
        p.append(f"train.epochs: must be >= 1, got {t.epochs}")
    if t.max_steps < -1:
        p.append(f"train.max_steps: must be -1 (use epochs), 0 (evaluate only) or > 0, got {t.max_steps}")
    if not 0 <= t.warmup_ratio < 1:
        p.append(f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    if t.warmup_steps < 0:
        p.append(f"train.warmup_steps: must be >= 0, got {t.warmup_steps}")
    if t.max_grad_norm < 0:
        p.append(f"train.max_grad_norm: must be >= 0 (0 disables clipping), got {t.max_grad_norm}")
    if t.weight_decay < 0:
        p.append(f"train.weight_decay: must be >= 0, got {t.weight_decay}")
    if not 0 < t.layer_lr_decay <= 1:
        p.append(f"train.layer_lr_decay: must be in (0, 1] (1 is off), got {t.layer_lr_decay}")
    return p


def _check_data(cfg: ExperimentConfig) -> list[str]:
    p = []
    d = cfg.data
    if d.max_length < 8:
        p.append(f"data.max_length: must be >= 8, got {d.max_length}")
    if d.truncation == "head_tail" and not 0 < d.head_tokens < d.max_length - 2:
        p.append(f"data.head_tokens: must be between 1 and data.max_length - 3, got {d.head_tokens}")
    if d.source == "path" and not d.path:
        p.append("data.path: required when data.source is 'path'")
    if d.source == "hub" and not d.dataset:
        p.append("data.dataset: required when data.source is 'hub' (a dataset id, e.g. stanfordnlp/imdb)")
    if d.source != "hub" and (d.dataset or d.dataset_config or d.validation_split):
        p.append(f"data.dataset, data.dataset_config, data.validation_split: for data.source=hub, not {d.source!r}")
    if d.validation_size < 1:
        p.append(f"data.validation_size: must be >= 1, got {d.validation_size}")
    for key in ("max_train_samples", "max_eval_samples"):
        value = getattr(d, key)
        if value is not None and value < 1:
            p.append(f"data.{key}: must be >= 1 or null, got {value}")
    for key in ("synthetic_train_size", "synthetic_test_size", "bucket_size_multiplier"):
        if getattr(d, key) < 1:
            p.append(f"data.{key}: must be >= 1, got {getattr(d, key)}")
    if d.num_workers < 0:
        p.append(f"data.num_workers: must be >= 0, got {d.num_workers}")
    return p


CLASSIFICATION_METRICS = ("accuracy", "precision", "recall", "f1_macro", "f1_micro")
METRICS_BY_PROBLEM = {
    "single_label": ("loss", *CLASSIFICATION_METRICS),
    "multi_label": ("loss", "subset_accuracy", "f1_macro", "f1_micro"),
    "regression": ("loss", "mse", "mae", "pearson", "spearman"),
}
LOWER_IS_BETTER = frozenset({"loss", "mse", "mae"})
"""Metrics whose best value is the lowest (the rest: the highest)."""


def _check_task(cfg: ExperimentConfig) -> list[str]:
    p = []
    problem, d, e, t = cfg.task.problem_type, cfg.data, cfg.eval, cfg.train
    names = d.label_columns if problem == "multi_label" and d.label_columns else d.labels
    if problem == "single_label" and (len(names) < 2 or len(set(names)) != len(names)):
        p.append(f"data.labels: need at least two distinct names, got {names}")
    if problem == "multi_label" and (not names or len(set(names)) != len(names)):
        p.append(f"data.labels (or data.label_columns): need distinct label names, got {names}")
    if d.label_columns and problem != "multi_label":
        p.append(
            "data.label_columns: one 0/1 column per label is a multi_label layout; set task.problem_type=multi_label"
        )
    if t.class_weights is not None and problem != "single_label":
        p.append(f"train.class_weights: for single_label problems, not {problem}")
    if isinstance(t.class_weights, list) and (len(t.class_weights) != len(names) or min(t.class_weights) <= 0):
        p.append(f"train.class_weights: one positive weight per label of {names}, got {t.class_weights}")
    if e.metric not in METRICS_BY_PROBLEM[problem] and not isinstance(cfg, PretrainConfig):
        p.append(f"eval.metric: {e.metric!r} does not apply to {problem}; choose from {METRICS_BY_PROBLEM[problem]}")
    if not 0 < e.threshold < 1:
        p.append(f"eval.threshold: must be in (0, 1), got {e.threshold}")
    if d.source in ("synthetic", "imdb") and problem != "single_label":
        p.append(f"task.problem_type: {problem} needs labels of that kind; data.source={d.source} has sentiment classes "
                 "(use data.source=path or hub with data.label_column)")  # fmt: skip
    if cfg.augment.ops and d.text_pair_column:
        p.append("augment.ops: augmentation rewrites single texts; it does not apply to text pairs")
    if e.long_documents == "windows":
        if d.text_pair_column:
            p.append("eval.long_documents: windows reads single long texts; it does not apply to text pairs")
        if cfg.model.modalities != ["text"]:
            p.append(f"eval.long_documents: windows reads text alone; it does not apply to model.modalities="
                     f"{cfg.model.modalities}")  # fmt: skip
        if not 0 <= e.window_stride < d.max_length // 2:
            p.append(f"eval.window_stride: tokens shared by consecutive windows, 0 to data.max_length / 2, "
                     f"got {e.window_stride}")  # fmt: skip
    return p


def _check_eval_and_checkpoint(cfg: ExperimentConfig) -> list[str]:
    p = []
    e, c = cfg.eval, cfg.checkpoint
    if e.every_steps < 0 or e.patience < 0:
        p.append("eval.every_steps and eval.patience: must be >= 0")
    if e.batch_size < 1:
        p.append(f"eval.batch_size: must be >= 1, got {e.batch_size}")
    if c.every_steps < 0 or c.every_minutes < 0:
        p.append("checkpoint.every_steps and checkpoint.every_minutes: must be >= 0 (0 disables)")
    if c.keep_last < 1:
        p.append(f"checkpoint.keep_last: must be >= 1, got {c.keep_last}")
    if not c.resume:
        p.append("checkpoint.resume: must be auto, none or a checkpoint folder")
    return p


def _check_runtime_and_logging(cfg: ExperimentConfig) -> list[str]:
    p = []
    r, g = cfg.runtime, cfg.logging
    if r.collective_timeout_s <= 0:
        p.append(f"runtime.collective_timeout_s: must be > 0, got {r.collective_timeout_s}")
    if r.cpu_threads < 0:
        p.append(f"runtime.cpu_threads: must be >= 0 (0 is automatic), got {r.cpu_threads}")
    if r.max_nonfinite_steps < 1:
        p.append(f"runtime.max_nonfinite_steps: must be >= 1, got {r.max_nonfinite_steps}")
    if g.every_steps < 1:
        p.append(f"logging.every_steps: must be >= 1, got {g.every_steps}")
    if g.peak_tflops < 0:
        p.append(f"logging.peak_tflops: must be >= 0 (0 measures it), got {g.peak_tflops}")
    if g.network_bytes and not sys.platform.startswith("linux"):
        p.append(f"logging.network_bytes: counts TCP payload through Linux's /proc and TCP_INFO; not on "
                 f"{sys.platform} (set it to false)")  # fmt: skip
    return p


def _check_model(cfg: ExperimentConfig) -> list[str]:
    p = []
    m, d = cfg.model, cfg.data
    for key in ("dropout", "classifier_dropout"):
        value = getattr(m, key)
        if value is not None and not 0 <= value < 1:
            p.append(f"model.{key}: must be in [0, 1), got {value}")
    if m.freeze_layers < 0:
        p.append(f"model.freeze_layers: must be >= 0, got {m.freeze_layers}")
    if not m.modalities or len(set(m.modalities)) != len(m.modalities):
        p.append(f"model.modalities: need one or more distinct encoder names, got {m.modalities}")
    if d.feature_columns and m.modalities == ["text"]:
        p.append("data.feature_columns: read for a non-text modality, but model.modalities is [text]")
    if "tabular" in m.modalities and not d.feature_columns:
        p.append("data.feature_columns: the tabular modality needs the numeric columns to read")
    if m.fusion_hidden < 1:
        p.append(f"model.fusion_hidden: must be >= 1, got {m.fusion_hidden}")
    return p


def _check_pretraining(cfg: PretrainConfig) -> list[str]:
    p = []
    if not 0 < cfg.mlm.mask_probability < 1:
        p.append(f"mlm.mask_probability: must be in (0, 1), got {cfg.mlm.mask_probability}")
    if cfg.eval.metric not in ("loss", "accuracy"):
        p.append(f"eval.metric: pre-training selects by masked-token 'loss' or 'accuracy', got {cfg.eval.metric!r}")
    if cfg.model.freeze_encoder:
        p.append("model.freeze_encoder: pre-training trains the encoder; it cannot be frozen")
    if cfg.augment.ops:
        p.append("augment.ops: augmentation applies to fine-tuning (harness/train.py), not to pre-training")
    return p


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, cls: type[ExperimentConfig] = ExperimentConfig
) -> ExperimentConfig:
    """Build the config from defaults, then the YAML file, then the dotted overrides; validate it all."""
    cfg = cls()
    problems: list[str] = []
    source = "config"
    if path is not None:
        path = Path(path)
        source = f"config {path}"
        if not path.is_file():
            raise ConfigError([f"{path}: no such config file"], source)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError([f"{path}: not valid YAML: {exc}"], source) from exc
        _merge(cfg, values, "", problems)
    nested, override_problems = parse_overrides(overrides or [])
    problems += override_problems
    _merge(cfg, nested, "", problems)
    if not problems:
        problems += validate(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def config_from_dict(values: dict[str, Any], cls: type[ExperimentConfig] = ExperimentConfig) -> ExperimentConfig:
    """Build and validate a config from a nested dict (e.g. a saved config.yaml)."""
    cfg = cls()
    problems: list[str] = []
    _merge(cfg, values, "", problems)
    problems = problems or validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg
