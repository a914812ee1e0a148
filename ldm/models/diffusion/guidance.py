"""Classifier-free guidance, computed here and nowhere else, and the denoiser view of an eps model for k-samplers."""
from typing import Optional

import torch
from torch import Tensor, nn

from ldm.models.diffusion.sigmas import get_sigmas, sigma_to_t, sigmas_from_alphas_cumprod


def guided_eps(model: nn.Module, x: Tensor, t: Tensor, cond: Tensor, uncond: Optional[Tensor] = None,
               scale: float = 1.0) -> Tensor:
    """eps_u + s (eps_c - eps_u) from one batched `apply_model` call on [uncond, cond] (Ho & Salimans 2022, eq. 6)."""
    if uncond is None or scale == 1.0:
        return model.apply_model(x, t, cond).to(x.dtype)
    e_u, e_c = model.apply_model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond])).to(x.dtype).chunk(2)
    return e_u + scale * (e_c - e_u)


class CompVisDenoiser:
    """D(x, sigma) = x - sigma eps(x / sqrt(sigma^2 + 1), t(sigma)) of an eps model (Karras et al. 2022, table 1)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.log_sigmas = sigmas_from_alphas_cumprod(model.alphas_cumprod.float()).log()

    def get_sigmas(self, n: int, karras: bool = False) -> Tensor:
        """The `n`-step sampling schedule (n + 1 sigmas ending in 0) of the wrapped model."""
        return get_sigmas(self.model.alphas_cumprod.float(), n, karras=karras)

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor, uncond: Optional[Tensor] = None,
                 cond_scale: float = 1.0) -> Tensor:
        """Denoised estimate of `x` (batch) at noise levels `sigma` ([B]), with classifier-free guidance."""
        sigma = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        t = sigma_to_t(sigma.reshape(-1).float(), self.log_sigmas)
        eps = guided_eps(self.model, x / (sigma ** 2 + 1).sqrt(), t, cond, uncond, cond_scale)
        return x - sigma * eps
