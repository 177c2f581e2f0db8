"""Train-time text augmentation: a registry of word-level operations, applied on the fly to training examples.

`augment.ops` lists operations as `name:strength` and they run in that order on each training text, every time
the text is drawn, with an RNG seeded by (run seed, epoch, example index): an epoch sees new variants, a rerun
(or a resumed run) the same ones. Validation and test texts are never augmented.

Built in: `word_dropout` (drop each word with probability strength), `swap` (swap strength x words adjacent
pairs), `synonym` (replace each word that has synonyms with probability strength; `augment.synonyms_path` is a
text file with one group of interchangeable words per line, comma-separated). Add your own:

    from harness.augment import register_augmentation

    @register_augmentation("shout")
    def shout(words: list[str], rng: numpy.random.Generator, strength: float, context) -> list[str]:
        return [w.upper() if rng.random() < strength else w for w in words]

and name its module in `augment.modules` so that every rank imports it before training starts.
"""

from __future__ import annotations

import importlib
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from harness.config import AugmentConfig, ConfigError, DataConfig
from harness.data.collate import PadCollator
from harness.data.tokenize import TextEncoder

Augmentation = Callable[[list[str], np.random.Generator, float, "AugmentContext"], list[str]]
AUGMENTATIONS: dict[str, Augmentation] = {}
AUGMENT_STREAM = 0x61756720  # keeps augmentation draws apart from any other per-example stream


def register_augmentation(name: str) -> Callable[[Augmentation], Augmentation]:
    """Decorator: make `fn(words, rng, strength, context) -> words` available as `augment.ops: [name:strength]`."""

    def add(fn: Augmentation) -> Augmentation:
        AUGMENTATIONS[name] = fn
        return fn

    return add


@dataclass
class AugmentContext:
    """Run-level resources an operation may need (loaded once)."""

    synonyms: dict[str, list[str]] = field(default_factory=dict)
    """word -> the other words of its group."""


@register_augmentation("word_dropout")
def word_dropout(words: list[str], rng: np.random.Generator, strength: float, context: AugmentContext) -> list[str]:
    kept = [w for w, r in zip(words, rng.random(len(words)), strict=True) if r >= strength]
    return kept or words[:1]  # never an empty text


@register_augmentation("swap")
def swap(words: list[str], rng: np.random.Generator, strength: float, context: AugmentContext) -> list[str]:
    words = list(words)
    if len(words) < 2:
        return words
    for i in rng.integers(0, len(words) - 1, size=int(round(strength * len(words)))):
        words[i], words[i + 1] = words[i + 1], words[i]
    return words


@register_augmentation("synonym")
def synonym(words: list[str], rng: np.random.Generator, strength: float, context: AugmentContext) -> list[str]:
    out = []
    for word, r in zip(words, rng.random(len(words)), strict=True):
        # Punctuation around a word ("great!") stays where it was; the lookup is on the bare, lowercased word.
        core = word.strip(string.punctuation)
        options = context.synonyms.get(core.lower()) if core else None
        if options and r < strength:
            start = word.index(core)
            word = word[:start] + options[int(rng.integers(len(options)))] + word[start + len(core) :]
        out.append(word)
    return out


def parse_op(item: str) -> tuple[str, float]:
    name, _, strength = item.partition(":")
    return name.strip(), float(strength) if strength else 0.1


def check_augment_config(cfg: AugmentConfig) -> list[str]:
    """Problems with `augment.*`: unknown operations (after importing augment.modules), strengths, files."""
    problems = []
    for module in cfg.modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            problems.append(f"augment.modules: cannot import {module!r}: {exc}")
    for item in cfg.ops:
        try:
            name, strength = parse_op(item)
        except ValueError:
            problems.append(f"augment.ops: {item!r} is not name:strength (e.g. word_dropout:0.1)")
            continue
        if name not in AUGMENTATIONS:
            problems.append(f"augment.ops: unknown operation {name!r}; known: {', '.join(sorted(AUGMENTATIONS))}")
        if not 0 <= strength <= 1:
            problems.append(f"augment.ops: {item!r}: strength must be in [0, 1]")
        if name == "synonym" and not cfg.synonyms_path:
            problems.append("augment.synonyms_path: required by the synonym operation")
    if cfg.synonyms_path and not Path(cfg.synonyms_path).expanduser().is_file():
        problems.append(f"augment.synonyms_path {cfg.synonyms_path}: no such file")
    return problems


def load_synonyms(path: str) -> dict[str, list[str]]:
    """One group per line, comma-separated ("good, great, fine"); blank lines and # comments are skipped."""
    synonyms: dict[str, list[str]] = {}
    for number, line in enumerate(Path(path).expanduser().read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        group = [w.strip().lower() for w in line.split(",") if w.strip()]
        if len(group) < 2 or any(" " in w for w in group):
            raise ConfigError(
                [f"augment.synonyms_path {path}, line {number}: expected 2+ single words, comma-separated"]
            )
        for word in group:
            synonyms.setdefault(word, [])
            synonyms[word] += [w for w in group if w != word and w not in synonyms[word]]
    return synonyms


class Augmenter:
    """The configured operations, applied in order to one text, deterministically per (seed, epoch, index)."""

    def __init__(self, cfg: AugmentConfig, seed: int):
        problems = check_augment_config(cfg)
        if problems:
            raise ConfigError(problems)
        self.ops = [(AUGMENTATIONS[name], strength) for name, strength in map(parse_op, cfg.ops)]
        self.context = AugmentContext(load_synonyms(cfg.synonyms_path) if cfg.synonyms_path else {})
        self.seed = seed

    def __call__(self, text: str, index: int, epoch: int) -> str:
        rng = np.random.default_rng([self.seed, AUGMENT_STREAM, epoch, index])
        words = text.split()
        for op, strength in self.ops:
            words = op(words, rng, strength, self.context)
        return " ".join(words)


@dataclass
class AugmentingCollator:
    """Training batches from raw texts: augment each, tokenize (truncation as configured), then pad."""

    texts: list[str]
    augmenter: Augmenter
    epoch: int
    tokenizer: object
    data: DataConfig
    pad: PadCollator

    def __post_init__(self):
        self.encoder = TextEncoder.of(self.tokenizer, self.data)

    def __call__(self, examples: list[tuple]) -> dict[str, torch.Tensor]:
        texts = [self.augmenter(self.texts[example[0]], example[0], self.epoch) for example in examples]
        encoded, _ = self.encoder.encode(texts)  # truncated exactly as the cached (unaugmented) texts are
        rows = [(example[0], np.asarray(ids), *example[2:]) for example, ids in zip(examples, encoded, strict=True)]
        return self.pad(rows)  # the examples with their new token ids; their other fields pass through
