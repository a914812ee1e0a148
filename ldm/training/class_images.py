"""Class-prior images for DreamBooth (Ruiz et al. 2023, sec. 3.3), generated with the base model before training."""
import copy
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ldm.images import generation_metadata, save_image
from ldm.inference.flags import SAMPLER_NAMES
from ldm.inference.sampling import sample_images, sampling_mode
from ldm.inference.txt2img import next_index
from ldm.util import UserError, free_memory

logger = logging.getLogger(__name__)

CLASS_PROMPT = "a photo of a {class_word}"
STEPS, SCALE = 50, 10.0


def generation_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The weights' dtype for class images under a trainer precision: half on a GPU (bf16 when training in bf16),
    float32 on a CPU (where half precision is often emulated and memory is plentiful)."""
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if "bf16" in precision else torch.float16


def sampling_copy(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A copy of `model` for sampling whose floating-point weights are `dtype` on `device`, made tensor by tensor so
    that no second full-precision copy is ever held; buffers (the noise schedule) keep their dtype, the EMA is left
    out (it equals the weights before training)."""
    memo: dict[int, object] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(param.detach().to(device, dtype if param.is_floating_point() else None),
                                       requires_grad=False)
    ema = getattr(model, "model_ema", None)
    skipped = {id(b) for b in ema.buffers()} if ema is not None else set()
    for buffer in model.buffers():
        memo[id(buffer)] = buffer.to("meta") if id(buffer) in skipped else buffer.to(device)
    twin = copy.deepcopy(model, memo)
    twin.use_ema = False
    return twin.to(device).eval()


def generate_class_images(model: nn.Module, folder: str | Path, class_word: str, count: int, batch_size: int = 4,
                          seed: int = 0, steps: int = STEPS, scale: float = SCALE, prompt: Optional[str] = None,
                          negative_prompt: str = "", sampler: str = "ddim", device: Optional[torch.device] = None,
                          dtype: Optional[torch.dtype] = None, checkpoint: Optional[str] = None) -> list[Path]:
    """Write `count` samples of `prompt` (default "a photo of a {class_word}"; `{class_word}` is filled), steered
    away from `negative_prompt`, with `sampler` (DDIM by default) into `folder` as class-NNNNN.png, with progress.
    With a `device` or `dtype` other than the model's, a copy of the model holding its weights there in that dtype
    samples (the model stays as it is), and is freed before returning. `checkpoint`, the file the model's weights
    come from, is recorded in each image's metadata with its hash.

    Each file is written under a hidden temporary name and renamed (save_image), so an interrupted run leaves only
    whole images.
    """
    if sampler not in SAMPLER_NAMES:
        raise UserError(f"--class_sampler {sampler!r}: choose one of {', '.join(SAMPLER_NAMES)}")
    device, dtype = device or model.alphas_cumprod.device, dtype or model.unet_dtype
    if device != model.alphas_cumprod.device or dtype != model.unet_dtype:
        twin = sampling_copy(model, device, dtype)
        try:
            return generate_class_images(twin, folder, class_word, count, batch_size, seed, steps, scale, prompt,
                                         negative_prompt, sampler, checkpoint=checkpoint)
        finally:
            del twin
            free_memory(device)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prompt = (prompt or CLASS_PROMPT).replace("{class_word}", class_word)
    first = next_index(folder, r"class-(\d{5,})\.png")
    indices = list(range(first, first + count))
    metadata = generation_metadata(sampler, steps, scale, checkpoint, prompt=prompt, negative_prompt=negative_prompt)
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
