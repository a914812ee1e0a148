"""Text-to-image and image-to-image runs as the sampling scripts make them, in three rooms entered once, in order:
plan (every flag checked, no model loaded), build (the model with its LoRAs, embeddings and ControlNets), run (the
batches, and the images written with their metadata)."""
import argparse
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor, nn

from ldm.config import latent_shape, native_size, size_multiple
from ldm.controlnet.options import build_controls, check_control_options
from ldm.controlnet.stack import ControlStack, controlled
from ldm.data.buckets import bucket_box
from ldm.data.image_files import DataError, load_rgb
from ldm.embeddings.files import apply_embedding_files, check_embedding_specs, warn_unused
from ldm.images import generation_metadata, make_grid, save_image, to_pil
from ldm.inference.flags import CLIP_SKIP_KEY, read_prompts, resolve_sampler
from ldm.inference.loading import check_checkpoint, choose_device, load_model, precision_scope, sampling_config
from ldm.inference.sampling import ADAPTIVE_TOLERANCES, img2img_steps, make_generators, sample_latents
from ldm.lora.files import apply_lora_files, check_lora_specs
from ldm.models.diffusion.sampling import randn
from ldm.util import DiskFullError, UserError, ensure_writable_dir

logger = logging.getLogger(__name__)


def init_size(width: int, height: int, native: int, multiple: int, target_height: Optional[int] = None,
              target_width: Optional[int] = None) -> tuple[int, int]:
    """(width, height) an init image of `width` x `height` is sampled at: `target_width` x `target_height` (--W/--H),
    the other side following the image's aspect ratio when one is given, else the model's native area (native x
    native pixels) at the image's aspect ratio; each side rounded to a multiple of `multiple`."""
    if target_height is None and target_width is None:
        scale = native / math.sqrt(width * height)
        target_width, target_height = width * scale, height * scale
    elif target_height is None:
        target_height = target_width * height / width
    elif target_width is None:
        target_width = target_height * width / height
    return tuple(max(multiple, round(side / multiple) * multiple) for side in (target_width, target_height))


def load_init_image(path: str, multiple: int, native: int, height: Optional[int] = None, width: Optional[int] = None,
                    keep_size: bool = False) -> Tensor:
    """An init image as [1, 3, H, W] in [-1, 1], read as training photos are (EXIF orientation, any mode) and resized
    to init_size, centre-cropped by what the new aspect ratio leaves over; with `keep_size` at its own size, cropped
    to a multiple of `multiple` pixels on each side."""
    if keep_size and (height is not None or width is not None):
        raise UserError("--keep_size samples at the init image's own size; drop --H/--W, or --keep_size")
    for flag, side in (("--H", height), ("--W", width)):
        if side is not None and side <= 0:
            raise UserError(f"{flag} {side} must be a positive number of pixels")
    try:
        image = load_rgb(path)
    except DataError as err:
        raise UserError(f"--init-img {err}") from None
    if keep_size:
        size = tuple(s - s % multiple for s in image.size)
        if not all(size):
            raise UserError(f"--init-img {path} is {image.size[0]}x{image.size[1]}, smaller than {multiple} pixels")
        box = (0, 0, *size)
    else:
        size = init_size(*image.size, native, multiple, height, width)
        box = bucket_box(*image.size, size)
    if size != image.size:
        how = "cropped" if keep_size else "resized"
        logger.info("init image %dx%d %s to %dx%d (sides a multiple of %d%s)", *image.size, how, *size, multiple,
                    "" if keep_size or height or width else f"; the model's {native}x{native} area")
        image = image.crop(box) if keep_size else image.resize(size, Image.Resampling.LANCZOS, box=box)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def next_index(folder: Path, pattern: str) -> int:
    """One more than the largest number in the file names of `folder` that match `pattern`; 0 when none do."""
    regex = re.compile(pattern)
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := regex.fullmatch(p.name))] if folder.is_dir() else []
    return max(numbers, default=-1) + 1


@dataclass
class SamplingPlan:
    """What the flags ask for, checked with no model loaded: the sampler, device and autocast scope, the model config,
    the ControlNet settings, the prompts, the init image (img2img), the image and latent sizes."""
    sampler: str
    device: torch.device
    scope: ContextManager
    config: DictConfig
    control_settings: list
    prompts: list[str]
    init: Optional[Tensor]
    height: int
    width: int
    shape: tuple[int, int, int]
    strength: float
    tolerances: tuple[float, float]


@dataclass
class SamplingModel:
    """The model loaded with its LoRAs and ControlNets, and the metadata every image it makes records."""
    model: nn.Module
    control: Optional[ControlStack]
    metadata: dict[str, Any]


def plan(opt: argparse.Namespace, init_img: Optional[str] = None) -> SamplingPlan:
    """Every flag checked (sampler, device, precision, checkpoint, LoRAs, output folder, config, ControlNets, prompts,
    sizes, the init image) before any model is loaded."""
    sampler, device = resolve_sampler(opt), choose_device(opt.device)
    check_checkpoint(opt.ckpt)
    check_lora_specs(opt.lora)
    check_embedding_specs(opt.embedding)
    ensure_writable_dir(opt.outdir, "--outdir")
    config = sampling_config(opt.config, opt.ckpt)
    if opt.clip_skip is not None:
        OmegaConf.update(config, CLIP_SKIP_KEY, opt.clip_skip, merge=True)
    control_settings = check_control_options(opt, config)
    prompts = read_prompts(opt.prompt, opt.from_file)
    native = native_size(config)
    init = None if init_img is None else load_init_image(init_img, size_multiple(config), native, opt.H, opt.W,
                                                         opt.keep_size)
    height, width = ((native if opt.H is None else opt.H, native if opt.W is None else opt.W) if init is None
                     else init.shape[2:])
    shape = latent_shape(config, height, width, opt.C, opt.f)
    strength = getattr(opt, "strength", 1.0)
    if init is not None:
        img2img_steps(opt.ddim_steps, strength)
    scope = precision_scope(opt.precision, device)
    tolerances = (ADAPTIVE_TOLERANCES[0] if opt.rtol is None else opt.rtol,
                  ADAPTIVE_TOLERANCES[1] if opt.atol is None else opt.atol)
    return SamplingPlan(sampler, device, scope, config, control_settings, prompts, init, height, width, shape,
                        strength, tolerances)


def build(opt: argparse.Namespace, sampling: SamplingPlan, init_img: Optional[str] = None) -> SamplingModel:
    """The model with the checkpoint's weights, the LoRA files merged in and the ControlNets (their hint images
    written to the output folder), and the images' metadata."""
    model = load_model(sampling.config, opt.ckpt, sampling.device, use_ema=opt.use_ema, precision=opt.precision)
    loras = apply_lora_files(model, sampling.config.model, opt.lora)
    embeddings = apply_embedding_files(model, opt.embedding)
    warn_unused(embeddings, [*sampling.prompts, opt.negative_prompt])
    metadata = generation_metadata(sampling.sampler, opt.ddim_steps, opt.scale, opt.ckpt, opt.use_ema, loras,
                                   karras=opt.karras, eta=opt.ddim_eta, width=sampling.width, height=sampling.height,
                                   negative_prompt=opt.negative_prompt, embeddings=embeddings or None)
    if sampling.init is not None:
        metadata.update(init_image=Path(init_img).name, strength=sampling.strength)
    if sampling.sampler == "dpm_adaptive":
        metadata.update(rtol=sampling.tolerances[0], atol=sampling.tolerances[1])
    if model.cond_stage_model.clip_skip != 1:  # recorded only when set, as A1111's infotext does
        metadata.update(clip_skip=model.cond_stage_model.clip_skip)
    outdir = Path(opt.outdir)
    (outdir / "samples").mkdir(parents=True, exist_ok=True)
    hint_stem = outdir / "hint-{:04}".format(next_index(outdir, r"hint-(\d{4,})-\d+\.png"))
    size = (sampling.width, sampling.height)
    control, controlnets = build_controls(opt, sampling.control_settings, sampling.config, size, sampling.device,
                                          model.unet_dtype, hint_stem)
    if controlnets:
        metadata.update(controlnets=controlnets, guess_mode=opt.guess_mode)
    return SamplingModel(model, control, metadata)


def run(opt: argparse.Namespace, sampling: SamplingPlan, built: SamplingModel) -> list[Path]:
    """Sample, decode and save every prompt's images (`--n_iter` batches of `--n_samples`) and its grid."""
    model, params, n = built.model, built.metadata, opt.n_samples
    outdir = Path(opt.outdir)
    sample_dir = outdir / "samples"
    count, grid_count = next_index(sample_dir, r"(\d{5,})\.png"), next_index(outdir, r"grid-(\d{4,})\.png")
    written, batch_index = [], 0
    with torch.no_grad(), sampling.scope, model.ema_scope(), controlled(model, built.control):
        # The posterior mean, so that an img2img result depends on its seed only.
        init_latent = (None if sampling.init is None else
                       model.scale_factor * model.encode_first_stage(sampling.init.to(sampling.device)).mode())
        for prompt in sampling.prompts:
            cond = model.get_learned_conditioning([prompt]).repeat(n, 1, 1)
            uncond = None if opt.scale == 1.0 else model.get_learned_conditioning([opt.negative_prompt]).repeat(n, 1, 1)
            images, prompt_seeds = [], []
            for _ in range(opt.n_iter):
                first = opt.seed + (0 if opt.fixed_code else batch_index * n)
                seeds, batch_index = list(range(first, first + n)), batch_index + 1
                generators = make_generators(seeds)
                z = sample_latents(model, sampling.sampler, opt.ddim_steps, cond, uncond, opt.scale,
                                   randn((n, *sampling.shape), generators, sampling.device), generators, opt.ddim_eta,
                                   opt.karras, None if init_latent is None else init_latent.repeat(n, 1, 1, 1),
                                   sampling.strength, tolerances=sampling.tolerances)
                batch = to_pil(model.decode_first_stage(z))
                if not opt.skip_save:
                    for image, seed in zip(batch, seeds):
                        save_kept(image, sample_dir / f"{count:05}.png", {**params, "prompt": prompt, "seed": seed},
                                  written)
                        count += 1
                if not opt.skip_grid:
                    images, prompt_seeds = images + batch, prompt_seeds + seeds
            if not opt.skip_grid:
                save_kept(make_grid(images, opt.n_rows or n), outdir / f"grid-{grid_count:04}.png",
                          {**params, "prompt": prompt, "seeds": prompt_seeds}, written)
                grid_count += 1
    return written


def generate(opt: argparse.Namespace, init_img: Optional[str] = None) -> list[Path]:
    """A sampling script's run: plan (every flag checked, no model loaded), build (the model with its LoRAs and
    ControlNets), run (sample, decode, save)."""
    sampling = plan(opt, init_img)
    return run(opt, sampling, build(opt, sampling, init_img))


def save_kept(image: Image.Image, path: Path, metadata: dict, written: list[Path]) -> None:
    """save_image, adding `path` to `written`; a full disk stops with one line saying what is kept."""
    try:
        save_image(image, path, metadata)
    except DiskFullError as err:
        raise UserError(f"{err}; stopped, the {len(written)} images written before it are kept") from None
    written.append(path)
