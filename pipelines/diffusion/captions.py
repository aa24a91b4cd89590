"""Caption augmentation of the instance rows: tag shuffling (kohya's `--shuffle_caption --keep_tokens N`, and
`--keep_tokens_separator`) and caption dropout (`--caption_dropout_rate P`, the caption replaced by "").

Every draw is a pure function of (seed, epoch, stream, dataset index) and of what it decides, so a resumed run,
another batch size or another number of processes sees the same caption for the same sample, and turning
shuffling on or off does not change which captions are dropped. Only Python's `random.Random.random()` is used:
it is the one draw whose sequence Python promises to keep across versions (`shuffle`, `randint` may change).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pipelines.trainer.order import stable_seed

# Purpose tags appended to the (seed, epoch, stream, index) seed: the crop, noise and timestep draws of the same
# sample use the same four numbers without a tag, and a caption draw must not be correlated with them.
DROPOUT_DRAW = 0x63617064  # "capd"
SHUFFLE_DRAW = 0x63617073  # "caps"


def split_tags(text: str) -> list[str]:
    """Comma-separated tags, stripped; empty tags (`a,,b`, a trailing comma) dropped."""
    return [t.strip() for t in text.split(",") if t.strip()]


def shuffled(tags: list[str], rng: random.Random) -> list[str]:
    """A permutation of `tags` drawn from `rng.random()` alone (one key per tag), stable across Python versions."""
    keys = [rng.random() for _ in tags]
    return [tags[i] for i in sorted(range(len(tags)), key=keys.__getitem__)]


def shuffle_caption(caption: str, keep_tokens: int, separator: str, rng: random.Random) -> str:
    """The caption's tags re-joined with ", ", the movable ones in `rng`'s order. With `separator` present in the
    caption (kohya's `--keep_tokens_separator`, e.g. "|||"), the tags before it stay in place, those after it move,
    and those after a second separator stay at the end, and `keep_tokens` is not used; otherwise the first
    `keep_tokens` tags stay in place."""
    suffix: list[str] = []
    if separator and separator in caption:
        fixed_part, movable_part = caption.split(separator, 1)
        if separator in movable_part:
            movable_part, suffix_part = movable_part.split(separator, 1)
            suffix = split_tags(suffix_part)
        fixed, movable = split_tags(fixed_part), split_tags(movable_part)
    else:
        tags = split_tags(caption)
        fixed, movable = tags[:keep_tokens], tags[keep_tokens:]
    return ", ".join(fixed + shuffled(movable, rng) + suffix)


@dataclass(frozen=True)
class CaptionAugment:
    """What happens to an instance caption before it is encoded. Class (prior-preservation) rows are never passed
    here: their prompt is the class prompt the class images were made with, and the prior loss needs it intact."""

    seed: int = 0
    dropout_rate: float = 0.0
    """probability that the caption becomes "" (after shuffling)"""
    shuffle: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""

    @property
    def active(self) -> bool:
        return self.shuffle or self.dropout_rate > 0

    def dropped(self, epoch: int, stream: int, index: int) -> bool:
        """Whether sample `index` of `stream` drops its caption in `epoch`."""
        if self.dropout_rate <= 0:
            return False
        rng = random.Random(stable_seed(self.seed, epoch, stream, index, DROPOUT_DRAW))
        return rng.random() < self.dropout_rate

    def __call__(self, caption: str, epoch: int, stream: int, index: int) -> str:
        if self.shuffle:
            rng = random.Random(stable_seed(self.seed, epoch, stream, index, SHUFFLE_DRAW))
            caption = shuffle_caption(caption, self.keep_tokens, self.keep_tokens_separator, rng)
        return "" if self.dropped(epoch, stream, index) else caption
