"""Write the toy world's DreamBooth subject photos: the yellow-and-blue ball (or with --subject box the second
subject, the blue-and-yellow box) at five positions and sizes, on mixed backgrounds (two plain, then street, kitchen
and snow), so that the subject does not come with one background.

    python scripts/make_toy_subject.py                       # data/toy/subject/
    python scripts/make_toy_subject.py --subject box --output_dir data/toy/subject_box
    python scripts/make_toy_subject.py --contexts kitchen --output_dir photos/   # all on one background
    python scripts/make_toy_subject.py --contexts kitchen --output_dir masked/ --masks   # with loss masks
"""
import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm.cli import run_command  # noqa: E402
from ldm.toy.world import CONTEXTS, SUBJECTS, object_mask, render, subject_scene  # noqa: E402

# (x, y, size): where the object stands and its half-height, as fractions of the side.
DEFAULT_CONTEXTS = ("plain", "street", "kitchen", "plain", "snow")
LAYOUTS = ((0.5, 0.82, 0.2), (0.32, 0.9, 0.15), (0.66, 0.76, 0.23), (0.42, 0.7, 0.13), (0.6, 0.93, 0.18))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="data/toy/subject")
    parser.add_argument("--subject", choices=SUBJECTS, default="ball", help="which subject, by its class word")
    parser.add_argument("--contexts", nargs="+", choices=CONTEXTS, default=list(DEFAULT_CONTEXTS),
                        help="backgrounds, used in turn")
    parser.add_argument("--size", type=int, default=64, help="side in pixels")
    parser.add_argument("--masks", action="store_true", help="also write subject-N.mask.png: the object, exactly")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    opt = parse_args(argv)
    return run_command(lambda: write_subject(opt))


def write_subject(opt: argparse.Namespace) -> str:
    """The subject's photos (and masks) in --output_dir; what was written."""
    folder = Path(opt.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for index, (x, y, size) in enumerate(LAYOUTS):
        scene = subject_scene(opt.contexts[index % len(opt.contexts)], x=x, y=y, size=size, seed=index,
                              subject=SUBJECTS[opt.subject])
        Image.fromarray(render(scene, opt.size)).save(folder / f"subject-{index + 1}.png")
        if opt.masks:
            mask = (object_mask(scene, opt.size) * 255).round().astype(np.uint8)
            Image.fromarray(mask).save(folder / f"subject-{index + 1}.mask.png")
    return f"wrote {len(LAYOUTS)} photos of the {opt.subject} subject to {folder}"


if __name__ == "__main__":
    sys.exit(main())
