"""Options of the eps-prediction objective that DreamBooth trainers expose: offset noise, input perturbation, the
range of training timesteps, per-timestep loss weightings and robust losses. At their defaults the objective is the
plain simple loss of DDPM, drawn with the same random numbers."""
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ldm.modules.losses.prior_preservation import eps_mse_per_sample
from ldm.util import UserError

LOSS_WEIGHTINGS = ("none", "min_snr", "debiased", "p2")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
DEBIASED_MAX_SNR = 1000.0  # kept from kohya's debiased estimation: the weight 1/sqrt(SNR) is not let below 1/sqrt(1000)


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio a_t / (1 - a_t) of the forward process at timesteps t."""
    a = alphas_cumprod.to(torch.float64)[t]
    return (a / (1 - a)).float()


def timestep_weights(weighting: str, snr_t: torch.Tensor, snr_gamma: float = 5.0, p2_k: float = 1.0,
                     p2_gamma: float = 1.0) -> torch.Tensor:
    """Per-timestep weights of the eps-prediction loss:
    min_snr   min(SNR, gamma) / SNR           (Hang et al. 2023, eq. 9 written for eps prediction)
    debiased  1 / sqrt(min(SNR, 1000))        (Yu et al. 2024, "Unmasking bias in diffusion model training")
    p2        1 / (k + SNR) ** gamma          (Choi et al. 2022, eq. 8)"""
    if weighting == "none":
        return torch.ones_like(snr_t)
    if weighting == "min_snr":
        return snr_t.clamp(max=snr_gamma) / snr_t
    if weighting == "debiased":
        return snr_t.clamp(max=DEBIASED_MAX_SNR).rsqrt()
    if weighting == "p2":
        return (p2_k + snr_t).pow(-p2_gamma)
    raise ValueError(f"unknown loss weighting {weighting!r}")


def huber_threshold(schedule: str, huber_c: float, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                    num_timesteps: int) -> torch.Tensor:
    """kohya's Huber threshold per timestep: constant c; exponential c ** (t / T) (1 at t = 0, c at t = T);
    snr (1 - c) / (1 + sigma_t) ** 2 + c with sigma_t = sqrt((1 - a_t) / a_t)."""
    if schedule == "constant":
        return torch.full(t.shape, huber_c, dtype=torch.float32, device=t.device)
    if schedule == "exponential":
        return torch.exp(math.log(huber_c) * t.float() / num_timesteps)
    a = alphas_cumprod.to(torch.float64)[t]
    sigma = ((1 - a) / a).sqrt()
    return ((1 - huber_c) / (1 + sigma) ** 2 + huber_c).float()


def elementwise_loss(loss_type: str, prediction: torch.Tensor, target: torch.Tensor,
                     huber_c: torch.Tensor) -> torch.Tensor:
    """l2 (p - y)^2, l1 |p - y|, and kohya's pseudo-Huber forms: huber 2c (sqrt((p - y)^2 + c^2) - c), which tends to
    (p - y)^2 as c grows, and smooth_l1 2 (sqrt((p - y)^2 + c^2) - c), which tends to 2 |p - y| as c shrinks.
    `huber_c` holds one threshold per batch element."""
    diff = prediction.float() - target.float()
    if loss_type == "l2":
        return diff.pow(2)
    if loss_type == "l1":
        return diff.abs()
    c = huber_c.reshape(-1, *([1] * (diff.dim() - 1)))
    robust = diff.pow(2) / (torch.sqrt(diff.pow(2) + c.pow(2)) + c)  # sqrt(d^2 + c^2) - c without cancellation
    return 2 * c * robust if loss_type == "huber" else 2 * robust


@dataclass
class NoiseObjective:
    """What the training loss adds to the simple loss; see docs/recipe.md for typical values."""

    offset_noise: float = 0.0
    input_perturbation: float = 0.0
    timestep_range: Optional[Sequence[int]] = None
    loss_weighting: str = "none"
    snr_gamma: float = 5.0
    p2_k: float = 1.0
    p2_gamma: float = 1.0
    loss_type: str = "l2"
    huber_c: float = 0.1
    huber_schedule: str = "constant"

    def check(self, num_timesteps: int) -> None:
        """Refuse values and combinations that cannot work, naming the config key."""
        choices = (("loss_weighting", LOSS_WEIGHTINGS), ("loss_type", LOSS_TYPES), ("huber_schedule", HUBER_SCHEDULES))
        for key, known in choices:
            if getattr(self, key) not in known:
                raise UserError(f"model.params.{key} {getattr(self, key)!r}: expected one of {', '.join(known)}")
        for key in ("offset_noise", "input_perturbation"):
            if getattr(self, key) < 0:
                raise UserError(f"model.params.{key} {getattr(self, key)} is below 0 (0 turns it off, 0.1 is usual)")
        for key in ("snr_gamma", "huber_c", "p2_k"):
            if getattr(self, key) <= 0:
                raise UserError(f"model.params.{key} must be above 0, got {getattr(self, key)}")
        if self.huber_c > 1 and self.huber_schedule != "constant":
            raise UserError(f"model.params.huber_c {self.huber_c}: the {self.huber_schedule} schedule needs it in "
                            "(0, 1]")
        if self.huber_schedule != "constant" and self.loss_type not in ("huber", "smooth_l1"):
            raise UserError(f"model.params.huber_schedule {self.huber_schedule!r} only applies to loss_type huber or "
                            f"smooth_l1, not {self.loss_type!r}")
        low, high = self.timesteps(num_timesteps)
        if not 0 <= low < high <= num_timesteps:
            raise UserError(f"model.params.timestep_range [{low}, {high}]: need 0 <= min < max <= {num_timesteps} "
                            "(training timesteps are drawn from [min, max))")

    def timesteps(self, num_timesteps: int) -> tuple[int, int]:
        if self.timestep_range is None:
            return 0, num_timesteps
        if len(self.timestep_range) != 2:
            raise UserError(f"model.params.timestep_range {list(self.timestep_range)}: expected [min, max]")
        return int(self.timestep_range[0]), int(self.timestep_range[1])

    def sample_timesteps(self, n: int, num_timesteps: int, device: torch.device) -> torch.Tensor:
        """Training timesteps, uniform in [min, max) of timestep_range."""
        low, high = self.timesteps(num_timesteps)
        return torch.randint(low, high, (n,), device=device)

    def sample_noise(self, x_start: torch.Tensor) -> torch.Tensor:
        """Gaussian noise, plus offset noise: one constant per sample and channel, times offset_noise."""
        noise = torch.randn_like(x_start)
        if self.offset_noise:
            noise = noise + self.offset_noise * torch.randn(*x_start.shape[:2], *([1] * (x_start.dim() - 2)),
                                                             device=x_start.device, dtype=x_start.dtype)
        return noise

    def model_input_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """The noise that makes x_t: with input_perturbation gamma, noise + gamma * N(0, I); the target stays noise."""
        if not self.input_perturbation:
            return noise
        return noise + self.input_perturbation * torch.randn_like(noise)

    def per_sample(self, prediction: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
                   alphas_cumprod: torch.Tensor, num_timesteps: int,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of each batch element: the elementwise loss averaged over the latent (with a loss mask `weight`
        [B, 1, h, w], its weighted mean: normalised by the mask's area), times its timestep weight."""
        if weight is not None:
            threshold = huber_threshold(self.huber_schedule, self.huber_c, t, alphas_cumprod, num_timesteps)
            elementwise = elementwise_loss(self.loss_type, prediction, target, threshold)
            weight = weight.float().expand_as(elementwise)
            loss = (elementwise * weight).flatten(1).mean(dim=1) / weight.flatten(1).mean(dim=1).clamp(min=1e-8)
        elif self.loss_type == "l2":
            loss = eps_mse_per_sample(prediction, target)
        else:
            threshold = huber_threshold(self.huber_schedule, self.huber_c, t, alphas_cumprod, num_timesteps)
            loss = elementwise_loss(self.loss_type, prediction, target, threshold).flatten(1).mean(dim=1)
        if self.loss_weighting == "none":
            return loss
        snr_t = snr(alphas_cumprod, t)
        return loss * timestep_weights(self.loss_weighting, snr_t, self.snr_gamma, self.p2_k, self.p2_gamma)
