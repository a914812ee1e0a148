"""Images go through the sampler a few at a time and the decoder one at a time (issue 33, item 7): the image logger,
validation samples and evaluation never hand more than their `images_per_call` to one call, and a chunked batch gives
the same images as the whole (each image's noise comes from its own seeded generator). Class images (item 8) are
sampled by a half-precision copy of the model that is freed before training."""
import contextlib
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import ldm.training.class_images
import ldm.inference.sampling
from ldm.callbacks import ImageLogger, ValidationSamples
from ldm.inference.sampling import sample_images
from ldm.training.class_images import generate_class_images, generation_dtype, sampling_copy
from tests.helpers.models import build_tiny_model
from tests.helpers.repo import REPO


@pytest.fixture
def calls(monkeypatch, tiny_model):
    """The batch sizes handed to the sampler (`sample_latents`) and to the decoder, recorded as `sampled`, `decoded`."""
    seen = SimpleNamespace(sampled=[], decoded=[])
    sample, decode = ldm.inference.sampling.sample_latents, tiny_model.decode_first_stage

    def spy_sample(model, sampler, steps, cond, uncond, scale, noise, *args, **kwargs):
        seen.sampled.append(noise.shape[0])
        return sample(model, sampler, steps, cond, uncond, scale, noise, *args, **kwargs)

    def spy_decode(z, *args, **kwargs):
        seen.decoded.append(z.shape[0])
        return decode(z, *args, **kwargs)

    monkeypatch.setattr(ldm.inference.sampling, "sample_latents", spy_sample)
    monkeypatch.setattr(tiny_model, "decode_first_stage", spy_decode)
    return seen


def test_chunked_sampling_matches_the_whole_batch(tiny_model, calls):
    seeds = [3, 4, 5, 6, 7]
    whole = sample_images(tiny_model.eval(), "a dog", seeds, steps=2, scale=5.0)
    assert calls.sampled == [5] and calls.decoded == [1] * 5
    calls.sampled.clear(), calls.decoded.clear()
    chunked = sample_images(tiny_model, "a dog", seeds, steps=2, scale=5.0, per_call=2)
    assert calls.sampled == [2, 2, 1] and calls.decoded == [1] * 5
    for a, b in zip(whole, chunked):  # equal up to the float rounding of a different batch size
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1



def test_several_prompts_share_a_call_and_each_image_matches_its_own_prompts_call(tiny_model, calls, monkeypatch):
    prompts, seeds = ["a dog", "a dog", "a sks dog", "a sks dog"], [3, 4, 3, 4]
    encoded, encode = [], tiny_model.get_learned_conditioning
    monkeypatch.setattr(tiny_model, "get_learned_conditioning", lambda texts: encoded.append(texts) or encode(texts))
    shared = sample_images(tiny_model.eval(), prompts, seeds, steps=2, scale=5.0)
    assert calls.sampled == [4] and encoded[0] == prompts  # one call, each image with its own prompt
    alone = (sample_images(tiny_model, "a dog", [3, 4], steps=2, scale=5.0)
             + sample_images(tiny_model, "a sks dog", [3, 4], steps=2, scale=5.0))
    for a, b in zip(shared, alone):  # equal up to the float rounding of a different batch size
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1
    with pytest.raises(ValueError, match="3 prompts for 2 seeds"):
        sample_images(tiny_model, prompts[:3], [3, 4], steps=2, scale=5.0)

def test_image_logger_samples_and_decodes_one_image_per_call(tmp_path, tiny_model, calls):
    concept = SimpleNamespace(instance=SimpleNamespace(captions=["a sks dog"]))
    trainer = SimpleNamespace(global_step=2, current_epoch=0, is_global_zero=True, default_root_dir=str(tmp_path),
                              optimizers=[], datamodule=SimpleNamespace(concepts=[concept]),
                              precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext))
    batch = {"jpg": torch.rand(1, 32, 32, 3) * 2 - 1, "txt": ["a sks dog"]}
    logger = ImageLogger(batch_frequency=2, max_images=3, ddim_steps=2, preview_every=1, images_per_call=1)
    logger.on_train_batch_end(trainer, tiny_model, None, batch, 0)
    assert calls.sampled == [1, 1, 1] and max(calls.decoded) == 1
    assert len(calls.decoded) == 3 + 2  # three samples, then the two previews of the first seed one by one
    assert len(list((tmp_path / "images" / "train").glob("samples_instance_*.png"))) == 1


def test_lowmem_configs_log_two_images_one_per_call():
    for size in ("stable-diffusion", "tiny", "toy"):
        callbacks = OmegaConf.load(REPO / "configs" / size / "v1-finetune_lowmem.yaml").lightning.callbacks
        assert callbacks.image_logger.params.max_images <= 2, size
        assert callbacks.image_logger.params.images_per_call == 1, size
        assert callbacks.validation.params.images_per_call == 1, size


def test_class_images_sample_a_half_copy_decode_one_at_a_time_and_free_it(tmp_path, tiny_model, monkeypatch):
    seen = SimpleNamespace(dtypes=[], copies=[], decoded=[])
    sample = ldm.training.class_images.sample_images

    def spy(model, prompt, seeds, *args, **kwargs):
        unet = model.model.diffusion_model
        forward = unet.forward
        unet.forward = lambda x, *a, **k: seen.dtypes.append(x.dtype) or forward(x, *a, **k)
        decode = model.decode_first_stage
        model.decode_first_stage = lambda z: seen.decoded.append(z.shape[0]) or decode(z)
        seen.copies.append(weakref.ref(model))
        try:
            return sample(model, prompt, seeds, *args, **kwargs)
        finally:
            del unet.forward, model.decode_first_stage
    monkeypatch.setattr(ldm.training.class_images, "sample_images", spy)
    model = build_tiny_model(use_ema=True)
    half = sampling_copy(model, torch.device("cpu"), torch.bfloat16)
    assert half.unet_dtype == torch.bfloat16 and half.first_stage_model.decoder.conv_out.weight.dtype == torch.bfloat16
    assert half.alphas_cumprod.dtype == torch.float32 and half.model_ema.decay.is_meta and not half.use_ema
    del half
    # half-precision convolutions take seconds each on this CPU: the run samples with a float64 copy
    paths = generate_class_images(model, tmp_path, "dog", 3, batch_size=2, steps=2, dtype=torch.float64)
    assert len(paths) == 3 and seen.decoded == [1, 1, 1] and set(seen.dtypes) == {torch.float64}
    assert all(ref() is None for ref in seen.copies)  # the copy is gone
    assert model.unet_dtype == torch.float32 and model.model_ema.decay.dtype == torch.float32  # the model untouched
    assert generation_dtype("bf16-true", torch.device("cuda")) == torch.bfloat16
    assert generation_dtype("16-mixed", torch.device("cuda")) == torch.float16
    assert generation_dtype("32-true", torch.device("cuda")) == torch.float16
    assert generation_dtype("bf16-true", torch.device("cpu")) == torch.float32
    seen.copies.clear()
    generate_class_images(model, tmp_path, "dog", 1, steps=2, dtype=torch.float32)
    assert seen.copies[0]() is model  # nothing to change: no copy


def test_validation_samples_one_image_per_call(tmp_path, tiny_model, calls):
    instance = SimpleNamespace(identifier="sks", class_word="dog", paths=[])
    trainer = SimpleNamespace(global_step=4, default_root_dir=str(tmp_path), optimizers=[], loggers=[],
                              datamodule=SimpleNamespace(datasets=lambda: {"train": instance}),
                              precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext))
    validation = ValidationSamples(every_n_steps=4, prompts=["photo of a {identifier} {class_word}"], seeds=(0, 1, 2),
                                   ddim_steps=2, images_per_call=1)
    validation.sample(trainer, tiny_model)
    assert calls.sampled == [1, 1, 1] and calls.decoded == [1, 1, 1]
    assert len(list((tmp_path / "images" / "validation" / "step_000004").glob("*.png"))) == 3
