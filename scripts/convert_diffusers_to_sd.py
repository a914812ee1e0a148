"""A diffusers Stable Diffusion v1 pipeline folder as one SD v1 file, such as A1111, ComfyUI and this tool load:

    python scripts/convert_diffusers_to_sd.py path/to/stable-diffusion-v1-5 -o sd15.safetensors --half

The folder (model_index.json, unet/, vae/, text_encoder/; .safetensors or .bin weights, or their fp16 variants) is
read with diffusers' own key tables inverted (diffusers must be installed; nothing is downloaded); the noise
schedule comes from its scheduler config. `--ckpt` and `--actual_resume` take such a folder directly as well.
"""
import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from ldm.checkpoint import export_weights  # noqa: E402
from ldm.checkpoint.diffusers import is_diffusers_folder  # noqa: E402
from ldm.cli import run_command  # noqa: E402
from ldm.util import UserError  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="the diffusers pipeline folder (it holds model_index.json)")
    parser.add_argument("-o", "--output", required=True, help="the file to write: .safetensors or .ckpt")
    parser.add_argument("--half", action="store_true", help="write fp16 weights (default: as stored)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    opt = parse_args(argv)

    def work() -> str:
        if not is_diffusers_folder(opt.folder):
            raise UserError(f"{opt.folder} is not a diffusers pipeline folder (no model_index.json in it)")
        return export_weights(opt.folder, opt.output, torch.float16 if opt.half else None).summary()
    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
