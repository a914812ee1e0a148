"""A config target for end-to-end tests: a validation scorer whose scores are given in advance, one per round, so
that a test knows which step is the best."""
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image


class ScriptedScorer:
    """`score` of the k-th round is `values[k]` (the last one again after them)."""

    metrics = ("score",)
    default_recipe = ("score",)

    def __init__(self, values: Sequence[float]):
        self.values, self.rounds = list(values), 0

    def __call__(self, samples: Mapping[str, Sequence[Image.Image]], identifier: str, class_word: str,
                 photos: Sequence[Path]) -> dict[str, float]:
        value = self.values[min(self.rounds, len(self.values) - 1)]
        self.rounds += 1
        return {"score": value}
