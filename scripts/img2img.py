"""Image-to-image sampling: noise an init image to --strength and denoise it toward the prompt (SDEdit)."""
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
    parser.add_argument("--init-img", type=str, required=True, help="path to the input image")
    parser.add_argument("--strength", type=float, default=0.75,
                        help="how much noise to add to the init image: 1.0 keeps none of it")
    parser.add_argument("--H", type=int, default=None, help="height to sample at, rounded to the model's size multiple "
                        "(default: the model's native area at the init image's aspect ratio, 512x512 pixels for SD v1)")
    parser.add_argument("--W", type=int, default=None, help="width to sample at (as --H; one of them alone keeps the "
                        "init image's aspect ratio)")
    parser.add_argument("--keep_size", action="store_true",
                        help="sample at the init image's own size (cropped to the size multiple), not resized")
    parser.set_defaults(outdir="outputs/img2img-samples", n_iter=1, n_samples=2, scale=5.0)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    opt = parse_args(argv)

    def work() -> str:
        written = generate(opt, init_img=opt.init_img)
        return f"Your samples are ready and waiting for you here: {opt.outdir} ({len(written)} files written)"
    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
