"""The SD v1 noise schedule against diffusers' `scaled_linear` betas, and the forward process."""
import torch
from diffusers import DDPMScheduler

from ldm.modules.diffusionmodules.schedule import SCHEDULE_BUFFERS, make_beta_schedule, schedule_buffers


def test_betas_match_diffusers_scaled_linear():
    ours = schedule_buffers(make_beta_schedule("linear", 1000, 0.00085, 0.012))
    reference = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    for name, theirs in (("betas", reference.betas), ("alphas_cumprod", reference.alphas_cumprod)):
        error = (ours[name] - theirs.float()).abs().max().item()
        # diffusers takes the cumulative product in float32, we (like CompVis) in float64
        assert error < 1e-6, f"{name} differs from diffusers by {error:.2e}"
    assert set(ours) == set(SCHEDULE_BUFFERS) and len(ours) == 12


def test_posterior_coefficients_are_consistent():
    buffers = schedule_buffers(make_beta_schedule("linear", 1000, 0.00085, 0.012))
    ac = buffers["alphas_cumprod"].double()
    assert torch.allclose(buffers["alphas_cumprod_prev"][1:].double(), ac[:-1])
    assert torch.allclose(buffers["sqrt_recip_alphas_cumprod"].double() ** 2 * ac, torch.ones_like(ac), atol=1e-5)
    assert buffers["posterior_variance"][0] == 0


def test_q_sample_and_predict_start_invert_each_other(tiny_model):
    x0 = torch.randn(3, 4, 8, 8)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 500, 999])
    x_t = tiny_model.q_sample(x0, t, noise)
    assert torch.allclose(tiny_model.predict_start_from_noise(x_t, t, noise), x0, atol=1e-4)
