"""ControlNets at sampling time: a guided DDIM run against diffusers' StableDiffusionControlNetPipeline, the
--controlnet flags of txt2img and img2img (strength 0 is the uncontrolled image, hints, metadata, errors), guess mode
and the step window, and every sampler."""
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ldm.checkpoint import save_lora, save_weights
from ldm.config import load_config
from ldm.controlnet.hints import canny, read_hint
from ldm.controlnet.options import load_controlnet
from ldm.controlnet.stack import Control, ControlStack, controlled
from ldm.images import read_metadata
from ldm.inference.flags import SAMPLER_NAMES
from ldm.inference.loading import load_model
from ldm.inference.sampling import sample_latents
from ldm.lora.layers import inject_lora, lora_tensors
from ldm.modules.controlnet import ControlNet
from tests.controlnet.test_controlnet import PREFIX, TINY_CONTROLNET, diffusers_controlnet
from tests.helpers.models import build_tiny_model, randomise_zero_init
from tests.helpers.other_tools import parse_infotext
from tests.helpers.repo import TINY_CONFIG, load_script
from tests.lora.test_lora import NAMES, randomise_lora, tiny
from tests.models.test_samplers import SCALE, SD_DDIM, noise, relative_error
from tests.modules.test_unet import randomise

txt2img, img2img = load_script("stable_txt2img"), load_script("img2img")
SAMPLING = ["--config", str(TINY_CONFIG), "--device", "cpu", "--n_iter", "1", "--n_samples", "1", "--ddim_steps", "4",
            "--skip_grid", "--prompt", "a photo of sks dog"]
SIZE = ["--H", "64", "--W", "64"]  # txt2img's; img2img takes the init image's


def shapes_image(size=(64, 64)) -> Image.Image:
    image = Image.new("RGB", size, "black")
    draw = ImageDraw.Draw(image)
    draw.rectangle((10, 12, 40, 44), fill="white")
    draw.ellipse((36, 6, 60, 30), fill=(200, 40, 40))
    return image


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny SD v1 checkpoint, a ControlNet for it in lllyasviel's layout, a LoRA and a control image."""
    root = tmp_path_factory.mktemp("controlnet")
    base = root / "tiny.ckpt"
    save_weights(randomise_zero_init(build_tiny_model()).state_dict(), base)
    net = ControlNet(**TINY_CONTROLNET)
    randomise(net, seed=11)
    control = root / "control_tiny_canny.pth"
    save_weights({PREFIX + k: v for k, v in net.state_dict().items()}, control)
    model = tiny()
    inject_lora(model, NAMES, rank=4, text_encoder=False)
    randomise_lora(model)
    lora = root / "dog.safetensors"
    save_lora(lora_tensors(model, NAMES), lora, base_hash="0" * 64)
    image = root / "shapes.png"
    shapes_image().save(image)
    return base, control, lora, image


def test_guided_ddim_matches_diffusers_controlnet_pipeline(files):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is needed for the parity test")
    base, control, _, image = files
    model = load_model(load_config(str(TINY_CONFIG)), str(base), torch.device("cpu"))
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(base), original_config=str(TINY_CONFIG), text_encoder=model.cond_stage_model.transformer.text_model,
        tokenizer=model.cond_stage_model.tokenizer, safety_checker=None, feature_extractor=None,
        local_files_only=True)
    net = load_controlnet(str(control), TINY_CONTROLNET, torch.device("cpu"), torch.float32)
    components = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
    components["scheduler"] = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, **SD_DDIM)
    controlled_pipe = diffusers.StableDiffusionControlNetPipeline(
        **components, controlnet=diffusers_controlnet(pipe.unet, net), requires_safety_checker=False)
    controlled_pipe.set_progress_bar_config(disable=True)
    cond = model.get_learned_conditioning(["a photo of sks dog"] * 2)
    uncond = model.get_learned_conditioning(["blurry"] * 2)
    expected = controlled_pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, image=Image.open(image),
                               latents=noise(), num_inference_steps=10, guidance_scale=SCALE, height=64, width=64,
                               output_type="latent").images
    hint = read_hint(str(image), 64, 64)
    with controlled(model, ControlStack([Control(net, hint)])):
        ours = sample_latents(model, "ddim", 10, cond, uncond, SCALE, noise(), progress=False)
    plain = sample_latents(model, "ddim", 10, cond, uncond, SCALE, noise(), progress=False)
    error = relative_error(ours, expected)
    print(f"ControlNet DDIM, 10 steps, guidance {SCALE}: max |ours - diffusers| / max |diffusers| = {error:.1e} "
          f"(control moved the latents by {relative_error(plain, expected):.2f} relative)")
    assert error <= 2e-5
    assert relative_error(plain, expected) > 1e-2


def test_canny_finds_the_edges_of_shapes():
    image = torch.zeros(1, 3, 64, 64)
    image[..., 16:48, 16:48] = 1.0
    edges = canny(image)[0, 0]
    assert edges.shape == (64, 64) and set(edges.unique().tolist()) == {0.0, 1.0}
    rows, cols = edges.nonzero(as_tuple=True)
    on_border = ((rows - 15.5).abs() <= 1) | ((rows - 47.5).abs() <= 1) | ((cols - 15.5).abs() <= 1) | (
        (cols - 47.5).abs() <= 1)
    assert bool(on_border.all()), "edges away from the square's border"
    assert edges[16:48, 15:17].sum() >= 30 and edges[15:17, 16:48].sum() >= 30, "a side of the square is missing"
    faint = image * 0.15  # a step of 38 grey levels: its gradient stays below the high threshold of 200
    assert canny(faint).sum() == 0
    assert canny(faint, 20, 60).sum() > 0


def sample(tmp_path, name, base, *extra, script=txt2img):
    outdir = tmp_path / name
    flags = SAMPLING + SIZE if script is txt2img else SAMPLING
    assert script.main([*flags, "--ckpt", str(base), "--outdir", str(outdir), *extra]) == 0
    return outdir / "samples" / "00000.png"


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_strength_zero_is_the_uncontrolled_image_and_the_metadata_names_the_controlnet(tmp_path, files):
    base, control, _, image = files
    plain = sample(tmp_path, "plain", base)
    zero = sample(tmp_path, "zero", base, "--controlnet", str(control), "--control_image", str(image),
                  "--control_strength", "0")
    one = sample(tmp_path, "one", base, "--controlnet", str(control), "--control_image", str(image))
    assert np.array_equal(pixels(plain), pixels(zero))
    assert np.abs(pixels(plain) - pixels(one)).mean() > 1
    meta = read_metadata(one)
    assert meta["controlnets"] == [{
        "file": control.name, "sha256": hashlib.sha256(control.read_bytes()).hexdigest(), "control": "canny",
        "strength": 1.0, "start": 0.0, "end": 1.0, "hint": "hint-0000-0.png", "canny_low": 100.0,
        "canny_high": 200.0}]
    hint = pixels(one.parent.parent / "hint-0000-0.png")
    assert hint.shape == (64, 64, 3) and set(np.unique(hint)) == {0, 255}
    info = parse_infotext(Image.open(one).info["parameters"])
    assert info["ControlNet 0"].startswith('"Module: canny, Model: control_tiny_canny [')
    assert "controlnets" not in read_metadata(plain)


def test_a_ready_map_of_another_size_is_resized_and_two_controlnets_add_up(tmp_path, files):
    base, control, _, _ = files
    depth = tmp_path / "depth.png"
    Image.fromarray(np.tile(np.linspace(0, 255, 50, dtype=np.uint8), (30, 1))).save(depth)  # grey, 50x30
    one = sample(tmp_path, "one", base, "--controlnet", str(control), "--control_image", str(depth),
                 "--control", "none")
    two = sample(tmp_path, "two", base, "--controlnet", str(control), "--control_image", str(depth),
                 "--controlnet", str(control), "--control_image", str(depth), "--control", "none",
                 "--control_strength", "0.5")
    hint = pixels(one.parent.parent / "hint-0000-0.png")
    assert hint.shape == (64, 64, 3) and hint[..., 0].min() < 20 and hint[..., 0].max() > 235
    assert np.array_equal(pixels(one), pixels(two)), "two ControlNets at 0.5 are one at 1"
    assert [c["strength"] for c in read_metadata(two)["controlnets"]] == [0.5, 0.5]


def test_img2img_takes_controlnets_with_a_lora(tmp_path, files):
    base, control, lora, image = files
    init = tmp_path / "init.png"
    shapes_image().rotate(90).save(init)
    args = ["--init-img", str(init), "--strength", "0.75", "--lora", str(lora)]
    plain = sample(tmp_path, "plain", base, *args, script=img2img)
    guided = sample(tmp_path, "guided", base, *args, "--controlnet", str(control), "--control_image", str(image),
                    "--guess_mode", "--control_end", "0.5", script=img2img)
    assert np.abs(pixels(plain) - pixels(guided)).mean() > 0.5
    meta = read_metadata(guided)
    assert meta["guess_mode"] is True and meta["loras"][0]["file"] == "dog.safetensors"
    assert meta["controlnets"][0]["end"] == 0.5


@pytest.mark.parametrize("flags,message", [
    (["--control_image", "{image}"], "--control_image needs a --controlnet"),
    (["--controlnet", "{control}"], "need 1 --control_image"),
    (["--controlnet", "{control}", "--control_image", "{tmp}/missing.png"], "cannot read it as an image"),
    (["--controlnet", "{tmp}/none.pth", "--control_image", "{image}"], "checkpoint not found"),
    (["--controlnet", "{control}", "--control_image", "{image}", "--control_start", "0.6", "--control_end", "0.4"],
     "need 0 <= start < end <= 1"),
    (["--controlnet", "{control}", "--control_image", "{image}", "--control_strength", "1", "--control_strength",
      "2"], "given 2 times for 1 ControlNets"),
    (["--controlnet", "{lora}", "--control_image", "{image}"], "not a ControlNet file"),
])
def test_bad_control_flags_are_one_line_errors(tmp_path, files, capsys, flags, message):
    base, control, lora, image = files
    values = {"image": image, "control": control, "lora": lora, "tmp": tmp_path}
    flags = [flag.format(**values) for flag in flags]
    code = txt2img.main([*SAMPLING, *SIZE, "--ckpt", str(base), "--outdir", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err


class Recorder(torch.nn.Module):
    """A stand-in ControlNet that returns ones and records the rows and timesteps it was called on."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, float]] = []

    def forward(self, x, hint, t, context):
        self.calls.append((x.shape[0], float(t[0])))
        return [torch.ones(x.shape[0], 1, 1, 1)] * 13


def test_guess_mode_leaves_the_unconditional_rows_without_control():
    stack = ControlStack([Control(Recorder(), torch.rand(1, 3, 8, 8), strength=2.0)], guess_mode=True)
    x, t, context = torch.zeros(4, 4, 1, 1), torch.full((4,), 500), torch.zeros(4, 3, 8)
    residuals = stack.residuals(x, t, context, n_uncond=2)
    assert stack.controls[0].net.calls == [(2, 500.0)]
    assert [float(r[:2].abs().max()) for r in residuals] == [0.0] * 13
    torch.testing.assert_close(torch.stack([r[2:].mean() for r in residuals]),
                               2.0 * 0.825 ** torch.arange(12, -1, -1.0))
    plain = ControlStack([Control(Recorder(), torch.rand(1, 3, 8, 8))]).residuals(x, t, context, n_uncond=2)
    assert all(bool((r == 1).all()) for r in plain)


def test_the_step_window_counts_the_steps_run():
    net = Recorder()
    stack = ControlStack([Control(net, torch.rand(1, 3, 8, 8), start=0.2, end=0.6)])
    stack.plan(torch.arange(999, 0, -100.0))  # ten steps
    x, context = torch.zeros(1, 4, 1, 1), torch.zeros(1, 3, 8)
    acting = [stack.residuals(x, torch.tensor([float(t)]), context) is not None for t in range(999, 0, -100)]
    assert acting == [False, False, True, True, True, True, False, False, False, False]


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_takes_the_control(files, sampler):
    base, control, _, image = files
    model = load_model(load_config(str(TINY_CONFIG)), str(base), torch.device("cpu"))
    net = load_controlnet(str(control), TINY_CONTROLNET, torch.device("cpu"), torch.float32)
    cond = model.get_learned_conditioning(["a photo of sks dog"])
    uncond = model.get_learned_conditioning([""])

    def run():
        generator = [torch.Generator().manual_seed(1)]
        return sample_latents(model, sampler, 4, cond, uncond, SCALE, noise()[:1], generator, progress=False)

    plain = run()
    with controlled(model, ControlStack([Control(net, read_hint(str(image), 64, 64))])):
        guided = run()
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-3
