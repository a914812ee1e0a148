"""Loss masks of training photos: `name.mask.png` beside `name.jpg`, or `masks/name.<any image suffix>` in the same
folder; white = learn, black = ignore, grey = weight in between. A mask is cropped, resized and flipped with its
photo (the model brings it to the latent size by area averaging); `mask_floor` keeps some weight everywhere."""
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageOps

from ldm.data.image_files import load_rgb
from ldm.util import UserError

MASK_TAG = ".mask"
MASK_FOLDER = "masks"


def is_mask_file(path: Path) -> bool:
    """`name.mask.png` and the like: a mask, not a training photo."""
    return Path(path.stem).suffix == MASK_TAG


def mask_path(photo: Path) -> Optional[Path]:
    """The photo's mask file, if it has one."""
    beside = photo.with_name(f"{photo.stem}{MASK_TAG}.png")
    if beside.is_file():
        return beside
    folder = photo.parent / MASK_FOLDER
    found = sorted(folder.glob(f"{photo.stem}.*")) if folder.is_dir() else []
    return found[0] if found else None


def check_mask_size(mask: Image.Image, path: Path, photo_size: tuple[int, int]) -> None:
    """Refuse a mask (upright) of another size than its photo."""
    if mask.size != photo_size:
        raise UserError(f"{path}: the mask is {mask.size[0]}x{mask.size[1]}, its photo {photo_size[0]}x"
                        f"{photo_size[1]}; a mask must have its photo's size")


def check_mask(mask: Image.Image, path: Path, photo_size: tuple[int, int]) -> None:
    """Refuse, before training, a mask (upright, mode L) of another size than its photo, or one with no white pixel:
    an all-black mask would make the photo's loss exactly 0 at every step."""
    check_mask_size(mask, path, photo_size)
    brightest = mask.getextrema()[1]
    if brightest < 255:
        raise UserError(f"{path}: the mask has no white pixel (its brightest is {brightest} of 255), so its photo "
                        "would teach nothing: paint the subject white (a mask saved with values 0 and 1 looks black)")


def load_mask(path: Path, photo_size: tuple[int, int], box: tuple[int, int, int, int], size: tuple[int, int],
              flip: bool, floor: float) -> torch.Tensor:
    """The mask as [height, width] (of `size`, width first) float in [floor, 1], cut by the photo's crop `box` and
    mirrored with it."""
    mask = load_rgb(path).convert("L")  # as the photos are read: EXIF orientation, 16-bit scaled, alpha over white
    check_mask_size(mask, path, photo_size)  # check_mask read every mask whole before training
    mask = mask.resize(size, Image.Resampling.BOX, box=box)
    if flip:
        mask = ImageOps.mirror(mask)
    values = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)
    return floor + (1.0 - floor) * values
