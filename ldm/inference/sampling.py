"""The one sampler path: DDIM, PLMS or a k-sampler over one denoiser from latent noise to latents, seeded per image;
and images of a prompt for the callers inside the library (validation, evaluation, the toy metrics)."""
import contextlib
import logging
from typing import Callable, ContextManager, Optional, Sequence

import torch
from PIL import Image
from torch import Tensor, nn

from ldm.images import to_pil
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.guidance import CompVisDenoiser
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampling import SAMPLERS as K_SAMPLERS
from ldm.models.diffusion.sampling import DIFFUSERS_SCHEDULE, STOCHASTIC, Generator, randn
from ldm.models.diffusion.sigmas import sigma_to_t
from ldm.util import UserError

logger = logging.getLogger(__name__)


ADAPTIVE_TOLERANCES = (0.05, 0.0078)  # k-diffusion's rtol, atol


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
def sample_images(model: nn.Module, prompt: str | Sequence[str], seeds: Sequence[int], steps: int = 50,
                  scale: float = 10.0, eta: float = 0.0, shape: Optional[Sequence[int]] = None,
                  on_prediction: Optional[Callable[[Tensor, int], None]] = None, negative_prompt: str = "",
                  sampler: str = "ddim", per_call: Optional[int] = None) -> list[Image.Image]:
    """Samples of `prompt` (DDIM unless `sampler` names another), one per seed (an image depends on its seed and
    prompt only); `prompt` is one for every image or a list of one per seed (several prompts in one batch). Latents
    of `shape` (C, h, w; default: the model's own size); `on_prediction` as in sample_latents (it sees the first
    call's images). With `per_call`, at most that many images per sampler call; the decoder takes one image at a time
    (its activations at full size are the peak of sampling)."""
    prompts = [prompt] * len(seeds) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(seeds):
        raise ValueError(f"sample_images: {len(prompts)} prompts for {len(seeds)} seeds; give one prompt or one per seed")
    if per_call is not None and len(seeds) > per_call > 0:
        starts = range(0, len(seeds), per_call)
        return [image for k, first in enumerate(starts)
                for image in sample_images(model, prompts[first:first + per_call], seeds[first:first + per_call],
                                           steps, scale, eta, shape, on_prediction if k == 0 else None,
                                           negative_prompt, sampler)]
    n, device = len(seeds), model.alphas_cumprod.device
    shape = (model.channels, model.image_size, model.image_size) if shape is None else tuple(shape)
    cond = model.get_learned_conditioning(prompts)
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


@torch.no_grad()
def sample_once(model: torch.nn.Module, sampler: str, steps: int, n: int, shape: Sequence[int], scale: float,
                scope: ContextManager, prompt: str = "a photo of sks dog") -> torch.Tensor:
    """`n` images of `prompt` with guidance `scale` (seeds 0..n-1) through the sampling scripts' own path, decoded."""
    with scope:
        cond, uncond = model.get_learned_conditioning([prompt] * n), model.get_learned_conditioning([""] * n)
        generators = make_generators(range(n))
        noise = randn((n, *shape), generators, model.alphas_cumprod.device)
        z = sample_latents(model, sampler, steps, cond, uncond, scale, noise, generators, progress=False)
        return model.decode_first_stage(z)
