"""User image files read one way everywhere (ldm/data/image_files.py): img2img init images, ControlNet control images
and masks come upright and 8-bit from EXIF-rotated JPEGs, 16-bit PNGs, CMYK, grey, RGBA, palette and WebP files, as
training photos do; init images are resized to the model's size unless --keep_size."""
import numpy as np
import pytest
import torch
from PIL import Image, features

from ldm.controlnet.hints import read_hint
from ldm.data.masks import load_mask
from ldm.inference.txt2img import init_size, load_init_image
from ldm.util import UserError

WIDTH, HEIGHT = 48, 32  # multiples of the tiny model's 16 pixels, so that --keep_size keeps every pixel


def reference() -> np.ndarray:
    """An upright [HEIGHT, WIDTH, 3] uint8 picture whose quadrants differ, so that any rotation or flip shows."""
    picture = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    picture[:HEIGHT // 2, :WIDTH // 2] = (200, 30, 30)
    picture[:HEIGHT // 2, WIDTH // 2:] = (30, 200, 30)
    picture[HEIGHT // 2:, :WIDTH // 2] = (30, 30, 200)
    picture[HEIGHT // 2:, WIDTH // 2:] = (220, 220, 40)
    return picture


def grey() -> np.ndarray:
    return np.asarray(Image.fromarray(reference()).convert("L"))


def write(kind: str, folder) -> tuple[str, np.ndarray, float]:
    """A file of `kind`, its expected upright 8-bit RGB content, and the mean error in 8-bit levels allowed."""
    picture, path = Image.fromarray(reference()), folder / kind
    if kind == "exif-rotated.jpg":
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 degrees clockwise to show": stored turned counter-clockwise
        picture.rotate(90, expand=True).save(path, exif=exif, quality=100)
        return str(path), reference(), 4.0
    if kind == "16-bit.png":
        Image.fromarray(grey().astype(np.uint16) * 257).save(path)
        return str(path), np.repeat(grey()[..., None], 3, axis=2), 0.0
    if kind == "cmyk.jpg":
        picture.convert("CMYK").save(path, quality=100)
        return str(path), reference(), 4.0
    if kind == "grey.png":
        picture.convert("L").save(path)
        return str(path), np.repeat(grey()[..., None], 3, axis=2), 0.0
    if kind == "rgba.png":
        rgba = picture.convert("RGBA")
        rgba.putalpha(Image.fromarray(np.where(np.arange(WIDTH) < WIDTH // 2, 255, 0).astype(np.uint8)[None].repeat(
            HEIGHT, axis=0)))
        rgba.save(path)
        expected = reference().copy()
        expected[:, WIDTH // 2:] = 255  # transparency over white
        return str(path), expected, 0.0
    if kind == "palette.png":
        picture.quantize(4).save(path)
        return str(path), reference(), 0.0
    if not features.check("webp"):
        pytest.skip("this Pillow was built without WebP support")
    picture.save(path, lossless=True)
    return str(path), reference(), 0.0


KINDS = ["exif-rotated.jpg", "16-bit.png", "cmyk.jpg", "grey.png", "rgba.png", "palette.png", "lossless.webp"]


def levels(image: torch.Tensor) -> np.ndarray:
    """A [1, 3, H, W] tensor in [-1, 1] as [H, W, 3] 8-bit levels."""
    return ((image[0].permute(1, 2, 0).numpy() + 1.0) * 127.5).round()


@pytest.mark.parametrize("kind", KINDS)
def test_init_image_is_read_upright_in_8_bit_rgb(tmp_path, kind):
    path, expected, tolerance = write(kind, tmp_path)
    image = load_init_image(path, multiple=16, native=64, keep_size=True)
    assert image.shape == (1, 3, HEIGHT, WIDTH)
    assert np.abs(levels(image) - expected).mean() <= tolerance


@pytest.mark.parametrize("kind", ["exif-rotated.jpg", "16-bit.png"])
def test_control_images_and_masks_are_read_the_same_way(tmp_path, kind):
    path, expected, tolerance = write(kind, tmp_path)
    hint = read_hint(path, WIDTH, HEIGHT)[0].permute(1, 2, 0).numpy() * 255.0
    assert np.abs(hint - expected).mean() <= tolerance
    mask = load_mask(path, (WIDTH, HEIGHT), (0, 0, WIDTH, HEIGHT), (WIDTH, HEIGHT), flip=False, floor=0.0)
    expected_grey = np.asarray(Image.fromarray(expected.astype(np.uint8)).convert("L"), dtype=np.float32)
    assert np.abs(mask.numpy() * 255.0 - expected_grey).mean() <= tolerance


@pytest.mark.parametrize("size,height,width,expected", [
    ((780, 520), None, None, (80, 48)),  # the native 64x64 area at the photo's 3:2, sides rounded to 16
    ((520, 780), None, None, (48, 80)),
    ((30, 20), None, None, (80, 48)),  # a small image is scaled up
    ((780, 520), 100, None, (144, 96)),  # --H alone: 100 -> 96, the width follows the aspect ratio
    ((780, 520), None, 64, (64, 48)),
    ((780, 520), 64, 64, (64, 64)),  # both: that size, centre-cropped to it
])
def test_init_size_is_the_models_area_or_h_w_rounded_to_the_multiple(size, height, width, expected):
    assert init_size(*size, native=64, multiple=16, target_height=height, target_width=width) == expected


def test_a_large_photo_is_resized_keep_size_keeps_it_and_bad_files_are_one_line(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (780, 520), (10, 120, 200)).save(path)
    assert load_init_image(str(path), 16, 64).shape == (1, 3, 48, 80)
    assert load_init_image(str(path), 16, 64, height=64, width=64).shape == (1, 3, 64, 64)
    assert load_init_image(str(path), 16, 64, keep_size=True).shape == (1, 3, 512, 768)
    with pytest.raises(UserError, match="--keep_size samples at the init image's own size"):
        load_init_image(str(path), 16, 64, height=64, keep_size=True)
    with pytest.raises(UserError, match="--W -8 must be a positive number"):
        load_init_image(str(path), 16, 64, width=-8)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"^--init-img .*broken.png: cannot read this image"):
        load_init_image(str(tmp_path / "broken.png"), 16, 64)
    with pytest.raises(UserError, match=r"^--control_image .*broken.png: cannot read this image"):
        read_hint(str(tmp_path / "broken.png"), 64, 64)
