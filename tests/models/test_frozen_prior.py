"""Prior preservation by the frozen model: the class term's target is the base model's own prediction on the instance
latents noised afresh under the class prompt; a LoRA run switches its adapters off for it, a full fine-tune keeps a
frozen copy outside the state_dict, read again from the base checkpoint on resume."""
import copy
import logging

import pytest
import torch

from ldm.checkpoint import save_weights
from ldm.lora.layers import lora_layers
from ldm.modules.losses import eps_mse_per_sample
from ldm.util import UserError
from tests.helpers.models import build_tiny_model, randomise_zero_init

KEYS = {"first_stage_key": "image", "cond_stage_key": "caption"}
PROMPT = "photo of a dog"


def frozen_model(**overrides):
    model = build_tiny_model(seed=0, prior_preservation="frozen_model", **KEYS, **overrides)
    return randomise_zero_init(model)


def make_batch() -> dict:
    generator = torch.Generator().manual_seed(0)
    return {"image": torch.rand(2, 64, 64, 3, generator=generator) * 2 - 1,
            "caption": ["photo of a sks dog"] * 2, "prior_caption": [PROMPT] * 2}


def perturb(*modules: torch.nn.Module) -> None:
    """Move the trained weights away from the base, as training would."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in modules:
            for param in module.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)


def fixed_t_and_noise(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([10, 500, 300, 900][:n]), torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(2))


def test_class_term_equals_a_hand_computation_with_the_base_models_prediction():
    model = frozen_model(reg_weight=0.5, cond_stage_trainable=True)
    base = copy.deepcopy(model)
    model.start_frozen_prior(resumed=False)
    assert model.frozen_copy.text is not None  # the text encoder trains: it has its frozen twin too
    perturb(model.model, model.cond_stage_model)
    batch, (t, noise) = make_batch(), fixed_t_and_noise(4)
    with torch.no_grad():
        torch.manual_seed(1)
        losses = model.shared_step(batch, t=t, noise=noise)
        torch.manual_seed(1)
        z, captions, n = model.get_input(batch)
        x_instance, x_class = model.q_sample(z, t[:2], noise[:2]), model.q_sample(z, t[2:], noise[2:])
        instance = eps_mse_per_sample(model.apply_model(x_instance, t[:2], model.get_learned_conditioning(captions)),
                                      noise[:2]).mean()
        target = base.apply_model(x_class, t[2:], base.get_learned_conditioning([PROMPT] * 2))
        prediction = model.apply_model(x_class, t[2:], model.get_learned_conditioning([PROMPT] * 2))
        class_prior = eps_mse_per_sample(prediction, target).mean()
    torch.testing.assert_close(losses["loss_instance"], instance)
    torch.testing.assert_close(losses["loss_class"], class_prior)
    torch.testing.assert_close(losses["loss"], instance + 0.5 * class_prior)
    assert class_prior > 1e-6  # the trained model moved away from the base
    assert eps_mse_per_sample(prediction, noise[2:]).mean() > 2 * class_prior  # the target is not the noise


def test_lora_class_term_is_zero_at_init_and_its_target_is_the_base_prediction():
    model = frozen_model(lora={"rank": 4, "text_encoder": True}, cond_stage_trainable=True)
    base = copy.deepcopy(model)
    model.inject_lora(model.unet_params)
    batch, (t, noise) = make_batch(), fixed_t_and_noise(4)
    with torch.no_grad():
        assert model.shared_step(batch, t=t, noise=noise)["loss_class"] == pytest.approx(0.0, abs=1e-12)
        perturb(*[layer.lora_B for layer in lora_layers(model).values()])
        model.cond_stage_model.requires_grad_(False)  # as --stop_text_encoder_training leaves it
        trains = {name: p.requires_grad for name, p in model.named_parameters()}
        scaling = [dict(layer.scaling) for layer in lora_layers(model).values()]
        x = model.q_sample(torch.randn(2, 4, 8, 8), t[2:], noise[2:])
        frozen = model.frozen_target([PROMPT] * 2, 0)
        expected = base.apply_model(x, t[2:], base.get_learned_conditioning([PROMPT] * 2))
        torch.testing.assert_close(frozen.denoise(x, t[2:], frozen.cond), expected, rtol=0, atol=1e-6)
        assert [dict(layer.scaling) for layer in lora_layers(model).values()] == scaling  # untouched
        assert {name: p.requires_grad for name, p in model.named_parameters()} == trains  # put back
        assert not any(layer.disable_adapters for layer in lora_layers(model).values())
        trained = model.apply_model(x, t[2:], model.get_learned_conditioning([PROMPT] * 2))
        assert (trained - expected).abs().max() > 1e-4
        assert model.shared_step(batch, t=t, noise=noise)["loss_class"] > 1e-8


def test_the_frozen_copy_is_in_no_state_dict_and_never_trains(tmp_path):
    model, plain = frozen_model(cond_stage_trainable=True), build_tiny_model(seed=0, cond_stage_trainable=True, **KEYS)
    model.start_frozen_prior(resumed=False)
    assert list(model.state_dict()) == list(plain.state_dict())
    assert len(list(model.parameters())) == len(list(plain.parameters()))
    frozen = [p for part in model.frozen_copy.parts() for p in part.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    trained = {id(p) for p in model.trainable_parameters()}
    assert not trained & {id(p) for p in frozen}
    model.save_step_weights(tmp_path / "step_1.ckpt")
    saved = torch.load(tmp_path / "step_1.ckpt", map_location="cpu", weights_only=True)
    assert set(saved.get("state_dict", saved)) == set(plain.state_dict())


def test_a_resume_reads_the_frozen_copy_from_the_base_checkpoint(tmp_path):
    base = frozen_model(cond_stage_trainable=True)
    path = tmp_path / "base.ckpt"
    save_weights(base.state_dict(), path)
    resumed = frozen_model(cond_stage_trainable=True, prior_base_checkpoint=str(path))
    perturb(resumed.model, resumed.cond_stage_model)  # the weights of the resumed run, not the base's
    resumed.start_frozen_prior(resumed=True)
    for part, original in ((resumed.frozen_copy.unet, base.model), (resumed.frozen_copy.text, base.cond_stage_model)):
        state, expected = part.state_dict(), original.state_dict()
        assert all(torch.equal(state[key], expected[key]) for key in expected)
    fresh = frozen_model(cond_stage_trainable=True)
    perturb(fresh.model)
    fresh.start_frozen_prior(resumed=False)  # a new run copies the weights it starts from
    assert torch.equal(fresh.frozen_copy.unet.diffusion_model.out[2].weight, fresh.model.diffusion_model.out[2].weight)


@pytest.mark.parametrize("base", [None, "gone.ckpt"])
def test_a_missing_base_checkpoint_is_one_clear_error(tmp_path, base):
    model = frozen_model(prior_base_checkpoint=None if base is None else str(tmp_path / base))
    with pytest.raises(UserError, match="prior_base_checkpoint") as err:
        model.start_frozen_prior(resumed=True)
    assert "\n" not in str(err.value)


def test_the_copy_is_placed_at_the_frozen_precision_and_its_cost_logged(caplog):
    model = frozen_model(frozen_precision="bf16")
    model.start_frozen_prior(resumed=False)
    with caplog.at_level(logging.INFO):
        model.place_frozen_copy(torch.device("cpu"), "32-true")
    assert next(model.frozen_copy.unet.parameters()).dtype == torch.bfloat16
    assert model.model.diffusion_model.out[2].weight.dtype == torch.float32  # the trained UNet as it was
    megabytes = sum(p.numel() * 2 for p in model.model.parameters()) / 2 ** 20
    assert f"holds {megabytes:.1f} MB (bfloat16 on cpu)" in caplog.text
    with torch.no_grad():
        assert torch.isfinite(model.shared_step(make_batch())["loss_class"])


def test_class_images_runs_need_no_prior_captions_and_frozen_model_runs_refuse_class_examples():
    plain = build_tiny_model(seed=0, **KEYS)
    assert plain.objective.prior.source == "class_images" and plain.frozen_prior_inputs({}, None, [], None)[3] is None
    model = frozen_model()
    model.start_frozen_prior(resumed=False)
    batch = {**make_batch(), "class_image": torch.zeros(1, 64, 64, 3), "class_caption": [PROMPT]}
    with pytest.raises(ValueError, match="prior_caption"):
        model.shared_step(batch)
    with pytest.raises(UserError, match="prior_preservation 'frozen'"):
        build_tiny_model(prior_preservation="frozen")
