"""DreamBooth data (Ruiz et al. 2023): subject photos and class-prior images with their captions, read the way
real-world photo folders need (EXIF orientation, any colour mode, stray files), and the instance/class pairing."""
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ldm.data.batch import MASK_KEY, MOMENTS_KEY
from ldm.data.buckets import bucket_box, bucket_sizes, nearest_bucket
from ldm.data.captions import STRATEGIES, caption_of, check_placeholders, fill
from ldm.data.image_files import DataError, load_rgb, open_image, reading, to_rgb
from ldm.data.masks import MASK_FOLDER, check_mask, is_mask_file, load_mask, mask_path
from ldm.util import UserError

logger = logging.getLogger(__name__)

INSTANCE_TEMPLATE = "photo of a {identifier} {class_word}"
CLASS_TEMPLATE = "photo of a {class_word}"
DEFAULT_IDENTIFIER, DEFAULT_CLASS_WORD = "sks", "dog"
CROPS = ("center", "random", "none")
INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                  "lanczos": Image.Resampling.LANCZOS}
IMAGE_SUFFIXES = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
SAMPLES_FOLDER = "samples"  # where scripts/stable_txt2img.py --outdir DIR writes its images: DIR/samples/


def count_images(folder: str | Path | None) -> int:
    """How many image files `folder` holds (0 when it does not exist); hidden files are not counted."""
    if folder is None or not Path(folder).is_dir():
        return 0
    return sum(1 for p in Path(folder).iterdir()
               if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def class_image_folder(folder: str) -> str:
    """The folder that holds the class images of `folder`: `folder/samples` when only it holds images (what
    `scripts/stable_txt2img.py --outdir folder` wrote), else `folder` itself."""
    samples = Path(folder) / SAMPLES_FOLDER
    if count_images(folder) == 0 and count_images(samples) > 0:
        logger.info("class images: %s holds no images, using its %s/ subfolder (%s)", folder, SAMPLES_FOLDER, samples)
        return str(samples)
    return folder


def list_images(folder: str | Path) -> list[Path]:
    """Image files of `folder`, sorted; hidden files, `.txt` captions and masks are skipped quietly, others with a
    warning."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: {'not a folder' if folder.exists() else 'folder not found'}")
    images, skipped = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() == ".txt" or is_mask_file(path) or (
                path.is_dir() and path.name == MASK_FOLDER):
            continue
        (images if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES else skipped).append(path)
    if skipped:
        names = ", ".join(p.name for p in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        hint = " (HEIC photos: convert them to JPEG first)" if any(p.suffix.lower() == ".heic" for p in skipped) else ""
        logger.warning("%s: skipped %d entries that are not image files: %s%s", folder, len(skipped), names, hint)
    if not images:
        found = f"only {len(skipped)} entries that are not image files" if skipped else "nothing"
        raise DataError(f"{folder}: no images to train on (found {found}; expected .jpg, .png, .webp, ...)")
    return images


def short_side(path: str | Path, size: int) -> int:
    """Decode a whole image file, so that a broken one fails now, and return its short side in pixels.

    JPEGs decode at a reduced scale near `size`, which still reads every byte of the file but is faster.
    """
    with reading(path), open_image(path) as image:
        width, height = image.size
        if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
            logger.warning("%s: a very large image (%dx%d, %.0f MP): it is decoded again for every step, slowly and "
                           "with much memory; downscale it, e.g. to 2048 px on the long side", path, width, height,
                           width * height / 1e6)
        side = min(image.size)
        image.draft("RGB", (size, size))
        to_rgb(ImageOps.exif_transpose(image))
        return side


def upright_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the image as it trains: after its EXIF orientation."""
    with reading(path), open_image(path) as image:
        return ImageOps.exif_transpose(image).size


def square_box(width: int, height: int, crop: str) -> tuple[int, int, int, int]:
    """The crop box (left, top, right, bottom) of the largest square: centred, at a random place, or the whole image."""
    if crop == "none":
        return 0, 0, width, height
    side = min(width, height)
    if crop == "center":
        left, top = (width - side) // 2, (height - side) // 2
    else:
        left = int(torch.randint(0, width - side + 1, ()))
        top = int(torch.randint(0, height - side + 1, ()))
    return left, top, left + side, top + side


class PersonalizedBase(Dataset):
    """The images of one folder as `image` ([H, W, 3] float in [-1, 1]) and `caption`, each repeated `repeats` times;
    once `use_moments` gave it their cached VAE posteriors, as `moments` ([2 * z_channels, h, w]) instead of `image`.

    Captions follow `caption_strategy` (ldm/data/captions.py; by default `template`, the instance template or with
    `reg` the class template, unless a `name.txt` sits beside `name.jpg`), and `caption_dropout` empties one with
    that probability. With masks in the folder (ldm/data/masks.py) each item also holds `mask` [H, W]. Every image
    is decoded once here, so a broken file fails before any model is loaded.
    """

    def __init__(self, data_root: str | None = None, size: int = 512, repeats: int = 100, flip_p: float = 0.5,
                 interpolation: str = "bicubic", crop: str = "center",
                 identifier: str = DEFAULT_IDENTIFIER, class_word: str = DEFAULT_CLASS_WORD, reg: bool = False,
                 template: str | None = None, caption_strategy: str = "instanceprompt", caption_dropout: float = 0.0,
                 mask_floor: float = 0.0, minimum_image_size: int = 0, buckets: bool = False):
        role = "class images (reg)" if reg else "instance images (train)"
        if data_root is None:
            hint = " (or set data.params.reg=null to train without prior preservation)" if reg else ""
            raise DataError(f"no folder given for the {role}: pass --{'reg_' if reg else ''}data_root{hint}")
        if crop not in CROPS or interpolation not in INTERPOLATIONS:
            raise DataError(f"{role}: crop must be one of {CROPS} and interpolation one of {tuple(INTERPOLATIONS)}, "
                            f"got crop={crop!r}, interpolation={interpolation!r}")
        if size < 8 or repeats < 1 or not all(0.0 <= p <= 1.0 for p in (flip_p, caption_dropout, mask_floor)):
            raise DataError(f"{role}: need size >= 8, repeats >= 1, 0 <= flip_p, caption_dropout, mask_floor <= 1 "
                            f"(got {size}, {repeats}, {flip_p}, {caption_dropout}, {mask_floor})")
        if caption_strategy not in STRATEGIES:
            raise DataError(f"{role}: caption_strategy must be one of {', '.join(STRATEGIES)}, "
                            f"got {caption_strategy!r}")
        for flag, word, example in (("--class_word", class_word, "dog"), ("--token/--identifier", identifier, "sks")):
            if not str(word).strip():
                raise DataError(f"{flag} is empty: the captions need it (e.g. {flag.split('/')[0]} {example})")
        self.size, self.repeats, self.flip_p, self.crop = size, repeats, flip_p, crop
        self.interpolation, self.resample = interpolation, INTERPOLATIONS[interpolation]
        self.moments: torch.Tensor | Sequence[torch.Tensor] | None = None
        self.identifier, self.class_word = identifier, class_word
        self.template = template or (CLASS_TEMPLATE if reg else INSTANCE_TEMPLATE)
        try:
            check_placeholders(self.template, f"{role}: template")
        except UserError as err:
            raise DataError(str(err)) from None
        self.caption_strategy, self.caption_dropout = caption_strategy, caption_dropout
        sides = {path: short_side(path, size) for path in list_images(data_root)}
        self.paths = [path for path, side in sides.items() if side >= minimum_image_size]
        if len(self.paths) < len(sides):
            skipped = [path.name for path, side in sides.items() if side < minimum_image_size]
            logger.warning("%s: skipped %d images smaller than minimum_image_size %d pixels: %s", data_root,
                           len(skipped), minimum_image_size, ", ".join(skipped[:5]))
            if not self.paths:
                raise DataError(f"{data_root}: every image is smaller than minimum_image_size {minimum_image_size}")
        self.captions = [self._caption(path) for path in self.paths]
        self.bucket_of: list[tuple[int, int]] | None = None  # (width, height) per image, with buckets
        if buckets:
            if crop != "none":
                raise DataError(f"{role}: buckets train each photo at its own aspect ratio, so they need crop: none "
                                f"(got crop: {crop})")
            sizes = bucket_sizes(size)
            self.bucket_of = [nearest_bucket(*upright_size(path), sizes) for path in self.paths]
        self.mask_paths = [mask_path(path) for path in self.paths]
        self.masked, self.mask_floor = any(self.mask_paths), mask_floor  # with any mask, every photo has one
        if self.masked:
            self._check_masks(data_root)
        self._masks: dict[tuple[int, bool], torch.Tensor] = {}
        small = [path.name for path in self.paths if sides[path] < size]
        if small:
            logger.warning("%s: %d images are smaller than %d pixels and will be upscaled (blurry): %s",
                           data_root, len(small), size, ", ".join(small[:5]))

    def _check_masks(self, data_root: str) -> None:
        """Decode every mask now, as the photos are, and log how many photos have one."""
        for photo, mask in zip(self.paths, self.mask_paths):
            if mask is not None:
                try:  # read as load_mask reads it: upright, 16-bit scaled, alpha over white
                    check_mask(load_rgb(mask).convert("L"), mask, upright_size(photo))
                except UserError as err:
                    raise DataError(str(err)) from None
        logger.info("%s: %d of %d photos have a loss mask (the others learn everywhere)", data_root,
                    sum(m is not None for m in self.mask_paths), len(self.paths))

    def _caption(self, image_path: Path) -> str:
        try:
            text = caption_of(image_path, self.caption_strategy, self.template)
        except UserError as err:
            raise DataError(str(err)) from None
        return fill(text, self.identifier, self.class_word)

    def __len__(self) -> int:
        return len(self.paths) * self.repeats

    @property
    def flips(self) -> tuple[bool, ...]:
        """The mirrorings an example can have: none, or with `flip_p` > 0 both."""
        return (False, True) if self.flip_p > 0 else (False,)

    def use_moments(self, moments: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Yield `moments[k][flip]` instead of decoding image k: [N images, len(flips), 2 * z_channels, h, w], or with
        buckets one [len(flips), 2 * z_channels, h, w] per image."""
        shapes = [tuple(m.shape[:1]) for m in moments]
        if len(shapes) != len(self.paths) or set(shapes) != {(len(self.flips),)}:
            raise ValueError(f"moments for {len(shapes)} images in {sorted(set(shapes))} flips, expected "
                             f"{len(self.paths)} images in {len(self.flips)} flips")
        self.moments = moments

    def image(self, k: int, flip: bool | None = None) -> torch.Tensor:
        """Image k cropped and resized, as [H, W, 3] in [-1, 1]; mirrored as `flip` says, or with probability flip_p."""
        return self.example(k, flip)[0]

    def example(self, k: int, flip: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image k as `image` gives it, and its loss mask [H, W] cut and mirrored alike (None without masks)."""
        image = load_rgb(self.paths[k])
        photo_size, box = image.size, self._box(k, image.size)
        image = image.resize(self.target_size(k), self.resample, box=box)
        if flip is None:
            flip = bool(torch.rand(()) < self.flip_p)
        if flip:
            image = ImageOps.mirror(image)
        mask = self._mask(k, photo_size, box, flip) if self.masked else None
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0), mask

    def target_size(self, k: int) -> tuple[int, int]:
        """(width, height) image k trains at: its bucket, or size x size."""
        return self.bucket_of[k] if self.bucket_of is not None else (self.size, self.size)

    def _box(self, k: int, photo_size: tuple[int, int]) -> tuple[int, int, int, int]:
        return bucket_box(*photo_size, self.bucket_of[k]) if self.bucket_of is not None else square_box(
            *photo_size, self.crop)

    def _mask(self, k: int, photo_size: tuple[int, int], box: tuple[int, int, int, int], flip: bool) -> torch.Tensor:
        if self.mask_paths[k] is None:
            width, height = self.target_size(k)
            return torch.ones(height, width)
        try:
            return load_mask(self.mask_paths[k], photo_size, box, self.target_size(k), flip, self.mask_floor)
        except UserError as err:
            raise DataError(str(err)) from None

    def mask(self, k: int, flip: bool) -> torch.Tensor:
        """Image k's mask for cached latents (a centre or full crop, so it is the same every time: kept in memory)."""
        if (k, flip) not in self._masks:
            size = upright_size(self.paths[k])
            self._masks[k, flip] = self._mask(k, size, self._box(k, size), flip)
        return self._masks[k, flip]

    def caption(self, k: int) -> str:
        """Image k's caption, or with probability caption_dropout the empty one (no draw when it is 0)."""
        if self.caption_dropout and bool(torch.rand(()) < self.caption_dropout):
            return ""
        return self.captions[k]

    def __getitem__(self, index: int) -> dict[str, Any]:
        k = index % len(self.paths)
        if self.moments is None:
            image, mask = self.example(k)
            item = {"image": image, "caption": self.caption(k)}
        else:
            flip = bool(torch.rand(()) < self.flip_p)  # the same draw as for an image, so flips follow the same seeds
            item = {MOMENTS_KEY: self.moments[k][self.flips.index(flip)], "caption": self.caption(k)}
            mask = self.mask(k, flip) if self.masked else None
        return item if mask is None else {**item, MASK_KEY: mask}
