"""Train-time augmentation: each operation, determinism, the registry, bad settings, training-only use."""

import numpy as np
import pytest

from harness.augment import AUGMENTATIONS, AugmentContext, Augmenter, AugmentingCollator, load_synonyms
from harness.config import AugmentConfig, ConfigError, DataConfig, ModelConfig
from harness.data.collate import PadCollator
from harness.model import TINY_BERT, load_model

TEXT = " ".join(f"w{i}" for i in range(200))


def test_word_dropout_drops_about_its_share_and_keeps_order():
    out = AUGMENTATIONS["word_dropout"](TEXT.split(), np.random.default_rng(0), 0.25, AugmentContext())
    assert 120 < len(out) < 180
    assert [int(w[1:]) for w in out] == sorted(int(w[1:]) for w in out)
    assert AUGMENTATIONS["word_dropout"](["one"], np.random.default_rng(0), 1.0, AugmentContext()) == ["one"]


def test_swap_only_reorders():
    out = AUGMENTATIONS["swap"](TEXT.split(), np.random.default_rng(0), 0.1, AugmentContext())
    assert sorted(out) == sorted(TEXT.split()) and out != TEXT.split()
    moved = sum(a != b for a, b in zip(out, TEXT.split(), strict=True))
    assert 10 <= moved <= 40  # 20 adjacent swaps, some undoing or chaining others


def test_synonyms_file_and_replacement(tmp_path):
    path = tmp_path / "syn.txt"
    path.write_text("# sentiment words\ngood, great, fine\n\nbad,awful\n")
    synonyms = load_synonyms(str(path))
    assert synonyms["good"] == ["great", "fine"] and synonyms["awful"] == ["bad"]
    context = AugmentContext(synonyms)
    words = "A good film, GOOD! not bad at all".split()
    out = AUGMENTATIONS["synonym"](words, np.random.default_rng(0), 1.0, context)
    assert out[0] == "A" and out[1] in ("great", "fine") and out[2] == "film,"
    assert out[3][-1] == "!" and out[3][:-1] in ("great", "fine") and out[5] == "awful"
    path.write_text("good, great\nlonely\n")
    with pytest.raises(ConfigError, match=r"syn.txt, line 2"):
        load_synonyms(str(path))


def test_augmenter_is_deterministic_per_seed_epoch_and_example(tmp_path):
    cfg = AugmentConfig(ops=["word_dropout:0.2", "swap:0.1"])
    a, b = Augmenter(cfg, seed=1), Augmenter(cfg, seed=1)
    assert a(TEXT, 5, 0) == b(TEXT, 5, 0)
    variants = {a(TEXT, 5, 0), a(TEXT, 5, 1), a(TEXT, 6, 0), Augmenter(cfg, seed=2)(TEXT, 5, 0)}
    assert len(variants) == 4 and TEXT not in variants


def test_user_operations_register_through_augment_modules():
    augmenter = Augmenter(AugmentConfig(ops=["reverse_words:1.0"], modules=["tests.custom_augment"]), seed=0)
    assert augmenter("a b c", 0, 0) == "c b a"


def test_bad_settings_name_every_problem():
    with pytest.raises(ConfigError) as err:
        Augmenter(AugmentConfig(ops=["dropout_words:0.1", "swap:2", "synonym:0.1", "swap:x"], modules=["no.such"]), 0)
    message = str(err.value)
    assert "unknown operation 'dropout_words'" in message and "word_dropout" in message
    assert "'swap:2': strength must be in [0, 1]" in message and "synonyms_path: required" in message
    assert "'swap:x' is not name:strength" in message and "cannot import 'no.such'" in message


def test_training_batches_are_augmented_and_tokenized_on_the_fly():
    tokenizer, _ = load_model(ModelConfig(name_or_path=TINY_BERT), "classifier", ["neg", "pos"], seed=0)
    texts = ["great acting and a great plot", "boring film with awful dialogue"]
    data = DataConfig(max_length=16)
    pad = PadCollator(tokenizer.pad_token_id)
    augmenter = Augmenter(AugmentConfig(ops=["reverse_words:1.0"], modules=["tests.custom_augment"]), seed=0)
    collate = AugmentingCollator(texts, augmenter, 0, tokenizer, data, pad)
    batch = collate([(1, np.zeros(3), 0), (0, np.zeros(3), 1)])  # the split's ids are not used: texts are
    expected = tokenizer("dialogue awful with film boring")["input_ids"]
    assert batch["input_ids"][0, : len(expected)].tolist() == expected
    assert batch["index"].tolist() == [1, 0] and batch["labels"].tolist() == [0, 1]
    assert batch["attention_mask"].sum(1).tolist() == [
        len(expected),
        len(tokenizer("plot great a and acting great")["input_ids"]),
    ]
