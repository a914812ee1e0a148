"""ControlNet hint images: read, made 3-channel, resized to the output size, scaled to [0, 1]; Canny edges by kornia
(thresholds in OpenCV's units, as A1111's canny preprocessor takes them)."""
import numpy as np
import torch
from PIL import Image

from ldm.data.image_files import DataError, load_rgb

# OpenCV's Canny and kornia's both take the raw 3x3 Sobel gradient, of a 0..255 image and of a 0..1 image.
OPENCV_GRADIENT_SCALE = 255.0


def read_hint(path: str, width: int, height: int) -> torch.Tensor:
    """The image at `path` as a [1, 3, height, width] tensor in [0, 1] (EXIF rotation applied, resized if needed)."""
    try:
        image = load_rgb(path)
    except DataError as err:
        raise DataError(f"--control_image {err}") from None
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def canny(image: torch.Tensor, low: float = 100.0, high: float = 200.0) -> torch.Tensor:
    """White edges on black, [1, 3, H, W] in {0, 1}, of an image in [0, 1]; `low` and `high` are the hysteresis
    thresholds on the gradient of the 0..255 image (OpenCV's `cv2.Canny(image, low, high)`)."""
    from kornia.filters import canny as kornia_canny
    if not 0 <= low <= high:
        raise ValueError(f"--canny_low {low} and --canny_high {high}: need 0 <= low <= high")
    _, edges = kornia_canny(image, low / OPENCV_GRADIENT_SCALE, high / OPENCV_GRADIENT_SCALE,
                            kernel_size=(3, 3), sigma=(0.5, 0.5))
    return (edges > 0).float().expand(-1, 3, -1, -1).contiguous()


def hint_image(hint: torch.Tensor) -> Image.Image:
    """A [1, 3, H, W] hint in [0, 1] as an RGB image (what is saved next to the samples)."""
    array = (hint[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)
