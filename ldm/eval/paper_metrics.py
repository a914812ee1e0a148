"""The DreamBooth paper's metrics (Ruiz et al. 2023, sec. 4.1): DINO and CLIP-I, the mean cosine similarity of
generated to real images under ViT-S/16 DINO CLS and CLIP ViT-B/32 image embeddings, and CLIP-T, that of each image
to its prompt. The scoring models are read from local folders only (transformers' format)."""
import re
from typing import Sequence

from PIL import Image
from torch import Tensor

from ldm.modules.encoders.vision import ClipEmbedder, DinoEmbedder
from ldm.util import UserError


def without_identifier(prompt: str, identifier: str) -> str:
    """The prompt CLIP-T compares with: the identifier taken out ("a sks dog on the beach" -> "a dog on the beach")."""
    return re.sub(r"\s+", " ", re.sub(rf"\b{re.escape(identifier)}\b", "", prompt)).strip()


def real_pairs_mean(embeddings: Tensor) -> float:
    """Mean cosine similarity over the pairs of distinct real images (the paper's "real images" row)."""
    n = embeddings.shape[0]
    if n < 2:
        return float("nan")
    similarity = embeddings @ embeddings.T
    return float((similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1)))


class PaperScorer:
    """DINO, CLIP-I against the subject's real photos and CLIP-T against the prompt without the identifier, per
    generated image (the Scorer interface of ldm/eval/compare.py)."""

    metrics = ("dino", "clip_i", "clip_t")

    def __init__(self, clip: ClipEmbedder, dino: DinoEmbedder, real: Sequence[Image.Image], identifier: str) -> None:
        if not real:
            raise UserError("the subject's real photos are needed for DINO and CLIP-I; none were found")
        self.clip, self.dino, self.identifier = clip, dino, identifier
        self.real_clip, self.real_dino = clip.images(real), dino.images(real)

    def __call__(self, images: Sequence[Image.Image], prompt: str) -> list[dict[str, float]]:
        clip, dino = self.clip.images(images), self.dino.images(images)
        text = self.clip.texts([without_identifier(prompt, self.identifier)])
        clip_i, dino_i, clip_t = (clip @ self.real_clip.T).mean(1), (dino @ self.real_dino.T).mean(1), clip @ text.T
        return [{"dino": float(d), "clip_i": float(c), "clip_t": float(t)}
                for d, c, t in zip(dino_i, clip_i, clip_t[:, 0])]

    def real_baseline(self) -> dict[str, float]:
        """DINO and CLIP-I of the real photos against each other."""
        return {"dino": real_pairs_mean(self.real_dino), "clip_i": real_pairs_mean(self.real_clip)}
