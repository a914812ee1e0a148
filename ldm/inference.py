"""What every sampling script shares: devices, model loading, seeds, prompts, sampler choice, images with metadata."""
import argparse
import contextlib
import logging
import math
import re
from pathlib import Path
from typing import Callable, ContextManager, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor, nn

from ldm.checkpoint import (CheckpointError, ShapeMismatchError, check_checkpoint_file, load_model_weights,
                            parameters_on_meta)
from ldm.controlnet import add_control_arguments, build_controls, check_control_options
from ldm.data.buckets import bucket_box
from ldm.data.image_files import DataError, load_rgb
from ldm.images import make_grid, read_metadata, save_image, to_pil  # noqa: F401 (read_metadata: for callers)
from ldm.lora_files import apply_lora_files, check_lora_specs
from ldm.model_config import latent_shape, native_size, sampling_config, size_multiple, with_fitting_config
from ldm.models.diffusion.control import controlled
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.guidance import CompVisDenoiser
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampling import SAMPLERS as K_SAMPLERS
from ldm.models.diffusion.sampling import DIFFUSERS_SCHEDULE, STOCHASTIC, Generator, randn
from ldm.models.diffusion.sigmas import sigma_to_t
from ldm.precision import cuda_has_bf16, gpu_name
from ldm.util import (DiskFullError, UserError, ensure_writable_dir, file_sha256, instantiate_from_config,
                      user_or_project_path)

logger = logging.getLogger(__name__)

SAMPLER_NAMES = ("ddim", "plms", *K_SAMPLERS)
NO_SCHEDULE = ("ddim", "plms", "dpm_fast", "dpm_adaptive")  # --karras does not apply to them
ADAPTIVE_TOLERANCES = (0.05, 0.0078)  # k-diffusion's rtol, atol
CLIP_SKIP_KEY = "model.params.cond_stage_config.params.clip_skip"  # what --clip_skip sets


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags txt2img and img2img share, with the defaults of the CompVis txt2img script."""
    add = parser.add_argument
    add("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar",
        help="the prompt to render")
    add("--negative_prompt", type=str, default="", help="what to steer away from (the unconditional prompt)")
    add("--outdir", type=str, nargs="?", default="outputs/txt2img-samples", help="dir to write results to")
    add("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    add("--skip_save", action="store_true", help="do not save individual samples (speed tests)")
    add("--ddim_steps", type=int, default=50, help="number of sampling steps (every sampler)")
    add("--plms", action="store_true", help="use PLMS sampling (same as --sampler plms)")
    add("--sampler", choices=SAMPLER_NAMES, default=None, help="sampler (default ddim, or plms with --plms)")
    add("--karras", action="store_true", help="Karras et al. sigma spacing for the k-samplers")
    add("--rtol", type=float, default=None,
        help=f"dpm_adaptive: relative error tolerance (default {ADAPTIVE_TOLERANCES[0]}); it replaces --ddim_steps")
    add("--atol", type=float, default=None,
        help=f"dpm_adaptive: absolute error tolerance (default {ADAPTIVE_TOLERANCES[1]})")
    add("--fixed_code", action="store_true", help="the same starting noise (seeds) for every batch")
    add("--ddim_eta", type=float, default=0.0, help="DDIM eta (eta=0.0 is deterministic)")
    add("--n_iter", type=int, default=2, help="batches per prompt")
    add("--C", type=int, default=None, help="latent channels (default: the config's, 4 for SD v1)")
    add("--f", type=int, default=None,
        help="downsampling factor of the autoencoder (default: the config's, 8 for SD v1)")
    add("--n_samples", type=int, default=3, help="images per batch (batch size)")
    add("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    add("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    add("--use_ema", action="store_true", help="sample with the file's EMA UNet (model_ema.*: a run trained with "
        "use_ema, or a *-full-ema file)")
    add("--from-file", type=str, help="read prompts from this file, one per line")
    add("--config", type=user_or_project_path, default=None, help="model config (default: the saved config of the "
        "training run that --ckpt comes from, else configs/stable-diffusion/v1-inference.yaml)")
    add("--ckpt", type=user_or_project_path, default="models/ldm/stable-diffusion-v1/model.ckpt",
        help=".ckpt or .safetensors (configs/... and data/... that are not in the working folder: the project's own)")
    add("--seed", type=int, default=42, help="seed of the first image; image k gets seed + k")
    add_precision_argument(parser)
    add("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto", help="auto picks cuda, then mps, then cpu")
    add("--clip_skip", type=int, default=None, metavar="N",
        help="condition on the N-th text encoder layer from the end, as A1111: 1 the last, 2 the penultimate "
             "(default: the config's, so what the run of --ckpt trained with, else 1)")
    add("--lora", action="append", default=[], metavar="FILE[:SCALE]",
        help="a kohya-format LoRA file (ours, kohya's, A1111's, civitai's) folded into --ckpt at SCALE (default 1); "
             "repeatable, the files add up")
    add_control_arguments(parser)


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    """--precision, as every sampling script takes it (load_model and precision_scope read it)."""
    parser.add_argument("--precision", choices=["autocast", "full", "bf16"], default="autocast",
                        help="autocast: fp16 weights and mixed precision on a CUDA GPU (full elsewhere); bf16: "
                             "bfloat16 weights and mixed precision; full: fp32 weights")


def resolve_sampler(opt: argparse.Namespace) -> str:
    """The sampler that the flags ask for, refusing combinations that would be silently ignored."""
    sampler = opt.sampler or ("plms" if opt.plms else "ddim")
    if opt.plms and sampler != "plms":
        raise UserError(f"--plms conflicts with --sampler {sampler}; pass only one of them")
    if opt.karras and sampler in NO_SCHEDULE:
        raise UserError(f"--karras applies to the samplers that follow a sigma schedule "
                        f"({', '.join(s for s in K_SAMPLERS if s not in NO_SCHEDULE)}), not to {sampler}")
    if sampler != "dpm_adaptive" and (opt.rtol is not None or opt.atol is not None):
        raise UserError(f"--rtol and --atol apply to the dpm_adaptive sampler only; drop them for {sampler}")
    for name in ("rtol", "atol"):
        if getattr(opt, name) is not None and getattr(opt, name) <= 0:
            raise UserError(f"--{name} must be above 0, got {getattr(opt, name)}")
    if opt.ddim_eta != 0 and sampler != "ddim":
        raise UserError(f"--ddim_eta applies to the ddim sampler only; drop it for {sampler}")
    if opt.ddim_steps < 1 or opt.n_iter < 1 or opt.n_samples < 1:
        raise UserError("--ddim_steps, --n_iter and --n_samples must be at least 1")
    if opt.scale < 0:
        logger.warning("--scale %g is below 0: guidance then pushes the images away from the prompt (usual values "
                       "are 5 to 10; 1 turns guidance off)", opt.scale)
    return sampler


def choose_device(name: str) -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then the CPU; asking for a missing one is an error."""
    has_mps = torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device cuda: PyTorch {torch.__version__} sees no CUDA GPU; use --device auto or cpu")
    if name == "mps" and not has_mps:
        raise UserError("--device mps: Apple MPS is not available here; use --device auto or cpu")
    return torch.device(name)


def precision_scope(precision: str, device: torch.device) -> ContextManager:
    """Mixed-precision autocast for `precision`, or nothing for full precision."""
    if precision == "full" or (precision == "autocast" and device.type == "cpu"):
        return contextlib.nullcontext()
    if precision == "bf16" and device.type == "cuda" and not cuda_has_bf16(device):
        raise UserError(f"--precision bf16: this GPU ({gpu_name(device)}) has no native bfloat16; use --precision "
                        "autocast")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def weights_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of a sampling model's weights: float16 under autocast on a CUDA GPU, bfloat16 with --precision
    bf16, else float32 (--precision full, and autocast elsewhere)."""
    if precision == "bf16":
        return torch.bfloat16
    return torch.float16 if precision == "autocast" and device.type == "cuda" else torch.float32


def load_model(config: DictConfig, ckpt_path: str, device: torch.device, use_ema: bool = False,
               precision: str = "full", flag: str = "--ckpt") -> nn.Module:
    """A LatentDiffusion built from `config`, with the weights of `ckpt_path` (its EMA UNet with `use_ema`), in eval
    mode on `device`; the UNet, VAE and text encoder hold their weights at `weights_dtype(precision, device)`, the
    noise schedule stays float32; `flag` is the option that named the file. A run config's `use_ema` only says how
    it trained: the sampling model holds one set of weights."""
    check_checkpoint(ckpt_path, flag)
    if OmegaConf.select(config, "model.params.use_ema"):
        config = OmegaConf.merge(config, {"model": {"params": {"use_ema": False}}})
    try:
        with parameters_on_meta():  # the file fills them: no random init, one copy of the weights
            model = instantiate_from_config(config.model)
    except (KeyError, TypeError, ValueError, ImportError) as err:
        raise UserError(f"cannot build the model from the config: {err}") from None
    dtype = weights_dtype(precision, device)
    for part in (model.model, model.first_stage_model, model.cond_stage_model):
        part.to(dtype)  # still on meta: the file's tensors load at this dtype
    try:
        load_model_weights(model, ckpt_path, use_ema=use_ema)
    except ShapeMismatchError as err:
        raise with_fitting_config(err) from None
    return model.eval().requires_grad_(False).to(device)


def check_checkpoint(ckpt_path: str, flag: str = "--ckpt") -> None:
    """Refuse a checkpoint (named by `flag`) that is missing, unreadable, a folder or not a weight file, before any
    model is built."""
    check_checkpoint_file(ckpt_path, f"pass {flag} path/to/sd-v1-x.ckpt or .safetensors")


def read_prompts(prompt: Optional[str], from_file: Optional[str]) -> list[str]:
    """The prompts to render: --prompt, or the non-empty lines of --from-file."""
    if not from_file:
        return [prompt or ""]
    try:
        lines = Path(from_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--from-file {from_file}: cannot read it ({err.__class__.__name__}: {err})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"--from-file {from_file} holds no prompts; write one prompt per line")
    return prompts


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, so that an image depends only on its own seed, whatever the device."""
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def img2img_steps(steps: int, strength: float) -> int:
    """How many of `steps` an img2img run with `strength` performs (the CompVis rule, int(strength * steps))."""
    if not 0.0 < strength <= 1.0:
        raise UserError(f"--strength {strength} must be in (0, 1]")
    if int(strength * steps) < 1:
        raise UserError(f"--strength {strength} with {steps} steps runs no step; raise --strength or --ddim_steps")
    return int(strength * steps)


def sample_latents(model: nn.Module, sampler: str, steps: int, cond: Tensor, uncond: Optional[Tensor], scale: float,
                   noise: Tensor, generator: Generator = None, eta: float = 0.0, karras: bool = False,
                   init_latent: Optional[Tensor] = None, strength: float = 1.0, progress: bool = True,
                   tolerances: tuple[float, float] = ADAPTIVE_TOLERANCES,
                   on_prediction: Optional[Callable[[Tensor, int], None]] = None) -> Tensor:
    """Latents from `noise` (txt2img) or from `init_latent` noised to `strength` (img2img) with any sampler;
    dpm_adaptive takes `tolerances` (rtol, atol) and logs how many model calls it used; `on_prediction(x0, i)` sees
    the predicted clean latents after each step i of a txt2img run."""
    control = getattr(model, "control", None)  # ControlNets act over a fraction of the steps run
    if sampler in ("ddim", "plms"):
        ddim = DDIMSampler(model) if sampler == "ddim" else PLMSSampler(model)
        if control is not None:
            ddim.make_schedule(steps, eta)
            run = steps if init_latent is None else img2img_steps(steps, strength)
            control.plan(ddim.ddim_timesteps[:run][::-1].copy())
        if init_latent is None:
            return ddim.sample(steps, noise.shape[0], noise.shape[1:], cond, eta=eta, x_T=noise, verbose=progress,
                               unconditional_guidance_scale=scale, unconditional_conditioning=uncond,
                               generator=generator, img_callback=on_prediction)[0]
        ddim.make_schedule(steps, eta)
        t_start = img2img_steps(steps, strength)
        z = ddim.stochastic_encode(init_latent, t_start, noise)
        return ddim.decode(z, cond, t_start, scale, uncond, verbose=progress, generator=generator)
    denoiser, diffusers_schedule = CompVisDenoiser(model), sampler in DIFFUSERS_SCHEDULE
    sigmas = denoiser.get_sigmas(steps, karras=karras, whole_timesteps=diffusers_schedule)
    if init_latent is None:  # diffusers starts from x_T = noise in VP form, k-diffusion from noise * sigma_max
        x = noise * ((sigmas[0] ** 2 + 1).sqrt() if diffusers_schedule else sigmas[0])
    else:
        sigmas = sigmas[steps - img2img_steps(steps, strength):]
        x = init_latent + noise * sigmas[0]
    if control is not None:
        control.plan(sigma_to_t(sigmas[:-1].float(), denoiser.log_sigmas))
    extra: dict = {"generator": generator} if sampler in STOCHASTIC else {}
    if on_prediction is not None and init_latent is None:
        extra["callback"] = lambda state: on_prediction(state["denoised"], state["i"])
    if sampler == "dpm_adaptive":
        extra.update(rtol=tolerances[0], atol=tolerances[1], info={})
    z = K_SAMPLERS[sampler](denoiser, x, sigmas, {"cond": cond, "uncond": uncond, "cond_scale": scale},
                            disable=not progress, **extra)
    if sampler == "dpm_adaptive":
        info = extra["info"]
        logger.info("dpm_adaptive: %d model calls for %d image(s) (%d steps accepted, %d rejected)",
                    info["model_calls"], x.shape[0], info["accepted"], info["rejected"])
    return z


@torch.no_grad()
def sample_images(model: nn.Module, prompt: str, seeds: Sequence[int], steps: int = 50, scale: float = 10.0,
                  eta: float = 0.0, shape: Optional[Sequence[int]] = None,
                  on_prediction: Optional[Callable[[Tensor, int], None]] = None, negative_prompt: str = "",
                  sampler: str = "ddim", per_call: Optional[int] = None) -> list[Image.Image]:
    """Samples of `prompt` (DDIM unless `sampler` names another), one per seed (an image depends on its seed only),
    with latents of `shape` (C, h, w; default: the model's own size); `on_prediction` as in sample_latents (it sees
    the first call's images). With `per_call`, at most that many images per sampler call; the decoder takes one
    image at a time (its activations at full size are the peak of sampling)."""
    if per_call is not None and len(seeds) > per_call > 0:
        chunks = [seeds[first:first + per_call] for first in range(0, len(seeds), per_call)]
        return [image for k, chunk in enumerate(chunks)
                for image in sample_images(model, prompt, chunk, steps, scale, eta, shape, on_prediction if k == 0
                                           else None, negative_prompt, sampler)]
    n, device = len(seeds), model.alphas_cumprod.device
    shape = (model.channels, model.image_size, model.image_size) if shape is None else tuple(shape)
    cond = model.get_learned_conditioning([prompt] * n)
    uncond = None if scale == 1.0 else model.get_learned_conditioning([negative_prompt] * n)
    generators = make_generators(seeds)
    noise = randn((n, *shape), generators, device)
    latents = sample_latents(model, sampler, steps, cond, uncond, scale, noise, generators, eta, progress=False,
                             on_prediction=on_prediction)
    return to_pil(torch.cat([model.decode_first_stage(z) for z in latents.split(1)]))


@contextlib.contextmanager
def sampling_mode(model: nn.Module):
    """Eval mode and EMA weights for sampling in the middle of training; the training mode comes back after."""
    was_training = model.training
    model.eval()
    try:
        with model.ema_scope():
            yield model
    finally:
        model.train(was_training)


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


def generate(opt: argparse.Namespace, init_img: Optional[str] = None) -> list[Path]:
    """Check the flags, load the model, then sample, decode and save every prompt's images and grid."""
    sampler, device = resolve_sampler(opt), choose_device(opt.device)
    check_checkpoint(opt.ckpt)
    check_lora_specs(opt.lora)
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
    model = load_model(config, opt.ckpt, device, use_ema=opt.use_ema, precision=opt.precision)
    loras = apply_lora_files(model, config.model, opt.lora)
    tolerances = (ADAPTIVE_TOLERANCES[0] if opt.rtol is None else opt.rtol,
                  ADAPTIVE_TOLERANCES[1] if opt.atol is None else opt.atol)
    params = {"sampler": sampler, "karras": opt.karras, "steps": opt.ddim_steps, "scale": opt.scale,
              "eta": opt.ddim_eta, "width": width, "height": height, "negative_prompt": opt.negative_prompt,
              "checkpoint": Path(opt.ckpt).name, "checkpoint_sha256": file_sha256(opt.ckpt),
              **({"ema": True} if opt.use_ema else {})}
    if loras:
        params.update(loras=loras)
    if init is not None:
        params.update(init_image=Path(init_img).name, strength=strength)
    if sampler == "dpm_adaptive":
        params.update(rtol=tolerances[0], atol=tolerances[1])
    if model.cond_stage_model.clip_skip != 1:  # recorded only when set, as A1111's infotext does
        params.update(clip_skip=model.cond_stage_model.clip_skip)
    outdir, n = Path(opt.outdir), opt.n_samples
    sample_dir = outdir / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    count, grid_count = next_index(sample_dir, r"(\d{5,})\.png"), next_index(outdir, r"grid-(\d{4,})\.png")
    hint_stem = outdir / "hint-{:04}".format(next_index(outdir, r"hint-(\d{4,})-\d+\.png"))
    control, controlnets = build_controls(opt, control_settings, config, (width, height), device, model.unet_dtype,
                                          hint_stem)
    if controlnets:
        params.update(controlnets=controlnets, guess_mode=opt.guess_mode)
    written, batch_index = [], 0
    with torch.no_grad(), scope, model.ema_scope(), controlled(model, control):
        # The posterior mean, so that an img2img result depends on its seed only.
        init_latent = None if init is None else model.scale_factor * model.encode_first_stage(init.to(device)).mode()
        for prompt in prompts:
            cond = model.get_learned_conditioning([prompt]).repeat(n, 1, 1)
            uncond = None if opt.scale == 1.0 else model.get_learned_conditioning([opt.negative_prompt]).repeat(n, 1, 1)
            images, prompt_seeds = [], []
            for _ in range(opt.n_iter):
                first = opt.seed + (0 if opt.fixed_code else batch_index * n)
                seeds, batch_index = list(range(first, first + n)), batch_index + 1
                generators = make_generators(seeds)
                z = sample_latents(model, sampler, opt.ddim_steps, cond, uncond, opt.scale,
                                   randn((n, *shape), generators, device), generators, opt.ddim_eta, opt.karras,
                                   None if init_latent is None else init_latent.repeat(n, 1, 1, 1), strength,
                                   tolerances=tolerances)
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


def save_kept(image: Image.Image, path: Path, metadata: dict, written: list[Path]) -> None:
    """save_image, adding `path` to `written`; a full disk stops with one line saying what is kept."""
    try:
        save_image(image, path, metadata)
    except DiskFullError as err:
        raise UserError(f"{err}; stopped, the {len(written)} images written before it are kept") from None
    written.append(path)
