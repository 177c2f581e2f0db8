"""Encoder families by structure: where a model's embeddings, its ordered encoder layers and its dropout settings
live, and what its masked-LM head is. Everything that reaches inside a model (freezing, dropout overrides,
layer-wise learning rates, FLOP counts, the sparse masked-LM head) asks this module, never BERT's module names.

A family is recognised by its config's `model_type`; a model of another type (custom code, a new architecture)
is matched by structure: the first family whose module layout it has. A setting that needs a structure the
model does not have fails before any work, naming the family (or the model type) and the setting.

| family | layers (under the base model) | embedding side | model.dropout sets | classifier dropout |
|---|---|---|---|---|
| BERT (also MiniLM) | encoder.layer | embeddings | hidden / attention probs | classifier_dropout |
| RoBERTa, XLM-R, CamemBERT | encoder.layer | embeddings | hidden / attention probs | classifier_dropout |
| ELECTRA | encoder.layer | embeddings, embeddings_project | hidden / attention probs | classifier_dropout |
| ALBERT | encoder.albert_layer_groups (shared) | embeddings, encoder.embedding_hidden_mapping_in | hidden / attention probs | classifier_dropout_prob |
| DistilBERT | transformer.layer | embeddings | dropout / attention_dropout | seq_classif_dropout |
| DeBERTa-v2/v3 | encoder.layer | embeddings, encoder.rel_embeddings, encoder.LayerNorm | hidden / attention probs | cls_dropout (and the pooler's) |
| ModernBERT (Ettin, mmBERT) | layers | embeddings | embedding / mlp / attention | classifier_dropout |

ALBERT shares weights across layers: its `layers` are its distinct layer groups (usually one, run
num_hidden_layers times), so `model.freeze_layers` and `train.layer_lr_decay` count groups, not applications.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    name: str
    """For messages."""
    model_types: tuple[str, ...]
    layers: str
    """Dotted path, under the base model, of the ModuleList of encoder layers, bottom first."""
    embeddings: tuple[str, ...]
    """Dotted paths, under the base model, of the embedding side: what sits below the first layer or is shared
    by all layers (the lowest learning rate under layer-wise decay; frozen by model.freeze_embeddings)."""
    dropout_keys: tuple[str, ...]
    """Config attributes that model.dropout sets (every dropout inside the encoder)."""
    classifier_dropout_keys: tuple[str, ...]
    """Config attributes that model.classifier_dropout sets (the sequence-classification head's dropout)."""
    mlm_logits: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    """(the family's masked-LM model, hidden states [n, hidden]) -> logits [n, vocab]: its MLM head, applied
    to the predicted positions only."""
    runs_per_layer: Callable[[object], int] = lambda config: 1
    """How many times each entry of `layers` runs in a forward pass (ALBERT: its groups are shared)."""
    attention_windows: Callable[[object], list[int | None]] = lambda config: [None] * config.num_hidden_layers
    """Per attention application in a forward pass, the local window (a query sees the keys within +-window),
    None for global attention."""
    relative_scores: Callable[[object], tuple[int, int]] = lambda config: (0, 0)
    """DeBERTa's disentangled attention: (span k, score types): each layer also scores every query against 2k
    relative positions, once per type (content-to-position, position-to-content)."""


def _albert_runs(config) -> int:
    return config.num_hidden_layers // config.num_hidden_groups


def _albert_windows(config) -> list[int | None]:
    return [None] * (config.num_hidden_layers * config.inner_group_num)


def _modernbert_windows(config) -> list[int | None]:
    # masking_utils: a sliding layer's query sees keys at distance <= config.sliding_window (local_attention // 2)
    return [config.local_attention // 2 if kind == "sliding_attention" else None for kind in config.layer_types]


def _deberta_relative(config) -> tuple[int, int]:
    if not getattr(config, "relative_attention", False):
        return 0, 0
    if getattr(config, "position_buckets", -1) > 0:
        span = config.position_buckets
    else:
        span = config.max_relative_positions if config.max_relative_positions >= 1 else config.max_position_embeddings
    types = getattr(config, "pos_att_type", None) or []
    return span, sum(kind in types for kind in ("c2p", "p2c"))


def _deberta_mlm(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    if model.legacy:
        return model.cls(hidden)
    return model.lm_predictions(hidden, model.deberta.embeddings.word_embeddings)


def _distilbert_mlm(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model.vocab_projector(model.vocab_layer_norm(model.activation(model.vocab_transform(hidden))))


BERT_DROPOUT = ("hidden_dropout_prob", "attention_probs_dropout_prob")
FAMILIES = (
    Family("BERT", ("bert",), "encoder.layer", ("embeddings",), BERT_DROPOUT, ("classifier_dropout",),
           lambda m, h: m.cls(h)),
    Family("RoBERTa", ("roberta", "xlm-roberta", "camembert", "xlm-roberta-xl"), "encoder.layer", ("embeddings",),
           BERT_DROPOUT, ("classifier_dropout",), lambda m, h: m.lm_head(h)),
    Family("ELECTRA", ("electra",), "encoder.layer", ("embeddings", "embeddings_project"), BERT_DROPOUT,
           ("classifier_dropout",), lambda m, h: m.generator_lm_head(m.generator_predictions(h))),
    Family("ALBERT", ("albert",), "encoder.albert_layer_groups", ("embeddings", "encoder.embedding_hidden_mapping_in"),
           BERT_DROPOUT, ("classifier_dropout_prob",), lambda m, h: m.predictions(h), runs_per_layer=_albert_runs,
           attention_windows=_albert_windows),
    Family("DistilBERT", ("distilbert",), "transformer.layer", ("embeddings",), ("dropout", "attention_dropout"),
           ("seq_classif_dropout",), _distilbert_mlm),
    Family("DeBERTa-v2", ("deberta-v2",), "encoder.layer", ("embeddings", "encoder.rel_embeddings", "encoder.LayerNorm"),
           BERT_DROPOUT, ("cls_dropout", "pooler_dropout"), _deberta_mlm, relative_scores=_deberta_relative),
    Family("ModernBERT", ("modernbert",), "layers", ("embeddings",), ("embedding_dropout", "mlp_dropout",
           "attention_dropout"), ("classifier_dropout",), lambda m, h: m.decoder(m.head(h)),
           attention_windows=_modernbert_windows),
)  # fmt: skip


def family_named(model_type: str) -> Family | None:
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def family_of_config(config) -> Family | None:
    """A config's family: by model_type, else (another type, e.g. custom code) the first family whose dropout
    settings it has."""
    known = family_named(getattr(config, "model_type", ""))
    if known is not None:
        return known
    return next((f for f in FAMILIES if all(hasattr(config, key) for key in f.dropout_keys)), None)


def _find(root: nn.Module, dotted: str) -> nn.Module | None:
    node = root
    for part in dotted.split("."):
        node = getattr(node, part, None)
        if not isinstance(node, nn.Module):
            return None
    return node


def family_of(model: nn.Module) -> Family | None:
    """The model's family: by its config's model_type, else the first family whose layout its base model has."""
    config = getattr(model, "config", None)
    known = family_named(getattr(config, "model_type", ""))
    if known is not None:
        return known
    base = encoder_of(model)
    return next((f for f in FAMILIES if isinstance(_find(base, f.layers), nn.ModuleList)
                 and all(_find(base, e) is not None for e in f.embeddings)), None)  # fmt: skip


def encoder_of(model: nn.Module) -> nn.Module:
    """The transformer encoder inside a model: the base model of a transformers model (itself for a bare one)."""
    return getattr(model, "base_model", model)


def transformer_in(model: nn.Module) -> nn.Module:
    """The transformers model inside (a multimodal classifier holds its text encoder in encoders['text'])."""
    encoders = getattr(model, "encoders", None)
    if isinstance(encoders, nn.ModuleDict) and "text" in encoders:
        return encoders["text"].encoder
    return model


@dataclass
class Structure:
    """Where the parts of one model are."""

    family: Family
    base: nn.Module
    embeddings: list[nn.Module]
    layers: list[nn.Module]
    """Bottom first; ALBERT: its distinct layer groups."""


class StructureError(ValueError):
    """A setting needs a model structure this model does not have; the message names both."""


def structure_of(model: nn.Module, setting: str) -> Structure:
    """The model's parts, or StructureError naming the model type and the `setting` that needed them."""
    family = family_of(model)
    base = encoder_of(model)
    if family is None:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise StructureError(f"{setting}: the harness does not know where the layers of a {model_type!r} model are "
                             f"(known families: {', '.join(f.name for f in FAMILIES)})")  # fmt: skip
    layers = _find(base, family.layers)
    embeddings = [_find(base, path) for path in family.embeddings]
    return Structure(family, base, embeddings=[e for e in embeddings if e is not None],
                     layers=[] if layers is None else list(layers))  # fmt: skip


def layer_rank(structure: Structure) -> dict[int, int]:
    """Parameter id -> the layer-wise decay exponent: 0 for the head (and whatever is neither embeddings nor a
    layer), L - k for layer k of L (bottom layer k = 0), L + 1 for the embedding side."""
    count = len(structure.layers)
    rank = {}
    for k, layer in enumerate(structure.layers):
        for p in layer.parameters():
            rank[id(p)] = count - k
    for module in structure.embeddings:
        for p in module.parameters():
            rank[id(p)] = count + 1
    return rank
