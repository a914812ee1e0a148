"""Text-to-image sampling from a Stable Diffusion v1 checkpoint (class images before DreamBooth, results after)."""
import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm.cli import run_command  # noqa: E402
from ldm.inference.flags import add_sampling_arguments  # noqa: E402
from ldm.inference.txt2img import generate  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    add_sampling_arguments(parser)
    parser.add_argument("--H", type=int, default=None,
                        help="image height, in pixel space (default: the model's native size, 512 for SD v1)")
    parser.add_argument("--W", type=int, default=None,
                        help="image width, in pixel space (default: the model's native size, 512 for SD v1)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    opt = parse_args(argv)

    def work() -> str:
        written = generate(opt)
        return f"Your samples are ready and waiting for you here: {opt.outdir} ({len(written)} files written)"
    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
