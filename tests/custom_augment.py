"""A user's own augmentation, registered from a module named in `augment.modules` (used by the tests)."""

from harness.augment import register_augmentation


@register_augmentation("reverse_words")
def reverse_words(words, rng, strength, context):
    return words[::-1] if rng.random() < strength else words
