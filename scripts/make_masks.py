"""Loss masks for training photos from a text prompt, with CLIPSeg from a local folder (nothing is downloaded):

    python scripts/make_masks.py --input_dir photos/ --text dog --clipseg models/clipseg-rd64-refined

writes `name.mask.png` beside each photo (or into --output_dir), which training then uses (white = learn): the
pixels CLIPSeg scores above --threshold, grown by --padding pixels and feathered by --feather pixels. A photo that
has a mask already (a hand-edited one, say) keeps it unless --overwrite. Download the model once:
`hf download CIDAS/clipseg-rd64-refined --local-dir models/clipseg-rd64-refined`.
"""
import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm import tqdm  # noqa: E402

from ldm.cli import run_command  # noqa: E402
from ldm.data.image_files import load_rgb  # noqa: E402
from ldm.data.masks import MASK_TAG, mask_path  # noqa: E402
from ldm.data.personalized import list_images  # noqa: E402
from ldm.images import save_image  # noqa: E402
from ldm.inference.loading import choose_device  # noqa: E402
from ldm.modules.encoders.clipseg import ClipSegMasker  # noqa: E402
from ldm.util import UserError, ensure_writable_dir  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--input_dir", required=True, help="the photos")
    add("--output_dir", default=None, help="where the masks go (default: beside the photos)")
    add("--text", required=True, help="what to keep, e.g. dog")
    add("--clipseg", default="models/clipseg-rd64-refined", help="a local CLIPSeg folder")
    add("--threshold", type=float, default=0.3, help="the probability above which a pixel is the subject")
    add("--padding", type=int, default=8, help="pixels the mask grows by around the subject")
    add("--feather", type=float, default=4.0, help="the width of the soft edge, in pixels")
    add("--device", default="auto", help="cpu, cuda, mps or auto")
    add("--overwrite", action="store_true", help="replace the masks that exist (default: keep them, and say how many)")
    return parser.parse_args(argv)


def has_mask(photo: Path, output: Path) -> bool:
    """Whether the photo has a mask that training would use, or one at the path this script writes."""
    if (output / f"{photo.stem}{MASK_TAG}.png").exists():
        return True
    return output.resolve() == photo.parent.resolve() and mask_path(photo) is not None


def main(argv: Optional[Sequence[str]] = None) -> int:
    opt = parse_args(argv)

    def work() -> str:
        if not 0.0 <= opt.threshold <= 1.0 or opt.padding < 0 or opt.feather < 0:
            raise UserError("--threshold must be in [0, 1], --padding and --feather at least 0")
        photos = list_images(opt.input_dir)
        output = Path(opt.output_dir or opt.input_dir)
        ensure_writable_dir(output, "--output_dir")
        output.mkdir(parents=True, exist_ok=True)
        todo = photos if opt.overwrite else [photo for photo in photos if not has_mask(photo, output)]
        kept = len(photos) - len(todo)
        masker = ClipSegMasker(opt.clipseg, choose_device(opt.device)) if todo else None
        for photo in tqdm(todo, desc=f"masks of '{opt.text}'", unit="photo"):
            mask = masker.mask(load_rgb(photo), opt.text, opt.threshold, opt.padding, opt.feather)
            save_image(mask, output / f"{photo.stem}{MASK_TAG}.png",
                       {"text": opt.text, "threshold": opt.threshold, "padding": opt.padding, "feather": opt.feather})
        return f"wrote {len(todo)} masks to {output}" + (
            f"; kept {kept} that existed (--overwrite replaces them)" if kept else "")
    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
