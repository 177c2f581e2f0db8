"""Multimodal classification: a registry of modality encoders and a fusion head over their outputs.

`model.modalities` names the encoders to fuse; `[text]` (the default) is the plain Hugging Face classifier, any
other list builds a `FusionClassifier`: each encoder maps its batch fields to one vector per example, the
vectors are concatenated and an MLP head gives the logits. The training loop, distribution, mixed precision,
checkpoints and evaluation are unchanged: the model takes the batch's fields as keyword arguments and returns
`.logits`, like any classifier.

Built in: `text` (the encoder of `model.name_or_path`, pooled; reads input_ids / attention_mask) and `tabular`
(an MLP over `data.feature_columns`, read from the data files; reads `features`). Add a modality:

    from harness.multimodal import register_modality

    @register_modality("image", inputs=("image",))
    def image_encoder(cfg, context) -> torch.nn.Module:   # forward(image) -> [batch, out_dim]; has .out_dim
        ...

in a module named in `model.modules` (imported before the model is built). Its input fields come from the
dataset (TokenizedSplit.fields: `features` holds data.feature_columns) and are batched by stacking, or by the
functions given as `collate={field: rows -> tensor}`.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from harness.config import ExperimentConfig
from harness.model import FUSION_FILE, ModelError, load_model

WEIGHTS_FILE = "model.safetensors"
FUSION_MODEL_TYPE = "harness-multimodal-fusion"
"""config.json's model_type in a fusion export: a type transformers does not know, so it refuses the folder."""


@dataclass
class Modality:
    inputs: tuple[str, ...]
    """Batch fields the encoder's forward takes, in order."""
    build: Callable[[ExperimentConfig, dict], nn.Module]
    """(config, context) -> module with `out_dim`; context carries e.g. the text encoder's config."""
    collate: dict[str, Callable[[list], torch.Tensor]]
    """Per non-text input field: example rows -> batch tensor (default: stacked, for fixed-size fields)."""


MODALITIES: dict[str, Modality] = {}


def register_modality(name: str, inputs: tuple[str, ...], collate: dict[str, Callable] | None = None) -> Callable:
    """Decorator: make an encoder builder available as `model.modalities: [..., name]`."""

    def add(build: Callable[[ExperimentConfig, dict], nn.Module]) -> Callable:
        MODALITIES[name] = Modality(inputs, build, dict(collate or {}))
        return build

    return add


def field_collators(modalities: list[str]) -> dict[str, Callable[[list], torch.Tensor]]:
    """The batch collation each configured modality asks for, by field name (for PadCollator)."""
    return {field: fn for name in modalities for field, fn in MODALITIES[name].collate.items()}


class TextEncoder(nn.Module):
    """A pretrained transformer encoder; one vector per text: the pooler output where the model has one
    (BERT's tanh-projected [CLS], as its sequence classifier uses), else the first token's hidden state."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.out_dim = encoder.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]  # [batch, hidden]


@register_modality("text", inputs=("input_ids", "attention_mask"))
def text_encoder(cfg: ExperimentConfig, context: dict) -> nn.Module:
    # Reloading an export (context's text_config): the architecture only; the weights come from its safetensors.
    _, encoder = load_model(cfg.model, "encoder", seed=cfg.seed, from_config=context.get("text_config"))
    return TextEncoder(encoder)


class TabularEncoder(nn.Module):
    """Numeric features -> MLP. Standardise the columns first (a per-row LayerNorm would erase their scale)."""

    def __init__(self, num_features: int, hidden: int, dropout: float):
        super().__init__()
        self.out_dim = hidden
        self.net = nn.Sequential(
            nn.Linear(num_features, hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.GELU(),
        )  # fmt: skip

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float())  # [batch, hidden]


@register_modality("tabular", inputs=("features",))
def tabular_encoder(cfg: ExperimentConfig, context: dict) -> nn.Module:
    return TabularEncoder(len(cfg.data.feature_columns), cfg.model.fusion_hidden, head_dropout(cfg))


def head_dropout(cfg: ExperimentConfig) -> float:
    return cfg.model.classifier_dropout if cfg.model.classifier_dropout is not None else 0.1


class FusionClassifier(nn.Module):
    """Encoders by modality, their vectors concatenated, then an MLP head: [batch, sum of out_dim] -> logits."""

    def __init__(self, encoders: dict[str, nn.Module], num_labels: int, hidden: int, dropout: float, spec: dict):
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.inputs = {name: MODALITIES[name].inputs for name in encoders}
        width = sum(encoder.out_dim for encoder in encoders.values())
        self.head = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_labels)
        )  # fmt: skip
        self.spec = spec  # what rebuilds this model from an export (fusion.json)
        text = encoders.get("text")
        self.config = text.encoder.config if text is not None else None  # for max_positions and logs

    def forward(self, **batch: torch.Tensor) -> SequenceClassifierOutput:
        vectors = [encoder(*(batch[field] for field in self.inputs[name])) for name, encoder in self.encoders.items()]
        return SequenceClassifierOutput(logits=self.head(torch.cat(vectors, dim=-1)))  # [batch, labels]

    def save_pretrained(self, path, state_dict: dict[str, torch.Tensor], safe_serialization: bool = True, **_) -> None:
        """The export: weights, fusion.json, and a config.json that holds the text encoder's config (so reloading
        needs no download) under a model type transformers does not know: `pipeline` and `AutoModel*` refuse the
        folder, naming that type, instead of loading a text classifier with random weights in place of ours."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path / WEIGHTS_FILE))
        (path / FUSION_FILE).write_text(json.dumps(self.spec, indent=2) + "\n")
        labels = self.spec["labels"]
        config = {
            "model_type": FUSION_MODEL_TYPE,
            "architectures": [type(self).__name__],
            "id2label": {str(i): name for i, name in enumerate(labels)},
            "label2id": {name: i for i, name in enumerate(labels)},
            "modalities": list(self.encoders),
            "note": "a multimodal classifier of the harness (harness.multimodal.load_fusion_classifier loads it); "
            "transformers cannot, as it needs inputs besides text",
            "text_config": self.config.to_dict() if self.config is not None else None,
        }
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def fusion_export(name_or_path: str) -> Path | None:
    """The folder, if `name_or_path` is an exported FusionClassifier (a previous multimodal run's best/)."""
    folder = Path(name_or_path).expanduser()
    return folder if (folder / FUSION_FILE).is_file() else None


def build_fusion_classifier(cfg: ExperimentConfig, seed: int) -> FusionClassifier:
    """New encoders (text from model.name_or_path) and head; or, when model.name_or_path is a multimodal
    export, the same architecture with the export's trained weights (to evaluate it or train it further)."""
    for module in cfg.model.modules:  # users' own modalities register themselves on import
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ModelError(f"model.modules: cannot import {module!r}: {exc}") from exc
    unknown = [name for name in cfg.model.modalities if name not in MODALITIES]
    if unknown:
        raise ModelError(f"model.modalities: unknown {unknown}; registered: {sorted(MODALITIES)}")
    export = fusion_export(cfg.model.name_or_path)
    if export is None:
        return _build(cfg, seed, text_config=None)
    saved = json.loads((export / FUSION_FILE).read_text())["config"]
    for section, key in (("model", "modalities"), ("data", "feature_columns")):
        if saved[section][key] != getattr(getattr(cfg, section), key):
            raise ModelError(
                f"model.name_or_path {export}: exported with {section}.{key}={saved[section][key]}, "
                f"this run has {getattr(getattr(cfg, section), key)}"
            )
    text_config = text_config_of(export) if "text" in cfg.model.modalities else None
    model = _build(cfg, seed, text_config)
    model.load_state_dict(load_file(str(export / WEIGHTS_FILE)))
    return model


def text_config_of(export: Path):
    """The text encoder's config saved in a fusion export's config.json (exports before FUSION_MODEL_TYPE were
    the text encoder's config.json itself)."""
    from transformers import AutoConfig

    saved = json.loads((export / "config.json").read_text())
    if saved.get("model_type") != FUSION_MODEL_TYPE:
        return AutoConfig.from_pretrained(export)
    text = dict(saved["text_config"])
    return AutoConfig.for_model(text.pop("model_type"), **text)


def _build(cfg: ExperimentConfig, seed: int, text_config) -> FusionClassifier:
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # new encoders and the head: the same initial weights on every rank
        context = {"text_config": text_config}
        encoders = {name: MODALITIES[name].build(cfg, context) for name in cfg.model.modalities}
        spec = {"config": cfg.to_dict(), "labels": cfg.data.labels}
        return FusionClassifier(encoders, len(cfg.data.labels), cfg.model.fusion_hidden, head_dropout(cfg), spec)


def load_fusion_classifier(path: str | Path) -> FusionClassifier:
    """An exported FusionClassifier (best/ or final/) with its trained weights, in eval mode."""
    from harness.config import config_from_dict

    export = fusion_export(str(path))
    if export is None:
        raise ModelError(f"{path}: no {FUSION_FILE}; not a multimodal export")
    cfg = config_from_dict(json.loads((export / FUSION_FILE).read_text())["config"])
    cfg.model.name_or_path = str(export)
    return build_fusion_classifier(cfg, cfg.seed).eval()
