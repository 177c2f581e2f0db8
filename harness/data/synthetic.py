"""Built-in synthetic reviews: labelled, review-like texts with a learnable signal and no download.

Each text mixes neutral filler with sentiment words; the label is the polarity of the majority of those words,
so a small model learns it in a few hundred steps, but not from a single token. Lengths vary widely (like
real reviews) so that length bucketing and dynamic padding are exercised.
"""

from __future__ import annotations

import random

POSITIVE = (
    "great excellent wonderful superb brilliant moving delightful charming masterful gripping "
    "beautiful touching hilarious stunning memorable enjoyable clever fresh powerful perfect"
).split()
NEGATIVE = (
    "awful terrible boring dull bland clumsy tedious lifeless painful weak "
    "predictable shallow messy stupid annoying forgettable poor horrible dreadful pointless"
).split()
FILLER = (
    "the film movie story plot actor actress director scene scenes cast script camera music "
    "ending beginning character characters was is were a an and but with this that it its "
    "of to in on at for as by from about very quite rather really some most every one two "
    "watched saw felt thought seemed looked performance dialogue sequel screen audience time"
).split()

VOCABULARY = sorted(set(POSITIVE + NEGATIVE + FILLER))


def generate_reviews(n: int, seed: int, min_words: int = 8, max_words: int = 120) -> tuple[list[str], list[int]]:
    """Return n texts and their labels (0 negative, 1 positive), balanced and deterministic in `seed`."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        n_words = rng.randint(min_words, max_words)
        n_sentiment = max(3, n_words // 6) | 1  # odd, so the majority is never a tie
        n_major = n_sentiment // 2 + 1 + rng.randint(0, n_sentiment // 2)
        major, minor = (POSITIVE, NEGATIVE) if label == 1 else (NEGATIVE, POSITIVE)
        words = [rng.choice(major) for _ in range(n_major)]
        words += [rng.choice(minor) for _ in range(n_sentiment - n_major)]
        words += [rng.choice(FILLER) for _ in range(max(0, n_words - n_sentiment))]
        rng.shuffle(words)
        texts.append(" ".join(words) + ".")
        labels.append(label)
    order = list(range(n))
    rng.shuffle(order)
    return [texts[i] for i in order], [labels[i] for i in order]
