"""Classifier-free guidance, computed here and nowhere else, and the denoiser view of an eps model for k-samplers."""
from typing import Optional

import torch
from torch import Tensor, nn

from ldm.models.diffusion.sigmas import get_sigmas, sigma_to_t, sigmas_from_alphas_cumprod


def guided_eps(model: nn.Module, x: Tensor, t: Tensor, cond: Tensor, uncond: Optional[Tensor] = None,
               scale: float = 1.0) -> Tensor:
    """eps_u + s (eps_c - eps_u) from one batched `apply_model` call on [uncond, cond] (Ho & Salimans 2022, eq. 6);
    with ControlNets on the model (`model.control`, see control.py) their residuals go into that call."""
    if uncond is not None and scale != 1.0:
        x, t, context, n_uncond = torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond]), x.shape[0]
    else:
        context, n_uncond = cond, 0
    control = getattr(model, "control", None)
    residuals = None if control is None else control.residuals(x, t, context, n_uncond)
    extra = {} if residuals is None else {"control": residuals}
    eps = model.apply_model(x, t, context, **extra).to(x.dtype)
    if not n_uncond:
        return eps
    e_u, e_c = eps.chunk(2)
    return e_u + scale * (e_c - e_u)


class CompVisDenoiser:
    """D(x, sigma) = x - sigma eps(x / sqrt(sigma^2 + 1), t(sigma)) of an eps model (Karras et al. 2022, table 1)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.log_sigmas = sigmas_from_alphas_cumprod(model.alphas_cumprod.float()).log()

    def get_sigmas(self, n: int, karras: bool = False, whole_timesteps: bool = False) -> Tensor:
        """The `n`-step sampling schedule (n + 1 sigmas ending in 0) of the wrapped model (see sigmas.get_sigmas)."""
        return get_sigmas(self.model.alphas_cumprod.float(), n, karras=karras, whole_timesteps=whole_timesteps)

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor, uncond: Optional[Tensor] = None,
                 cond_scale: float = 1.0) -> Tensor:
        """Denoised estimate of `x` (batch) at noise levels `sigma` ([B]), with classifier-free guidance."""
        sigma = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        t = sigma_to_t(sigma.reshape(-1).float(), self.log_sigmas)
        eps = guided_eps(self.model, x / (sigma ** 2 + 1).sqrt(), t, cond, uncond, cond_scale)
        return x - sigma * eps
