"""Parity with diffusers: the same embedding file, loaded by `StableDiffusionPipeline.load_textual_inversion` into our
tiny model converted to a diffusers folder, gives the text conditioning ours gives (for a prompt with the token and
one without), and the same DDIM image within 2 levels of 255; for the .safetensors and the A1111 .pt file."""
import pytest
import torch

from ldm.checkpoint import save_embedding, save_weights
from ldm.config import load_config
from ldm.embeddings.files import apply_embedding_files
from ldm.inference.loading import load_model
from ldm.inference.sampling import sample_latents
from tests.helpers.models import build_tiny_model, randomise_zero_init
from tests.helpers.repo import TINY_CONFIG, load_script

diffusers = pytest.importorskip("diffusers", reason="diffusers holds the reference pipeline")
to_diffusers = load_script("convert_sd_to_diffusers")
PROMPTS = ["a photo of sks dog on the beach", "a photo of a dog"]
STEPS, SCALE = 3, 5.0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Our tiny checkpoint and its diffusers folder, written by our converter."""
    root = tmp_path_factory.mktemp("ti-parity")
    save_weights(randomise_zero_init(build_tiny_model(seed=1), seed=1).state_dict(), root / "tiny.ckpt")
    assert to_diffusers.main([str(root / "tiny.ckpt"), "-o", str(root / "pipe"), "--config", str(TINY_CONFIG)]) == 0
    return root


@pytest.mark.parametrize("name", ["sks.safetensors", "trained.pt"])
def test_diffusers_load_textual_inversion_gives_our_conditioning_and_image(models, name):
    path = models / name
    save_embedding(torch.randn(3, 32, generator=torch.Generator().manual_seed(2)) * 0.5, path, "sks", 10)
    ours = load_model(load_config(str(TINY_CONFIG)), str(models / "tiny.ckpt"), torch.device("cpu"))
    assert apply_embedding_files(ours, [str(path)])[0]["word"] == "sks"  # the .pt's name, the .safetensors' stem
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(models / "pipe"), local_files_only=True,
                                                             safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(path), token="sks")
    with torch.no_grad():
        cond = ours.get_learned_conditioning(PROMPTS)
        theirs, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    assert float((cond - theirs).abs().max() / theirs.abs().max()) < 1e-5
    without = load_model(load_config(str(TINY_CONFIG)), str(models / "tiny.ckpt"), torch.device("cpu"))
    assert not torch.allclose(cond[0], without.get_learned_conditioning(PROMPTS[:1])[0], atol=1e-3)  # it acts

    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = pipe(PROMPTS[0], latents=noise.clone(), height=64, width=64, num_inference_steps=STEPS,
                    guidance_scale=SCALE, output_type="np").images[0]
    with torch.no_grad():
        uncond = ours.get_learned_conditioning([""])
        z = sample_latents(ours, "ddim", STEPS, cond[:1], uncond, SCALE, noise.clone(), progress=False)
        image = ((ours.decode_first_stage(z)[0].permute(1, 2, 0) + 1) / 2).clamp(0, 1)
    levels = (image.numpy() * 255).round() - (torch.from_numpy(expected) * 255).round().numpy()
    print(f"{name}: our image vs diffusers' with load_textual_inversion: max {abs(levels).max():.0f} levels of 255")
    assert abs(levels).max() <= 2
