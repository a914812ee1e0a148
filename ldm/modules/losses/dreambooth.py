"""The DreamBooth training objective, composed once: the noise objective (the noisy input, the target and the
per-example loss with its options), scheduled sampling (rollout) and prior preservation (Ruiz et al. 2023, eq. 2:
instance loss + reg_weight x class loss). It sees the model only through a `denoise(x_t, t, cond)` callable (the
UNet's eps prediction), `q_sample(x_0, t, noise)` and the schedule's `alphas_cumprod`; with prior preservation by the
frozen model, through that model's `denoise` too (prior_preservation.FrozenModelTarget)."""
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ldm.modules.losses.noise_objective import NoiseObjective
from ldm.modules.losses.prior_preservation import Denoise, FrozenModelTarget, PriorPreservationLoss, concept_losses
from ldm.modules.losses.rollout import Rollout

QSample = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DreamBoothObjective:
    noise: NoiseObjective = field(default_factory=NoiseObjective)
    rollout: Rollout = field(default_factory=Rollout)
    prior: PriorPreservationLoss = field(default_factory=PriorPreservationLoss)

    def check(self, num_timesteps: int) -> None:
        self.noise.check(num_timesteps)
        self.rollout.check()
        self.prior.check()

    def per_sample(self, denoise: Denoise, q_sample: QSample, alphas_cumprod: torch.Tensor, x_start: torch.Tensor,
                   cond: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None,
                   weight: Optional[torch.Tensor] = None, step: Optional[int] = None,
                   frozen: Optional[FrozenModelTarget] = None) -> torch.Tensor:
        """Per-example simple loss ||eps - eps_theta(x_t, t, c)||^2 (Ho et al. 2020, eq. 14) with the noise
        objective's options (offset noise when `noise` is not given, input perturbation, loss type, timestep
        weighting) and a loss mask `weight` [B, 1, h, w]; at a training `step`, some inputs rolled out by the
        model itself (rollout.py); with `frozen`, the class examples' target is the frozen model's prediction on
        their (possibly rolled-out) input."""
        noise = self.noise.sample_noise(x_start) if noise is None else noise
        x_noisy, target = q_sample(x_start, t, self.noise.model_input_noise(noise)), noise
        if step is not None:
            x_noisy, target = self.rollout.apply(denoise, q_sample, alphas_cumprod, x_start, cond, t, x_noisy, target,
                                                 step)
        if frozen is not None:
            target = frozen.apply(x_noisy, t, target)
        prediction = denoise(x_noisy, t, cond)
        return self.noise.per_sample(prediction, target, t, alphas_cumprod, alphas_cumprod.shape[0], weight)

    def losses(self, per_sample: torch.Tensor, n_instance: int,
               concepts: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
        """`loss` (instance + reg_weight x class), its parts, and with several subjects each subject's loss."""
        return {**self.prior(per_sample, n_instance), **concept_losses(per_sample, concepts)}
