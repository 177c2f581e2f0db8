"""Any labelled text dataset: columns by name, text pairs, multi-label (both layouts), regression, hub datasets,
windows over long texts, and the objectives' losses, metrics and predictions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from harness.config import ConfigError, ModelConfig, load_config
from harness.data import prepare_text_splits
from harness.data.sources import DataError
from harness.data.tokenize import TextEncoder, pair_budgets, tokenize_split, windowed
from harness.model import TINY_BERT, load_model
from harness.objectives import Objective, pool_windows
from tests.conftest import tiny_config
from tests.table_data import multi_labels, write_multilabel, write_pairs, write_regression, write_renamed_csv


@pytest.fixture(scope="module")
def tokenizer():
    return load_model(ModelConfig(name_or_path=TINY_BERT), "classifier", ["neg", "pos"])[0]


def config(tmp_path, folder, *overrides):
    return load_config(tiny_config(tmp_path, data={"source": "path", "path": str(folder)}), list(overrides))


def test_columns_by_name_and_string_labels(tmp_path):
    folder = write_renamed_csv(tmp_path / "data")
    cfg = config(tmp_path, folder, "data.text_column=review", "data.label_column=sentiment",
                 "data.labels=[negative,positive]")  # fmt: skip
    splits = prepare_text_splits(cfg)
    assert len(splits["test"]) == 101 and set(splits["train"].labels) == {0, 1}
    with pytest.raises(DataError, match=r"train.csv: missing column\(s\) \['text'\]; found \['review', 'sentiment'\]"):
        prepare_text_splits(config(tmp_path, folder, "data.label_column=sentiment"))
    with pytest.raises(DataError, match=r"train.csv, row 0: column 'sentiment': label '\w+' is not in the label set"):
        prepare_text_splits(config(tmp_path, folder, "data.text_column=review", "data.label_column=sentiment"))


def test_pairs_are_tokenized_as_pairs_with_the_longer_side_cut_first(tmp_path, tokenizer):
    assert pair_budgets(10, 3, 20) == (10, 3)
    assert pair_budgets(10, 3, 9) == (6, 3)  # only the longer side loses tokens
    assert pair_budgets(3, 10, 9) == (3, 6)
    assert pair_budgets(8, 7, 10) == (5, 5)  # both cut, alternately from the longer
    assert pair_budgets(10, 10, 9) == (4, 5) and pair_budgets(11, 10, 9) == (5, 4)  # the odd token: as transformers
    folder = write_pairs(tmp_path / "pairs")
    cfg = config(tmp_path, folder, "data.text_column=premise", "data.text_pair_column=hypothesis",
                 "data.labels=[neg,pos]", "data.max_length=24")  # fmt: skip
    splits = prepare_text_splits(cfg)
    assert splits["train"].pairs is not None and len(splits["train"].pairs) == len(splits["train"])
    tokenized = tokenize_split(splits["test"], tokenizer, cfg.data, token_types=True)
    vocab = tokenizer.get_vocab()
    for i in range(5):
        ids, types = tokenized.input_ids[i].tolist(), tokenized.fields["token_type_ids"][i].tolist()
        assert len(ids) <= 24 and ids[0] == vocab["[CLS]"] and ids.count(vocab["[SEP]"]) == 2
        second = ids.index(vocab["[SEP]"]) + 1  # BERT: [CLS] a [SEP] are type 0, b [SEP] type 1
        assert types == [0] * second + [1] * (len(ids) - second)
    # Through the encoder directly, as transformers' own longest_first truncation cuts them:
    encoder = TextEncoder(tokenizer, 24, token_types=True)
    a, b = splits["test"].texts[0], splits["test"].pairs[0]
    expected = tokenizer(a, b, truncation="longest_first", max_length=24)["input_ids"]
    assert encoder.encode([a], [b])[0][0] == expected
    words = " ".join(splits["train"].texts).split()
    for first, second, max_length in [(9, 9, 16), (9, 9, 17), (12, 9, 16), (9, 12, 16), (20, 3, 16), (7, 8, 12)]:
        a, b = " ".join(words[:first]), " ".join(words[first : first + second])
        expected = tokenizer(a, b, truncation="longest_first", max_length=max_length)["input_ids"]
        assert TextEncoder(tokenizer, max_length).encode([a], [b])[0][0] == expected, (first, second, max_length)
    # head_tail on both sides of a pair: each keeps its head and its tail, head_tokens in proportion to its share.
    encoder = TextEncoder(tokenizer, 24, "head_tail", head_tokens=16)
    a, b = " ".join(words[:30]), " ".join(words[30:60])
    ids = encoder.encode([a], [b])[0][0]
    body_a, body_b = encoder.bodies([a])[0], encoder.bodies([b])[0]
    sep = ids.index(vocab["[SEP]"])
    kept_a, kept_b = ids[1:sep], ids[sep + 1 : -1]
    assert len(kept_a) + len(kept_b) == 21 and kept_a[-1] == body_a[-1] and kept_b[-1] == body_b[-1]
    assert kept_a[: len(kept_a) // 2] == body_a[: len(kept_a) // 2]


@pytest.mark.parametrize("layout", ["list", "columns"])
def test_multi_label_both_layouts(tmp_path, layout):
    folder = write_multilabel(tmp_path / layout, layout)
    overrides = (["data.label_column=tags", "data.labels=[praise,complaint,long]"] if layout == "list"
                 else ["data.label_columns=[praise,complaint,long]"])  # fmt: skip
    cfg = config(tmp_path, folder, "task.problem_type=multi_label", *overrides)
    splits = prepare_text_splits(cfg)
    for text, row in zip(splits["test"].texts, splits["test"].labels, strict=True):
        assert row == [float(name in multi_labels(text)) for name in ("praise", "complaint", "long")]
    bad = pd.read_csv(folder / "test.csv") if layout == "columns" else None
    if bad is not None:
        bad.loc[3, "long"] = 2
        bad.to_csv(folder / "test.csv", index=False)
        with pytest.raises(DataError, match=r"test.csv, row 3: column 'long' is 2, not 0 or 1"):
            prepare_text_splits(cfg)


def test_regression_targets_are_numbers_and_bad_cells_are_named(tmp_path):
    folder = write_regression(tmp_path / "scores")
    cfg = config(tmp_path, folder, "task.problem_type=regression", "data.label_column=score")
    splits = prepare_text_splits(cfg)
    assert all(isinstance(v, float) for v in splits["train"].labels) and len(set(splits["test"].labels)) > 3
    frame = pd.read_parquet(folder / "test.parquet").astype({"score": object})
    frame.loc[5, "score"] = "n/a"
    frame.to_csv(folder / "test.csv", index=False)  # a CSV column can mix numbers and text
    (folder / "test.parquet").unlink()
    with pytest.raises(DataError, match=r"test.csv, row 5: column 'score' is 'n/a', not a finite number"):
        prepare_text_splits(cfg)


def test_problem_type_and_metric_mismatches_are_config_errors(tmp_path):
    folder = write_regression(tmp_path / "scores")
    with pytest.raises(ConfigError, match="eval.metric: 'accuracy' does not apply to regression"):
        config(tmp_path, folder, "task.problem_type=regression", "eval.metric=accuracy")
    with pytest.raises(ConfigError, match="data.label_columns: one 0/1 column per label is a multi_label layout"):
        config(tmp_path, folder, "data.label_columns=[a,b]")


def test_a_local_folder_laid_out_like_a_hub_dataset_loads_through_the_hub_path(tmp_path):
    # `datasets.load_dataset(<id>)` with a local path: the code path of a real hub id (which cannot be reached
    # here), including the split names of a repository's data/ folder.
    repo = tmp_path / "user" / "reviews"
    (repo / "data").mkdir(parents=True)
    texts = [f"review number {i} was great" for i in range(41)]
    for split, n in (("train", 30), ("validation", 5), ("test", 6)):
        pd.DataFrame({"content": texts[:n], "stars": [i % 2 for i in range(n)]}).to_parquet(
            repo / "data" / f"{split}-00000-of-00001.parquet"
        )
    # A split no run here asks for, which cannot be read: only the splits in use are prepared.
    (repo / "data" / "unused-00000-of-00001.parquet").write_bytes(b"not parquet")
    columns = ["data.text_column=content", "data.label_column=stars"]

    def splits_of(*overrides):
        return prepare_text_splits(load_config(tiny_config(tmp_path, data={"source": "hub", "dataset": str(repo)}),
                                               [*columns, *overrides]))  # fmt: skip

    splits = splits_of("data.validation_split=validation")
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [30, 5, 6]
    assert splits["test"].origin == f"{repo}[test]" and splits["test"].labelled
    # A split spec with a slice, as `datasets` reads it.
    sliced = splits_of("data.validation_split=validation", "data.train_split=train[:50%]", "data.test_split=test[:3]")
    assert len(sliced["train"]) == 15 and len(sliced["test"]) == 3
    with pytest.raises(DataError, match=r"no split 'dev' \(data.test_split=dev\); it has \['test', 'train', 'unused', "
                                        r"'validation'\]"):  # fmt: skip
        splits_of("data.test_split=dev")
    # A test split published without labels (label -1, as GLUE's): predictions only. Elsewhere -1 is an error.
    pd.DataFrame({"content": texts[:6], "stars": [-1] * 6}).to_parquet(repo / "data" / "test-00000-of-00001.parquet")
    unlabelled = splits_of("data.validation_split=validation")["test"]
    assert not unlabelled.labelled and set(unlabelled.labels) == {-1} and len(unlabelled) == 6
    with pytest.raises(DataError, match=r"\[test\], row 0: column 'stars': label -1 is not in the label set"):
        splits_of("data.validation_split=test", "data.test_split=validation")


def test_windows_cover_every_token_of_a_long_text(tokenizer, tmp_path):
    encoder = TextEncoder(tokenizer, max_length=16)  # 14 body tokens per window
    body = list(range(100, 140))  # 40 tokens
    windows = encoder.windows(body, stride=4)
    assert all(len(w) <= 16 for w in windows) and len(windows) == 4
    inner = [w[1:-1] for w in windows]
    assert sorted(set(t for w in inner for t in w)) == body  # every token, in some window
    assert inner[-1][-1] == body[-1] and inner[0][0] == body[0]
    assert inner[1][:4] == inner[0][-4:]  # neighbours share `stride` tokens
    assert encoder.windows(body[:10], stride=4) == [encoder.wrap(body[:10])]
    # A split's windows carry their text's label; pooling puts one row per text back.
    from harness.data.sources import LabelledTexts

    split = LabelledTexts(["great " * 40, "awful film"], [1, 0], "x")
    bodies = tokenize_split(split, tokenizer, load_config(tiny_config(tmp_path)).data, full=True)
    w = windowed(bodies, encoder, stride=4)
    assert w.document.tolist() == [0, 0, 0, 0, 1] and w.split.labels.tolist() == [1, 1, 1, 1, 0]
    logits = np.array([[1.0, 2.0], [3.0, 0.0], [2.0, 1.0], [2.0, 1.0], [0.0, 5.0]])
    assert pool_windows(logits, w.document, 2, "mean").tolist() == [[2.0, 1.0], [0.0, 5.0]]
    assert pool_windows(logits, w.document, 2, "max").tolist() == [[3.0, 2.0], [0.0, 5.0]]


def test_objectives_losses_match_torch_and_predictions_read_back():
    logits = np.array([[2.0, -1.0, 0.5], [-0.5, 0.3, 1.5]], dtype=np.float32)
    multi = Objective("multi_label", ("a", "b", "c"), threshold=0.6)
    targets = np.array([[1, 0, 1], [0, 0, 1]], dtype=np.float32)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(logits), torch.tensor(targets))
    scores = multi.scores(logits, targets)
    assert scores["loss"] == pytest.approx(float(expected), rel=1e-6) and scores["subset_accuracy"] == 1.0
    assert [r["prediction"] for r in multi.predictions(logits)] == [["a", "c"], ["c"]]  # sigmoid(0.5) < 0.6
    single = Objective("single_label", ("a", "b", "c"), class_weights=(1.0, 2.0, 3.0))
    labels = torch.tensor([0, 2])
    summed = single.loss_sum(torch.tensor(logits), labels)
    weighted_mean = torch.nn.functional.cross_entropy(
        torch.tensor(logits), labels, weight=torch.tensor([1.0, 2.0, 3.0])
    )
    assert float(summed / single.weight_of(labels.numpy())) == pytest.approx(float(weighted_mean), rel=1e-6)
    regression = Objective("regression", ())
    r = regression.scores(np.array([[1.0], [2.0], [4.0]]), np.array([1.5, 2.0, 3.0]))
    assert r["mse"] == pytest.approx((0.25 + 0 + 1) / 3) == r["loss"] and r["spearman"] == pytest.approx(1.0)


def test_a_regression_head_folds_into_the_targets_units_and_back():
    from harness.objectives import fold_regression_head, target_statistics, unfold_regression_head

    mean, std = target_statistics(np.array([1.0, 4.0, 7.0, 10.0]))
    head = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    x = torch.randn(5, 6)
    standardised = head(x).detach()
    folded = fold_regression_head(head.state_dict(), mean, std)
    in_units = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    in_units.load_state_dict(folded)
    torch.testing.assert_close(in_units(x), standardised * std + mean)
    objective = Objective("regression", (), target_mean=mean, target_std=std)
    torch.testing.assert_close(torch.from_numpy(objective.values(standardised.numpy())).float(),
                               (standardised * std + mean)[:, 0])  # fmt: skip
    unfold_regression_head(in_units, mean, std)
    torch.testing.assert_close(in_units(x), standardised)
