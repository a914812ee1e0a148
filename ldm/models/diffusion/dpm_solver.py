"""DPM-Solver fast and adaptive (Lu et al. 2022, arXiv 2206.00927): eps-form steps of order 1 to 3 in t = -log sigma.

Deterministic (eta 0, k-diffusion's default). Both run from the largest to the smallest non-zero sigma of the schedule
they are given, as k-diffusion's `sample_dpm_fast` / `sample_dpm_adaptive` do between sigma_max and sigma_min.
"""
import math
from typing import Callable, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

Denoiser = Callable[..., Tensor]
Callback = Optional[Callable[[dict], None]]


class DPMSolver:
    """DPM-Solver-1, -2 and -3 steps over a denoiser D(x, sigma), counting the model calls."""

    def __init__(self, model: Denoiser, extra_args: dict, progress: Optional[tqdm] = None) -> None:
        self.model, self.extra_args, self.progress, self.calls = model, extra_args, progress, 0

    @staticmethod
    def t(sigma: Tensor) -> Tensor:
        return -sigma.log()

    @staticmethod
    def sigma(t: Tensor) -> Tensor:
        return (-t).exp()

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        """eps(x, t) = (x - D(x, sigma(t))) / sigma(t)."""
        sigma = self.sigma(t)
        self.calls += 1
        if self.progress is not None:
            self.progress.update()
        return (x - self.model(x, sigma * x.new_ones([x.shape[0]]), **self.extra_args)) / sigma

    def first_order(self, x: Tensor, t: Tensor, t_next: Tensor, eps: Tensor) -> Tensor:
        """DPM-Solver-1 (= DDIM): x_t' = x - sigma(t') (e^h - 1) eps (eq. 3.7)."""
        return x - self.sigma(t_next) * (t_next - t).expm1() * eps

    def second_order(self, x: Tensor, t: Tensor, t_next: Tensor, eps: Tensor,
                     r1: float = 0.5) -> tuple[Tensor, Tensor]:
        """DPM-Solver-2 with its intermediate point at t + r1 h (algorithm 4); also returns eps there."""
        h = t_next - t
        s1 = t + r1 * h
        eps_r1 = self.eps(self.first_order(x, t, s1, eps), s1)
        x_next = self.first_order(x, t, t_next, eps) - self.sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)
        return x_next, eps_r1

    def third_order(self, x: Tensor, t: Tensor, t_next: Tensor, eps: Tensor,
                    eps_r1: Optional[Tensor] = None) -> Tensor:
        """DPM-Solver-3 with r1 = 1/3, r2 = 2/3 (algorithm 5), reusing eps at t + h/3 when given."""
        r1, r2 = 1 / 3, 2 / 3
        h = t_next - t
        s1, s2 = t + r1 * h, t + r2 * h
        if eps_r1 is None:
            eps_r1 = self.eps(self.first_order(x, t, s1, eps), s1)
        u2 = (self.first_order(x, t, s2, eps)
              - self.sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps(u2, s2)
        return self.first_order(x, t, t_next, eps) - self.sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)

    def step(self, x: Tensor, t: Tensor, t_next: Tensor, order: int, eps: Optional[Tensor] = None) -> Tensor:
        """One step of `order` (1, 2 or 3) from t to t_next."""
        eps = self.eps(x, t) if eps is None else eps
        if order == 1:
            return self.first_order(x, t, t_next, eps)
        if order == 2:
            return self.second_order(x, t, t_next, eps)[0]
        return self.third_order(x, t, t_next, eps)


def sigma_range(sigmas: Tensor) -> tuple[Tensor, Tensor]:
    """The largest and the smallest non-zero sigma of a schedule."""
    positive = sigmas[sigmas > 0]
    return positive.max(), positive.min()


def fast_orders(calls: int) -> list[int]:
    """Step orders of DPM-Solver-fast spending exactly `calls` model calls: third order, then 2 and 1 (sec. 3.4)."""
    steps = calls // 3 + 1
    if calls % 3 == 0:
        return [3] * (steps - 2) + [2, 1]
    return [3] * (steps - 1) + [calls % 3]


@torch.no_grad()
def sample_dpm_fast(model: Denoiser, x: Tensor, sigmas: Tensor, extra_args: Optional[dict] = None,
                    callback: Callback = None, disable: Optional[bool] = None) -> Tensor:
    """DPM-Solver-fast: len(sigmas) - 1 model calls in uniform steps of t = -log sigma."""
    sigma_max, sigma_min = sigma_range(sigmas)
    orders = fast_orders(len(sigmas) - 1)
    with tqdm(total=len(sigmas) - 1, disable=disable, desc="DPM fast") as progress:
        solver = DPMSolver(model, extra_args or {}, progress)
        ts = torch.linspace(solver.t(sigma_max).item(), solver.t(sigma_min).item(), len(orders) + 1,
                            device=x.device)
        for i, order in enumerate(orders):
            eps = solver.eps(x, ts[i])
            if callback is not None:
                callback({"x": x, "i": i, "sigma": solver.sigma(ts[i]), "denoised": x - solver.sigma(ts[i]) * eps})
            x = solver.step(x, ts[i], ts[i + 1], order, eps)
    return x


class PIDStepSizeController:
    """Step size control from the inverse errors of the last three steps (Söderlind 2003, as k-diffusion uses it)."""

    def __init__(self, h: float, order: int, pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0,
                 accept_safety: float = 0.81, eps: float = 1e-8) -> None:
        self.h, self.accept_safety, self.eps = h, accept_safety, eps
        self.b = ((pcoeff + icoeff + dcoeff) / order, -(pcoeff + 2 * dcoeff) / order, dcoeff / order)
        self.inverse_errors: list[float] = []

    def propose_step(self, error: float) -> bool:
        """Scale h by the controller's factor (limited by 1 + atan(f - 1)); True when the step is accepted."""
        inverse = 1 / (error + self.eps)
        if not self.inverse_errors:
            self.inverse_errors = [inverse] * 3
        self.inverse_errors[0] = inverse
        factor = math.prod(e ** b for e, b in zip(self.inverse_errors, self.b))
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.inverse_errors[1:] = self.inverse_errors[:2]
        self.h *= factor
        return accept


def solve_adaptive(solver: DPMSolver, x: Tensor, t_start: Tensor, t_end: Tensor, rtol: float, atol: float,
                   callback: Callback = None, h_init: float = 0.05) -> tuple[Tensor, dict]:
    """DPM-Solver-23: embedded second/third-order pair, the error scaled by atol and rtol (sec. 3.4 and app. C)."""
    pid = PIDStepSizeController(h_init, order=3)
    s, x_prev, eps, info = t_start, x, None, {"accepted": 0, "rejected": 0}
    while s < t_end - 1e-5:
        t = torch.minimum(t_end, s + pid.h)
        if eps is None:  # kept across a rejected step: the same x and s
            eps = solver.eps(x, s)
            if callback is not None:
                sigma = solver.sigma(s)
                callback({"x": x, "i": info["accepted"], "sigma": sigma, "denoised": x - sigma * eps})
        x_low, eps_r1 = solver.second_order(x, s, t, eps, r1=1 / 3)
        x_high = solver.third_order(x, s, t, eps, eps_r1)
        scale = torch.clamp(rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=atol)
        error = (torch.linalg.norm((x_low - x_high) / scale) / x.numel() ** 0.5).item()
        if pid.propose_step(error):
            x_prev, x, s, eps = x_low, x_high, t, None
            info["accepted"] += 1
        else:
            info["rejected"] += 1
    return x, info


@torch.no_grad()
def sample_dpm_adaptive(model: Denoiser, x: Tensor, sigmas: Tensor, extra_args: Optional[dict] = None,
                        callback: Callback = None, disable: Optional[bool] = None, rtol: float = 0.05,
                        atol: float = 0.0078, info: Optional[dict] = None) -> Tensor:
    """DPM-Solver-23 with adaptive steps to the tolerances; each image gets its own steps, so that it does not depend
    on its batch (the callback sees one image at a time). `info`, when given, receives the model calls and the
    accepted and rejected steps."""
    extra_args = extra_args or {}
    sigma_max, sigma_min = sigma_range(sigmas)
    results, totals = [], {"model_calls": 0, "accepted": 0, "rejected": 0}
    with tqdm(disable=disable, desc="DPM adaptive", unit="call") as progress:
        for i in range(x.shape[0]):
            one = {k: v[i:i + 1] if isinstance(v, Tensor) and v.shape[:1] == x.shape[:1] else v
                   for k, v in extra_args.items()}
            solver = DPMSolver(model, one, progress)
            result, steps = solve_adaptive(solver, x[i:i + 1], solver.t(sigma_max), solver.t(sigma_min), rtol, atol,
                                           callback)
            results.append(result)
            totals["model_calls"] += solver.calls
            totals["accepted"] += steps["accepted"]
            totals["rejected"] += steps["rejected"]
    if info is not None:
        info.update(totals)
    return torch.cat(results)
