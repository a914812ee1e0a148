"""The memory savers each do only what they should: meta-device building, frozen parts in half precision, the whole
model in bf16 with a float32 noise schedule, text-encoder checkpointing, a compiled UNet, and the flags."""
import argparse

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import CheckpointError, load_model_weights, on_meta, parameters_on_meta, save_weights
from ldm.modules.diffusionmodules.schedule import SCHEDULE_BUFFERS
from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.training.flags import apply_saver_flags
from ldm.util import UserError, instantiate_from_config
from tests.helpers.models import build_tiny_model
from tests.helpers.repo import TINY_CONFIG

FINETUNE_CONFIG = "configs/tiny/v1-finetune_unfrozen.yaml"
SMALL_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def finetune_model(**params):
    config = OmegaConf.load(FINETUNE_CONFIG)
    config.model.params.update(params)
    model = instantiate_from_config(config.model)
    model.learning_rate = 1e-4
    return model


class PairData(torch.utils.data.Dataset):
    """Two fixed instance/class pairs at the tiny model's 64 px."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(index)
        image = lambda: torch.rand(64, 64, 3, generator=generator) * 2 - 1  # noqa: E731
        return {"image": image(), "caption": "photo of a sks dog",
                "class_image": image(), "class_caption": "photo of a dog"}


def fit(model, precision: str, steps: int = 1) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", precision=precision, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, torch.utils.data.DataLoader(PairData(), batch_size=1))
    return trainer


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    model = build_tiny_model(seed=1)
    save_weights(model.state_dict(), path)
    return model, path


def test_a_model_built_on_meta_takes_the_files_tensors_and_holds_no_random_copy(tiny_file):
    reference, path = tiny_file
    config = OmegaConf.load(TINY_CONFIG)
    with parameters_on_meta():
        model = instantiate_from_config(config.model)
    assert on_meta(model) and all(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for name, b in model.named_buffers() if name in SCHEDULE_BUFFERS)
    load_model_weights(model, path)
    assert on_meta(model) == []
    expected, loaded = reference.state_dict(), model.state_dict()
    assert expected.keys() == loaded.keys() and all(torch.equal(expected[k], loaded[k]) for k in expected)
    plain = instantiate_from_config(config.model)
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in plain.parameters()]


def test_a_fresh_ema_on_meta_starts_from_the_weights_in_memory_of_its_own(tiny_file):
    _, path = tiny_file
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.use_ema = True
    with parameters_on_meta():
        model = instantiate_from_config(config.model)
    load_model_weights(model, path)
    weight = model.model.diffusion_model.out[-1].weight
    shadow = model.model_ema.diffusion_modelout2weight
    assert torch.equal(weight, shadow) and weight.data_ptr() != shadow.data_ptr()


def test_a_half_precision_file_loads_into_a_meta_model_at_the_models_dtype(tiny_file, tmp_path):
    reference, _ = tiny_file
    path = tmp_path / "half.safetensors"
    save_weights(reference.state_dict(), path, dtype=torch.float16)
    with parameters_on_meta():
        model = instantiate_from_config(OmegaConf.load(TINY_CONFIG).model)
    load_model_weights(model, path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_meta_tensors_the_file_cannot_fill_are_an_error(tiny_file):
    _, path = tiny_file
    with parameters_on_meta():
        model = instantiate_from_config(OmegaConf.load(TINY_CONFIG).model)
        model.extra = torch.nn.Linear(2, 2)  # a part no SD file has
    with pytest.raises(CheckpointError, match="no values for 2 tensors.*extra.weight.*stay empty"):
        load_model_weights(model, path)


@pytest.mark.parametrize("precision, frozen, vae, text", [
    ("bf16-mixed", "auto", torch.bfloat16, torch.bfloat16),
    ("32-true", "auto", torch.float32, torch.float32),
    ("bf16-mixed", "fp32", torch.float32, torch.float32),
    ("32-true", "fp16", torch.float16, torch.float16),
])
def test_frozen_parts_are_stored_in_half_precision_under_mixed_precision(precision, frozen, vae, text):
    model = finetune_model(cond_stage_trainable=False, frozen_precision=frozen)
    fit(model, precision)
    assert model.first_stage_model.encoder.conv_in.weight.dtype == vae
    assert model.cond_stage_model.transformer.text_model.embeddings.token_embedding.weight.dtype == text
    assert model.unet_dtype == torch.float32


def test_a_training_text_encoder_stays_in_float32_under_mixed_precision():
    model = finetune_model(cond_stage_trainable=True)
    fit(model, "bf16-mixed")
    assert model.first_stage_model.encoder.conv_in.weight.dtype == torch.bfloat16
    assert model.cond_stage_model.transformer.text_model.embeddings.token_embedding.weight.dtype == torch.float32


def test_a_frozen_precision_that_does_not_exist_is_a_clear_error():
    with pytest.raises(UserError, match="frozen_precision 'half'.*auto, fp32, fp16, bf16"):
        finetune_model(frozen_precision="half")


def test_bf16_true_trains_the_unet_in_bf16_on_a_float32_noise_schedule():
    model = finetune_model(cond_stage_trainable=False)
    expected = model.alphas_cumprod.clone()
    before = model.model.diffusion_model.input_blocks[0][0].weight.detach().clone()
    fit(model, "bf16-true", steps=2)
    assert model.unet_dtype == torch.bfloat16
    assert model.alphas_cumprod.dtype == torch.float32 and torch.equal(model.alphas_cumprod, expected)
    after = model.model.diffusion_model.input_blocks[0][0].weight
    assert not torch.equal(after.float(), before.float())
    images = model.decode_first_stage(torch.randn(1, 4, 8, 8))
    assert images.dtype == torch.float32 and torch.isfinite(images).all()


def test_text_encoder_checkpointing_gives_the_same_gradients_with_fewer_saved_activations():
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        encoder = FrozenCLIPEmbedder(text_config=SMALL_TEXT, freeze=False, gradient_checkpointing=checkpointing)
        encoder.train()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            output = encoder(["a photo of a sks dog"])
        output.square().sum().backward()
        results.append(([p.grad for p in encoder.parameters() if p.grad is not None], len(saved)))
    (plain, n_plain), (checkpointed, n_checkpointed) = results
    assert len(plain) == len(checkpointed) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))
    assert n_checkpointed < n_plain / 2


def test_a_compiled_unet_keeps_its_state_dict_keys_and_its_outputs():
    model = finetune_model(compile_unet={"backend": "eager"})
    keys = list(model.state_dict())
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32)
    with torch.no_grad():
        expected = model.apply_model(x, t, context)
        model.compile_diffusion_model()
        assert model.model.diffusion_model._compiled_call_impl is not None
        assert torch.allclose(model.apply_model(x, t, context), expected)
    assert list(model.state_dict()) == keys


def test_a_bad_compile_option_is_a_clear_error():
    model = finetune_model(compile_unet={"colour": "blue"})
    with pytest.raises(UserError, match="compile_unet"):
        model.compile_diffusion_model()


def saver_flags(**flags) -> argparse.Namespace:
    defaults = {"gradient_checkpointing": False, "optimizer": None, "fused_backward": False, "compile": False}
    return argparse.Namespace(**{**defaults, **flags})


def test_the_saver_flags_go_into_the_model_config():
    config = OmegaConf.load(FINETUNE_CONFIG)
    config.model.params.optimizer = {"target": "lion", "params": {"betas": [0.9, 0.99]}}
    apply_saver_flags(config, saver_flags(gradient_checkpointing=True, optimizer="adamw8bit",
                                               fused_backward=True, compile=True))
    params = config.model.params
    assert params.unet_config.params.use_checkpoint is True
    assert params.cond_stage_config.params.gradient_checkpointing is True
    assert OmegaConf.to_container(params.optimizer) == {"target": "adamw8bit", "params": {}, "fused_backward": True}
    assert params.compile_unet is True
    untouched = OmegaConf.load(FINETUNE_CONFIG)
    apply_saver_flags(untouched, saver_flags())
    assert untouched == OmegaConf.load(FINETUNE_CONFIG)


@pytest.mark.parametrize("device, kept", [("cpu", True), ("meta", False)])  # meta: any device but the CPU
def test_gradients_are_zeroed_in_place_on_a_cpu_and_freed_elsewhere(monkeypatch, device, kept):
    model = finetune_model()
    monkeypatch.setattr(model, "_device", torch.device(device))  # what the device property reads; nothing moves
    params = list(model.model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    sum(p.square().sum() for p in params).backward()
    grads = [p.grad for p in params]
    model.optimizer_zero_grad(0, 0, optimizer)
    if kept:
        assert all(p.grad is g and not g.any() for p, g in zip(params, grads))
    else:
        assert all(p.grad is None for p in params)
