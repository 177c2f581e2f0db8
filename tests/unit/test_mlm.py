"""Pre-training's pieces: the corpus (train + unlabelled, never test), whole-word masking, the sparse MLM head."""

import numpy as np
import pandas as pd
import pytest
import torch

from harness.config import DataConfig, MLMConfig, ModelConfig, PretrainConfig
from harness.data import prepare_pretraining_splits
from harness.data.sources import LabelledTexts
from harness.data.tokenize import NO_WORD, tokenize_split
from harness.model import IGNORE, TINY_BERT, load_model
from harness.tasks.masked_lm import MaskedLMCollator, WholeWordMasker

WORDS = ["great", "awful", "movie", "plot", "acting", "boring", "superb", "film", "director", "scene"]


def _texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    # Words the tiny vocabulary lacks ("zqx...") split into several WordPieces: whole-word masking matters.
    return [" ".join(rng.choice(WORDS + ["zqxv", "plotz", "12345"], size=rng.integers(20, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny():
    return load_model(ModelConfig(name_or_path=TINY_BERT), "masked-lm", seed=0)


@pytest.fixture
def split(tiny, tmp_path):
    tokenizer, _ = tiny
    texts = LabelledTexts(_texts(200, 0), [-1] * 200, "test")
    return tokenize_split(texts, tokenizer, DataConfig(max_length=48, cache_dir=str(tmp_path)), with_word_ids=True)


def test_corpus_is_train_plus_unlabelled_and_never_test(tmp_path):
    pd.DataFrame({"text": [f"train {i}" for i in range(40)], "label": [i % 2 for i in range(40)]}).to_parquet(
        tmp_path / "train.parquet"
    )
    pd.DataFrame({"text": [f"test {i}" for i in range(10)], "label": [0] * 10}).to_parquet(tmp_path / "test.parquet")
    pd.DataFrame({"text": [f"unsup {i}" for i in range(30)], "label": [-1] * 30}).to_parquet(tmp_path / "unsup.parquet")
    cfg = PretrainConfig(data=DataConfig(source="path", path=str(tmp_path), validation_size=7))
    splits = prepare_pretraining_splits(cfg)
    assert set(splits) == {"train", "validation"}
    texts = splits["train"].texts + splits["validation"].texts
    assert len(splits["validation"]) == 7 and len(texts) == 70 and len(set(texts)) == 70
    assert sum(t.startswith("unsup") for t in texts) == 30 and not any(t.startswith("test") for t in texts)
    cfg.mlm.include_unlabelled = False
    texts = sum((s.texts for s in prepare_pretraining_splits(cfg).values()), [])
    assert len(texts) == 40 and all(t.startswith("train") for t in texts)


def test_aclimdb_unsup_folder_is_read(tmp_path):
    for split, polarity, n in (("train", "pos", 5), ("train", "neg", 5), ("test", "pos", 2), ("test", "neg", 2),
                               ("train", "unsup", 6)):  # fmt: skip
        folder = tmp_path / "aclImdb" / split / polarity
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"{i}_0.txt").write_text(f"{split} {polarity} {i}")
    cfg = PretrainConfig(data=DataConfig(source="path", path=str(tmp_path), validation_size=2))
    texts = sum((s.texts for s in prepare_pretraining_splits(cfg).values()), [])
    assert len(texts) == 16 and sum("unsup" in t for t in texts) == 6 and not any(t.startswith("test") for t in texts)


def test_word_ids_follow_truncation_and_mark_special_tokens(split, tiny, tmp_path):
    tokenizer, _ = tiny
    for ids, words in zip(split.input_ids, split.word_ids, strict=True):
        assert len(ids) == len(words) <= 48
        assert words[0] == NO_WORD and words[-1] == NO_WORD  # [CLS] ... [SEP]
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        assert np.all(np.diff(words[1:-1]) >= 0)  # words in order, pieces of one word adjacent
    # The ids are the classifier's for the same texts (one tokenizer call gives them with the word ids).
    texts = LabelledTexts(_texts(200, 0), [-1] * 200, "test")
    plain = tokenize_split(texts, tokenizer, DataConfig(max_length=48, cache_dir=str(tmp_path)))
    assert all(np.array_equal(a, b) for a, b in zip(plain.input_ids, split.input_ids, strict=True))


def test_masking_is_deterministic_whole_word_and_near_the_rate(split, tiny):
    tokenizer, _ = tiny
    masker = WholeWordMasker(MLMConfig(mask_probability=0.15), seed=5, tokenizer=tokenizer, split=split)
    predicted, total, split_words = 0, 0, 0
    for index in range(len(split)):
        ids, labels = masker.mask(index, epoch=0)
        again_ids, again_labels = masker.mask(index, epoch=0)
        assert np.array_equal(ids, again_ids) and np.array_equal(labels, again_labels)
        chosen = labels != IGNORE
        assert chosen.sum() == masker.count(index, epoch=0) >= 1
        original = split.input_ids[index]
        assert np.array_equal(labels[chosen], original[chosen])  # the targets are the original tokens
        assert np.array_equal(ids[~chosen], original[~chosen])  # nothing else changes
        words = split.word_ids[index]
        assert not chosen[words == NO_WORD].any()  # special tokens are never predicted
        for word in np.unique(words[chosen]):  # a chosen word is chosen whole
            assert chosen[words == word].all()
            split_words += (words == word).sum() > 1
        predicted += chosen.sum()
        total += (words != NO_WORD).sum()
    assert 0.12 < predicted / total <= 0.16
    assert split_words > 20  # multi-piece words were among those masked
    epoch_1 = [masker.mask(i, epoch=1)[1] for i in range(len(split))]
    assert sum(not np.array_equal(masker.mask(i, 0)[1], m) for i, m in enumerate(epoch_1)) > 150  # new masks per epoch


def test_eighty_ten_ten(split, tiny):
    tokenizer, _ = tiny
    masker = WholeWordMasker(MLMConfig(mask_probability=0.5), seed=1, tokenizer=tokenizer, split=split)
    kinds = np.zeros(3)
    for index in range(len(split)):
        ids, labels = masker.mask(index, epoch=3)
        chosen = labels != IGNORE
        kinds += [(ids[chosen] == tokenizer.mask_token_id).sum(), (ids[chosen] == labels[chosen]).sum(), 0]
        kinds[2] += chosen.sum()
    masked, kept, n = kinds
    random = n - masked - kept  # a random replacement can draw the original token: then it counts as kept
    assert n > 2000
    assert masked / n == pytest.approx(0.8, abs=0.03)
    assert kept / n == pytest.approx(0.1, abs=0.03) and random / n == pytest.approx(0.1, abs=0.03)


def test_token_level_masking_ignores_word_boundaries(split, tiny):
    tokenizer, _ = tiny
    masker = WholeWordMasker(MLMConfig(whole_word_masking=False), seed=5, tokenizer=tokenizer, split=split)
    partial = 0
    for index in range(len(split)):
        chosen = masker.mask(index, 0)[1] != IGNORE
        words = split.word_ids[index]
        partial += sum(not chosen[words == w].all() for w in np.unique(words[chosen]))
    assert partial > 20


def test_sparse_head_equals_the_full_head_at_masked_positions(split, tiny):
    tokenizer, model = tiny
    model.eval()
    masker = WholeWordMasker(MLMConfig(), seed=0, tokenizer=tokenizer, split=split)
    batch = MaskedLMCollator(masker, 0, tokenizer.pad_token_id)([split[i] for i in range(6)])
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sparse = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).logits
        by_index = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         predicted=batch["predicted"]).logits  # fmt: skip
    chosen = batch["labels"] != IGNORE
    assert sparse.shape == (chosen.sum(), full.shape[-1])
    torch.testing.assert_close(sparse, full[chosen], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_index, sparse, rtol=0, atol=0)  # the collator's index: the same positions
    assert torch.equal(batch["targets"], batch["labels"][chosen])
    assert not any(p.requires_grad for p in model.bert.pooler.parameters())  # kept for fine-tuning, not trained
