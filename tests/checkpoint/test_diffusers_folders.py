"""diffusers pipeline folders in and out: the name map (diffusers' own converters, inverted) covers the full-size SD
v1 layout on the meta device and matches diffusers' and transformers' own modules; SD -> diffusers -> SD is
bit-identical through the two scripts; our folder loads in StableDiffusionPipeline.from_pretrained and gives our
DDIM image; a folder saved by diffusers from random tiny weights gives diffusers' UNet output and DDIM image here."""
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import group_of, read_state_dict, save_weights
from ldm.checkpoint.diffusers import diffusers_names
from ldm.config import load_config
from ldm.inference.loading import load_model, sampling_config
from ldm.inference.sampling import sample_latents
from ldm.modules.encoders.modules import TOKENIZER_DIR, load_tokenizer
from tests.helpers.models import build_tiny_model, randomise_zero_init
from tests.helpers.repo import FULL_CONFIG, TINY_CONFIG, load_script
from tests.helpers.specs import read_spec

diffusers = pytest.importorskip("diffusers", reason="diffusers holds the reference pipeline and the key tables")
to_diffusers, to_sd = load_script("convert_sd_to_diffusers"), load_script("convert_diffusers_to_sd")
SHAPE, STEPS, SCALE = (1, 4, 8, 8), 10, 7.5


def relative_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return float((ours - expected).abs().max() / expected.abs().max())


def ddim_both(pipe, ours, cond, uncond, output_type: str):
    """Our DDIM latents and the pipeline's output (`output_type`) from the same noise and embeddings."""
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    expected = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise.clone(), height=64, width=64,
                    num_inference_steps=STEPS, guidance_scale=SCALE, output_type=output_type).images
    with torch.no_grad():
        return sample_latents(ours, "ddim", STEPS, cond, uncond, SCALE, noise.clone(), progress=False), expected


def test_the_full_size_map_covers_the_spec_and_diffusers_own_modules():
    config = OmegaConf.load(FULL_CONFIG)
    names = diffusers_names(config)
    spec = {k: v for k, v in read_spec().items() if group_of(k) in ("UNet", "VAE", "text encoder")
            and not k.endswith("position_ids")}
    assert set(names) == set(spec) and all(names[k].sd_shape == spec[k] for k in spec)
    assert len({(n.part, n.key) for n in names.values()}) == len(names)  # one SD tensor per diffusers tensor
    utils = diffusers.loaders.single_file_utils
    original = OmegaConf.to_container(config)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**utils.create_unet_diffusers_config_from_ldm(original, {}))
        vae = diffusers.AutoencoderKL(**utils.create_vae_diffusers_config_from_ldm(original, {}))
    for part, module in (("unet", unet), ("vae", vae)):
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        assert {n.key: n.shape for n in names.values() if n.part == part} == expected, part
    text = {n.key for n in names.values() if n.part == "text_encoder"}
    assert len(text) == 196 and all(k.startswith("text_model.") for k in text)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd") / "tiny.ckpt"
    save_weights(randomise_zero_init(build_tiny_model()).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def our_folder(tmp_path_factory, tiny_file):
    folder = tmp_path_factory.mktemp("pipelines") / "ours"
    assert to_diffusers.main([str(tiny_file), "-o", str(folder), "--config", str(TINY_CONFIG)]) == 0
    return folder


def test_sd_to_diffusers_to_sd_is_bit_identical(our_folder, tiny_file, tmp_path):
    assert json.loads((our_folder / "scheduler" / "scheduler_config.json").read_text())["clip_sample"] is False
    back = tmp_path / "back.safetensors"
    assert to_sd.main([str(our_folder), "-o", str(back)]) == 0
    original, converted = read_state_dict(tiny_file), read_state_dict(back)
    assert set(converted) == set(original)
    assert all(torch.equal(converted[k], original[k]) for k in original)


def test_our_folder_loads_in_diffusers_and_gives_our_ddim_image(our_folder, tiny_file):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(our_folder), local_files_only=True,
                                                             safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    ours = load_model(load_config(str(TINY_CONFIG)), str(tiny_file), torch.device("cpu"))
    cond, uncond = ours.get_learned_conditioning(["a photo of a dog"]), ours.get_learned_conditioning([""])
    tokens = pipe.tokenizer(["a photo of a dog"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        theirs_cond = pipe.text_encoder(tokens.input_ids).last_hidden_state
    assert relative_error(cond, theirs_cond) < 1e-5
    latents, expected = ddim_both(pipe, ours, cond, uncond, "latent")
    error = relative_error(latents, expected)
    print(f"our DDIM vs diffusers' on our converted folder: max relative difference {error:.1e}")
    assert error < 1e-4



def test_our_folder_generates_from_a_prompt_at_the_models_own_size(our_folder):
    """The pipeline tokenizes the prompt itself (model_max_length 77, not 1e30) and samples at the tiny model's 64 px,
    not SD's 512, when no size is given."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(our_folder), local_files_only=True,
                                                             safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer.model_max_length == 77
    image = pipe("a photo of a dog", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()

def diffusers_tiny_pipeline(folder):
    """A StableDiffusionPipeline of diffusers' own classes with random weights, in our tiny config's sizes."""
    from transformers import CLIPTextConfig, CLIPTextModel
    utils = diffusers.loaders.single_file_utils
    original = OmegaConf.to_container(OmegaConf.load(TINY_CONFIG))
    torch.manual_seed(3)
    unet = diffusers.UNet2DConditionModel(**utils.create_unet_diffusers_config_from_ldm(original, {}))
    vae = diffusers.AutoencoderKL(**utils.create_vae_diffusers_config_from_ldm(original, {}))
    with torch.no_grad():  # give the zero-initialised output layers values, so the images depend on everything
        for param in unet.parameters():
            if not param.any():
                param.normal_(0.0, 0.05)
    text = original["model"]["params"]["cond_stage_config"]["params"]["text_config"]
    text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=load_tokenizer(
        TOKENIZER_DIR), unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_folder_saved_by_diffusers_gives_its_unet_output_and_ddim_image(tmp_path):
    folder = tmp_path / "theirs"
    pipe = diffusers_tiny_pipeline(folder)
    config = sampling_config(None, str(folder))  # the folder's own sizes
    assert config.model.params.unet_config.params.model_channels == 32
    ours = load_model(config, str(folder), torch.device("cpu"))
    cond = ours.get_learned_conditioning(["a photo of a dog"])
    uncond = ours.get_learned_conditioning([""])
    x, t = torch.randn(2, *SHAPE[1:], generator=torch.Generator().manual_seed(1)), torch.tensor([10, 700])
    with torch.no_grad():
        eps = ours.apply_model(x, t, cond.expand(2, -1, -1))
        expected_eps = pipe.unet(x, t, encoder_hidden_states=cond.expand(2, -1, -1)).sample
    assert relative_error(eps, expected_eps) < 1e-5
    latents, expected = ddim_both(pipe, ours, cond, uncond, "np")
    with torch.no_grad():
        image = ((ours.decode_first_stage(latents) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    error = float(np.abs(image - expected).max())
    print(f"DDIM image from diffusers' folder, ours vs diffusers': max difference {error:.1e} (pixels in [0, 1])")
    assert error < 1e-4


def test_folders_that_are_not_sd_v1_pipelines_are_one_line_errors(tmp_path, capsys):
    folder = tmp_path / "sd2"
    diffusers_tiny_pipeline(folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "use_linear_projection": True}))
    assert to_sd.main([str(folder), "-o", str(tmp_path / "x.safetensors")]) == 1
    assert "is a Stable Diffusion 2.x or XL pipeline" in capsys.readouterr().err
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    assert to_sd.main([str(folder), "-o", str(tmp_path / "x.safetensors")]) == 1
    assert "vae holds no weights" in capsys.readouterr().err
    assert to_sd.main([str(tmp_path), "-o", str(tmp_path / "x.safetensors")]) == 1
    assert "is not a diffusers pipeline folder" in capsys.readouterr().err
