"""Loss masks from a text prompt (`scripts/make_masks.py`): CLIPSeg (Lüddecke and Ecker 2022) from a local
transformers folder scores every pixel against the prompt; the probability map, brought back to the photo's size,
is thresholded, dilated by `padding` pixels (the mask keeps a margin around the subject) and feathered (a Gaussian
edge of `feather` pixels), as ldm/data/masks.py reads it: white = learn."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from ldm.modules.encoders.preprocess import Preprocess
from ldm.modules.encoders.vision import check_model_folder


class ClipSegMasker:
    def __init__(self, folder: str | Path, device: torch.device = torch.device("cpu")) -> None:
        from transformers import CLIPSegForImageSegmentation, CLIPTokenizer
        folder = check_model_folder(folder, "clipseg", "--clipseg")
        self.model = CLIPSegForImageSegmentation.from_pretrained(str(folder), local_files_only=True).eval().to(device)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.preprocess = Preprocess.from_folder(folder, "vit")
        self.device = device

    @torch.no_grad()
    def probabilities(self, image: Image.Image, text: str) -> np.ndarray:
        """P(pixel shows `text`) at the photo's own size, [H, W] in [0, 1]."""
        tokens = self.tokenizer([text], padding=True, return_tensors="pt").to(self.device)
        pixels = self.preprocess([image]).to(self.device)
        logits = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                            pixel_values=pixels).logits.reshape(1, 1, *pixels.shape[-2:])
        size = (image.height, image.width)
        return torch.nn.functional.interpolate(logits.sigmoid().float(), size=size, mode="bilinear")[0, 0].cpu().numpy()

    def mask(self, image: Image.Image, text: str, threshold: float, padding: int, feather: float) -> Image.Image:
        """The loss mask of `image`: white where CLIPSeg finds `text` above `threshold`, grown and feathered."""
        mask = Image.fromarray(((self.probabilities(image, text) >= threshold) * 255).astype(np.uint8))
        if padding > 0:
            mask = mask.filter(ImageFilter.MaxFilter(2 * padding + 1))
        if feather > 0:
            mask = mask.filter(ImageFilter.GaussianBlur(feather))
        return mask
