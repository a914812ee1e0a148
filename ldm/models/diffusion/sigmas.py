"""Noise levels for the k-diffusion samplers: sigmas of a discrete DDPM schedule and the Karras schedule."""
import torch
from torch import Tensor


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """VE noise level of each training timestep, sigma_t = sqrt((1 - abar_t) / abar_t) (Karras et al. 2022, table 1)."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def sigma_to_t(sigma: Tensor, log_sigmas: Tensor) -> Tensor:
    """Fractional training timestep of each sigma, interpolating linearly in log sigma (the k-diffusion convention)."""
    log_sigma = sigma.clamp(min=1e-10).log().reshape(-1)
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, log_sigmas.shape[0] - 2)
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)


def t_to_sigma(t: Tensor, log_sigmas: Tensor) -> Tensor:
    """Sigma at a fractional training timestep, interpolating linearly in log sigma (inverse of `sigma_to_t`)."""
    low = t.floor().long().clamp(0, log_sigmas.shape[0] - 1)
    high = t.ceil().long().clamp(0, log_sigmas.shape[0] - 1)
    w = t - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def append_zero(sigmas: Tensor) -> Tensor:
    """Append the final noise level 0 (the clean sample)."""
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def discrete_sigmas(alphas_cumprod: Tensor, n: int) -> Tensor:
    """`n` sigmas at timesteps evenly spaced from T-1 down to 0, then 0 (k-diffusion; diffusers' 'linspace')."""
    log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod).log()
    t = torch.linspace(log_sigmas.shape[0] - 1, 0, n, device=alphas_cumprod.device, dtype=alphas_cumprod.dtype)
    return append_zero(t_to_sigma(t, log_sigmas))


def linspace_timestep_sigmas(alphas_cumprod: Tensor, n: int) -> Tensor:
    """`n` sigmas at the whole timesteps round(linspace(0, T-1, n + 1)) from T-1 down, t = 0 left out, then 0:
    diffusers' `timestep_spacing="linspace"`, its UniPCMultistepScheduler's default (SD 1.5's scheduler config names
    none)."""
    t = torch.linspace(0, alphas_cumprod.shape[0] - 1, n + 1, dtype=torch.float64).round().flip(0)[:-1]
    return append_zero(sigmas_from_alphas_cumprod(alphas_cumprod)[t.long().to(alphas_cumprod.device)])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                  device: torch.device | None = None) -> Tensor:
    """`n` sigmas evenly spaced in sigma^(1/rho) from sigma_max to sigma_min, then 0 (Karras et al. 2022, eq. 5)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return append_zero(sigmas.float().to(device))


def get_sigmas(alphas_cumprod: Tensor, n: int, karras: bool = False, whole_timesteps: bool = False) -> Tensor:
    """The sampling schedule of `n` steps (n + 1 sigmas ending in 0) for a model trained with `alphas_cumprod`:
    Karras, else k-diffusion's (fractional timesteps), or diffusers' linspace one with `whole_timesteps`."""
    if n < 1:
        raise ValueError(f"the number of sampling steps must be at least 1, got {n}")
    if not karras:
        return linspace_timestep_sigmas(alphas_cumprod, n) if whole_timesteps else discrete_sigmas(alphas_cumprod, n)
    sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)
    return karras_sigmas(n, sigmas[0].item(), sigmas[-1].item(), device=alphas_cumprod.device)
