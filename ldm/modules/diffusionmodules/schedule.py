"""The DDPM noise schedule in one place: betas and the buffers derived from them (Ho et al. 2020, eqs. 4, 6, 7)."""
import math

import torch

SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


def make_beta_schedule(schedule: str, n_timestep: int, linear_start: float = 1e-4, linear_end: float = 2e-2,
                       cosine_s: float = 8e-3) -> torch.Tensor:
    """Betas in float64. SD's "linear" is linear in sqrt(beta) (diffusers calls it "scaled_linear")."""
    if schedule == "linear":
        return torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=torch.float64) ** 2
    if schedule == "cosine":  # Nichol & Dhariwal 2021, eq. 17
        steps = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + cosine_s
        alphas_cumprod = torch.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
        return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {schedule!r}; expected 'linear' or 'cosine'")


def schedule_buffers(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every buffer a SD v1 checkpoint stores for the schedule, computed in float64 and returned in float32."""
    betas = betas.to(torch.float64)
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    buffers = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
    }
    return {name: buffers[name].to(torch.float32) for name in SCHEDULE_BUFFERS}


def extract_into_tensor(values: torch.Tensor, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Gather `values[t]` per batch element and reshape to broadcast over a tensor of `shape`."""
    return values.gather(-1, t).reshape(t.shape[0], *((1,) * (len(shape) - 1)))
