"""Tiny random models of every encoder family harness/families.py knows, saved as model folders the way a user
would have them (config.json, weights, a tokenizer): transformers' config classes at toy sizes, with the
WordPiece tokenizer of `builtin:tiny-bert` (whose vocabulary covers the synthetic reviews)."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("bert", "roberta", "xlm-roberta", "distilbert", "deberta-v2", "modernbert", "electra", "albert")
HIDDEN, LAYERS, HEADS, FFN, POSITIONS = 32, 3, 2, 64, 258


def tiny_config(family: str, vocab_size: int, pad_id: int, cls_id: int, sep_id: int, mask_id: int):
    import transformers as T

    common = dict(vocab_size=vocab_size, pad_token_id=pad_id, max_position_embeddings=POSITIONS)
    bert_like = dict(common, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     intermediate_size=FFN)  # fmt: skip
    if family == "bert":
        return T.BertConfig(**bert_like)
    if family == "roberta":
        return T.RobertaConfig(**bert_like, bos_token_id=cls_id, eos_token_id=sep_id)
    if family == "xlm-roberta":
        return T.XLMRobertaConfig(**bert_like, bos_token_id=cls_id, eos_token_id=sep_id)
    if family == "electra":
        return T.ElectraConfig(**bert_like, embedding_size=16)  # factorised: embeddings_project 16 -> 32
    if family == "albert":
        return T.AlbertConfig(**bert_like, embedding_size=16, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    if family == "distilbert":
        return T.DistilBertConfig(**common, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN)
    if family == "deberta-v2":  # v3's settings: shared relative keys, position buckets, both score types
        return T.DebertaV2Config(**bert_like, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                 position_buckets=16, max_relative_positions=-1, share_att_key=True,
                                 norm_rel_ebd="layer_norm", type_vocab_size=0)  # fmt: skip
    if family == "modernbert":  # layers 0 global, 1 and 2 sliding; a 16-token window so short texts use it
        return T.ModernBertConfig(**bert_like, local_attention=16, bos_token_id=cls_id, eos_token_id=sep_id,
                                  cls_token_id=cls_id, sep_token_id=sep_id, embedding_dropout=0.1,
                                  mlp_dropout=0.1, attention_dropout=0.1)  # fmt: skip
    raise ValueError(family)


def save_tiny_model(family: str, folder: Path, kind: str = "masked-lm", seed: int = 0) -> Path:
    """A random `family` model (masked-LM by default: its head too) and the tiny-bert tokenizer, in `folder`."""
    from transformers import BertTokenizer

    from harness.model import tiny_bert_vocab

    vocab = tiny_bert_vocab()
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=POSITIONS - 2)
    config = tiny_config(family, len(vocab), tokenizer.pad_token_id, tokenizer.cls_token_id,
                         tokenizer.sep_token_id, tokenizer.mask_token_id)  # fmt: skip
    from transformers.models.auto import modeling_auto as auto

    mapping = (
        auto.MODEL_FOR_MASKED_LM_MAPPING if kind == "masked-lm" else auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = mapping[type(config)](config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
