"""How well a toy-world model follows prompts, read by the toy scorer: object class, context and colour."""
from typing import Sequence

import numpy as np
from torch import nn

from ldm.inference.sampling import sample_images, sampling_mode
from ldm.toy.scorer import ToyScorer
from ldm.toy.world import CLASSES, COLOURS, CONTEXT_PHRASES, CONTEXTS


def prompt_following(model: nn.Module, scorer: ToyScorer, samples: int = 8, steps: int = 25, scale: float = 5.0,
                     seed: int = 1000, classes: Sequence[str] = CLASSES) -> dict[str, float]:
    """Fractions of DDIM samples that show the asked class and context ("a photo of a ball in the snow", every
    class x context) and the asked colour ("a photo of a red box", every colour x class)."""
    seeds = list(range(seed, seed + samples))
    hits: dict[str, list[bool]] = {"class": [], "context": [], "colour": []}
    with sampling_mode(model):
        for cls in classes:
            for context in CONTEXTS:
                for score in scorer.score_images(
                        sample_images(model, f"a photo of a {cls} {CONTEXT_PHRASES[context]}", seeds, steps, scale)):
                    hits["class"].append(score["cls"] == cls)
                    hits["context"].append(score["context"] == context)
            for colour in COLOURS:
                article = "an" if colour[0] in "aeiou" else "a"
                images = sample_images(model, f"a photo of {article} {colour} {cls}", seeds, steps, scale)
                hits["colour"] += [score["colour"] == colour for score in scorer.score_images(images)]
    return {name: float(np.mean(values)) for name, values in hits.items()}
