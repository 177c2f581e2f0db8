"""Multimodal pieces: feature columns read and checked, fields collated, the registry, export round trip."""

import numpy as np
import pandas as pd
import pytest
import torch

from harness.config import ConfigError, ModelConfig, config_from_dict
from harness.cpu_dropout import ATTENTION_NAME, use_fast_cpu_dropout
from harness.data.collate import PadCollator
from harness.data.sources import DataError, TableSpec, load_path_splits
from harness.data.tokenize import TokenizedSplit
from harness.model import ModelError, load_model
from harness.multimodal import (
    MODALITIES,
    build_fusion_classifier,
    field_collators,
    load_fusion_classifier,
    register_modality,
)
from harness.predict import PredictError, load_classifier

LABELS = ["neg", "pos"]


def write_split(folder, name, frame):
    if name.endswith(".csv"):
        frame.to_csv(folder / name, index=False)
    else:
        frame.to_parquet(folder / name)


def test_feature_columns_are_read_beside_text_and_follow_selection(tmp_path):
    write_split(tmp_path, "train.parquet", pd.DataFrame(
        {"text": ["a", "b", "c"], "label": [0, 1, 0], "age": [1.5, 2, 3], "score": [-1, 0, 1]}))  # fmt: skip
    write_split(tmp_path, "test.csv", pd.DataFrame({"text": ["d"], "label": [1], "age": [9.0], "score": [7]}))
    splits = load_path_splits(str(tmp_path), TableSpec(labels=tuple(LABELS), feature_columns=("score", "age")))
    assert splits["train"].features.dtype == np.float32
    np.testing.assert_array_equal(splits["train"].features, [[-1, 1.5], [0, 2], [1, 3]])  # in the listed order
    np.testing.assert_array_equal(splits["test"].features, [[7, 9]])
    picked = splits["train"].select([2, 0])
    assert picked.texts == ["c", "a"]
    np.testing.assert_array_equal(picked.features, [[1, 3], [-1, 1.5]])
    assert load_path_splits(str(tmp_path), TableSpec(labels=tuple(LABELS)))["train"].features is None


@pytest.mark.parametrize(
    "values,expected",
    [
        ([1.0, "many", 3.0], "row 1: column 'age' is 'many', not a finite number"),
        ([1.0, 2.0, float("nan")], "row 2: column 'age' is empty, not a finite number"),  # CSV writes NaN as ''
        ([1.0, float("inf"), 3.0], "row 1: column 'age' is inf, not a finite number"),
        (None, "missing column(s) ['age']"),
    ],
)
def test_bad_feature_values_name_the_file_row_and_column(tmp_path, values, expected):
    write_split(tmp_path, "train.csv", pd.DataFrame({"text": ["a"], "label": [0], "age": [1.0]}))
    test = pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 0]})
    if values is not None:
        test["age"] = values
    write_split(tmp_path, "test.csv", test)
    with pytest.raises(DataError) as err:
        load_path_splits(str(tmp_path), TableSpec(labels=tuple(LABELS), feature_columns=("age",)))
    assert expected in str(err.value) and str(tmp_path / "test.csv") in str(err.value)


def test_collation_stacks_the_other_fields_per_batch():
    split = TokenizedSplit(
        input_ids=[np.array([2, 5, 3]), np.array([2, 3])],
        labels=np.array([1, 0]),
        lengths=np.array([3, 2]),
        fields={"features": np.array([[1, 2], [3, 4]], dtype=np.float32)},
    )
    batch = PadCollator(pad_token_id=0)([split[1], split[0]])
    assert batch["input_ids"].tolist() == [[2, 3, 0], [2, 5, 3]]
    assert batch["features"].dtype == torch.float32 and batch["features"].tolist() == [[3, 4], [1, 2]]
    assert batch["index"].tolist() == [1, 0]
    # A modality's own collation for its field (registered with register_modality(..., collate=...)).
    summed = PadCollator(0, field_collators={"features": lambda rows: torch.tensor([float(r.sum()) for r in rows])})
    assert summed([split[0], split[1]])["features"].tolist() == [3.0, 7.0]


def fusion_config(**model):
    return config_from_dict({
        "model": {"name_or_path": "builtin:tiny-bert", "modalities": ["text", "tabular"], "fusion_hidden": 16, **model},
        "data": {"source": "path", "path": "unused", "feature_columns": ["a", "b", "c"]},
    })  # fmt: skip


@pytest.mark.parametrize(
    "model,data,expected",
    [
        ({"modalities": ["text", "tabular"]}, {}, "the tabular modality needs the numeric columns"),
        ({}, {"feature_columns": ["x"]}, "data.feature_columns: read for a non-text modality"),
        ({"modalities": ["text", "text"]}, {}, "model.modalities: need one or more distinct"),
        ({"modalities": []}, {}, "model.modalities: need one or more distinct"),
    ],
)
def test_modality_config_errors(model, data, expected):
    with pytest.raises(ConfigError, match=expected):
        config_from_dict({"model": model, "data": {"source": "path", "path": "unused", **data}})


def test_unknown_modality_names_the_registered_ones():
    cfg = fusion_config(modalities=["text", "audio"])
    with pytest.raises(ModelError, match=r"unknown \['audio'\]; registered: \[.*'tabular', 'text'"):
        build_fusion_classifier(cfg, seed=0)


def batch_of(rows: int, features: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(5, 40, (rows, 7), generator=generator),
        "attention_mask": torch.ones(rows, 7, dtype=torch.long),
        "features": torch.randn(rows, features, generator=generator),
    }


def test_a_modality_from_model_modules_is_fused_with_text():
    with pytest.raises(ModelError, match="model.modules: cannot import 'tests.no_such_module'"):
        build_fusion_classifier(fusion_config(modules=["tests.no_such_module"]), seed=0)
    cfg = fusion_config(modalities=["text", "feature_sum"], modules=["tests.custom_modality"])
    try:
        model = build_fusion_classifier(cfg, seed=0)
        assert list(model.encoders) == ["text", "feature_sum"]
        assert model.head[1].in_features == 64 + 1  # tiny BERT's pooled 64 + the new encoder's 1
        logits = model(**batch_of(4)).logits
        assert logits.shape == (4, 2) and torch.isfinite(logits).all()
    finally:
        MODALITIES.pop("feature_sum", None)


def test_a_modality_can_collate_its_own_fields():
    @register_modality("zeros", inputs=("features",), collate={"features": lambda rows: torch.zeros(len(rows), 1)})
    def zeros(cfg, context):
        return torch.nn.Identity()

    try:
        assert list(field_collators(["text", "zeros"])) == ["features"]
        assert field_collators(["text", "tabular"]) == {}  # tabular features are stacked
    finally:
        del MODALITIES["zeros"]


def test_the_fast_cpu_dropout_reaches_the_text_encoder_inside_the_fusion_model():
    # The fusion model holds its text encoder's config without being a transformers model: the encoder inside
    # it must take the fast attention (torch's SDPA with dropout on CPU takes its slow math path: 1.25x the
    # text + tabular example's step time).
    model = build_fusion_classifier(fusion_config(), seed=3)
    swapped = use_fast_cpu_dropout(model)
    assert swapped["attention_models"] == 1 and swapped["kept"] == []
    assert model.encoders["text"].encoder.config._attn_implementation == ATTENTION_NAME


def test_same_seed_same_model_and_export_round_trip(tmp_path):
    cfg = fusion_config()
    model = build_fusion_classifier(cfg, seed=3)
    twin = build_fusion_classifier(cfg, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True))
    with torch.no_grad():  # move the weights off their initial values, so the reload must read them
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    model.eval()
    model.save_pretrained(tmp_path / "best", state_dict=model.state_dict())
    reloaded = load_fusion_classifier(tmp_path / "best")
    batch = batch_of(5)
    torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)

    other = fusion_config(name_or_path=str(tmp_path / "best"), modalities=["tabular"])
    with pytest.raises(ModelError, match=r"exported with model.modalities=\['text', 'tabular'\], this run has"):
        build_fusion_classifier(other, seed=0)

    # A text-only run or harness.predict would load a BERT config from it and random weights: refused.
    with pytest.raises(ModelError, match="a multimodal export"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "best")), "classifier", LABELS, seed=0)
    with pytest.raises(PredictError, match="needs inputs besides text"):
        load_classifier(tmp_path / "best")

    # Other tools: transformers refuses the folder, naming what it is, instead of loading a text classifier with
    # random weights in place of the fused model's (its config.json was once the text encoder's).
    from transformers import AutoModelForSequenceClassification, pipeline

    for load in (
        AutoModelForSequenceClassification.from_pretrained,
        lambda p: pipeline("text-classification", model=p),
    ):
        with pytest.raises(ValueError, match="harness-multimodal-fusion"):
            load(str(tmp_path / "best"))
