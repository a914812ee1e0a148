"""DDIM sampling (Song et al. 2021) over a LatentDiffusion model, with the CompVis `DDIMSampler` interface."""
import logging
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ldm.models.diffusion.guidance import guided_eps
from ldm.models.diffusion.sampling import Generator, randn

logger = logging.getLogger(__name__)


class DDIMSampler:
    """DDIM over the model's `alphas_cumprod`, eta = 0 deterministic (Song et al. 2021, eq. 12)."""

    name = "DDIM"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.ddim_timesteps: Optional[np.ndarray] = None

    def make_schedule(self, ddim_num_steps: int, ddim_eta: float = 0.0) -> None:
        """Timesteps k * (T // S) + 1 for k < S and their alpha_bar, previous alpha_bar and sigma (eq. 16)."""
        num_timesteps = self.model.num_timesteps
        if not 0 < ddim_num_steps < num_timesteps:
            raise ValueError(f"the number of DDIM steps must be from 1 to {num_timesteps - 1}, got {ddim_num_steps}")
        # The +1 offset of CompVis' 'uniform' schedule is kept on purpose (diffusers: steps_offset=1). CompVis took
        # range(0, T, T // S), more than S steps when S does not divide T; this takes exactly S, as diffusers does.
        self.ddim_timesteps = np.arange(ddim_num_steps) * (num_timesteps // ddim_num_steps) + 1
        alphas_cumprod = self.model.alphas_cumprod.float()
        index = torch.as_tensor(self.ddim_timesteps, device=alphas_cumprod.device)
        self.ddim_alphas = alphas_cumprod[index]
        self.ddim_alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[index[:-1]]])
        self.ddim_sigmas = ddim_eta * ((1 - self.ddim_alphas_prev) / (1 - self.ddim_alphas)
                                       * (1 - self.ddim_alphas / self.ddim_alphas_prev)).sqrt()

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: Sequence[int], conditioning: Optional[Tensor] = None,
               callback: Optional[Callable[[int], None]] = None,
               img_callback: Optional[Callable[[Tensor, int], None]] = None, eta: float = 0.0,
               x_T: Optional[Tensor] = None, log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Optional[Tensor] = None, verbose: bool = True,
               generator: Generator = None) -> tuple[Tensor, dict]:
        """Sample a batch of latents of `shape` (C, H, W) in S steps; returns (samples, {'x_inter', 'pred_x0'})."""
        self.make_schedule(S, eta)
        device = self.model.alphas_cumprod.device
        img = x_T if x_T is not None else randn((batch_size, *shape), generator, device)
        return self._loop(img, conditioning, S, unconditional_guidance_scale, unconditional_conditioning,
                          callback, img_callback, log_every_t, verbose, generator)

    def stochastic_encode(self, x0: Tensor, t_start: int, noise: Optional[Tensor] = None,
                          generator: Generator = None) -> Tensor:
        """Noise `x0` to the level at which `decode(..., t_start)` begins (CompVis went one step further), eq. 4 of
        Ho et al. 2020."""
        if noise is None:
            noise = randn(x0.shape, generator, x0.device, x0.dtype)
        alpha = self.ddim_alphas[t_start - 1]
        return alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise

    @torch.no_grad()
    def decode(self, x_latent: Tensor, cond: Tensor, t_start: int, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Optional[Tensor] = None,
               callback: Optional[Callable[[int], None]] = None, verbose: bool = True,
               generator: Generator = None) -> Tensor:
        """Run the last `t_start` steps of the schedule from `x_latent` (img2img; call `make_schedule` first)."""
        if self.ddim_timesteps is None or not 0 < t_start <= len(self.ddim_timesteps):
            raise ValueError(f"t_start must be between 1 and the number of scheduled steps, got {t_start}")
        return self._loop(x_latent, cond, t_start, unconditional_guidance_scale, unconditional_conditioning,
                          callback, None, 100, verbose, generator)[0]

    def _loop(self, img: Tensor, cond: Tensor, n_steps: int, scale: float, uncond: Optional[Tensor],
              callback, img_callback, log_every_t: int, verbose: bool, generator: Generator) -> tuple[Tensor, dict]:
        """Steps with indices n_steps-1 down to 0 of the current schedule."""
        intermediates = {"x_inter": [img], "pred_x0": [img]}
        self._start()
        steps = range(n_steps - 1, -1, -1)
        for i, index in enumerate(tqdm(steps, desc=f"{self.name} Sampler", total=n_steps, disable=not verbose)):
            ts = torch.full((img.shape[0],), int(self.ddim_timesteps[index]), device=img.device, dtype=torch.long)
            img, pred_x0 = self._step(img, cond, ts, index, scale, uncond, generator)
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == n_steps - 1:
                intermediates["x_inter"].append(img)
                intermediates["pred_x0"].append(pred_x0)
        return img, intermediates

    def _start(self) -> None:
        """Reset per-run state (none for DDIM)."""

    def _step(self, x: Tensor, c: Tensor, t: Tensor, index: int, scale: float, uncond: Optional[Tensor],
              generator: Generator) -> tuple[Tensor, Tensor]:
        return self.p_sample_ddim(x, c, t, index, scale, uncond, generator)

    def p_sample_ddim(self, x: Tensor, c: Tensor, t: Tensor, index: int, unconditional_guidance_scale: float = 1.0,
                      unconditional_conditioning: Optional[Tensor] = None,
                      generator: Generator = None) -> tuple[Tensor, Tensor]:
        """One DDIM step from schedule index `index` to `index - 1`; returns (x_prev, pred_x0)."""
        e_t = guided_eps(self.model, x, t, c, unconditional_conditioning, unconditional_guidance_scale)
        return self.x_prev_and_pred_x0(x, e_t, index, generator)

    def x_prev_and_pred_x0(self, x: Tensor, e_t: Tensor, index: int,
                           generator: Generator = None) -> tuple[Tensor, Tensor]:
        """DDIM update given eps (Song et al. 2021, eq. 12): predicted x0, direction to x_t, optional noise."""
        a_t, a_prev, sigma_t = self.ddim_alphas[index], self.ddim_alphas_prev[index], self.ddim_sigmas[index]
        pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
        x_prev = a_prev.sqrt() * pred_x0 + (1 - a_prev - sigma_t ** 2).sqrt() * e_t
        if sigma_t > 0:
            x_prev = x_prev + sigma_t * randn(x.shape, generator, x.device, x.dtype)
        return x_prev, pred_x0
