"""Identifier candidates for DreamBooth (`scripts/find_rare_token.py`). The paper picks rare tokens of the text
encoder's vocabulary (Ruiz et al. 2023, sec. 3.2); with CLIP's BPE the vocabulary is in merge order, so a token's
id is its merge rank and a late merge is a rare string. A candidate is a whole word that the tokenizer encodes as
one token, short, and late in the merges; given a model, candidates are ranked by how little they change what the
model is told (the text embedding of "a photo of a <token> <class>" against "a photo of a <class>") and, for the
best few, what it draws (fixed-seed samples of the two prompts)."""
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ldm.inference.sampling import sample_images

WORD_END = "</w>"


@dataclass
class Candidate:
    token: str
    rank: int  # its id in the vocabulary: the merge that made it
    text_change: Optional[float] = None  # relative L2 change of the text embedding (lower: a weaker prior)
    image_change: Optional[float] = None  # mean absolute pixel change of fixed-seed samples (lower: weaker)


def candidates(tokenizer, min_rank: int = 40000, min_length: int = 3, max_length: int = 4,
               include: Sequence[str] = ("sks",)) -> list[Candidate]:
    """Whole-word tokens of `min_length` to `max_length` letters from merge rank `min_rank` on, each encoded as
    exactly one token when written alone; `include` joins them whatever their rank (to see where they fall)."""
    found = []
    for piece, rank in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        word = piece[:-len(WORD_END)] if piece.endswith(WORD_END) else None
        if word is None or not word.isalpha() or not word.isascii():
            continue
        if (rank >= min_rank and min_length <= len(word) <= max_length) or word in include:
            if len(single_token_ids(tokenizer, word)) == 1:
                found.append(Candidate(word, rank))
    return found


def single_token_ids(tokenizer, text: str) -> list[int]:
    """The ids of `text` without the start and end tokens."""
    return tokenizer(text).input_ids[1:-1]


@torch.no_grad()
def text_changes(model: nn.Module, found: list[Candidate], class_word: str, batch_size: int = 64) -> None:
    """Fill in each candidate's text_change."""
    reference = model.get_learned_conditioning([f"a photo of a {class_word}"]).float()
    for start in range(0, len(found), batch_size):
        part = found[start:start + batch_size]
        cond = model.get_learned_conditioning([f"a photo of a {c.token} {class_word}" for c in part]).float()
        changes = (cond - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)
        for candidate, change in zip(part, changes.tolist()):
            candidate.text_change = change


@torch.no_grad()
def image_changes(model: nn.Module, found: list[Candidate], class_word: str, seeds: Sequence[int],
                  steps: int = 25, scale: float = 7.5) -> None:
    """Fill in each candidate's image_change: DDIM samples of both prompts at the same seeds, compared."""
    reference = [np.asarray(i, np.float32) for i in sample_images(model, f"a photo of a {class_word}", seeds, steps,
                                                                  scale)]
    for candidate in tqdm(found, desc="fixed-seed samples", unit="token"):
        images = sample_images(model, f"a photo of a {candidate.token} {class_word}", seeds, steps, scale)
        candidate.image_change = float(np.mean([np.abs(np.asarray(i, np.float32) - r).mean() / 255.0
                                                for i, r in zip(images, reference)]))
