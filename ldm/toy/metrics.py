"""What the toy scorer reads in a toy-world model's samples: how well it follows prompts (object class, context and
colour), and during training (`ToySampleScorer`, the validation callback's scorer) identifier binding,
recontextualisation and leakage of the subject into the class prompt."""
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image
from torch import nn

from ldm.inference.sampling import sample_images, sampling_mode
from ldm.toy.scorer import ToyPromptScorer, ToyScorer, load_scorer
from ldm.toy.world import CLASSES, COLOURS, CONTEXT_PHRASES, CONTEXTS
from ldm.util import mean, user_or_project_path


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


class ToySampleScorer:
    """`lightning.callbacks.validation.params.scorer` on the toy world: `binding` (the subject in the samples of
    identifier prompts without a context), `recontext_subject` and `recontext_context` (the subject, and the asked
    context, in those of identifier prompts with one: "a sks ball in the forest"), `leakage` (the subject in those of
    prompts without the identifier: "photo of a ball"); each a fraction of the samples, as the demo measures them."""

    metrics = ("binding", "recontext_subject", "recontext_context", "leakage")
    default_recipe = ("binding", "recontext_subject", "recontext_context", "1 - leakage")

    def __init__(self, weights: str = "data/toy/scorer.safetensors"):
        path = Path(user_or_project_path(weights))
        if not path.is_file():
            raise ValueError(f"the toy scorer {weights} is missing; scripts/pretrain_toy_model.py makes it")
        self.scorer = load_scorer(path)

    def __call__(self, samples: Mapping[str, Sequence[Image.Image]], identifier: str, class_word: str,
                 photos: Sequence[Path] = ()) -> dict[str, float]:
        scorer = ToyPromptScorer(self.scorer, class_word)
        hits: dict[str, list[float]] = {name: [] for name in self.metrics}
        for prompt, images in samples.items():
            scores = scorer(images, prompt)
            if not re.search(rf"\b{re.escape(identifier)}\b", prompt):
                hits["leakage"] += [s["subject"] for s in scores]
            elif scorer.asked_context(prompt) is None:
                hits["binding"] += [s["subject"] for s in scores]
            else:
                hits["recontext_subject"] += [s["subject"] for s in scores]
                hits["recontext_context"] += [s["prompt"] for s in scores]
        return {name: mean(values) for name, values in hits.items() if values}
