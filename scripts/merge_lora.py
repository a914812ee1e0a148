"""Fold LoRA files into a Stable Diffusion v1 checkpoint, for tools that take one full model file:

    python scripts/merge_lora.py sd-v1-5.safetensors logs/<run>/checkpoints/last.safetensors:0.8 -o merged.safetensors
    python scripts/merge_lora.py base.ckpt style.safetensors:0.5 dog.safetensors -o merged.ckpt --half

Each LoRA adds up @ down * alpha / rank * scale to its weights, one file after another (scale 1 by default); LyCORIS
files (DoRA, LoHa, LoKr) fold in by their kind's rule (docs/lora.md). The output is a weights-only SD v1 file (.ckpt
or .safetensors by its suffix); a full-EMA base is written without its EMA copy, which the LoRA does not change
(--ema: its EMA UNet weights are the ones merged and kept).
"""
import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm.checkpoint import (EMA_PREFIX, UNET_PREFIX, WEIGHT_SUFFIXES, CheckpointError, read_lora,  # noqa: E402
                            read_state_dict, save_weights, select_unet_weights, to_sd_layout)
from ldm.checkpoint.fitting import check_fits  # noqa: E402
from ldm.cli import run_command  # noqa: E402
from ldm.config import DEFAULT_CONFIG, shown  # noqa: E402
from ldm.inference.loading import sampling_config  # noqa: E402
from ldm.lora.files import check_lora_specs, lora_names, parse_lora_spec  # noqa: E402
from ldm.lora.layers import merge_lora  # noqa: E402
from ldm.util import UserError, ensure_writable_dir, format_bytes, user_or_project_path  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=user_or_project_path,
                        help="the SD v1 checkpoint the LoRA files were trained on (.ckpt or .safetensors)")
    parser.add_argument("loras", nargs="+", metavar="LORA[:SCALE]", help="kohya-format LoRA or LyCORIS "
                        "files, each at a scale")
    parser.add_argument("-o", "--output", required=True, help="the merged checkpoint: .ckpt or .safetensors")
    parser.add_argument("--config", type=user_or_project_path, default=None, help="the base's model config (its "
                        "UNet's shape; default: as sampling chooses, the run's own for a file in a run's checkpoints/, "
                        f"else {shown(DEFAULT_CONFIG)}); a base it does not fit is refused, naming the config that "
                        "fits")
    parser.add_argument("--half", action="store_true", help="write fp16 weights (default: as the base stores them)")
    parser.add_argument("--ema", action="store_true", help="merge into the base's EMA UNet weights and keep those")
    return parser.parse_args(argv)


def check_paths(opt: argparse.Namespace) -> Path:
    """The output path, refused when it has no weight suffix or is one of the inputs."""
    output = Path(opt.output)
    if output.suffix not in WEIGHT_SUFFIXES:
        raise UserError(f"{output}: the output must end in .ckpt or .safetensors (it chooses the format)")
    inputs = [Path(opt.base), *(Path(parse_lora_spec(spec)[0]) for spec in opt.loras)]
    if output.exists() and any(output.resolve() == path.resolve() for path in inputs if path.exists()):
        raise UserError(f"{output} is one of the inputs; write the merged checkpoint to another file")
    ensure_writable_dir(output.parent, "-o")
    return output


def merge(opt: argparse.Namespace) -> list[str]:
    """Merge and write; one line per LoRA file and one for the output."""
    output = check_paths(opt)
    check_lora_specs(opt.loras, "LORA")
    config = sampling_config(opt.config, opt.base)
    state = select_unet_weights(to_sd_layout(read_state_dict(opt.base)), opt.ema)
    if not any(key.startswith(UNET_PREFIX) for key in state):
        raise CheckpointError(f"{opt.base} has no UNet weights ({UNET_PREFIX}*); is it a full SD v1 checkpoint?")
    state = {key: value for key, value in state.items() if not key.startswith(EMA_PREFIX)}
    check_fits(config, state, opt.base)  # the LoRA names follow the config's UNet: they must be the base's
    names = lora_names(config.model)
    lines = []
    for spec in opt.loras:
        path, scale = parse_lora_spec(spec)
        report = merge_lora(state, read_lora(path)[0], names, scale, source=Path(path).name)
        lines.append(f"{report.summary()}, at scale {scale:g}")
    save_weights(state, output, dtype=torch.float16 if opt.half else None)
    lines.append(f"wrote {output} ({format_bytes(output.stat().st_size)}, {len(state)} tensors)")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    opt = parse_args(argv)
    return run_command(lambda: "\n".join(merge(opt)), level=logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
