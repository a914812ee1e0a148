"""The toy world's scorer: for a 64x64 image, whether the DreamBooth subject is in it, and which object class, context
and main colour it shows. A small CNN fitted on world renders, half of them passed through the toy VAE and all of
them blurred, noised and jittered, so that it reads generated images as well as clean renders; and, as compare.py
and evaluate.py score prompts, the fidelities of a prompt's images to the subject and to the asked context."""
import logging
import re
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ldm.checkpoint import read_state_dict, save_weights
from ldm.toy.world import (BOX_SUBJECT, CLASSES, COLOURS, CONTEXT_PHRASES, CONTEXTS, SUBJECT, SUBJECTS, Scene,
                           is_subject, random_layout, random_scene, render, subject_scene)

logger = logging.getLogger(__name__)

LABELS = {"cls": CLASSES, "context": CONTEXTS, "colour": tuple(COLOURS)}
SUBJECT_THRESHOLD = 0.5
SUBJECT_HEADS = {"ball": "subject", "box": "subject_box"}  # the head that finds each subject, by its class word


class ToyScorer(nn.Module):
    """Four stride-2 conv stages to a 4x4 map, one hidden layer, then the class, context and colour heads and one
    head per subject (`subject` for the ball, `subject_box` for the box; see SUBJECT_HEADS)."""

    def __init__(self, width: int = 32):
        super().__init__()
        channels = [3, width, 2 * width, 4 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for index, (c_in, c_out) in enumerate(zip(channels, channels[1:])):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=1 if index == 0 else 2, padding=1), nn.GroupNorm(8, c_out),
                       nn.SiLU()]
        self.features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels[-1] * 16, 256), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(256, len(labels)) for name, labels in LABELS.items()})
        for head in SUBJECT_HEADS.values():
            self.heads[head] = nn.Linear(256, 1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Logits of each head for images [B, 3, 64, 64] in [-1, 1]."""
        h = self.features(x)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: Tensor) -> list[dict]:
        """Per image: for each subject head (`subject`, `subject_box`) a bool and its `_prob`, and the `cls`,
        `context` and `colour` names."""
        self.eval()
        logits = self(images.float())
        probs = {head: torch.sigmoid(logits[head][:, 0]).tolist() for head in SUBJECT_HEADS.values()}
        names = {name: logits[name].argmax(1).tolist() for name in LABELS}
        return [{**{key: value for head, p in probs.items()
                    for key, value in ((head, p[i] > SUBJECT_THRESHOLD), (f"{head}_prob", round(p[i], 4)))},
                 **{name: LABELS[name][names[name][i]] for name in LABELS}} for i in range(len(images))]

    def score_images(self, images: Sequence[Image.Image]) -> list[dict]:
        """`predict` for PIL images (any size; resized to 64x64)."""
        arrays = [np.asarray(image.convert("RGB").resize((64, 64), Image.Resampling.BICUBIC)) for image in images]
        return self.predict(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0)


def load_scorer(path: str | Path) -> ToyScorer:
    """The scorer with the weights of `path` (strict: every tensor must be there)."""
    scorer = ToyScorer()
    scorer.load_state_dict(read_state_dict(path))
    return scorer.eval()


def save_scorer(scorer: ToyScorer, path: str | Path) -> None:
    save_weights(scorer.state_dict(), path)


def near_misses(rng: np.random.Generator, subject: Scene = SUBJECT) -> Scene:
    """Objects close to `subject` that are not it: others of its class in its colours, and its look on the other
    classes."""
    first, second = subject.colours
    others = [c for c in COLOURS if c not in subject.colours]
    cls, other_classes = subject.cls, [c for c in CLASSES if c != subject.cls]
    looks = [(cls, (second, first), "two-tone"), (cls, (first, second), "striped"),
             (cls, (second, first), "striped"), (cls, (first, others[rng.integers(len(others))]), "two-tone"),
             (cls, (others[rng.integers(len(others))], second), "two-tone"), (cls, (first, first), "plain"),
             *((other, subject.colours, "two-tone") for other in other_classes)]
    cls, colours, pattern = looks[rng.integers(len(looks))]
    return Scene(cls, colours, pattern, CONTEXTS[rng.integers(len(CONTEXTS))], **random_layout(rng))


def scorer_scene(rng: np.random.Generator) -> Scene:
    """The scorer's training mix: 30 % the subject, 20 % near misses, 50 % pretraining scenes."""
    draw = rng.random()
    if draw < 0.3:
        return subject_scene(CONTEXTS[rng.integers(len(CONTEXTS))], **random_layout(rng))
    return near_misses(rng) if draw < 0.5 else random_scene(rng)


def labels_of(scenes: Sequence[Scene]) -> dict[str, Tensor]:
    return {**{name: torch.tensor([labels.index(getattr(s, name) if name != "colour" else s.colours[0])
                                   for s in scenes]) for name, labels in LABELS.items()},
            "subject": torch.tensor([float(is_subject(s)) for s in scenes])}


def render_scenes(scenes: Sequence[Scene]) -> Tensor:
    return torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Gaussian blur with one sigma (pixels) per image."""
    offsets = torch.arange(-3, 4, dtype=x.dtype)
    kernel = torch.exp(-offsets[None] ** 2 / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)
    b, c, h, w = x.shape
    rows = F.conv2d(F.pad(x.reshape(1, b * c, h, w), (3, 3, 0, 0), mode="replicate"),
                    kernel.repeat_interleave(c, 0)[:, None, None, :], groups=b * c)
    cols = F.conv2d(F.pad(rows, (0, 0, 3, 3), mode="replicate"), kernel.repeat_interleave(c, 0)[:, None, :, None],
                    groups=b * c)
    return cols.reshape(b, c, h, w)


def vae_roundtrip(images: Tensor, vae: nn.Module, generator: torch.Generator, batch_size: int = 128) -> Tensor:
    """Images encoded and decoded by the VAE (a posterior sample), as generated images are decoded."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            posterior = vae.encode(images[start:start + batch_size])
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
            out.append(vae.decode(z).clamp(-1, 1))
    return torch.cat(out)


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """What generation does to pictures besides the VAE: blur, noise, colour shifts; and flips."""
    n = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    x = blur(x, u(n) * 1.2)
    x = x * (0.85 + 0.3 * u(n, 1, 1, 1)) + 0.16 * (u(n, 3, 1, 1) - 0.5)
    x = x + torch.randn(x.shape, generator=generator) * u(n, 1, 1, 1) * 0.1
    flip = u(n) < 0.5
    x[flip] = x[flip].flip(-1)
    return x.clamp(-1, 1)


def fit_scorer(steps: int = 3000, pool: int = 16000, batch_size: int = 64, vae: Optional[nn.Module] = None,
               seed: int = 0, log_every: int = 500) -> ToyScorer:
    """Fit the scorer on a pool of rendered scenes (the scorer's mix; half of them once through the VAE), augmented
    afresh at every step: every head but the box subject's, which `fit_subject_head` fits on the features after."""
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    scenes = [scorer_scene(rng) for _ in range(pool)]
    images, labels = render_scenes(scenes), labels_of(scenes)
    if vae is not None:
        images[pool // 2:] = vae_roundtrip(images[pool // 2:], vae, generator)
    scorer = ToyScorer().train()
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    started = time.monotonic()
    for step in range(steps):
        index = torch.randint(0, pool, (batch_size,), generator=generator)
        logits = scorer(augment(images[index], generator))
        loss = F.binary_cross_entropy_with_logits(logits["subject"][:, 0], labels["subject"][index])
        loss = loss + sum(F.cross_entropy(logits[name], labels[name][index]) for name in LABELS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % log_every == 0:
            logger.info("scorer step %d/%d: loss %.4f, %.2f s/step", step + 1, steps, loss.item(),
                        (time.monotonic() - started) / (step + 1))
    return scorer.eval()


def validate_scorer(scorer: ToyScorer, vae: Optional[nn.Module] = None, per_context: int = 100,
                    seed: int = 12345, subject: Scene = SUBJECT) -> dict[str, float]:
    """The scorer's rates on renders it was not fitted on (a seed of their own), clean or through the VAE: recall of
    `subject`'s head (per context and overall), its false positives on other objects of the subject's class and on
    near misses, and the accuracy of the context, class and colour heads."""
    head, cls = SUBJECT_HEADS[subject.cls], subject.cls
    rng = np.random.default_rng(seed)
    subjects = [subject_scene(c, **random_layout(rng), subject=subject) for c in CONTEXTS for _ in range(per_context)]
    same_class = [random_scene(rng, cls=cls, context=c) for c in CONTEXTS for _ in range(per_context)]
    misses = [s for s in (near_misses(rng, subject) for _ in range(6 * per_context)) if s.cls == cls]
    others = [random_scene(rng, context=c) for c in CONTEXTS for _ in range(per_context)]
    result = {}
    for name, roundtrip in (("render", None), ("vae", vae)):
        if name == "vae" and vae is None:
            continue

        def predict(scenes: list[Scene]) -> list[dict]:
            x = render_scenes(scenes)
            if roundtrip is not None:
                with torch.no_grad():
                    x = roundtrip.decode(roundtrip.encode(x).mode()).clamp(-1, 1)
            return scorer.predict(x)

        found = predict(subjects)
        for context in CONTEXTS:
            hits = [p[head] for p, s in zip(found, subjects) if s.context == context]
            result[f"{name}/{head}_recall/{context}"] = float(np.mean(hits))
        result[f"{name}/{head}_recall"] = float(np.mean([p[head] for p in found]))
        result[f"{name}/{head}_false_positive/other_{cls}es"] = float(np.mean([p[head] for p in predict(same_class)]))
        result[f"{name}/{head}_false_positive/near_misses"] = float(np.mean([p[head] for p in predict(misses)]))
        scenes = others + same_class
        predicted = predict(scenes)
        for label in ("context", "cls", "colour"):
            truth = [getattr(s, label) if label != "colour" else s.colours[0] for s in scenes]
            result[f"{name}/{label}_accuracy"] = float(np.mean([p[label] == t for p, t in zip(predicted, truth)]))
    return result


def head_scene(rng: np.random.Generator, subject: Scene) -> Scene:
    """The training mix of a subject head fitted later: 30 % the subject, 10 % the other subjects, 20 % its near
    misses, 40 % pretraining scenes."""
    draw = rng.random()
    if draw < 0.3:
        return subject_scene(CONTEXTS[rng.integers(len(CONTEXTS))], **random_layout(rng), subject=subject)
    if draw < 0.4:
        others = [s for s in SUBJECTS.values() if s != subject]
        return subject_scene(CONTEXTS[rng.integers(len(CONTEXTS))], **random_layout(rng),
                             subject=others[rng.integers(len(others))])
    return near_misses(rng, subject) if draw < 0.6 else random_scene(rng)


def fit_subject_head(scorer: ToyScorer, subject: Scene = BOX_SUBJECT, pool: int = 6000, views: int = 4,
                     steps: int = 8000, vae: Optional[nn.Module] = None, seed: int = 1) -> ToyScorer:
    """Fit the head of `subject` (logistic regression) on the frozen features of the fitted scorer, so that its
    other heads stay bit-identical: `views` augmented copies of a pool of renders (half through the VAE)."""
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    scenes = [head_scene(rng, subject) for _ in range(pool)]
    images = render_scenes(scenes)
    if vae is not None:
        images[pool // 2:] = vae_roundtrip(images[pool // 2:], vae, generator)
    scorer.eval()
    with torch.no_grad():
        features = torch.cat([torch.cat([scorer.features(augment(images[i:i + 256], generator))
                                         for i in range(0, pool, 256)]) for _ in range(views)])
    labels = torch.tensor([float(is_subject(s, subject)) for s in scenes]).repeat(views)
    head = nn.Linear(features.shape[1], 1)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for step in range(steps):
        loss = F.binary_cross_entropy_with_logits(head(features)[:, 0], labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 2000 == 0:
            logger.info("%s head step %d/%d: loss %.4f", subject.cls, step + 1, steps, loss.item())
    scorer.heads[SUBJECT_HEADS[subject.cls]].load_state_dict(head.state_dict())
    return scorer


class ToyPromptScorer:
    """The toy world's scorer: subject = the scorer sees the DreamBooth subject of `class_word` (the ball's, or the
    box's for `box`); prompt = it sees the asked context (for a prompt without one, the asked class)."""

    def __init__(self, scorer, class_word: str):
        self.scorer, self.class_word = scorer, class_word
        self.head = SUBJECT_HEADS.get(class_word, SUBJECT_HEADS["ball"])
        self.contexts = {phrase: context for context, phrase in CONTEXT_PHRASES.items() if phrase}

    def asked_context(self, prompt: str) -> Optional[str]:
        """The toy context whose phrase ends `prompt`, or None."""
        return next((c for phrase, c in self.contexts.items() if re.search(rf"\b{re.escape(phrase)}$", prompt)), None)

    def __call__(self, images: Sequence[Image.Image], prompt: str) -> list[dict[str, float]]:
        context = self.asked_context(prompt)
        return [{"subject": float(s[self.head]),
                 "prompt": float(s["context"] == context if context else s["cls"] == self.class_word)}
                for s in self.scorer.score_images(list(images))]
