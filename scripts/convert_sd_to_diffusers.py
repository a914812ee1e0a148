"""An SD v1 file as a diffusers pipeline folder, written offline, that `StableDiffusionPipeline.from_pretrained`
loads:

    python scripts/convert_sd_to_diffusers.py logs/<run>/checkpoints/last.ckpt -o dog-pipeline --half

The model config is --config, else the run's own (for a file in a run's checkpoints/), else the SD v1 inference
config; the part configs are built here, the tokenizer comes from this package's files, and the scheduler is
DDIMScheduler with `clip_sample: false`, so that diffusers' DDIM gives our DDIM's images. diffusers must be
installed (its key tables are used); nothing is downloaded.
"""
import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from ldm.checkpoint import ShapeMismatchError, read_state_dict, select_unet_weights, to_sd_layout  # noqa: E402
from ldm.checkpoint.diffusers import write_diffusers_folder  # noqa: E402
from ldm.checkpoint.fitting import with_fitting_config  # noqa: E402
from ldm.cli import run_command  # noqa: E402
from ldm.config import load_config  # noqa: E402
from ldm.inference.loading import choose_config  # noqa: E402
from ldm.util import UserError, ensure_writable_dir  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="the SD v1 file (.ckpt or .safetensors, resumable or weights only)")
    parser.add_argument("-o", "--output", required=True, help="the pipeline folder to write (new or empty)")
    parser.add_argument("--config", default=None, help="the model config (default: see above)")
    parser.add_argument("--half", action="store_true", help="write fp16 weights (default: as stored)")
    parser.add_argument("--ema", action="store_true", help="write the file's EMA UNet weights in place of the UNet's")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    opt = parse_args(argv)

    def work() -> str:
        output = Path(opt.output)
        if output.exists() and (not output.is_dir() or any(output.iterdir())):
            raise UserError(f"-o {output} exists and is not an empty folder; choose a new one")
        ensure_writable_dir(output, "-o")
        config_path = choose_config(opt.config, opt.checkpoint)
        state = select_unet_weights(to_sd_layout(read_state_dict(opt.checkpoint)), opt.ema)
        try:
            written = write_diffusers_folder(state, load_config(config_path), output,
                                             torch.float16 if opt.half else None)
        except ShapeMismatchError as err:
            raise with_fitting_config(err) from None
        size = sum(path.stat().st_size for path in written)
        return f"wrote {output}: a diffusers StableDiffusionPipeline folder, weights {size / 1e6:.1f} MB"
    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
