"""Scheduled sampling for diffusion training (rollout), as SimpleTuner documents it: with a probability that ramps
up over training, an example's noisy input is not drawn from q(x_t | x_0) but made by the model itself, which
denoises (without gradients) from a noisier point of the same noise through a few DDIM steps of a 50-step sampler's
spacing; the target becomes the noise that this input really holds with respect to x_0, so that the model learns
to correct the errors it makes along its own sampling path. At probability 0 nothing is drawn and a training step
is bit for bit the plain one."""
from dataclasses import dataclass
from typing import Callable

import torch

from ldm.modules.diffusionmodules.schedule import extract_into_tensor
from ldm.util import UserError

SAMPLERS = ("ddim",)
SAMPLER_STEPS = 50  # the rollout steps are those of a 50-step DDIM sampler: 20 timesteps apart at 1000


@dataclass
class Rollout:
    probability: float = 0.0
    max_step_offset: int = 0
    ramp_steps: int = 0
    sampler: str = "ddim"

    def check(self) -> None:
        if not 0.0 <= self.probability <= 1.0 or self.ramp_steps < 0 or self.max_step_offset < 0:
            raise UserError("model.params.scheduled_sampling_probability must be in [0, 1], its ramp and max step "
                            f"offset at least 0 (got {self.probability}, {self.ramp_steps}, {self.max_step_offset})")
        if self.probability > 0 and self.max_step_offset < 1:
            raise UserError("model.params.scheduled_sampling_probability is set: give "
                            "scheduled_sampling_max_step_offset >= 1 (sampler steps to roll out)")
        if self.sampler not in SAMPLERS:
            raise UserError(f"model.params.scheduled_sampling_sampler {self.sampler!r}: only {', '.join(SAMPLERS)} "
                            "(deterministic steps of the model's own eps)")

    def probability_at(self, step: int) -> float:
        """The probability at training step `step`: linear from 0 to `probability` over `ramp_steps`."""
        return self.probability * (min(1.0, step / self.ramp_steps) if self.ramp_steps else 1.0)

    @torch.no_grad()
    def apply(self, denoise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
              q_sample: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
              alphas_cumprod: torch.Tensor, x_start: torch.Tensor, cond: torch.Tensor, t: torch.Tensor,
              x_noisy: torch.Tensor, target: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs and targets of a batch, with the chosen examples rolled out by `denoise` (the model's eps
        prediction) from `q_sample`'s noisier points."""
        p = self.probability_at(step)
        if p <= 0:
            return x_noisy, target
        n, device = x_start.shape[0], x_start.device
        chosen = torch.rand(n, device=device) < p
        offsets = torch.randint(1, self.max_step_offset + 1, (n,), device=device)
        if not chosen.any():
            return x_noisy, target
        num_timesteps, alphas = alphas_cumprod.shape[0], alphas_cumprod
        stride = max(1, num_timesteps // SAMPLER_STEPS)
        current = torch.where(chosen, (t + stride * offsets).clamp(max=num_timesteps - 1), t)
        x = q_sample(x_start, current, target)
        while bool((current > t).any()):
            active = current > t
            now, later = current[active], torch.maximum(current - stride, t)[active]
            eps = denoise(x[active], now, cond[active])
            a_now = extract_into_tensor(alphas, now, eps.shape)
            a_next = extract_into_tensor(alphas, later, eps.shape)
            x0 = (x[active] - (1 - a_now).sqrt() * eps) / a_now.sqrt()
            x[active] = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
            current[active] = later
        a_t = extract_into_tensor(alphas, t, x.shape)
        rolled_target = (x - a_t.sqrt() * x_start) / (1 - a_t).sqrt()
        keep = chosen.view(-1, *([1] * (x.dim() - 1)))
        return torch.where(keep, x, x_noisy), torch.where(keep, rolled_target, target)
