"""Time text-to-image sampling of ours against diffusers' StableDiffusionPipeline built from the same weights.

Any of our samplers can be timed; those without a diffusers scheduler of the same algorithm are timed alone.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from ldm.checkpoint import save_weights  # noqa: E402
from ldm.cli import run_command  # noqa: E402
from ldm.inference import (SAMPLER_NAMES, choose_device, load_model, make_generators,  # noqa: E402
                           precision_scope, sample_latents)
from ldm.model_config import latent_shape, load_config, native_size  # noqa: E402
from ldm.models.diffusion.sampling import randn  # noqa: E402
from ldm.modules.encoders.modules import TOKENIZER_DIR, load_tokenizer  # noqa: E402
from ldm.offline import import_offline  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

# Our sampler name -> (diffusers scheduler class, config overrides giving the same schedule).
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "plms": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {"timestep_spacing": "linspace"}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "linspace"}),
    "heun": ("HeunDiscreteScheduler", {"timestep_spacing": "linspace"}),
    "dpm2": ("KDPM2DiscreteScheduler", {"timestep_spacing": "linspace"}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {"timestep_spacing": "linspace"}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/tiny/v1-inference.yaml", help="model config")
    parser.add_argument("--ckpt", default=None, help="weights; default: random weights from the config, seeded")
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, default="ddim",
                        help=f"compared with diffusers for {', '.join(SCHEDULERS)}; the others are timed alone")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n_samples", type=int, default=1)
    parser.add_argument("--H", type=int, default=None, help="image height (default: the config's native size)")
    parser.add_argument("--W", type=int, default=None, help="image width (default: the config's native size)")
    parser.add_argument("--scale", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each, after one warm-up run")
    parser.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto")
    parser.add_argument("--precision", choices=["full", "autocast"], default="full",
                        help="autocast: ours under fp16 autocast, diffusers with fp16 weights (GPU only)")
    return parser.parse_args(argv)


def seconds(run: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of `run`, waiting for the GPU to finish."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median_seconds(runs: Sequence[Callable[[], object]], repeats: int, device: torch.device) -> list[float]:
    """Median time of each of `runs`, timed in turn (so a load change on the machine hits all), after a warm-up."""
    times: list[list[float]] = [[] for _ in runs]
    for k in range(repeats + 1):
        for run, bucket in zip(runs, times):
            elapsed = seconds(run, device)
            if k:
                bucket.append(elapsed)
    return [statistics.median(bucket) for bucket in times]


def build_pipeline(ckpt: str, config: str, model: torch.nn.Module, sampler: str, dtype: torch.dtype):
    """diffusers' pipeline converted from the same file, sharing our CLIP text model and tokenizer files."""
    try:
        diffusers = import_offline("diffusers")
    except ImportError:
        raise SystemExit("error: the benchmark compares against diffusers; pip install diffusers") from None
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    tokenizer.model_max_length = model.cond_stage_model.max_length
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        ckpt, original_config=config, text_encoder=model.cond_stage_model.transformer.text_model,
        tokenizer=tokenizer, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        local_files_only=True, torch_dtype=dtype)
    name, overrides = SCHEDULERS[sampler]
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **overrides)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv: Optional[Sequence[str]] = None) -> int:
    opt = parse_args(argv)
    return run_command(lambda: benchmark(opt))


def benchmark(opt: argparse.Namespace) -> None:
    """Time our sampler, and diffusers' where it has one, on the same model and prompt."""
    device, config = choose_device(opt.device), load_config(opt.config)
    height, width = opt.H or native_size(config), opt.W or native_size(config)
    shape = latent_shape(config, height, width)
    scope = precision_scope(opt.precision, device)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = opt.ckpt
        if ckpt is None:
            torch.manual_seed(0)
            ckpt = str(Path(tmp) / "random.ckpt")
            save_weights(instantiate_from_config(config.model).state_dict(), ckpt)
        model = load_model(config, ckpt, device)
        half = opt.precision == "autocast" and device.type != "cpu"
        pipe = (build_pipeline(ckpt, opt.config, model, opt.sampler, torch.float16 if half else torch.float32)
                if opt.sampler in SCHEDULERS else None)
    prompt, n = ["a photo of sks dog"] * opt.n_samples, opt.n_samples

    @torch.no_grad()
    def ours() -> torch.Tensor:
        with scope:
            cond, uncond = model.get_learned_conditioning(prompt), model.get_learned_conditioning([""] * n)
            generators = make_generators(range(n))
            noise = randn((n, *shape), generators, device)
            z = sample_latents(model, opt.sampler, opt.steps, cond, uncond, opt.scale, noise, generators,
                               progress=False)
            return model.decode_first_stage(z)

    def theirs() -> torch.Tensor:
        return pipe(prompt, num_inference_steps=opt.steps, guidance_scale=opt.scale, height=height, width=width,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    times = median_seconds([ours] if pipe is None else [ours, theirs], opt.repeats, device)
    print(f"{opt.config} {height}x{width}, {opt.sampler} {opt.steps} steps, batch {n}, {device.type}, "
          f"{opt.precision}, torch threads {torch.get_num_threads()}")
    print(f"ours      {times[0]:.3f} s (median of {opt.repeats}), {times[0] / n:.3f} s/image")
    if pipe is None:
        print(f"diffusers has no scheduler of the {opt.sampler} algorithm: timed ours alone")
        return
    print(f"diffusers {times[1]:.3f} s (median of {opt.repeats})")
    print(f"ratio ours / diffusers = {times[0] / times[1]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
