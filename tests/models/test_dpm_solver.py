"""DPM-Solver fast and adaptive, which diffusers lacks, on an ODE with a known solution: Gaussian data.

For data N(mu, s^2) the ideal denoiser is D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), and the probability-flow
ODE dx/dsigma = (x - D) / sigma has the solution x(sigma) = mu + (x_0 - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma_0^2)).
"""
import math

import pytest
import torch

from ldm.models.diffusion.dpm_solver import DPMSolver, fast_orders, sample_dpm_adaptive, sample_dpm_fast

MU, S, SIGMA_MAX, SIGMA_MIN = 0.3, 0.5, 10.0, 0.05


class GaussianDenoiser:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return MU + S ** 2 / (S ** 2 + sigma ** 2) * (x - MU)


def start() -> torch.Tensor:
    return torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * SIGMA_MAX


def exact(x0: torch.Tensor, sigma: float) -> torch.Tensor:
    return MU + (x0 - MU) * math.sqrt((S ** 2 + sigma ** 2) / (S ** 2 + SIGMA_MAX ** 2))


def schedule(n: int) -> torch.Tensor:
    """n steps ending at SIGMA_MIN, then 0 (how the samplers are given their range)."""
    sigmas = torch.exp(torch.linspace(math.log(SIGMA_MAX), math.log(SIGMA_MIN), n, dtype=torch.float64))
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def error(x: torch.Tensor, x0: torch.Tensor) -> float:
    return (x - exact(x0, SIGMA_MIN)).abs().max().item()


@pytest.mark.parametrize("order", [1, 2, 3])
def test_each_step_order_converges_at_its_rate(order):
    """Uniform steps in t = -log sigma: halving the step divides the global error by about 2^order."""
    x0, errors = start(), []
    for steps in (6, 12, 24):
        solver = DPMSolver(GaussianDenoiser(), {})
        ts = torch.linspace(-math.log(SIGMA_MAX), -math.log(SIGMA_MIN), steps + 1, dtype=torch.float64)
        x = x0
        for i in range(steps):
            x = solver.step(x, ts[i], ts[i + 1], order)
        assert solver.calls == steps * order
        errors.append(error(x, x0))
    rates = [math.log2(errors[k] / errors[k + 1]) for k in range(2)]
    print(f"DPM-Solver-{order}: errors {errors}, observed orders {rates}")
    assert all(order - 0.35 < rate < order + 0.6 for rate in rates), rates


def test_fast_spends_exactly_its_model_calls_and_converges():
    assert fast_orders(10) == [3, 3, 3, 1] and fast_orders(9) == [3, 3, 2, 1] and fast_orders(2) == [2]
    x0, errors = start(), []
    for calls in (12, 24, 48):  # each ends in a second- and a first-order step, which bound its rate
        model = GaussianDenoiser()
        errors.append(error(sample_dpm_fast(model, x0, schedule(calls), disable=True), x0))
        assert model.calls == calls
    print(f"DPM fast: errors {errors} at 12, 24, 48 model calls")
    assert errors[0] > 2 * errors[1] > 4 * errors[2] and errors[2] < 1e-3


def test_adaptive_meets_tighter_tolerances_with_more_calls_and_reports_them():
    x0, results = start(), []
    for rtol, atol in ((0.05, 0.0078), (0.0005, 0.000078)):
        model, info = GaussianDenoiser(), {}
        x = sample_dpm_adaptive(model, x0, schedule(5), rtol=rtol, atol=atol, disable=True, info=info)
        assert info["model_calls"] == model.calls > 0 and info["accepted"] > 0
        results.append((error(x, x0), info["model_calls"]))
    print(f"DPM adaptive: (max error, model calls) at k-diffusion's tolerances and at 1/100: {results}")
    (loose, loose_calls), (tight, tight_calls) = results
    assert tight < loose / 5 and tight_calls > loose_calls
    assert loose < 0.05 * exact(x0, SIGMA_MIN).abs().max().item()  # rtol 0.05 of the result's size


def test_adaptive_gives_each_image_its_own_steps():
    x0 = start()
    batch = sample_dpm_adaptive(GaussianDenoiser(), x0 * torch.tensor([1.0, 50.0, 1.0]).reshape(3, 1, 1, 1),
                                schedule(5), disable=True)
    alone = sample_dpm_adaptive(GaussianDenoiser(), x0[:1], schedule(5), disable=True)
    torch.testing.assert_close(batch[:1], alone, rtol=0, atol=0)
