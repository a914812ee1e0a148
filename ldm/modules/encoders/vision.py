"""The vision encoders that score images: CLIP ViT-B/32 and DINO ViT-S/16 from local transformers folders (the
DreamBooth paper's CLIP-I, CLIP-T and DINO), with the checks that name a folder that is not one."""
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import Tensor

from ldm.modules.encoders.preprocess import Preprocess
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

    def __init__(self, folder: str | Path, device: torch.device = torch.device("cpu"), flag: str = "--dino") -> None:
        from transformers import ViTModel
        folder = check_model_folder(folder, "dino", flag)
        self.model = ViTModel.from_pretrained(str(folder), add_pooling_layer=False, local_files_only=True)
        self.model = self.model.eval().to(device)
        self.preprocess = Preprocess.from_folder(folder, "vit")
        self.device = device

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> Tensor:
        chunks = [self.preprocess(images[i:i + BATCH]).to(self.device) for i in range(0, len(images), BATCH)]
        return torch.cat([_normalised(self.model(pixel_values=c).last_hidden_state[:, 0]) for c in chunks])
