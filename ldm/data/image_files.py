"""Reading one user image file the way real-world photos need: Pillow's decompression-bomb guard as one line, EXIF
orientation applied, any colour mode (16-bit, CMYK, palette, transparency) made 8-bit RGB. Training photos, masks,
img2img init images and ControlNet control images all come through `load_rgb`."""
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

from ldm.util import UserError

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class DataError(UserError):
    """A problem with the user's image files (training photos, init or control images) or the training data's settings,
    with a message that names the path."""


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: transparency over white, 16-bit grey scaled (not clipped), CMYK/L/P converted."""
    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.clip(np.asarray(image, dtype=np.float32) / 257.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def open_image(path: str | Path) -> Image.Image:
    """Image.open with Pillow's decompression-bomb guard as one clear line: a DataError above its hard limit (twice
    Image.MAX_IMAGE_PIXELS), nothing below it (`short_side` warns once per file)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.DecompressionBombError as err:
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        found = f"{int(pixels.group(1)) / 1e6:.0f} MP" if pixels else "too many pixels"
        raise DataError(f"{path}: the image is too large to decode safely ({found}, Pillow's limit is "
                        f"{2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP); downscale it, e.g. to 2048 px on the long "
                        "side") from None


@contextmanager
def reading(path: str | Path) -> Iterator[None]:
    """Turn PIL's errors for an unreadable file into a DataError naming it."""
    try:
        yield
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{path}: cannot read this image ({err})") from None


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file upright (EXIF orientation applied) as 8-bit RGB."""
    with reading(path), open_image(path) as image:
        return to_rgb(ImageOps.exif_transpose(image))
