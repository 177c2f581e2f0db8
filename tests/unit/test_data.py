import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from harness.config import DataConfig, ModelConfig
from harness.data.collate import PadCollator
from harness.data.sources import DataError, LabelledTexts, TableSpec, load_path_splits, load_synthetic
from harness.data.splits import cap, split_validation
from harness.data.tokenize import TokenizedSplit, list_rows, tokenize_split, truncate
from harness.model import TINY_BERT, load_model

LABELS = ["neg", "pos"]


def write_table(path, texts, labels):
    frame = pd.DataFrame({"text": texts, "label": labels})
    if path.suffix == ".parquet":
        frame.to_parquet(path)
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        path.write_text(
            "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in zip(texts, labels, strict=True))
        )


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_path_source_reads_each_format(tmp_path, suffix):
    # Labels as names or as ids written as text (parquet columns have one type, so strings throughout).
    write_table(tmp_path / f"train{suffix}", ["good film", "bad film", 'fine, "quoted" text'], ["1", "0", "pos"])
    write_table(tmp_path / f"test{suffix}", ["ok", "meh"], ["neg", "1"])
    splits = load_path_splits(str(tmp_path), TableSpec(labels=tuple(LABELS)))
    assert splits["train"].texts == ["good film", "bad film", 'fine, "quoted" text']
    assert splits["train"].labels == [1, 0, 1]
    assert splits["test"].labels == [0, 1]


def test_integer_label_columns(tmp_path):
    write_table(tmp_path / "train.parquet", ["a", "b"], [1, 0])
    write_table(tmp_path / "test.csv", ["c", "d"], [0, 1])
    splits = load_path_splits(str(tmp_path), TableSpec(labels=tuple(LABELS)))
    assert splits["train"].labels == [1, 0] and splits["test"].labels == [0, 1]


def test_path_source_reads_the_stanford_aclimdb_layout(tmp_path):
    root = tmp_path / "aclImdb"
    for split in ("train", "test"):
        for polarity, n in (("neg", 2), ("pos", 3)):
            folder = root / split / polarity
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{i}_{1 if polarity == 'neg' else 9}.txt").write_text(f"{polarity} review {i}<br />end")
    (root / "train" / "unsup").mkdir()  # present in the real download; never read
    splits = load_path_splits(str(tmp_path), TableSpec(labels=tuple(LABELS)))  # the folder above aclImdb works too
    assert Counter(splits["train"].labels) == {0: 2, 1: 3}
    assert "pos review 0<br />end" in splits["test"].texts


@pytest.mark.parametrize(
    "case,expected",
    [
        ("missing_file", "no test file"),
        ("missing_column", "missing column(s) ['label']"),
        ("unknown_label", "row 1: column 'label': label 'maybe' is not in the label set"),
        ("out_of_range", "row 0: column 'label': label 7 is not in the label set"),
        ("empty_text", "row 2: column 'text': text must be a non-empty string"),
        ("empty_split", "the split is empty"),
        ("malformed", "cannot read it as csv"),
    ],
)
def test_bad_files_name_the_file_and_row(tmp_path, case, expected):
    write_table(tmp_path / "train.csv", ["a", "b", "c"], [0, 1, 0])
    test = tmp_path / "test.csv"
    if case == "missing_file":
        pass
    elif case == "missing_column":
        pd.DataFrame({"text": ["a"]}).to_csv(test, index=False)
    elif case == "unknown_label":
        write_table(test, ["a", "b"], ["pos", "maybe"])
    elif case == "out_of_range":
        write_table(test, ["a"], [7])
    elif case == "empty_text":
        write_table(test, ["a", "b", "  "], [0, 1, 0])
    elif case == "empty_split":
        pd.DataFrame({"text": [], "label": []}).to_csv(test, index=False)
    elif case == "malformed":
        test.write_bytes(b'text,label\n"unterminated,1\n\x00\xff')
    with pytest.raises(DataError) as err:
        load_path_splits(str(tmp_path), TableSpec(labels=tuple(LABELS)))
    assert expected in str(err.value)
    if case != "missing_file":
        assert str(test) in str(err.value)


def test_missing_data_folder(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        load_path_splits(str(tmp_path / "nope"), TableSpec(labels=tuple(LABELS)))


def test_validation_split_is_stratified_seeded_and_disjoint():
    texts = [f"t{i}" for i in range(1000)]
    labels = [0] * 700 + [1] * 300  # sorted by label, as IMDB's files are
    train, val = split_validation(LabelledTexts(texts, labels, "x"), 101, seed=3)
    assert len(val) == 101 and len(train) == 899
    assert Counter(val.labels) == {0: 71, 1: 30}  # 70.7 and 30.3: largest remainder
    assert not set(train.texts) & set(val.texts)
    assert val.texts == split_validation(LabelledTexts(texts, labels, "x"), 101, seed=3)[1].texts
    assert val.texts != split_validation(LabelledTexts(texts, labels, "x"), 101, seed=4)[1].texts
    assert val.labels[:10] != sorted(val.labels[:10]) or len(set(val.labels[:20])) == 2
    with pytest.raises(DataError, match="validation_size"):
        split_validation(LabelledTexts(texts[:5], labels[:5], "x"), 5, seed=0)


def test_cap_is_a_seeded_subset():
    split = LabelledTexts([f"t{i}" for i in range(50)], [i % 2 for i in range(50)], "x")
    small = cap(split, 10, seed=1)
    assert len(small) == 10 and set(small.texts) <= set(split.texts)
    assert small.texts == cap(split, 10, seed=1).texts
    assert cap(split, None, seed=1) is split


def test_synthetic_is_balanced_deterministic_and_learnable_by_counting():
    from harness.data.synthetic import NEGATIVE, POSITIVE

    cfg = DataConfig(source="synthetic", synthetic_train_size=400, synthetic_test_size=50)
    a, b = load_synthetic(cfg, seed=1), load_synthetic(cfg, seed=1)
    assert a["train"].texts == b["train"].texts and Counter(a["train"].labels) == {0: 200, 1: 200}
    for text, label in zip(a["train"].texts, a["train"].labels, strict=True):  # the label is the majority polarity
        words = text.rstrip(".").split()
        assert (sum(w in POSITIVE for w in words) > sum(w in NEGATIVE for w in words)) == (label == 1)


@pytest.mark.parametrize(
    "strategy,expected",
    [("head", [0, 1, 2, 3, 4]), ("tail", [5, 6, 7, 8, 9]), ("head_tail", [0, 1, 7, 8, 9])],
)
def test_truncation_strategies(strategy, expected):
    assert truncate(list(range(10)), 5, strategy, head_tokens=2) == expected
    assert truncate([1, 2], 5, strategy, head_tokens=2) == [1, 2]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    tokenizer, _ = load_model(ModelConfig(name_or_path=TINY_BERT), "classifier", LABELS, seed=0)
    return tokenizer


def test_tokenize_adds_specials_truncates_and_caches(tmp_path, tiny_tokenizer, monkeypatch):
    cfg = DataConfig(max_length=8, truncation="head_tail", head_tokens=2, cache_dir=str(tmp_path))
    split = LabelledTexts(["great film the plot was dull and boring but the cast great", "awful"], [1, 0], "x")
    out = tokenize_split(split, tiny_tokenizer, cfg)
    vocab = tiny_tokenizer.get_vocab()
    ids = [vocab[w] for w in "great film the plot was dull and boring but the cast great".split()]
    assert out.input_ids[0].tolist() == [vocab["[CLS]"], *ids[:2], *ids[-4:], vocab["[SEP]"]]
    assert out.lengths.tolist() == [8, 3] and out.labels.tolist() == [1, 0]
    assert len(list((tmp_path / "tokenized").glob("*.arrow"))) == 1

    calls = []
    original = type(tiny_tokenizer).__call__
    monkeypatch.setattr(
        type(tiny_tokenizer), "__call__", lambda self, *a, **k: calls.append(a) or original(self, *a, **k)
    )
    again = tokenize_split(split, tiny_tokenizer, cfg)
    assert [a.tolist() for a in again.input_ids] == [a.tolist() for a in out.input_ids]
    assert calls and not any(call[0] == split.texts for call in calls)  # only the template probes, never the texts
    tokenize_split(split, tiny_tokenizer, DataConfig(max_length=9, cache_dir=str(tmp_path)))  # new key: tokenizes
    assert any(call[0] == split.texts for call in calls)
    assert len(list((tmp_path / "tokenized").glob("*.arrow"))) == 2


def test_list_rows_are_the_arrow_rows_for_sliced_and_chunked_tables():
    import pyarrow as pa

    table = pa.table({"ids": pa.array([[1, 2], [3], [], [4, 5, 6]], type=pa.list_(pa.int32()))})
    chunked = pa.concat_tables([table, table.slice(1, 3)])  # two chunks, the second a slice with an offset
    assert chunked.column("ids").num_chunks == 2
    for t, expected in ((table, [[1, 2], [3], [], [4, 5, 6]]), (table.slice(1, 3), [[3], [], [4, 5, 6]]),
                        (chunked, [[1, 2], [3], [], [4, 5, 6], [3], [], [4, 5, 6]])):  # fmt: skip
        rows = list_rows(t, "ids")
        assert [r.tolist() for r in rows] == expected and all(r.dtype == np.int32 for r in rows)


def test_collator_pads_dynamically():
    split = TokenizedSplit([np.array([5, 6, 7]), np.array([5])], np.array([1, 0]), np.array([3, 1]))
    batch = PadCollator(pad_token_id=0)([split[1], split[0]])
    assert batch["input_ids"].tolist() == [[5, 0, 0], [5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert batch["labels"].tolist() == [0, 1] and batch["index"].tolist() == [1, 0]
    assert PadCollator(0, pad_to_multiple_of=8)([split[0]])["input_ids"].shape == (1, 8)
