"""EMA in a LoRA run: the average covers the adapter weights only, the step files hold the averaged LoRA, last.ckpt
the trained LoRA and its average, and a resume restores the average."""
import pytest
import torch

from ldm.checkpoint import CheckpointError, read_lora
from ldm.lora.layers import is_lora_key, lora_tensors
from tests.helpers.models import build_tiny_model, randomise_zero_init

KEYS = {"first_stage_key": "image", "cond_stage_key": "caption"}


def lora_model(use_ema: bool = True, seed: int = 0):
    model = randomise_zero_init(build_tiny_model(seed=0, lora={"rank": 4, "text_encoder": True},
                                                 cond_stage_trainable=True, use_ema=use_ema, ema_decay=0.5,
                                                 ema_warmup=False, **KEYS))
    model.inject_lora(model.unet_params)
    return model


def step(model, seed: int = 1) -> None:
    """An optimizer step's change of the LoRA weights, then the EMA's update."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.trainable_parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    model.model_ema(model.ema_source())


def shadow(model) -> dict[str, torch.Tensor]:
    buffers = dict(model.model_ema.named_buffers())
    return {name: buffers[key].clone() for name, key in model.model_ema.shadow_names.items()}


def test_the_shadow_holds_the_adapter_weights_only():
    model = lora_model()
    adapters = {name for name, _ in model.named_parameters() if is_lora_key(name)}
    assert set(model.model_ema.shadow_names) == adapters
    assert any(name.startswith("cond_stage_model.") for name in adapters)  # the text encoder's LoRA too
    trained = {id(p) for n, p in model.named_parameters() if n in adapters}
    assert {id(p) for p in model.trainable_parameters()} == trained
    assert not build_tiny_model(lora={"rank": 4}, use_ema=True, **KEYS).use_ema  # none before injection


def test_the_average_updates_with_the_decay():
    model = lora_model()
    before = shadow(model)
    step(model)
    params = dict(model.named_parameters())
    for name, value in shadow(model).items():
        torch.testing.assert_close(value, 0.5 * before[name] + 0.5 * params[name].detach())
    assert int(model.model_ema.num_updates) == -1  # no warm-up: the decay is 0.5 from the first step


def test_the_step_file_is_the_averaged_lora_and_the_model_keeps_its_weights(tmp_path):
    model = lora_model()
    step(model)
    trained = {key: value.clone() for key, value in lora_tensors(model, model.lora_names).items()}
    with model.ema_scope():
        averaged = {key: value.clone() for key, value in lora_tensors(model, model.lora_names).items()}
    model.save_step_weights(tmp_path / "step_1.safetensors")
    saved, _ = read_lora(tmp_path / "step_1.safetensors")
    assert all(torch.equal(saved[key], averaged[key]) for key in averaged)
    assert any(not torch.equal(saved[key], trained[key]) for key in trained if key.endswith("lora_up.weight"))
    assert all(torch.equal(value, trained[key]) for key, value in lora_tensors(model, model.lora_names).items())
    assert not hasattr(lora_model(use_ema=False), "model_ema")


def test_last_ckpt_keeps_the_average_and_a_resume_restores_it(tmp_path):
    model = lora_model()
    step(model)
    step(model, seed=2)
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    state = checkpoint["state_dict"]
    assert state and all(is_lora_key(key) or key.startswith("model_ema.") for key in state)
    assert any(key.startswith("model_ema.") for key in state)
    resumed = lora_model()
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(state, strict=False)
    assert all(torch.equal(value, shadow(model)[name]) for name, value in shadow(resumed).items())
    without = lora_model(use_ema=False)
    with pytest.raises(CheckpointError, match="use_ema changed"):
        without.on_load_checkpoint(checkpoint)


def test_a_resume_from_a_step_file_starts_the_average_from_it(tmp_path):
    model = lora_model()
    step(model)
    model.save_step_weights(tmp_path / "step_1.safetensors")
    resumed = lora_model()
    resumed.load_lora_file(tmp_path / "step_1.safetensors")
    params = dict(resumed.named_parameters())
    assert all(torch.equal(value, params[name].detach()) for name, value in shadow(resumed).items())
    assert all(torch.equal(value, shadow(model)[name]) for name, value in shadow(resumed).items())
