"""k-diffusion-style samplers: small functions over a denoiser D(x, sigma, **extra_args) and a sigma schedule."""
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import trange

from ldm.models.diffusion.dpm_solver import sample_dpm_adaptive, sample_dpm_fast

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
def sample_dpm_2_ancestral(model: Denoiser, x: Tensor, sigmas: Tensor, extra_args: Optional[dict] = None,
                           callback: Callback = None, disable: Optional[bool] = None, eta: float = 1.0,
                           s_noise: float = 1.0, generator: Generator = None) -> Tensor:
    """DPM-Solver-2 steps to sigma_down plus fresh noise sigma_up (k-diffusion's ancestral DPM2)."""
    extra_args, s_in = extra_args or {}, x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable, desc="DPM2 a"):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, x, i, sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
            continue
        sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
        x_2 = x + d * (sigma_mid - sigmas[i])
        d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra_args))
        x = x + d_2 * (sigma_down - sigmas[i])
        x = x + randn(x.shape, generator, x.device, x.dtype) * s_noise * sigma_up
    return x


def dpmpp_first_order(x: Tensor, sigma: Tensor, sigma_next: Tensor, denoised: Tensor) -> Tensor:
    """DPM-Solver++(1) = DDIM in data prediction: x' = (sigma' / sigma) x - (e^-h - 1) D, h = log(sigma / sigma')."""
    return (sigma_next / sigma) * x - (sigma_next.log() - sigma.log()).expm1() * denoised


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model: Denoiser, x: Tensor, sigmas: Tensor, extra_args: Optional[dict] = None,
                              callback: Callback = None, disable: Optional[bool] = None, eta: float = 1.0,
                              s_noise: float = 1.0, generator: Generator = None) -> Tensor:
    """DPM-Solver++(2S) steps (midpoint at r = 1/2 in log sigma) to sigma_down, plus fresh noise sigma_up
    (Lu et al. 2022b, algorithm 1; k-diffusion's ancestral form)."""
    extra_args, s_in = extra_args or {}, x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable, desc="DPM++ 2S a"):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, x, i, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            sigma_mid = (sigmas[i] * sigma_down).sqrt()
            denoised_2 = model(dpmpp_first_order(x, sigmas[i], sigma_mid, denoised), sigma_mid * s_in, **extra_args)
            x = dpmpp_first_order(x, sigmas[i], sigma_down, denoised_2)
        if sigmas[i + 1] > 0:
            x = x + randn(x.shape, generator, x.device, x.dtype) * s_noise * sigma_up
    return x


def brownian_increments(sigma: Tensor, sigma_mid: Tensor, sigma_next: Tensor, shape: Sequence[int],
                        generator: Generator, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Normalised increments of one Brownian motion (in sigma) over [sigma_mid, sigma] and over [sigma_next, sigma],
    which contains it: what k-diffusion's Brownian tree gives these two queries, drawn from the per-image seeds."""
    first, rest = randn(shape, generator, device, dtype), randn(shape, generator, device, dtype)
    short, whole = sigma - sigma_mid, sigma - sigma_next
    return first, (short.sqrt() * first + (whole - short).sqrt() * rest) / whole.sqrt()


@torch.no_grad()
def sample_dpmpp_sde(model: Denoiser, x: Tensor, sigmas: Tensor, extra_args: Optional[dict] = None,
                     callback: Callback = None, disable: Optional[bool] = None, eta: float = 1.0,
                     s_noise: float = 1.0, generator: Generator = None, r: float = 0.5) -> Tensor:
    """Stochastic DPM-Solver++ of two stages per step, each an ancestral DPM-Solver++(1) move (k-diffusion)."""
    extra_args, s_in = extra_args or {}, x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable, desc="DPM++ SDE"):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        sigma_s = sigmas[i] ** (1 - r) * sigmas[i + 1] ** r
        noise_1, noise_2 = brownian_increments(sigmas[i], sigma_s, sigmas[i + 1], x.shape, generator, x.device,
                                               x.dtype)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigma_s, eta)
        x_2 = dpmpp_first_order(x, sigmas[i], sigma_down, denoised) + noise_1 * s_noise * sigma_up
        denoised_2 = model(x_2, sigma_s * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        fac = 1 / (2 * r)
        x = dpmpp_first_order(x, sigmas[i], sigma_down, (1 - fac) * denoised + fac * denoised_2)
        x = x + noise_2 * s_noise * sigma_up
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


@torch.no_grad()
def sample_dpmpp_2m_sde(model: Denoiser, x: Tensor, sigmas: Tensor, extra_args: Optional[dict] = None,
                        callback: Callback = None, disable: Optional[bool] = None, eta: float = 1.0,
                        s_noise: float = 1.0, generator: Generator = None) -> Tensor:
    """SDE-DPM-Solver++(2M), midpoint form, first order on the first and last steps (Lu et al. 2022b, app. B)."""
    extra_args, s_in = extra_args or {}, x.new_ones([x.shape[0]])
    old_denoised, h_last = None, None
    for i in trange(len(sigmas) - 1, disable=disable, desc="DPM++ 2M SDE"):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            decay = -(-h - eta * h).expm1()
            x = (sigmas[i + 1] / sigmas[i]) * (-eta * h).exp() * x + decay * denoised
            if old_denoised is not None:
                x = x + 0.5 * decay * (h / h_last) * (denoised - old_denoised)
            if eta:
                noise = randn(x.shape, generator, x.device, x.dtype)
                x = x + noise * sigmas[i + 1] * (-(-2 * eta * h).expm1()).sqrt() * s_noise
        old_denoised, h_last = denoised, (sigmas[i].log() - sigmas[i + 1].log())
    return x


def unipc_bh2(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """h phi_1(-h) = e^-h - 1, B(h) = e^-h - 1 (the bh2 variant), and b_1, b_2 of the order conditions
    (Zhao et al. 2023, UniPC, eq. 6 and app. C, data prediction)."""
    hh = -h
    h_phi_1 = hh.expm1()
    h_phi_2 = h_phi_1 / hh - 1
    h_phi_3 = h_phi_2 / hh - 0.5
    return h_phi_1, h_phi_1, torch.stack([h_phi_2 / h_phi_1, 2 * h_phi_3 / h_phi_1])


@torch.no_grad()
def sample_unipc(model: Denoiser, x: Tensor, sigmas: Tensor, extra_args: Optional[dict] = None,
                 callback: Callback = None, disable: Optional[bool] = None) -> Tensor:
    """UniPC of order 2, bh2, data prediction: each model output corrects the last step (UniC) before the next
    predictor step (UniP); first order on the first and last steps (Zhao et al. 2023; diffusers' defaults)."""
    extra_args, s_in = extra_args or {}, x.new_ones([x.shape[0]])
    lambdas, n = -sigmas.log(), len(sigmas) - 1
    outputs: list[Tensor] = []
    x_last, order = x, 0
    for i in trange(n, disable=disable, desc="UniPC"):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        if i > 0:  # UniC: redo the last step with the new model output, in the order that step had
            h = lambdas[i] - lambdas[i - 1]
            h_phi_1, b_h, b = unipc_bh2(h)
            x = (sigmas[i] / sigmas[i - 1]) * x_last - h_phi_1 * outputs[-1]
            if order == 1:
                x = x - b_h * 0.5 * (denoised - outputs[-1])
            else:
                r = (lambdas[i - 2] - lambdas[i - 1]) / h
                rho_0 = (b[0] - b[1]) / (1 - r)  # [[1, 1], [r, 1]] rho = b
                d_1 = (outputs[-2] - outputs[-1]) / r
                x = x - b_h * (rho_0 * d_1 + (b[0] - rho_0) * (denoised - outputs[-1]))
        outputs = (outputs + [denoised])[-2:]
        order = min(2, i + 1, n - i)
        x_last = x
        h = lambdas[i + 1] - lambdas[i]
        h_phi_1, b_h, _ = unipc_bh2(h)
        x = (sigmas[i + 1] / sigmas[i]) * x - h_phi_1 * denoised
        if order == 2:
            r = (lambdas[i - 1] - lambdas[i]) / h
            x = x - b_h * 0.5 * (outputs[-2] - denoised) / r
    return x


SAMPLERS = {
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "lms": sample_lms,
    "dpm2": sample_dpm_2,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpm_fast": sample_dpm_fast,
    "dpm_adaptive": sample_dpm_adaptive,
    "dpm2_a": sample_dpm_2_ancestral,
    "dpmpp_2s_a": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "unipc": sample_unipc,
}
# Those that run on diffusers' schedule (whole linspace timesteps, starting from unit-variance noise in VP form), the
# one users compare them against; the others run on k-diffusion's, as A1111 does.
DIFFUSERS_SCHEDULE = ("unipc",)
# Those that draw fresh noise on the way (from the per-image generators, so that an image depends on its seed only).
STOCHASTIC = ("euler_a", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_2m_sde")
