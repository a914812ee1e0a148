"""The sampling scripts' shared flags, and their checks with no model loaded: the sampler and its options, the
precision, the prompts."""
import argparse
import logging
from pathlib import Path
from typing import Optional


from ldm.controlnet.options import add_control_arguments
from ldm.inference.sampling import ADAPTIVE_TOLERANCES
from ldm.models.diffusion.sampling import SAMPLERS as K_SAMPLERS
from ldm.util import UserError, user_or_project_path

logger = logging.getLogger(__name__)


SAMPLER_NAMES = ("ddim", "plms", *K_SAMPLERS)


NO_SCHEDULE = ("ddim", "plms", "dpm_fast", "dpm_adaptive")  # --karras does not apply to them


CLIP_SKIP_KEY = "model.params.cond_stage_config.params.clip_skip"  # what --clip_skip sets


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags txt2img and img2img share, with the defaults of the CompVis txt2img script."""
    add = parser.add_argument
    add("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar",
        help="the prompt to render")
    add("--negative_prompt", type=str, default="", help="what to steer away from (the unconditional prompt)")
    add("--outdir", type=str, nargs="?", default="outputs/txt2img-samples", help="dir to write results to")
    add("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    add("--skip_save", action="store_true", help="do not save individual samples (speed tests)")
    add("--ddim_steps", type=int, default=50, help="number of sampling steps (every sampler)")
    add("--plms", action="store_true", help="use PLMS sampling (same as --sampler plms)")
    add("--sampler", choices=SAMPLER_NAMES, default=None, help="sampler (default ddim, or plms with --plms)")
    add("--karras", action="store_true", help="Karras et al. sigma spacing for the k-samplers")
    add("--rtol", type=float, default=None,
        help=f"dpm_adaptive: relative error tolerance (default {ADAPTIVE_TOLERANCES[0]}); it replaces --ddim_steps")
    add("--atol", type=float, default=None,
        help=f"dpm_adaptive: absolute error tolerance (default {ADAPTIVE_TOLERANCES[1]})")
    add("--fixed_code", action="store_true", help="the same starting noise (seeds) for every batch")
    add("--ddim_eta", type=float, default=0.0, help="DDIM eta (eta=0.0 is deterministic)")
    add("--n_iter", type=int, default=2, help="batches per prompt")
    add("--C", type=int, default=None, help="latent channels (default: the config's, 4 for SD v1)")
    add("--f", type=int, default=None,
        help="downsampling factor of the autoencoder (default: the config's, 8 for SD v1)")
    add("--n_samples", type=int, default=3, help="images per batch (batch size)")
    add("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    add("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    add("--use_ema", action="store_true", help="sample with the file's EMA UNet (model_ema.*: a run trained with "
        "use_ema, or a *-full-ema file)")
    add("--from-file", type=str, help="read prompts from this file, one per line")
    add("--config", type=user_or_project_path, default=None, help="model config (default: the saved config of the "
        "training run that --ckpt comes from, else configs/stable-diffusion/v1-inference.yaml)")
    add("--ckpt", type=user_or_project_path, default="models/ldm/stable-diffusion-v1/model.ckpt",
        help=".ckpt or .safetensors (configs/... and data/... that are not in the working folder: the project's own)")
    add("--seed", type=int, default=42, help="seed of the first image; image k gets seed + k")
    add_precision_argument(parser)
    add("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto", help="auto picks cuda, then mps, then cpu")
    add("--clip_skip", type=int, default=None, metavar="N",
        help="condition on the N-th text encoder layer from the end, as A1111: 1 the last, 2 the penultimate "
             "(default: the config's, so what the run of --ckpt trained with, else 1)")
    add("--lora", action="append", default=[], metavar="FILE[:SCALE]",
        help="a kohya-format LoRA file (ours, kohya's, A1111's, civitai's) folded into --ckpt at SCALE (default 1); "
             "repeatable, the files add up")
    add("--embedding", action="append", default=[], metavar="FILE[:WORD]",
        help="a textual-inversion embedding (.safetensors or .pt: ours, A1111's, civitai's): WORD in the prompt stands "
             "for its vectors (default: a .pt's name, else the file's stem as A1111 does); repeatable")
    add_control_arguments(parser)


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    """--precision, as every sampling script takes it (load_model and precision_scope read it)."""
    parser.add_argument("--precision", choices=["autocast", "full", "bf16"], default="autocast",
                        help="autocast: fp16 weights and mixed precision on a CUDA GPU (full elsewhere); bf16: "
                             "bfloat16 weights and mixed precision; full: fp32 weights")


def resolve_sampler(opt: argparse.Namespace) -> str:
    """The sampler that the flags ask for, refusing combinations that would be silently ignored."""
    sampler = opt.sampler or ("plms" if opt.plms else "ddim")
    if opt.plms and sampler != "plms":
        raise UserError(f"--plms conflicts with --sampler {sampler}; pass only one of them")
    if opt.karras and sampler in NO_SCHEDULE:
        raise UserError(f"--karras applies to the samplers that follow a sigma schedule "
                        f"({', '.join(s for s in K_SAMPLERS if s not in NO_SCHEDULE)}), not to {sampler}")
    if sampler != "dpm_adaptive" and (opt.rtol is not None or opt.atol is not None):
        raise UserError(f"--rtol and --atol apply to the dpm_adaptive sampler only; drop them for {sampler}")
    for name in ("rtol", "atol"):
        if getattr(opt, name) is not None and getattr(opt, name) <= 0:
            raise UserError(f"--{name} must be above 0, got {getattr(opt, name)}")
    if opt.ddim_eta != 0 and sampler != "ddim":
        raise UserError(f"--ddim_eta applies to the ddim sampler only; drop it for {sampler}")
    if opt.ddim_steps < 1 or opt.n_iter < 1 or opt.n_samples < 1:
        raise UserError("--ddim_steps, --n_iter and --n_samples must be at least 1")
    if opt.scale < 0:
        logger.warning("--scale %g is below 0: guidance then pushes the images away from the prompt (usual values "
                       "are 5 to 10; 1 turns guidance off)", opt.scale)
    return sampler


def read_prompts(prompt: Optional[str], from_file: Optional[str]) -> list[str]:
    """The prompts to render: --prompt, or the non-empty lines of --from-file."""
    if not from_file:
        return [prompt or ""]
    try:
        lines = Path(from_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--from-file {from_file}: cannot read it ({err.__class__.__name__}: {err})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"--from-file {from_file} holds no prompts; write one prompt per line")
    return prompts
