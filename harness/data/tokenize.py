"""Tokenization with the model's fast tokenizer: truncation strategies, text pairs, windows over long texts, and
an on-disk cache.

`TextEncoder` is the one place that turns raw text into the ids a model sees: training, evaluation, on-the-fly
augmentation and serving (harness/predict.py) all use it, so a served model reads its input exactly as it was
trained. The cache key covers the data (texts, pairs and labels), the tokenizer (its full serialized
definition) and every length setting, so a changed input never reuses a stale cache and a repeated run skips
tokenization.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np

from harness.config import DataConfig
from harness.data.sources import LabelledTexts
from harness.faults import pause
from harness.locking import held

CACHE_FORMAT_VERSION = "2"
NO_WORD = -1
"""word_ids entry of a special token."""


@dataclass
class TokenizedSplit:
    """Token ids per example, with labels and lengths as arrays (what samplers and collators read)."""

    input_ids: list[np.ndarray]
    labels: np.ndarray
    """[examples] int64 class ids, [examples, labels] float32 multi-hot rows, or [examples] float32 numbers."""
    lengths: np.ndarray
    word_ids: list[np.ndarray] | None = None
    """Per token, the index of the word it belongs to (NO_WORD for special tokens); for whole-word masking."""
    fields: dict[str, np.ndarray | list] = field(default_factory=dict)
    """Other model inputs per example: `token_type_ids` of text pairs (padded like the ids), other modalities'
    inputs (e.g. `features`: [examples, columns], batched by stacking)."""
    labelled: bool = True
    """False for a test split without labels (LabelledTexts.labelled): predictions only."""

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple:
        """(index, token ids, label), plus a dict of the other fields' rows when there are any."""
        if self.fields:
            return index, self.input_ids[index], self.labels[index], {k: v[index] for k, v in self.fields.items()}
        return index, self.input_ids[index], self.labels[index]

    @property
    def real_tokens(self) -> int:
        return int(self.lengths.sum())


def truncate(ids: list[int], budget: int, strategy: str, head_tokens: int) -> list[int]:
    """Keep at most `budget` tokens: the first (head), the last (tail) or the first head_tokens + last rest."""
    if len(ids) <= budget:
        return ids
    if strategy == "head":
        return ids[:budget]
    if strategy == "tail":
        return ids[len(ids) - budget :]
    head = min(head_tokens, budget)
    return ids[:head] + ids[len(ids) - (budget - head) :]


def pair_budgets(first: int, second: int, budget: int) -> tuple[int, int]:
    """Lengths the two sides of a pair keep: the longer side is cut first, down to the shorter's length, then
    both alternately: what transformers' `longest_first` truncation does token by token (it cuts the second side
    when both are equally long, so an odd budget's extra token stays with the side that was longer, or the
    second)."""
    excess = first + second - budget
    if excess <= 0:
        return first, second
    if first - excess >= second:
        return first - excess, second
    if second - excess >= first:
        return first, second - excess
    short = budget // 2
    return (budget - short, short) if first > second else (short, budget - short)


def _locate(full: list[int], body: list[int], start: int = 0) -> int:
    for i in range(start, len(full) - len(body) + 1):
        if full[i : i + len(body)] == body:
            return i
    raise ValueError("cannot locate the text inside the tokenizer's special-token template")


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer's template puts before and after a single text ([CLS] / [SEP] for BERT).

    Read off the template itself (transformers 5 no longer exposes build_inputs_with_special_tokens)."""
    body = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello", add_special_tokens=True)["input_ids"]
    start = _locate(full, body)
    return full[:start], full[start + len(body) :]


def takes_token_types(tokenizer, model) -> bool:
    """Whether a pair's second text is marked with token type 1: only where the tokenizer makes token types,
    the model's forward takes them and it has a second type to embed. DistilBERT and ModernBERT take none;
    RoBERTa checkpoints embed one type (type_vocab_size 1), so type 1 would index past their table."""
    import inspect

    config = getattr(model, "config", None)
    return ("token_type_ids" in tokenizer.model_input_names
            and "token_type_ids" in inspect.signature(model.forward).parameters
            and getattr(config, "type_vocab_size", 2) > 1)  # fmt: skip


@dataclass
class TextEncoder:
    """Raw text, or a pair of texts, to the token ids (and token types) a model is trained on: the tokenizer's
    own special-token template around a body cut to data.max_length by data.truncation."""

    tokenizer: object
    max_length: int
    truncation: str = "head"
    head_tokens: int = 128
    token_types: bool = False
    """Emit token type ids for pairs (where both the tokenizer and the model take them)."""

    def __post_init__(self):
        self.prefix, self.suffix = special_affixes(self.tokenizer)
        self.budget = self.max_length - len(self.prefix) - len(self.suffix)
        a = self.tokenizer("hello", add_special_tokens=False)["input_ids"]
        b = self.tokenizer("world", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("hello", "world", add_special_tokens=True, return_token_type_ids=True)
        ids, types = full["input_ids"], full.get("token_type_ids") or [0] * len(full["input_ids"])
        ia = _locate(ids, a)
        ib = _locate(ids, b, ia + len(a))
        self.pair_prefix, self.pair_middle, self.pair_suffix = ids[:ia], ids[ia + len(a) : ib], ids[ib + len(b) :]
        # Token types of the template's parts: [CLS] A [SEP] are 0 and B [SEP] 1 for BERT; all 0 for RoBERTa.
        self.type_parts = (types[:ia], types[ia], types[ia + len(a) : ib], types[ib], types[ib + len(b) :])

    @classmethod
    def of(cls, tokenizer, data: DataConfig, token_types: bool = False) -> TextEncoder:
        return cls(tokenizer, data.max_length, data.truncation, data.head_tokens, token_types)

    def bodies(self, texts: list[str]) -> list[list[int]]:
        """The texts' token ids without special tokens or truncation."""
        return self.tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]

    def encode(
        self, texts: list[str], pairs: list[str] | None = None
    ) -> tuple[list[list[int]], list[list[int]] | None]:
        """Token ids of each text (or pair), with special tokens, truncated; token type ids for pairs where
        `token_types`, else None."""
        if pairs is None:
            return [self.wrap(self.cut(body, self.budget)) for body in self.bodies(texts)], None
        budget = self.max_length - len(self.pair_prefix) - len(self.pair_middle) - len(self.pair_suffix)
        ids, types = [], []
        pre, type_a, mid, type_b, suf = self.type_parts
        for a, b in zip(self.bodies(texts), self.bodies(pairs), strict=True):
            keep_a, keep_b = pair_budgets(len(a), len(b), budget)
            a, b = self.cut(a, keep_a, side=True), self.cut(b, keep_b, side=True)
            ids.append(self.pair_prefix + a + self.pair_middle + b + self.pair_suffix)
            types.append(pre + [type_a] * len(a) + mid + [type_b] * len(b) + suf)
        return ids, types if self.token_types else None

    def cut(self, body: list[int], budget: int, side: bool = False) -> list[int]:
        """`body` cut to `budget` tokens. A `side` of a pair keeps head_tokens in proportion to its budget
        (head_tail): a side's budget is about half a single text's, and the full head_tokens would leave it no
        tail."""
        head = round(self.head_tokens * budget / self.budget) if side else self.head_tokens
        return truncate(body, budget, self.truncation, head)

    def wrap(self, body: list[int]) -> list[int]:
        return self.prefix + body + self.suffix

    def windows(self, body: list[int], stride: int) -> list[list[int]]:
        """A long text's body as windows of max_length tokens (special tokens included) that share `stride`
        tokens with their neighbours and together hold every token; the last window ends at the text's end."""
        if len(body) <= self.budget:
            return [self.wrap(body)]
        step = self.budget - stride
        starts = list(range(0, len(body) - self.budget, step)) + [len(body) - self.budget]
        return [self.wrap(body[start : start + self.budget]) for start in starts]

    def windows_of(self, bodies: list[list[int]], stride: int) -> tuple[list[list[int]], np.ndarray]:
        """Every body's windows, flat, and for each window the index of the body it comes from."""
        per_body = [self.windows(body, stride) for body in bodies]
        document = np.asarray([i for i, windows in enumerate(per_body) for _ in windows], dtype=np.int64)
        return [window for windows in per_body for window in windows], document


def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def cache_key(split: LabelledTexts, encoder: TextEncoder, variant: str) -> str:
    parts = [variant, CACHE_FORMAT_VERSION, split.content_hash(), tokenizer_fingerprint(encoder.tokenizer),
             str(encoder.max_length), encoder.truncation,
             str(encoder.head_tokens if encoder.truncation == "head_tail" else 0), str(encoder.token_types)]  # fmt: skip
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _label_feature(labels: list) -> datasets.Value | datasets.Sequence:
    first = labels[0]
    if isinstance(first, list):
        return datasets.Sequence(datasets.Value("float32"))
    return datasets.Value("float32" if isinstance(first, float) else "int64")


def tokenize_split(
    split: LabelledTexts, tokenizer, cfg: DataConfig, with_word_ids: bool = False, token_types: bool = False,
    full: bool = False,
) -> TokenizedSplit:  # fmt: skip
    """Tokenize (or load from the cache) one split. Every process may call it at once: the first to take the
    cache entry's file lock tokenizes, the others wait for it (with no time limit: tokenizing a large corpus
    takes longer than a collective's timeout) and then read its cache. A node-local cache_dir is filled once per
    node, a shared one once.

    with_word_ids also keeps each token's word index (from the fast tokenizer's pre-tokenization); full keeps
    every token without special tokens (the bodies that `windowed` cuts into windows)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{tokenizer.name_or_path}: a fast (Rust) tokenizer is required")
    if with_word_ids and (full or split.pairs is not None):
        raise ValueError("tokenize_split: word ids are for single texts cut to max_length (masked-LM corpora)")
    encoder = TextEncoder.of(tokenizer, cfg, token_types=token_types and split.pairs is not None)

    def encode(batch: dict) -> dict:
        types = None
        if with_word_ids:  # single texts (masked-LM corpora): one tokenizer call gives the ids and the word ids
            encoded = tokenizer(batch["text"], add_special_tokens=False, truncation=False, verbose=False)
            ids = [encoder.wrap(encoder.cut(body, encoder.budget)) for body in encoded["input_ids"]]
        elif full:
            ids = encoder.bodies(batch["text"])
        else:
            ids, types = encoder.encode(batch["text"], batch.get("pair"))
        columns = {"input_ids": ids, "label": batch["label"], "length": [len(row) for row in ids]}
        if types is not None:
            columns["token_type_ids"] = types
        if with_word_ids:
            no_words = [NO_WORD] * len(encoder.prefix), [NO_WORD] * len(encoder.suffix)
            columns["word_ids"] = [
                no_words[0] + encoder.cut([NO_WORD if w is None else w for w in encoded.word_ids(i)], encoder.budget)
                + no_words[1]
                for i in range(len(ids))
            ]  # fmt: skip
        return columns

    features = {"input_ids": datasets.Sequence(datasets.Value("int32")), "label": _label_feature(split.labels),
                "length": datasets.Value("int32")}  # fmt: skip
    if encoder.token_types:
        features["token_type_ids"] = datasets.Sequence(datasets.Value("int8"))
    if with_word_ids:
        features["word_ids"] = datasets.Sequence(datasets.Value("int32"))
    variant = "full" if full else "words" if with_word_ids else "ids"
    key = cache_key(split, encoder, variant)
    cache_dir = Path(cfg.cache_dir).expanduser() / "tokenized"
    cache_dir.mkdir(parents=True, exist_ok=True)
    columns = {"text": split.texts, "label": split.labels, **({"pair": split.pairs} if split.pairs is not None else {})}
    cache_file = cache_dir / f"{key}.arrow"
    with held(cache_dir / f"{key}.lock", f"the tokenization of {split.origin}"):
        if not cache_file.is_file():
            pause("tokenize", once=True)  # fault injection for tests: a slow tokenization, under the lock
        tokenized = datasets.Dataset.from_dict(columns).map(
            encode,
            batched=True,
            batch_size=1000,
            remove_columns=[c for c in columns if c != "label"],
            features=datasets.Features(features),
            cache_file_name=str(cache_file),
            new_fingerprint=key,
            load_from_cache_file=True,
            desc="tokenizing",
        )
    del columns
    table = tokenized.data.table  # the memory-mapped Arrow table behind the cache file
    fields: dict = {"features": split.features} if split.features is not None else {}
    if encoder.token_types:
        fields["token_type_ids"] = list_rows(table, "token_type_ids")
    return TokenizedSplit(
        input_ids=list_rows(table, "input_ids"),
        labels=label_array(table.column("label")),
        lengths=table.column("length").to_numpy().astype(np.int64),
        word_ids=list_rows(table, "word_ids") if with_word_ids else None,
        fields=fields,
        labelled=split.labelled,
    )


def label_array(column) -> np.ndarray:
    """The label column as int64 class ids, float32 numbers, or a [rows, labels] float32 multi-hot matrix."""
    import pyarrow as pa

    column = column.combine_chunks()
    if pa.types.is_list(column.type):
        width = len(column[0]) if len(column) else 0
        return column.flatten().to_numpy().astype(np.float32).reshape(len(column), width)
    values = column.to_numpy()
    return values.astype(np.float32 if np.issubdtype(values.dtype, np.floating) else np.int64)


def list_rows(table, name: str) -> list[np.ndarray]:
    """A list<int> column as one NumPy view per row into the Arrow buffers (read-only).

    datasets' own numpy formatting converts such a column row by row through its formatter (about 17 s for
    IMDB's 50,000 reviews on 2 cores, which made a cache hit slower than tokenizing); slicing the Arrow buffers
    takes milliseconds. Chunk by chunk, without copying: the rows stay in the memory-mapped cache file, pages
    every process on the node shares, instead of a private copy per rank."""
    rows: list[np.ndarray] = []
    for chunk in table.column(name).chunks:
        flat = chunk.flatten().to_numpy()  # zero-copy; flatten() honours a sliced array's offset, .values would not
        offsets = chunk.offsets.to_numpy()
        rows += np.split(flat, offsets[1:-1] - offsets[0])
    return rows


@dataclass
class Windows:
    """A split of long texts as windows (`TextEncoder.windows`): the windows as a split of their own, and the
    text each window belongs to."""

    split: TokenizedSplit
    document: np.ndarray
    """[windows] index of the window's text."""
    documents: int


def windowed(bodies: TokenizedSplit, encoder: TextEncoder, stride: int) -> Windows:
    """Cut every text (`tokenize_split(..., full=True)` bodies) into windows; each window carries its text's label."""
    windows, document = encoder.windows_of([body.tolist() for body in bodies.input_ids], stride)
    ids = [np.asarray(window, dtype=np.int32) for window in windows]
    split = TokenizedSplit(ids, bodies.labels[document], np.asarray([len(w) for w in ids], dtype=np.int64))
    return Windows(split, document, len(bodies))
