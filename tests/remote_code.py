"""A model folder that ships its own code, as `trust_remote_code` models on the Hub do: a config and a sequence
classifier class in Python files beside the weights, named by config.json's auto_map (a tiny BERT underneath,
with the tokenizer of `builtin:tiny-bert`)."""

from __future__ import annotations

import json
from pathlib import Path

CONFIGURATION = """from transformers import BertConfig


class TinyRemoteConfig(BertConfig):
    model_type = "tiny-remote-bert"
"""

MODELING = """from transformers import BertForSequenceClassification

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteForSequenceClassification(BertForSequenceClassification):
    config_class = TinyRemoteConfig
"""

AUTO_MAP = {
    "AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
    "AutoModelForSequenceClassification": "modeling_tiny_remote.TinyRemoteForSequenceClassification",
}


def write_remote_code_model(folder: Path) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    from harness.model import TINY_BERT_SIZES, tiny_bert_vocab

    vocab = tiny_bert_vocab()
    BertTokenizer(vocab=vocab, model_max_length=512).save_pretrained(folder)
    BertForSequenceClassification(BertConfig(vocab_size=len(vocab), **TINY_BERT_SIZES)).save_pretrained(folder)
    (folder / "configuration_tiny_remote.py").write_text(CONFIGURATION)
    (folder / "modeling_tiny_remote.py").write_text(MODELING)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="tiny-remote-bert", auto_map=AUTO_MAP, architectures=["TinyRemoteForSequenceClassification"]
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
