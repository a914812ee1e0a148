"""The DreamBooth objective: instance loss + reg_weight x class loss, each with its own noise and timesteps."""
import pytest
import torch

from ldm.modules.losses import eps_mse_per_sample
from tests.helpers.models import build_tiny_model


def make_batch(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(2, 64, 64, 3, generator=generator) * 2 - 1,
            "caption": ["photo of a sks dog", "photo of a sks dog"],
            "class_image": torch.rand(1, 64, 64, 3, generator=generator) * 2 - 1,
            "class_caption": ["photo of a dog"]}


def separate_losses(model, batch, t, noise) -> tuple[torch.Tensor, torch.Tensor]:
    """Instance and class losses from two independent forwards, with the same latents, noise and timesteps."""
    torch.manual_seed(1)
    z, captions, n = model.get_input(batch)
    cond = model.get_learned_conditioning(captions)
    losses = []
    for part in (slice(0, n), slice(n, None)):
        x_noisy = model.q_sample(z[part], t[part], noise[part])
        losses.append(eps_mse_per_sample(model.apply_model(x_noisy, t[part], cond[part]), noise[part]).mean())
    return losses[0], losses[1]


@pytest.mark.parametrize("reg_weight", [1.0, 0.3])
def test_loss_is_instance_plus_weighted_class(reg_weight):
    model = build_tiny_model(seed=0, reg_weight=reg_weight, first_stage_key="image", cond_stage_key="caption")
    batch = make_batch()
    t = torch.tensor([10, 500, 990])
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    calls = []
    model.model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    with torch.no_grad():
        torch.manual_seed(1)
        losses = model.shared_step(batch, t=t, noise=noise)
        instance, class_prior = separate_losses(model, batch, t, noise)
    assert calls[0] == 3, "instance and class examples should go through the UNet in one batched forward"
    torch.testing.assert_close(losses["loss_instance"], instance)
    torch.testing.assert_close(losses["loss_class"], class_prior)
    torch.testing.assert_close(losses["loss"], instance + reg_weight * class_prior)
    assert abs(instance.item() - class_prior.item()) > 1e-4  # the two terms differ, so the weighting is observable


def test_each_example_gets_its_own_noise_and_timestep():
    model = build_tiny_model(seed=0, first_stage_key="image", cond_stage_key="caption")
    seen, q_sample = {}, model.q_sample
    model.q_sample = lambda x, t, noise: seen.update(t=t, noise=noise) or q_sample(x, t, noise)
    torch.manual_seed(0)
    with torch.no_grad():
        model.shared_step(make_batch())
    assert seen["t"].shape == (3,) and len(set(seen["t"].tolist())) == 3
    assert not torch.allclose(seen["noise"][0], seen["noise"][1])
    assert not torch.allclose(seen["noise"][0], seen["noise"][2])


def test_nan_loss_stops_training():
    model = build_tiny_model(seed=0, reg_weight=float("nan"), first_stage_key="image", cond_stage_key="caption")
    with pytest.raises(FloatingPointError, match="loss is nan at step 0"):
        model.training_step(make_batch(), 0)
