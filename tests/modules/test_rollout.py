"""Scheduled sampling (rollout): probability 0 is the plain step bit for bit; a rolled-out input is the model's own
DDIM steps from a noisier point, and its target is the noise it really holds; the probability ramps; bad settings
are one-line errors."""
import pytest
import torch

from ldm.modules.diffusionmodules.schedule import extract_into_tensor
from ldm.modules.losses.rollout import Rollout
from ldm.util import UserError
from tests.helpers.models import build_tiny_model, randomise_zero_init


def batch(model):
    g = torch.Generator().manual_seed(0)
    return {model.first_stage_key: torch.rand(2, 64, 64, 3, generator=g) * 2 - 1,
            model.cond_stage_key: ["photo of a sks dog", "photo of a dog"]}


def step_loss(model, seed=1):
    model.train()
    torch.manual_seed(seed)
    loss = model.shared_step(batch(model))["loss"]
    return loss, torch.get_rng_state()


def test_probability_zero_is_the_plain_step_bit_for_bit():
    plain = step_loss(randomise_zero_init(build_tiny_model()))
    off = step_loss(randomise_zero_init(build_tiny_model(scheduled_sampling_max_step_offset=3,
                                                         scheduled_sampling_probability=0.0)))
    assert torch.equal(plain[0], off[0]) and torch.equal(plain[1], off[1])
    on = step_loss(randomise_zero_init(build_tiny_model(scheduled_sampling_max_step_offset=3,
                                                        scheduled_sampling_probability=1.0)))
    assert not torch.equal(plain[0], on[0])


def test_a_rolled_out_input_and_its_target_agree_with_x0():
    model = randomise_zero_init(build_tiny_model()).train()
    rollout = Rollout(probability=1.0, max_step_offset=3)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([100, 500, 999])
    cond = model.get_learned_conditioning(["a dog"] * 3)
    x_t = model.q_sample(x0, t, noise)
    rolled, target = rollout.apply(model.apply_model, model.q_sample, model.alphas_cumprod, x0, cond, t, x_t, noise,
                                   step=0)
    a_t = extract_into_tensor(model.alphas_cumprod, t, x0.shape)
    assert torch.allclose(rolled, a_t.sqrt() * x0 + (1 - a_t).sqrt() * target, atol=1e-5)
    assert not torch.allclose(rolled[:2], x_t[:2], atol=1e-3)  # the model's own path, not q(x_t | x_0)
    assert torch.allclose(rolled[2], x_t[2], atol=1e-6)  # t = 999: no noisier point to start from


def test_the_ramp_and_the_settings():
    ramp = Rollout(probability=0.5, max_step_offset=2, ramp_steps=100)
    assert [ramp.probability_at(s) for s in (0, 50, 100, 400)] == [0.0, 0.25, 0.5, 0.5]
    for bad, message in ((Rollout(probability=0.5), "scheduled_sampling_max_step_offset >= 1"),
                         (Rollout(probability=1.5, max_step_offset=1), "must be in"),
                         (Rollout(probability=0.5, max_step_offset=1, sampler="euler"), "only ddim")):
        with pytest.raises(UserError, match=message):
            bad.check()
