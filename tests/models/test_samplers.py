"""Sampler maths against diffusers' schedulers on the same eps model and the same initial noise."""
import importlib
import sys
import types

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is the independent reference for sampler parity")

from ldm.checkpoint import save_weights  # noqa: E402
from ldm.config import load_config  # noqa: E402
from ldm.inference.loading import load_model  # noqa: E402
from ldm.inference.sampling import sample_latents  # noqa: E402
from ldm.models.diffusion import sampling  # noqa: E402
from ldm.models.diffusion.guidance import CompVisDenoiser, guided_eps  # noqa: E402
from ldm.models.diffusion.plms import PLMSSampler  # noqa: E402
from ldm.models.diffusion.sigmas import get_sigmas  # noqa: E402
from tests.helpers.models import build_tiny_model, randomise_zero_init  # noqa: E402
from tests.helpers.repo import TINY_CONFIG, load_script  # noqa: E402

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 4, 8, 8)
SCALE = 5.0
LMS = "scheduling_lms_discrete.LMSDiscreteScheduler"
# Tolerance on max |ours - diffusers| / max |diffusers| of the final latents (float32 on both sides, the same weights,
# the same noise). Measured on the tiny model: 1.7e-6 to 4.2e-6 for every sampler.
RELATIVE_TOLERANCE = 2e-5


class ToyEpsModel(torch.nn.Module):
    """A nonlinear eps(x, t, c) with SD's schedule buffers, standing in for LatentDiffusion.apply_model."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.num_timesteps = alphas_cumprod.shape[0]
        self.calls = 0

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        w = 1.0 + t.float()[:, None, None, None] / 1000.0
        return torch.tanh(x * w + cond.mean(dim=(1, 2))[:, None, None, None]) * 0.8 + 0.1 * torch.sin(3 * x)


def make_toy() -> ToyEpsModel:
    ref = diffusers.DDIMScheduler(**SD_SCHEDULE)
    return ToyEpsModel(ref.alphas_cumprod.clone())


@pytest.fixture
def conds():
    g = torch.Generator().manual_seed(1)
    return torch.randn(SHAPE[0], 77, 8, generator=g), torch.randn(SHAPE[0], 77, 8, generator=g)


def relative_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return ((ours - expected).abs().max() / expected.abs().max()).item()


def noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def reference_cfg(model, x, t, cond, uncond):
    """Guidance written independently: two separate model calls."""
    t = t.reshape(-1).expand(x.shape[0])
    e_u, e_c = model.apply_model(x, t, uncond), model.apply_model(x, t, cond)
    return e_u + SCALE * (e_c - e_u)


def run_diffusers(scheduler, model, x_T, cond, uncond, steps):
    """A plain diffusers denoising loop around `scheduler`."""
    scheduler.set_timesteps(steps)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = reference_cfg(model, scheduler.scale_model_input(x, t), t.float().reshape(1), cond, uncond)
        x = scheduler.step(eps, t, x).prev_sample
    return x


def test_guidance_is_one_batched_call(conds):
    model, (cond, uncond) = make_toy(), conds
    x, t = noise(), torch.full((SHAPE[0],), 500)
    e = guided_eps(model, x, t, cond, uncond, SCALE)
    assert model.calls == 1
    torch.testing.assert_close(e, reference_cfg(model, x, t, cond, uncond), rtol=0, atol=1e-6)


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("karras", [False, True])
def test_sigma_schedules_match_diffusers(steps, karras):
    ref = diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, use_karras_sigmas=karras)
    ref.set_timesteps(steps)
    ours = get_sigmas(make_toy().alphas_cumprod, steps, karras=karras)
    # k-diffusion interpolates log sigma between training timesteps, diffusers sigma itself: equal at the
    # integer timesteps of 10 steps (999 / 9 = 111), within 2e-4 relative (measured 7e-5) at the fractional ones of 50.
    rtol = 1e-5 if karras or steps == 10 else 2e-4
    torch.testing.assert_close(ours, ref.sigmas, rtol=rtol, atol=1e-6)


def test_plms_matches_pndm_and_original_algorithm(conds):
    """diffusers' PNDM without Runge-Kutta warm-up is CompVis PLMS: it averages eps at t and at the provisional
    next step first, then runs Adams-Bashforth on the stored eps, each step the DDIM update (PNDM eq. 9 = DDIM eq. 12)."""
    model, (cond, uncond) = make_toy(), conds
    ref = diffusers.PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    expected = run_diffusers(ref, model, noise(), cond, uncond, 10)
    model.calls = 0
    ours, _ = PLMSSampler(model).sample(10, SHAPE[0], SHAPE[1:], cond, x_T=noise(), verbose=False,
                                        unconditional_guidance_scale=SCALE, unconditional_conditioning=uncond)
    assert model.calls == 11, "pseudo improved Euler costs one extra model call, on the first step only"
    assert relative_error(ours, expected) < RELATIVE_TOLERANCE


def scheduler_class(path: str) -> type:
    """A scheduler class from its own module (diffusers' top level hides LMS behind a scipy check)."""
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(f"diffusers.schedulers.{module}"), name)


def fake_scipy_quad(monkeypatch):
    """diffusers' LMS integrates its Lagrange polynomial with scipy.integrate.quad; without scipy use Gauss-Legendre,
    exact for these polynomials of degree <= 3."""
    try:
        import scipy.integrate  # noqa: F401
        return
    except ImportError:
        pass
    nodes, weights = np.polynomial.legendre.leggauss(4)

    def quad(f, a, b, epsrel=None):
        mid, half = (a + b) / 2, (b - a) / 2
        return float(sum(w * f(mid + half * n) for n, w in zip(nodes, weights)) * half), 0.0

    module = sys.modules[scheduler_class(LMS).__module__]
    monkeypatch.setattr(module, "integrate", types.SimpleNamespace(quad=quad), raising=False)


LMS = "scheduling_lms_discrete.LMSDiscreteScheduler"


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """A tiny SD v1 file with random weights (the zero-initialised layers too)."""
    path = tmp_path_factory.mktemp("parity") / "tiny.ckpt"
    save_weights(randomise_zero_init(build_tiny_model()).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tiny_pair(tiny_file):
    """Our tiny LatentDiffusion and diffusers' StableDiffusionPipeline, both from one SD v1 file written here."""
    path = tiny_file
    ours = load_model(load_config(str(TINY_CONFIG)), str(path), torch.device("cpu"))
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(path), original_config=str(TINY_CONFIG), text_encoder=ours.cond_stage_model.transformer.text_model,
        tokenizer=ours.cond_stage_model.tokenizer, safety_checker=None, feature_extractor=None,
        local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    cond = ours.get_learned_conditioning(["a photo of sks dog"] * SHAPE[0])
    uncond = ours.get_learned_conditioning(["blurry"] * SHAPE[0])
    return ours, pipe, dict(pipe.scheduler.config), cond, uncond


SD_DDIM = {"steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False, "timestep_spacing": "leading"}
PIPELINE_CASES = [
    ("ddim", "scheduling_ddim.DDIMScheduler", SD_DDIM, 0.0),
    ("ddim", "scheduling_ddim.DDIMScheduler", SD_DDIM, 0.5),
    ("plms", "scheduling_pndm.PNDMScheduler", {**SD_DDIM, "skip_prk_steps": True}, 0.0),
    ("euler", "scheduling_euler_discrete.EulerDiscreteScheduler", {"timestep_spacing": "linspace"}, 0.0),
    ("euler", "scheduling_euler_discrete.EulerDiscreteScheduler",
     {"timestep_spacing": "linspace", "use_karras_sigmas": True}, 0.0),
    ("euler_a", "scheduling_euler_ancestral_discrete.EulerAncestralDiscreteScheduler",
     {"timestep_spacing": "linspace"}, 0.0),
    ("heun", "scheduling_heun_discrete.HeunDiscreteScheduler", {"timestep_spacing": "linspace"}, 0.0),
    ("lms", LMS, {"timestep_spacing": "linspace"}, 0.0),
    ("dpm2", "scheduling_k_dpm_2_discrete.KDPM2DiscreteScheduler", {"timestep_spacing": "linspace"}, 0.0),
    ("dpm2_a", "scheduling_k_dpm_2_ancestral_discrete.KDPM2AncestralDiscreteScheduler",
     {"timestep_spacing": "linspace"}, 0.0),
]


@pytest.mark.parametrize("name,scheduler,options,eta", PIPELINE_CASES)
def test_tiny_model_matches_diffusers_pipeline(tiny_pair, monkeypatch, name, scheduler, options, eta):
    """Ours (UNet, sampler) against diffusers (its converted UNet, its scheduler) on the same weights and noise."""
    fake_scipy_quad(monkeypatch)
    model, pipe, sd_scheduler_config, cond, uncond = tiny_pair
    pipe.scheduler = scheduler_class(scheduler).from_config(sd_scheduler_config, **options)
    steps, stochastic = 10, name in sampling.STOCHASTIC or eta > 0
    expected = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise(), num_inference_steps=steps,
                    guidance_scale=SCALE, eta=eta, generator=torch.Generator().manual_seed(9) if stochastic else None,
                    height=64, width=64, output_type="latent").images
    ours = sample_latents(model, name, steps, cond, uncond, SCALE, noise(), eta=eta,
                          karras=bool(options.get("use_karras_sigmas")),
                          generator=torch.Generator().manual_seed(9) if stochastic else None, progress=False)
    error = relative_error(ours, expected)
    print(f"{name} {options} eta={eta}: max |ours - diffusers| / max |diffusers| = {error:.1e}")
    assert error < RELATIVE_TOLERANCE


MULTISTEP_CASES = [
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {}),
    ("dpmpp_2m_sde", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("unipc", "UniPCMultistepScheduler", {}),
]


@pytest.mark.parametrize("name,scheduler,options", MULTISTEP_CASES)
def test_tiny_model_multistep_matches_diffusers_pipeline(tiny_pair, name, scheduler, options):
    """The multistep solvers on diffusers' own (rounded) timesteps; they start from unit-variance noise in VP form."""
    model, pipe, sd_scheduler_config, cond, uncond = tiny_pair
    pipe.scheduler = getattr(diffusers, scheduler).from_config(sd_scheduler_config, **options)
    stochastic = name in sampling.STOCHASTIC
    expected = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise(), num_inference_steps=10,
                    guidance_scale=SCALE, height=64, width=64, output_type="latent",
                    generator=torch.Generator().manual_seed(9) if stochastic else None).images
    sigmas = pipe.scheduler.sigmas.clone()
    x = noise() * (1 + sigmas[0] ** 2).sqrt()
    extra = {"generator": torch.Generator().manual_seed(9)} if stochastic else {}
    ours = sampling.SAMPLERS[name](CompVisDenoiser(model), x, sigmas,
                                   {"cond": cond, "uncond": uncond, "cond_scale": SCALE}, disable=True, **extra)
    error = relative_error(ours, expected)
    print(f"{name} {options}: max |ours - diffusers| / max |diffusers| = {error:.1e}")
    assert error < RELATIVE_TOLERANCE



# runwayml/stable-diffusion-v1-5's scheduler_config.json: it names no timestep_spacing, so a scheduler made from it
# takes its own default (UniPCMultistepScheduler: "linspace").
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}



@pytest.mark.parametrize("steps", [1, 6, 10, 25, 50])
def test_whole_timestep_sigmas_are_diffusers_default_unipc_sigmas(steps):
    scheduler = diffusers.UniPCMultistepScheduler.from_config(SD15_SCHEDULER)
    scheduler.set_timesteps(steps)
    ours = get_sigmas(scheduler.alphas_cumprod, steps, whole_timesteps=True)
    torch.testing.assert_close(ours, scheduler.sigmas, rtol=1e-6, atol=0)

def test_cli_unipc_gives_the_image_of_diffusers_default_unipc(tiny_file, tiny_pair, tmp_path):
    """txt2img --sampler unipc (the CLI path: schedule, starting noise, solver, decoding) against the pipeline with
    UniPCMultistepScheduler.from_config of SD 1.5's scheduler config, same weights and noise: within 2 levels of the
    8-bit image (measured 1; 11 levels when the CLI ran UniPC on k-diffusion's schedule)."""
    from PIL import Image

    model, pipe, _, _, _ = tiny_pair
    prompt, seed, steps = "a photo of sks dog", 7, 6
    assert load_script("stable_txt2img").main([
        "--config", str(TINY_CONFIG), "--ckpt", str(tiny_file), "--device", "cpu", "--sampler", "unipc",
        "--ddim_steps", str(steps), "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--seed", str(seed),
        "--prompt", prompt, "--outdir", str(tmp_path)]) == 0
    ours = np.asarray(Image.open(tmp_path / "samples" / "00000.png"), dtype=np.int16)
    pipe.scheduler = diffusers.UniPCMultistepScheduler.from_config(SD15_SCHEDULER)
    assert pipe.scheduler.config.timestep_spacing == "linspace"
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))  # the CLI's noise for the seed
    with torch.no_grad():
        cond, uncond = model.get_learned_conditioning([prompt]), model.get_learned_conditioning([""])
    image = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise, height=64, width=64,
                 num_inference_steps=steps, guidance_scale=7.5).images[0]
    difference = np.abs(ours - np.asarray(image, dtype=np.int16)).max()
    print(f"txt2img --sampler unipc vs diffusers' default UniPC: {difference} levels (8-bit)")
    assert difference <= 2

def run_singlestep(denoiser, x, sigmas, extra_args):
    """diffusers' DPM-Solver++(2S) (singlestep, order 2, midpoint) stepping through the given VE sigmas, the model
    called through our denoiser at each sigma: it checks the solver's algebra, not the timestep tables."""
    scheduler = diffusers.DPMSolverSinglestepScheduler(**SD_SCHEDULE, lower_order_final=False,
                                                       final_sigmas_type="sigma_min")
    scheduler.set_timesteps(len(sigmas) - 1)
    assert scheduler.order_list == [1, 2] * ((len(sigmas) - 1) // 2)
    scheduler.sigmas = sigmas.clone()
    x_vp = x / (1 + sigmas[0] ** 2).sqrt()
    for k, t in enumerate(scheduler.timesteps):
        sigma = sigmas[k]
        x_ve = x_vp * (1 + sigma ** 2).sqrt()
        eps = (x_ve - denoiser(x_ve, sigma.reshape(1).expand(x.shape[0]), **extra_args)) / sigma
        x_vp = scheduler.step(eps, t, x_vp).prev_sample
    return x_vp * (1 + sigmas[-1] ** 2).sqrt()


@pytest.mark.parametrize("name", ["dpmpp_2s_a", "dpmpp_sde"])
def test_two_stage_solvers_without_noise_are_dpmpp_2s(tiny_pair, name):
    """With eta 0, DPM++ 2S a and DPM++ SDE are DPM-Solver++(2S) with its midpoint at r = 1/2 in log sigma: diffusers'
    singlestep solver on a schedule whose odd points are those midpoints gives the same latents."""
    model, _, _, cond, uncond = tiny_pair
    denoiser, extra_args = CompVisDenoiser(model), {"cond": cond, "uncond": uncond, "cond_scale": SCALE}
    sigmas = denoiser.get_sigmas(6)[:-1]  # to the smallest sigma: the last step to 0 is Euler in both of ours
    midpoints = (sigmas[:-1] * sigmas[1:]).sqrt()
    interleaved = torch.stack([sigmas[:-1], midpoints], dim=1).flatten()
    x = noise() * sigmas[0]
    expected = run_singlestep(denoiser, x, torch.cat([interleaved, sigmas[-1:]]), extra_args)
    ours = sampling.SAMPLERS[name](denoiser, x, sigmas, extra_args, disable=True, eta=0.0)
    error = relative_error(ours, expected)
    print(f"{name} eta=0: max |ours - diffusers singlestep| / max |diffusers| = {error:.1e}")
    assert error < RELATIVE_TOLERANCE
