"""The image preprocessing of transformers' CLIPImageProcessor and ViTImageProcessor (resize, centre crop, rescale,
normalise), read from a model folder's preprocessor_config.json and done with PIL and NumPy (no torchvision)."""
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ldm.util import read_json

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# The processors' class defaults, for keys a preprocessor_config.json leaves out.
DEFAULTS = {
    "clip": {"size": {"shortest_edge": 224}, "resample": Image.Resampling.BICUBIC, "do_center_crop": True,
             "crop_size": {"height": 224, "width": 224}, "image_mean": CLIP_MEAN, "image_std": CLIP_STD},
    "vit": {"size": {"height": 224, "width": 224}, "resample": Image.Resampling.BILINEAR, "do_center_crop": False,
            "crop_size": None, "image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5)},
}


def _size(value: Any, square: bool) -> Optional[dict]:
    """A size entry as a dict: an int is the shortest edge (or a square when `square`)."""
    if value is None or isinstance(value, dict):
        return value
    return {"height": int(value), "width": int(value)} if square else {"shortest_edge": int(value)}


@dataclass
class Preprocess:
    """One processor's steps; `__call__` turns PIL images into a [N, 3, H, W] float32 batch."""
    size: Optional[dict]
    resample: int
    do_center_crop: bool
    crop_size: Optional[dict]
    image_mean: Sequence[float]
    image_std: Sequence[float]
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True

    @classmethod
    def from_folder(cls, folder: str | Path, kind: str) -> "Preprocess":
        """The steps of `folder`'s preprocessor_config.json, with the defaults of `kind` ("clip" or "vit")."""
        path = Path(folder) / "preprocessor_config.json"
        config = read_json(path) if path.is_file() else {}
        values = {**DEFAULTS[kind], **{k: v for k, v in config.items() if k in cls.__dataclass_fields__}}
        values["size"] = _size(values["size"], square=kind == "vit")
        values["crop_size"] = _size(values["crop_size"], square=True)
        return cls(**values)

    def resized(self, image: Image.Image) -> Image.Image:
        """The image at the processor's size: the shortest edge to `shortest_edge` (the long one truncated, as
        transformers rounds), or exactly height x width."""
        if not self.do_resize:
            return image
        width, height = image.size
        if "shortest_edge" in self.size:
            short, long = sorted((width, height))
            edge = self.size["shortest_edge"]
            new_long = int(edge * long / short)
            target = (edge, new_long) if width <= height else (new_long, edge)
        else:
            target = (self.size["width"], self.size["height"])
        return image.resize(target, resample=Image.Resampling(self.resample))

    def cropped(self, array: np.ndarray) -> np.ndarray:
        """The centre crop of an [H, W, C] array (the top-left of the two middles when the margin is odd)."""
        if not self.do_center_crop:
            return array
        height, width = self.crop_size["height"], self.crop_size["width"]
        top, left = (array.shape[0] - height) // 2, (array.shape[1] - width) // 2
        if top < 0 or left < 0:
            raise ValueError(f"an image of {array.shape[1]}x{array.shape[0]} after resizing is smaller than the crop "
                             f"{width}x{height}")
        return array[top:top + height, left:left + width]

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        batch = []
        for image in images:
            array = self.cropped(np.asarray(self.resized(image.convert("RGB"))))
            pixels = array.astype(np.float64) * self.rescale_factor if self.do_rescale else array.astype(np.float64)
            pixels = pixels.astype(np.float32)
            if self.do_normalize:
                pixels = (pixels - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
            batch.append(torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))))
        return torch.stack(batch)
