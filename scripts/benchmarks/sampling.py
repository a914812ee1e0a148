"""Time text-to-image sampling of ours against diffusers' StableDiffusionPipeline built from the same weights.

Any of our samplers can be timed; those without a diffusers scheduler of the same algorithm are timed alone. Both
sides run with the same settings (weights' dtype, TF32, cuDNN autotuning), printed above the times.
"""
import argparse
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402

from benchmarks.common import median_seconds, random_checkpoint  # noqa: E402
from benchmarks.reference import backend_text, default_backend  # noqa: E402
from ldm.cli import run_command  # noqa: E402
from ldm.config import latent_shape, load_config, native_size  # noqa: E402
from ldm.inference.flags import SAMPLER_NAMES  # noqa: E402
from ldm.inference.loading import choose_device, load_model, precision_scope, weights_dtype  # noqa: E402
from ldm.inference.sampling import sample_once  # noqa: E402
from ldm.modules.encoders.modules import TOKENIZER_DIR, load_tokenizer  # noqa: E402
from ldm.util import apply_backend_settings, backend_settings, import_offline  # noqa: E402

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
    "unipc": ("UniPCMultistepScheduler", {"timestep_spacing": "linspace"}),
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
                        help="autocast: both sides with fp16 weights (GPU only; on a CPU both stay fp32)")
    return parser.parse_args(argv)


def side_settings(precision: str, device: torch.device) -> dict:
    """What both sides run with: the weights' dtype (ldm.inference.weights_dtype: fp16 for `autocast` on a GPU, else
    fp32) and the backend flags (main.py's TF32 matmuls, TF32 convolutions, no cuDNN autotuning)."""
    return {"dtype": weights_dtype(precision, device), **default_backend()}


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
    settings = side_settings(opt.precision, device)
    apply_backend_settings(settings)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = opt.ckpt or str(random_checkpoint(config, Path(tmp)))
        model = load_model(config, ckpt, device, precision=opt.precision)
        pipe = (build_pipeline(ckpt, opt.config, model, opt.sampler, settings["dtype"])
                if opt.sampler in SCHEDULERS else None)
    prompt, n = ["a photo of sks dog"] * opt.n_samples, opt.n_samples

    def ours() -> torch.Tensor:
        return sample_once(model, opt.sampler, opt.steps, n, shape, opt.scale, precision_scope(opt.precision, device))

    def theirs() -> torch.Tensor:
        return pipe(prompt, num_inference_steps=opt.steps, guidance_scale=opt.scale, height=height, width=width,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    times = median_seconds([ours] if pipe is None else [ours, theirs], opt.repeats, device)
    print(f"{opt.config} {height}x{width}, {opt.sampler} {opt.steps} steps, batch {n}, {device.type}, "
          f"{opt.precision}, torch threads {torch.get_num_threads()}")
    print(f"both sides: weights {str(settings['dtype']).removeprefix('torch.')}, {backend_text(backend_settings())}")
    print(f"ours      {times[0]:.3f} s (median of {opt.repeats}), {times[0] / n:.3f} s/image")
    if pipe is None:
        print(f"diffusers has no scheduler of the {opt.sampler} algorithm: timed ours alone")
        return
    print(f"diffusers {times[1]:.3f} s (median of {opt.repeats})")
    print(f"ratio ours / diffusers = {times[0] / times[1]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
