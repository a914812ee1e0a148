"""The DreamBooth paper's metrics (Ruiz et al. 2023, sec. 4.1): DINO and CLIP-I, the mean cosine similarity of
generated to real images under ViT-S/16 DINO CLS and CLIP ViT-B/32 image embeddings, and CLIP-T, that of each image
to its prompt. The scoring models are read from local folders only (transformers' format)."""
import re
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import Tensor

from ldm.eval.preprocess import Preprocess
from ldm.util import UserError

DOWNLOADS = {"clip": "openai/clip-vit-base-patch32", "dino": "facebook/dino-vits16",
             "clipseg": "CIDAS/clipseg-rd64-refined"}
BATCH = 16
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def check_model_folder(folder: str | Path, kind: str, flag: str) -> Path:
    """A folder that holds a transformers model (config.json); else one line naming what to download."""
    path = Path(folder)
    if not (path / "config.json").is_file():
        found = "is not a folder" if not path.is_dir() else "holds no config.json"
        raise UserError(f"{flag} {folder} {found}: download {DOWNLOADS[kind]} into it once, e.g. `hf download "
                        f"{DOWNLOADS[kind]} --local-dir {folder}` (nothing is fetched at run time)")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise UserError(f"{flag} {folder} has a config.json but no weights ({' or '.join(WEIGHT_FILES[:2])}): an "
                        f"interrupted download? Download {DOWNLOADS[kind]} into it again")
    return path


def _features(output) -> Tensor:
    """get_*_features' result: a tensor (transformers 4) or an output whose pooler_output is it (transformers 5)."""
    return output if isinstance(output, Tensor) else output.pooler_output


def _normalised(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


class ClipEmbedder:
    """CLIP image and text embeddings (L2-normalised) from a local CLIPModel folder."""

    def __init__(self, folder: str | Path, device: torch.device = torch.device("cpu"), flag: str = "--clip") -> None:
        from transformers import CLIPModel, CLIPTokenizer
        folder = check_model_folder(folder, "clip", flag)
        self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval().to(device)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.preprocess = Preprocess.from_folder(folder, "clip")
        self.device = device

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> Tensor:
        chunks = [self.preprocess(images[i:i + BATCH]).to(self.device) for i in range(0, len(images), BATCH)]
        return torch.cat([_normalised(_features(self.model.get_image_features(pixel_values=c))) for c in chunks])

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> Tensor:
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _normalised(_features(self.model.get_text_features(**tokens)))


class DinoEmbedder:
    """DINO CLS-token embeddings (L2-normalised) from a local ViTModel folder."""

    def __init__(self, folder: str | Path, device: torch.device = torch.device("cpu")) -> None:
        from transformers import ViTModel
        folder = check_model_folder(folder, "dino", "--dino")
        self.model = ViTModel.from_pretrained(str(folder), add_pooling_layer=False, local_files_only=True)
        self.model = self.model.eval().to(device)
        self.preprocess = Preprocess.from_folder(folder, "vit")
        self.device = device

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> Tensor:
        chunks = [self.preprocess(images[i:i + BATCH]).to(self.device) for i in range(0, len(images), BATCH)]
        return torch.cat([_normalised(self.model(pixel_values=c).last_hidden_state[:, 0]) for c in chunks])


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
