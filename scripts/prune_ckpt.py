"""Prune a checkpoint to a weights-only SD v1 file, such as A1111, ComfyUI and diffusers load:

    python scripts/prune_ckpt.py logs/<run>/checkpoints/last.ckpt -o dog.safetensors --precision fp16
    python scripts/prune_ckpt.py sd-v1-4-full-ema.ckpt -o sd-v1-4-ema.ckpt --ema

It reads a resumable last.ckpt (optimizer and loop state), a full-EMA file or any weights-only file, leaves out the
training state and the EMA copies (--ema: the EMA UNet weights take the UNet's place) and writes .ckpt or
.safetensors by the output's suffix, in --precision (default: as stored; the noise schedule keeps its own).
"""
import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm.checkpoint import PRECISIONS, export_weights, precision_dtype  # noqa: E402
from ldm.cli import run_command  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="the checkpoint to prune (.ckpt or .safetensors)")
    parser.add_argument("-o", "--output", required=True, help="the file to write: .ckpt or .safetensors")
    parser.add_argument("--precision", default=None, metavar="|".join(PRECISIONS),
                        help="precision of the written weights (default: as stored)")
    parser.add_argument("--ema", action="store_true", help="write the EMA UNet weights in place of the UNet's")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    opt = parse_args(argv)
    return run_command(lambda: export_weights(opt.input, opt.output, precision_dtype(opt.precision, "--precision"),
                                              opt.ema).summary())


if __name__ == "__main__":
    sys.exit(main())
