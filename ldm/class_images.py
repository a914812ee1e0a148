"""Class-prior images for DreamBooth (Ruiz et al. 2023, sec. 3.3), generated with the base model before training."""
import logging
from pathlib import Path
from typing import Optional

from torch import nn
from tqdm.auto import tqdm

from ldm.images import save_image
from ldm.inference import SAMPLER_NAMES, next_index, sample_images, sampling_mode
from ldm.util import UserError

logger = logging.getLogger(__name__)

CLASS_PROMPT = "a photo of a {class_word}"
STEPS, SCALE = 50, 10.0


def generate_class_images(model: nn.Module, folder: str | Path, class_word: str, count: int, batch_size: int = 4,
                          seed: int = 0, steps: int = STEPS, scale: float = SCALE, prompt: Optional[str] = None,
                          negative_prompt: str = "", sampler: str = "ddim") -> list[Path]:
    """Write `count` samples of `prompt` (default "a photo of a {class_word}"; `{class_word}` is filled), steered
    away from `negative_prompt`, with `sampler` (DDIM by default) into `folder` as class-NNNNN.png, with progress.

    Each file is written under a hidden temporary name and renamed (save_image), so an interrupted run leaves only
    whole images.
    """
    if sampler not in SAMPLER_NAMES:
        raise UserError(f"--class_sampler {sampler!r}: choose one of {', '.join(SAMPLER_NAMES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prompt = (prompt or CLASS_PROMPT).replace("{class_word}", class_word)
    first = next_index(folder, r"class-(\d{5,})\.png")
    indices = list(range(first, first + count))
    metadata = {"prompt": prompt, "negative_prompt": negative_prompt, "sampler": sampler, "steps": steps,
                "scale": scale}
    written = []
    with sampling_mode(model), tqdm(total=count, desc=f"class images '{prompt}'", unit="img") as progress:
        for start in range(0, count, batch_size):
            batch = indices[start:start + batch_size]
            images = sample_images(model, prompt, [seed + i for i in batch], steps, scale,
                                   negative_prompt=negative_prompt, sampler=sampler)
            for index, image in zip(batch, images):
                path = folder / f"class-{index:05}.png"
                save_image(image, path, {**metadata, "seed": seed + index})
                written.append(path)
            progress.update(len(batch))
    logger.info("wrote %d class images to %s", len(written), folder)
    return written
