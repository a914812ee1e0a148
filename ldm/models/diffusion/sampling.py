"""k-diffusion-style samplers: small functions over a denoiser D(x, sigma, **extra_args) and a sigma schedule."""
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import trange

Generator = Union[torch.Generator, Sequence[torch.Generator], None]
Denoiser = Callable[..., Tensor]
Callback = Optional[Callable[[dict], None]]


def randn(shape: Sequence[int], generator: Generator, device: torch.device,
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Gaussian noise drawn on the generator's device, from one generator or one per batch item, moved to `device`."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        noise = torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype)
                             for g in generator])
    else:
        source = generator.device if generator is not None else device
        noise = torch.randn(tuple(shape), generator=generator, device=source, dtype=dtype)
    return noise.to(device)


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """Probability-flow ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from: Tensor, sigma_to: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """Split a step into a deterministic move to sigma_down and fresh noise of size sigma_up."""
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2)) ** 0.5 / sigma_from)
    return (sigma_to ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def _report(callback: Callback, x: Tensor, i: int, sigma: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "denoised": denoised})


@torch.no_grad()
def sample_euler(model: Denoiser, x: Tensor, sigmas: Tensor, extra_args: Optional[dict] = None,
                 callback: Callback = None, disable: Optional[bool] = None) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, algorithm 2 without churn)."""
    extra_args, s_in = extra_args or {}, x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable, desc="Euler"):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(model: Denoiser, x: Tensor, sigmas: Tensor, extra_args: Optional[dict] = None,
                           callback: Callback = None, disable: Optional[bool] = None, eta: float = 1.0,
                           generator: Generator = None) -> Tensor:
    """Euler steps to sigma_down plus fresh noise sigma_up: ancestral sampling (Ho et al. 2020, eq. 6) in sigma form."""
    extra_args, s_in = extra_args or {}, x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable, desc="Euler a"):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, x, i, sigmas[i], denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + randn(x.shape, generator, x.device, x.dtype) * sigma_up
    return x


@torch.no_grad()
def sample_heun(model: Denoiser, x: Tensor, sigmas: Tensor, extra_args: Optional[dict] = None,
                callback: Callback = None, disable: Optional[bool] = None) -> Tensor:
    """Heun's second-order method, Euler on the last step to sigma 0 (Karras et al. 2022, algorithm 1)."""
    extra_args, s_in = extra_args or {}, x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable, desc="Heun"):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        d, dt = to_d(x, sigmas[i], denoised), sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
        x = x + (d + d_2) / 2 * dt
    return x


def linear_multistep_coeff(order: int, sigmas: np.ndarray, i: int, j: int) -> float:
    """Integral over [sigma_i, sigma_i+1] of the Lagrange basis polynomial of point i-j through sigma_i-order+1..i."""
    basis = np.poly1d([1.0])
    for k in range(order):
        if k != j:
            basis *= np.poly1d([1.0, -sigmas[i - k]]) / (sigmas[i - j] - sigmas[i - k])
    antiderivative = basis.integ()
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


@torch.no_grad()
def sample_lms(model: Denoiser, x: Tensor, sigmas: Tensor, extra_args: Optional[dict] = None,
               callback: Callback = None, disable: Optional[bool] = None, order: int = 4) -> Tensor:
    """Linear multistep (Adams-Bashforth in sigma) of up to `order` past derivatives (Liu et al. 2022, PNDM, sec. 3)."""
    extra_args, s_in = extra_args or {}, x.new_ones([x.shape[0]])
    sigmas_np = sigmas.detach().cpu().double().numpy()
    ds: list[Tensor] = []
    for i in trange(len(sigmas) - 1, disable=disable, desc="LMS"):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        ds = (ds + [to_d(x, sigmas[i], denoised)])[-order:]
        cur_order = len(ds)
        coeffs = [linear_multistep_coeff(cur_order, sigmas_np, i, j) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


@torch.no_grad()
def sample_dpm_2(model: Denoiser, x: Tensor, sigmas: Tensor, extra_args: Optional[dict] = None,
                 callback: Callback = None, disable: Optional[bool] = None) -> Tensor:
    """DPM-Solver-2 with the midpoint at the geometric mean of sigmas (Lu et al. 2022, algorithm 1, r1 = 1/2)."""
    extra_args, s_in = extra_args or {}, x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable, desc="DPM2"):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
            continue
        sigma_mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
        x_2 = x + d * (sigma_mid - sigmas[i])
        d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra_args))
        x = x + d_2 * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Denoiser, x: Tensor, sigmas: Tensor, extra_args: Optional[dict] = None,
                    callback: Callback = None, disable: Optional[bool] = None) -> Tensor:
    """DPM-Solver++(2M), first order on the first and last steps (Lu et al. 2022b, DPM-Solver++, algorithm 2)."""
    extra_args, s_in = extra_args or {}, x.new_ones([x.shape[0]])
    old_denoised = None
    for i in trange(len(sigmas) - 1, disable=disable, desc="DPM++ 2M"):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            d = denoised
            if old_denoised is not None:
                r = (sigmas[i - 1].log() - sigmas[i].log()) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * d
        old_denoised = denoised
    return x


SAMPLERS = {
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "lms": sample_lms,
    "dpm2": sample_dpm_2,
    "dpmpp_2m": sample_dpmpp_2m,
}
