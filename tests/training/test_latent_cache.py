"""Cached latents and text embeddings (--cache_latents): the same loss as encoding every step, a cache file that is
reused and rebuilt when what it depends on changes, random crops refused (CLI runs that train on the
cache: tests/e2e/test_latent_cache_e2e.py)."""
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.testing import assert_close
from torch.utils.data import default_collate

from ldm.training import latent_cache
from ldm.data.concepts import ConceptPairs
from ldm.data.datamodule import DataModuleFromConfig
from ldm.training.latent_cache import cache_latents
from ldm.util import UserError
from tests.helpers.models import build_tiny_model, randomise_zero_init

CPU = torch.device("cpu")
KEYS = {"first_stage_key": "image", "cond_stage_key": "caption"}  # as the fine-tuning config names them


def noise_images(folder: Path, sizes: list[tuple[int, int]], seed: int) -> Path:
    """Random-pixel images (so that a mirrored one differs) of the given sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k, (width, height) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"img{k}.png")
    return folder


@pytest.fixture
def folders(tmp_path) -> SimpleNamespace:
    return SimpleNamespace(instance=noise_images(tmp_path / "instance", [(80, 64), (64, 72)], 0),
                           reg=noise_images(tmp_path / "class", [(64, 64), (70, 64), (64, 64)], 1),
                           cache=tmp_path / "run" / "cache")


def make_data(folders: SimpleNamespace, cache: bool = True, size: int = 64, crop: str = "center",
              reg_crop: str = "center", **options) -> DataModuleFromConfig:
    def dataset(root: Path, crop: str, **extra) -> dict:
        return {"target": "ldm.data.personalized.PersonalizedBase",
                "params": {"data_root": str(root), "size": size, "repeats": 2, "flip_p": 0.5, "crop": crop, **extra,
                           **options}}
    data = DataModuleFromConfig(batch_size=2, train=dataset(folders.instance, crop),
                                reg=dataset(folders.reg, reg_crop, reg=True), cache_latents=cache)
    data.setup("fit")
    return data


def seeded_batch(data: DataModuleFromConfig, seeds: list[int]) -> dict:
    """Pairs 0, 1, ... with each example's flips drawn under its own seed."""
    pairs = ConceptPairs(data.concepts)
    items = []
    for index, seed in enumerate(seeds):
        torch.manual_seed(seed)
        items.append(pairs[index])
    return default_collate(items)


def test_cached_and_uncached_steps_give_the_same_loss(folders):
    model = randomise_zero_init(build_tiny_model(cond_stage_trainable=False, **KEYS))
    plain, cached = make_data(folders, cache=False), make_data(folders)
    cache_latents(model, cached, folders.cache, CPU)
    seeds = [0, 1]
    flips = []
    for seed in seeds:
        torch.manual_seed(seed)
        flips.append(bool(torch.rand(()) < 0.5))
    assert flips == [True, False]  # one example of each flip
    image_batch, moments_batch = seeded_batch(plain, seeds), seeded_batch(cached, seeds)
    assert "image" not in moments_batch and moments_batch["moments"].shape == (2, 8, 8, 8)
    assert moments_batch["caption"] == image_batch["caption"]
    t = torch.tensor([20, 400, 700, 950])
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5))

    def step(batch: dict, seed: int = 7) -> dict:
        torch.manual_seed(seed)  # the draw of the latents from the posterior
        with torch.no_grad():
            return model.shared_step(batch, t, noise)

    expected = step(image_batch)
    assert_close(step(moments_batch), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(step(moments_batch, seed=8)["loss"], expected["loss"])  # the draw counts
    other_flip = dict(moments_batch, moments=cached.instance.moments[[0, 1], [0, 1]])
    assert not torch.allclose(step(other_flip)["loss"], expected["loss"])


def test_cache_file_is_reused_and_rebuilt_when_images_size_or_vae_change(folders, monkeypatch, caplog):
    model = build_tiny_model()
    encoded = []
    encode = latent_cache.encode_dataset
    monkeypatch.setattr(latent_cache, "encode_dataset", lambda *args: encoded.append(args[3]) or encode(*args))

    def run(size: int = 64) -> DataModuleFromConfig:
        encoded.clear()
        caplog.clear()
        data = make_data(folders, size=size)
        with caplog.at_level(logging.INFO, logger="ldm.training.latent_cache"):
            cache_latents(model, data, folders.cache, CPU)
        return data

    first = run()
    assert encoded == ["train", "reg"] and model.latents_cached
    saved = load_file(folders.cache / "latents_train.safetensors")["moments"]
    assert saved.shape == (2, 2, 8, 8, 8) and torch.equal(saved, first.instance.moments)
    assert load_file(folders.cache / "latents_reg.safetensors")["moments"].shape == (3, 2, 8, 8, 8)

    again = run()
    assert encoded == [] and caplog.text.count("reusing the latent cache") == 2
    assert torch.equal(again.instance.moments, first.instance.moments)

    noise_images(folders.instance, [(80, 64)], seed=9)  # img0.png gets other pixels, under the same name
    assert not torch.equal(run().instance.moments, first.instance.moments)
    assert encoded == ["train"] and "the image files changed" in caplog.text

    assert run(size=32).instance.moments.shape == (2, 2, 8, 4, 4)
    assert encoded == ["train", "reg"] and "the size changed" in caplog.text

    with torch.no_grad():
        model.first_stage_model.decoder.conv_out.weight.add_(0.1)  # the moments do not depend on the decoder
    run(size=32)
    assert encoded == []
    with torch.no_grad():
        model.first_stage_model.encoder.conv_in.weight.add_(0.1)
    run(size=32)
    assert encoded == ["train", "reg"] and "the VAE weights changed" in caplog.text


def test_bucketed_images_are_cached_one_tensor_each_and_train_as_uncached(tmp_path, monkeypatch):
    folders = SimpleNamespace(instance=noise_images(tmp_path / "instance", [(260, 128), (128, 250)], 2),
                              reg=noise_images(tmp_path / "class", [(192, 192), (250, 128)], 3),
                              cache=tmp_path / "run" / "cache")
    model = randomise_zero_init(build_tiny_model(cond_stage_trainable=False, **KEYS))
    plain = make_data(folders, cache=False, size=192, crop="none", reg_crop="none", buckets=True)
    cached = make_data(folders, size=192, crop="none", reg_crop="none", buckets=True)
    cache_latents(model, cached, folders.cache, CPU)
    assert [tuple(m.shape) for m in cached.instance.moments] == [(2, 8, 16, 32), (2, 8, 32, 16)]
    saved = load_file(folders.cache / "latents_train.safetensors")
    assert set(saved) == {"moments.0", "moments.1"} and torch.equal(saved["moments.1"], cached.instance.moments[1])
    t, noise = torch.tensor([400]), torch.randn(1, 4, 32, 16, generator=torch.Generator().manual_seed(5))
    losses = []
    for data in (plain, cached):
        torch.manual_seed(1)  # the flip
        batch = default_collate([data.instance[1]])
        torch.manual_seed(7)  # the draw of the latent from the posterior
        with torch.no_grad():
            losses.append(model.shared_step(batch, t, noise)["loss"])
    assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    batch = next(iter(cached.train_dataloader()))
    assert batch["moments"].shape[0] == 2 and len({tuple(m.shape) for m in batch["class_moments"]}) == 1

    encoded = []
    monkeypatch.setattr(latent_cache, "encode_dataset", lambda *args: encoded.append(args[3]))
    again = make_data(folders, size=192, crop="none", reg_crop="none", buckets=True)
    cache_latents(model, again, folders.cache, CPU)
    assert encoded == [] and all(torch.equal(a, b) for a, b in zip(again.instance.moments, cached.instance.moments))


def test_a_random_crop_cannot_be_cached(folders):
    for crops in (("random", "center"), ("center", "random")):
        with pytest.raises(UserError, match=r"crop is random, which cannot be cached .* crop center or none"):
            make_data(folders, crop=crops[0], reg_crop=crops[1])
    make_data(folders, cache=False, crop="random")  # without the cache a random crop is fine


def test_the_datasets_refuse_to_load_without_their_cache(folders):
    with pytest.raises(RuntimeError, match="no cached moments"):
        make_data(folders).train_dataloader()


def test_cached_text_embeddings_equal_uncached_and_each_caption_is_encoded_once(monkeypatch, caplog):
    plain = build_tiny_model(cond_stage_trainable=False)
    cached = build_tiny_model(cond_stage_trainable=False, cache_text_embeddings=True)
    seen = []
    encode = cached.cond_stage_model.encode
    monkeypatch.setattr(cached.cond_stage_model, "encode", lambda text: seen.append(list(text)) or encode(text))
    for captions in (["photo of a sks dog", "photo of a dog", "photo of a sks dog"], ["photo of a dog", ""]):
        assert_close(cached.get_learned_conditioning(captions), plain.get_learned_conditioning(captions))
    assert seen == [["photo of a sks dog", "photo of a dog"], [""]]
    cached.on_fit_start()  # Lightning may restore other weights before training: they are encoded anew
    cached.get_learned_conditioning([""])
    assert seen[-1] == [""]

    with caplog.at_level(logging.INFO, logger="ldm.models.diffusion.ddpm"):
        training = build_tiny_model(cond_stage_trainable=True, cache_text_embeddings=True)
    assert caplog.text.count("cache_text_embeddings: no effect while the text encoder trains") == 1
    first, second = (training.get_learned_conditioning(["photo of a dog"]) for _ in range(2))
    assert not training.text_embeddings and first.requires_grad and second.requires_grad


def test_idle_encoders_are_those_both_caches_make_idle_and_nothing_moves_on_a_cpu():
    model = build_tiny_model(cond_stage_trainable=False, cache_text_embeddings=True)
    assert model.idle_encoders() == []  # the batches still carry images
    model.latents_cached = True
    vae = [model.first_stage_model.encoder, model.first_stage_model.quant_conv]
    assert model.idle_encoders() == vae + [model.cond_stage_model]
    model.cache_text_embeddings = False
    assert model.idle_encoders() == vae
    model._trainer = SimpleNamespace(optimizers=[], world_size=1)
    model.on_train_start()
    assert model.offloaded == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_idle_encoders_wait_on_the_cpu_and_come_back_for_image_logging():
    model = build_tiny_model(cond_stage_trainable=False, cache_text_embeddings=True, **KEYS).cuda()
    model.latents_cached = True
    model._trainer = SimpleNamespace(optimizers=[], world_size=1)
    model.on_train_start()
    encoder, text = model.first_stage_model.encoder.conv_in.weight, model.cond_stage_model.parameters()
    assert encoder.device.type == "cpu" and next(text).device.type == "cpu"
    assert model.first_stage_model.decoder.conv_out.weight.is_cuda and model.model.diffusion_model.out[2].weight.is_cuda
    assert model.get_learned_conditioning(["a new caption"]).is_cuda
    batch = {"moments": torch.randn(1, 8, 8, 8, device="cuda"), "caption": ["photo of a dog"]}
    assert torch.isfinite(model.shared_step(batch)["loss"])
    with model.encoders_on_device():
        assert model.first_stage_model.encoder.conv_in.weight.is_cuda
    assert model.first_stage_model.encoder.conv_in.weight.device.type == "cpu"
    model.on_train_end()
    assert model.first_stage_model.encoder.conv_in.weight.is_cuda and not model.offloaded


def test_every_caption_and_the_empty_one_are_encoded_before_the_text_encoder_is_offloaded(monkeypatch):
    model = build_tiny_model(cond_stage_trainable=False, cache_text_embeddings=True)
    captions = {"train": ["photo of a sks dog", "photo of a sks dog on grass"], "reg": ["photo of a dog"] * 3}
    datamodule = SimpleNamespace(datasets=lambda: {k: SimpleNamespace(captions=v) for k, v in captions.items()})
    model._trainer = SimpleNamespace(optimizers=[], world_size=1, datamodule=datamodule)
    seen = []
    encode = model.cond_stage_model.encode
    monkeypatch.setattr(model.cond_stage_model, "encode", lambda text: seen.append(list(text)) or encode(text))
    model.on_train_start()
    assert set(model.text_embeddings) == {"", "photo of a sks dog", "photo of a sks dog on grass", "photo of a dog"}
    calls = len(seen)
    model.get_learned_conditioning(["photo of a dog", "", "photo of a sks dog on grass"])  # a step's captions
    assert len(seen) == calls == 1  # one call before training, none in a step
