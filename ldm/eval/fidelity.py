"""Fidelity during training: what scores the validation samples (a `SampleScorer`: the paper's CLIP-T, CLIP-I and
DINO here, the toy world's in ldm/toy/metrics.py), and `fidelity`, one number from a recipe of terms ("binding",
"1 - leakage", "dino / 0.668"), their mean, which the best step and early stopping watch."""
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Protocol, Sequence

import torch
from PIL import Image

from ldm.data.image_files import load_rgb
from ldm.eval.evaluate import PAPER_ROWS
from ldm.eval.paper_metrics import without_identifier
from ldm.modules.encoders.vision import ClipEmbedder, DinoEmbedder

PAPER = PAPER_ROWS["DreamBooth, Stable Diffusion (paper)"]
TERM = re.compile(r"(1\s*-\s*)?([a-z][a-z0-9_]*)(?:\s*/\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?))?")


class SampleScorer(Protocol):
    """Scores one subject's validation samples, by prompt, as `metrics` (names without `val/`); `default_recipe` is
    the fidelity it suggests."""
    metrics: tuple[str, ...]
    default_recipe: tuple[str, ...]

    def __call__(self, samples: Mapping[str, Sequence[Image.Image]], identifier: str, class_word: str,
                 photos: Sequence[Path]) -> dict[str, float]: ...


@dataclass(frozen=True)
class Term:
    """One term of a fidelity recipe: `metric`, divided by `scale`, or one minus that (`complement`)."""
    metric: str
    complement: bool = False
    scale: float = 1.0

    def value(self, scores: Mapping[str, float]) -> float:
        value = scores[self.metric] / self.scale
        return 1.0 - value if self.complement else value

    def __str__(self) -> str:
        return f"{'1 - ' if self.complement else ''}{self.metric}{f' / {self.scale:g}' if self.scale != 1 else ''}"


def parse_recipe(terms: Sequence[str], known: Optional[Iterable[str]] = None) -> tuple[Term, ...]:
    """The terms of a recipe such as ["binding", "recontext_subject", "1 - leakage"] or ["dino / 0.668",
    "clip_t / 0.305"]; each names a metric of `known` (when given)."""
    known = None if known is None else tuple(known)
    if isinstance(terms, str) or not terms:
        raise ValueError(f"a fidelity recipe is a list of terms such as [binding, 1 - leakage], got {terms!r}")
    parsed = []
    for text in terms:
        match = TERM.fullmatch(str(text).strip())
        if match is None:
            raise ValueError(f"fidelity term {text!r}: expected 'metric', '1 - metric' or 'metric / number'")
        if known is not None and match.group(2) not in known:
            raise ValueError(f"fidelity term {text!r}: {match.group(2)} is not measured here (the scorer measures "
                             f"{', '.join(known) or 'nothing'})")
        scale = float(match.group(3) or 1.0)
        if scale == 0:
            raise ValueError(f"fidelity term {text!r}: division by zero")
        parsed.append(Term(match.group(2), bool(match.group(1)), scale))
    return tuple(parsed)


def fidelity(recipe: Sequence[Term], scores: Mapping[str, float]) -> Optional[float]:
    """The mean of the recipe's terms; None when a metric it names is missing or not finite."""
    if not recipe or any(not math.isfinite(scores.get(term.metric, math.nan)) for term in recipe):
        return None
    return sum(term.value(scores) for term in recipe) / len(recipe)


def clip_scores(clip: ClipEmbedder, samples: Mapping[str, Sequence[Image.Image]], real: torch.Tensor,
                identifier: str) -> dict[str, float]:
    """CLIP-T: each sample against its prompt without the identifier; CLIP-I: the samples of identifier prompts
    against the instance photos' CLIP embeddings `real` (the paper's definitions, ldm/eval/paper_metrics.py)."""
    text_scores, image_scores = [], []
    for prompt, images in samples.items():
        embedded = clip.images(list(images))
        text_scores += (embedded @ clip.texts([without_identifier(prompt, identifier)]).T)[:, 0].tolist()
        if re.search(rf"\b{re.escape(identifier)}\b", prompt):
            image_scores += (embedded @ real.T).mean(1).tolist()
    scores = {"val/clip_t": sum(text_scores) / len(text_scores)}
    if image_scores:
        scores["val/clip_i"] = sum(image_scores) / len(image_scores)
    return scores


class PaperSampleScorer:
    """On real weights: CLIP-T and CLIP-I with a CLIP folder, DINO (the identifier prompts' samples against the
    photos) with a DINO folder; the default fidelity is DINO and CLIP-T, each divided by the paper's DreamBooth-SD
    figure, when both are measured."""

    def __init__(self, clip: Optional[ClipEmbedder], dino: Optional[DinoEmbedder]) -> None:
        self.clip, self.dino = clip, dino
        self.metrics = (("clip_t", "clip_i") if clip is not None else ()) + (("dino",) if dino is not None else ())
        self.default_recipe = (f"dino / {PAPER['dino']}", f"clip_t / {PAPER['clip_t']}")
        self._real: dict[tuple, tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = {}

    def real(self, photos: Sequence[Path]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The photos' CLIP and DINO embeddings, once per session."""
        key = tuple(str(p) for p in photos)
        if key not in self._real:
            images = [load_rgb(p) for p in photos]
            self._real[key] = (None if self.clip is None else self.clip.images(images),
                               None if self.dino is None else self.dino.images(images))
        return self._real[key]

    def __call__(self, samples: Mapping[str, Sequence[Image.Image]], identifier: str, class_word: str,
                 photos: Sequence[Path]) -> dict[str, float]:
        real_clip, real_dino = self.real(photos)
        scores = {}
        if self.clip is not None:
            scores.update({k[4:]: v for k, v in clip_scores(self.clip, samples, real_clip, identifier).items()})
        subject = [image for prompt, images in samples.items() for image in images
                   if re.search(rf"\b{re.escape(identifier)}\b", prompt)]
        if self.dino is not None and subject:
            scores["dino"] = float((self.dino.images(subject) @ real_dino.T).mean())
        return scores
