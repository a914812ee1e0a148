"""A model's samples of a list of prompts at fixed seeds and DDIM settings, saved with their metadata: what
scripts/compare.py and scripts/evaluate.py share (a model is a checkpoint with LoRA files at their scales and
embedding files bound to their words)."""
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from omegaconf import DictConfig
from PIL import Image

from ldm.config import latent_shape, native_size
from ldm.embeddings.files import apply_embedding_files
from ldm.eval.compare import ModelSpec
from ldm.images import generation_metadata, save_image
from ldm.inference.loading import load_model, precision_scope, sampling_config
from ldm.inference.sampling import sample_images
from ldm.lora.files import apply_lora_files
from ldm.util import free_memory

logger = logging.getLogger(__name__)


@dataclass
class SampleSettings:
    """Fixed for every model: the seeds of each prompt's images, the sampler and its steps, guidance, size (default:
    the config's native size), the config (default: each checkpoint's run config, else SD v1's) and the batch size."""
    seeds: list[int]
    steps: int = 25
    scale: float = 7.5
    height: Optional[int] = None
    width: Optional[int] = None
    config: Optional[str] = None
    batch: int = 2  # images per sampler call
    use_ema: bool = False  # each checkpoint's EMA UNet (model_ema.*)
    precision: str = "autocast"  # --precision: the weights' dtype and the autocast scope (ldm.inference)
    sampler: str = "ddim"
    embeddings: list[str] = field(default_factory=list)  # --embedding FILE[:WORD], bound in every model


def model_config(spec: ModelSpec, settings: SampleSettings) -> tuple[DictConfig, tuple[int, int], tuple[int, ...]]:
    """The model's config, its image size and latent shape (a size the model cannot take is a UserError)."""
    config = sampling_config(settings.config, spec.ckpt)
    height, width = (native_size(config) if size is None else size for size in (settings.height, settings.width))
    return config, (height, width), latent_shape(config, height, width)


def sample_model(spec: ModelSpec, settings: SampleSettings, prompts: Sequence[str], device: torch.device,
                 folder: Path) -> dict[str, list[Image.Image]]:
    """The model's images of every prompt, each saved with its metadata as `folder/<prompt index>-<seed>.png`; the
    model is freed before returning."""
    started = time.monotonic()
    config, (height, width), shape = model_config(spec, settings)
    scope = precision_scope(settings.precision, device)
    model = load_model(config, spec.ckpt, device, use_ema=settings.use_ema, precision=settings.precision,
                       flag="--model")
    loras = apply_lora_files(model, config.model, spec.loras)
    embeddings = apply_embedding_files(model, [*settings.embeddings, *spec.embeddings])  # the model's own win
    loaded = time.monotonic()
    folder.mkdir(parents=True, exist_ok=True)
    meta = generation_metadata(settings.sampler, settings.steps, settings.scale, spec.ckpt, settings.use_ema, loras,
                               width=width, height=height, embeddings=embeddings or None)
    images: dict[str, list[Image.Image]] = {}
    with model.ema_scope(), scope:
        for k, prompt in enumerate(prompts):
            images[prompt] = []
            for first in range(0, len(settings.seeds), settings.batch):
                seeds = settings.seeds[first:first + settings.batch]
                batch = sample_images(model, prompt, seeds, settings.steps, settings.scale, shape=shape,
                                      sampler=settings.sampler)
                for image, seed in zip(batch, seeds):
                    save_image(image, folder / f"{k:02}-{seed}.png", {**meta, "prompt": prompt, "seed": seed})
                images[prompt] += batch
    del model
    free_memory(device)
    logger.info("%s: loaded in %.1f s, sampled %d images in %.1f s", spec.label, loaded - started,
                len(prompts) * len(settings.seeds), time.monotonic() - loaded)
    return images
