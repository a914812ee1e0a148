"""The objective's options (offset noise, input perturbation, timestep range, loss weightings, robust losses): off by
default and then bit-identical to the plain simple loss; each equal to its formula where it is on."""
import math

import numpy as np
import pytest
import torch

from ldm.inference.sampling import sample_images
from ldm.modules.losses import NoiseObjective
from ldm.modules.losses.noise_objective import elementwise_loss, huber_threshold, snr, timestep_weights
from ldm.util import UserError
from tests.helpers.models import build_tiny_model
from tests.modules.test_loss import make_batch

DEFAULTS = {"offset_noise": 0.0, "input_perturbation": 0.0, "timestep_range": [0, 1000], "loss_weighting": "none",
            "snr_gamma": 5.0, "loss_type": "l2", "huber_c": 0.1, "huber_schedule": "constant",
            "lr_schedule": {"name": "constant"}}


def simple_loss_by_hand(model, batch: dict, seed: int) -> torch.Tensor:
    """The DreamBooth loss of one step written out: latents, timesteps, noise, x_t, ||eps - eps_theta||^2."""
    torch.manual_seed(seed)
    z, captions, n = model.get_input(batch)
    cond = model.get_learned_conditioning(captions)
    t = torch.randint(0, 1000, (z.shape[0],))
    noise = torch.randn_like(z)
    a = model.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    per_sample = (model.apply_model(a.sqrt() * z + (1 - a).sqrt() * noise, t, cond) - noise).pow(2).flatten(1).mean(1)
    return per_sample[:n].mean() + model.reg_weight * per_sample[n:].mean()


def test_every_option_at_its_default_gives_todays_step_bit_for_bit():
    keys = {"reg_weight": 0.7, "first_stage_key": "image", "cond_stage_key": "caption"}
    plain, explicit = build_tiny_model(seed=0, **keys), build_tiny_model(seed=0, **keys, **DEFAULTS)
    for model in (plain, explicit):
        model.learning_rate = 1e-3
    reference = build_tiny_model(seed=0, **keys)
    batch = make_batch()
    for model in (plain, explicit):
        torch.manual_seed(3)
        loss = model.shared_step(batch)["loss"]
        assert torch.equal(loss, simple_loss_by_hand(reference, batch, seed=3))
        optimizer = model.configure_optimizers()
        loss.backward()
        optimizer.step()
    assert isinstance(explicit.configure_optimizers(), torch.optim.AdamW)  # no scheduler for the constant rate
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), explicit.parameters()))


def test_offset_noise_is_one_constant_per_sample_and_channel():
    x = torch.zeros(256, 4, 16, 16)
    torch.manual_seed(0)
    plain = NoiseObjective().sample_noise(x)
    torch.manual_seed(0)
    offset = NoiseObjective(offset_noise=0.5).sample_noise(x)
    added = offset - plain
    assert added.flatten(2).std(dim=2).max() < 1e-6  # constant over each sample's channel
    assert added[:, :, 0, 0].std().item() == pytest.approx(0.5, rel=0.1)  # of scale offset_noise, per sample+channel
    assert added[:, :, 0, 0].unique().numel() == 256 * 4


def test_offset_noise_is_never_used_at_sampling():
    seeds = [1, 2]
    images = [sample_images(build_tiny_model(seed=0, offset_noise=value).eval(), "photo of a sks dog", seeds, 3, 5.0)
              for value in (0.0, 0.1)]
    assert [np.asarray(image).tolist() for image in images[0]] == [np.asarray(image).tolist() for image in images[1]]


def test_input_perturbation_noises_the_model_input_not_the_target():
    model = build_tiny_model(seed=0, input_perturbation=0.1)
    z = torch.randn(64, 4, 8, 8)
    noise = torch.randn_like(z)
    t = torch.full((64,), 500)
    seen = {}
    q_sample, apply_model = model.q_sample, model.apply_model
    model.q_sample = lambda x, t_, n: seen.update(input_noise=n) or q_sample(x, t_, n)
    model.apply_model = lambda *args: seen.setdefault("prediction", apply_model(*args))
    cond = model.get_learned_conditioning(["photo of a dog"] * 64)
    with torch.no_grad():
        loss = model.p_losses(z, cond, t, noise)
    assert ((seen["input_noise"] - noise) / 0.1).std().item() == pytest.approx(1.0, rel=0.05)
    torch.testing.assert_close(loss, (seen["prediction"] - noise).pow(2).flatten(1).mean(1))


def test_timesteps_come_from_the_range():
    t = NoiseObjective(timestep_range=[200, 400]).sample_timesteps(20000, 1000, torch.device("cpu"))
    assert t.min() == 200 and t.max() == 399


def sd_snr(t: list[int]) -> torch.Tensor:
    """SD v1's SNR from its betas (linear in sqrt(beta) from 0.00085 to 0.012), in float64."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    a = torch.cumprod(1 - betas, 0)[t]
    return a / (1 - a)


@pytest.mark.parametrize("weighting, formula", [
    ("min_snr", lambda s: min(s, 5.0) / s),
    ("debiased", lambda s: 1 / math.sqrt(min(s, 1000.0))),
    ("p2", lambda s: 1 / (1 + s)),
])
def test_timestep_weights_equal_the_papers_formulas(weighting, formula):
    model = build_tiny_model(seed=0, loss_weighting=weighting)
    t = [0, 10, 250, 500, 999]
    expected = torch.tensor([formula(s) for s in sd_snr(t).tolist()])
    snr_t = snr(model.alphas_cumprod, torch.tensor(t))
    torch.testing.assert_close(snr_t.double(), sd_snr(t), rtol=1e-4, atol=0)  # a float32 buffer
    torch.testing.assert_close(timestep_weights(weighting, snr_t), expected.float(), rtol=1e-4, atol=0)
    prediction, target = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8)
    plain = NoiseObjective().per_sample(prediction, target, torch.tensor(t), model.alphas_cumprod, 1000)
    weighted = model.objective.noise.per_sample(prediction, target, torch.tensor(t), model.alphas_cumprod, 1000)
    torch.testing.assert_close(weighted, plain * expected.float(), rtol=1e-4, atol=0)


def test_huber_approaches_l2_for_a_large_threshold_and_equals_its_closed_form():
    d = torch.tensor([[-2.0, -0.3, 0.0, 0.05, 0.3, 1.5]])
    zero = torch.zeros_like(d)
    errors = [(elementwise_loss("huber", d, zero, torch.tensor([c])) - d ** 2).abs().max().item()
              for c in (1.0, 10.0, 1e3)]
    assert errors[0] > 0.1 and errors[1] < errors[0] / 20 and errors[2] < 1e-5  # tends to L2 as c grows
    c = torch.tensor([0.1])
    expected = [2 * 0.1 * (math.sqrt(v * v + 0.01) - 0.1) for v in d[0].tolist()]
    torch.testing.assert_close(elementwise_loss("huber", d, zero, c)[0], torch.tensor(expected))
    torch.testing.assert_close(elementwise_loss("smooth_l1", d, zero, c)[0], torch.tensor(expected) / 0.1)
    torch.testing.assert_close(elementwise_loss("l1", d, zero, c), d.abs())


def test_huber_schedules_per_timestep():
    model = build_tiny_model(seed=0)
    t = torch.tensor([0, 500, 1000 - 1])
    exponential = huber_threshold("exponential", 0.1, t, model.alphas_cumprod, 1000)
    torch.testing.assert_close(exponential, torch.tensor([1.0, 0.1 ** 0.5, 0.1 ** 0.999]))
    sigma = (1 / sd_snr(t.tolist())).sqrt()
    torch.testing.assert_close(huber_threshold("snr", 0.1, t, model.alphas_cumprod, 1000),
                               (0.9 / (1 + sigma) ** 2 + 0.1).float(), rtol=1e-5, atol=0)
    robust = build_tiny_model(seed=0, loss_type="huber", huber_c=0.1, huber_schedule="snr")
    prediction, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    per_sample = robust.objective.noise.per_sample(prediction, target, t, robust.alphas_cumprod, 1000)
    c = (0.9 / (1 + sigma) ** 2 + 0.1).float().reshape(3, 1, 1, 1)
    by_hand = (2 * c * (((prediction - target) ** 2 + c ** 2).sqrt() - c)).flatten(1).mean(1)
    torch.testing.assert_close(per_sample, by_hand)


@pytest.mark.parametrize("options, message", [
    ({"loss_type": "l3"}, "model.params.loss_type 'l3': expected one of l2, l1, huber, smooth_l1"),
    ({"loss_weighting": "snr"}, "model.params.loss_weighting 'snr': expected one of none, min_snr, debiased, p2"),
    ({"huber_schedule": "snr"}, "huber_schedule 'snr' only applies to loss_type huber or smooth_l1, not 'l2'"),
    ({"offset_noise": -0.1}, "model.params.offset_noise -0.1 is below 0"),
    ({"snr_gamma": 0}, "model.params.snr_gamma must be above 0"),
    ({"timestep_range": [500, 100]}, r"timestep_range \[500, 100\]: need 0 <= min < max <= 1000"),
    ({"timestep_range": [0, 1001]}, r"timestep_range \[0, 1001\]"),
    ({"timestep_range": [5]}, r"timestep_range \[5\]: expected \[min, max\]"),
])
def test_values_that_cannot_work_are_refused_at_start_up(options, message):
    with pytest.raises(UserError, match=message):
        build_tiny_model(seed=0, **options)
