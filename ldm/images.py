"""Images we write: 8-bit RGB from the decoder, grids (labelled with Pillow's built-in font), and PNGs whose
metadata other tools read: A1111 "infotext" under `parameters`, and the full generation parameters as JSON."""
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Collection, Mapping, Optional, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from ldm.util import atomic_write, file_sha256

logger = logging.getLogger(__name__)

INFOTEXT_KEY = "parameters"  # what AUTOMATIC1111's PNG Info tab, civitai and others read: plain text
METADATA_KEY = "dreambooth"  # ours: every generation parameter as JSON
# A1111's display names of the samplers, whose infotext other tools parse.
SAMPLER_DISPLAY_NAMES = {"ddim": "DDIM", "plms": "PLMS", "euler": "Euler", "euler_a": "Euler a", "heun": "Heun",
                         "lms": "LMS", "dpm2": "DPM2", "dpm2_a": "DPM2 a", "dpmpp_2m": "DPM++ 2M",
                         "dpm_fast": "DPM fast", "dpm_adaptive": "DPM adaptive", "dpmpp_2s_a": "DPM++ 2S a",
                         "dpmpp_sde": "DPM++ SDE", "dpmpp_2m_sde": "DPM++ 2M SDE", "unipc": "UniPC"}
TEXT_COLOUR, STRIP_COLOUR = (255, 255, 255), (40, 40, 40)


def to_pil(images: Tensor) -> list[Image.Image]:
    """Decoded images in [-1, 1], [B, 3, H, W] -> 8-bit RGB PIL images."""
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a) for a in array.permute(0, 2, 3, 1).cpu().numpy()]


def make_grid(images: Sequence[Image.Image], per_row: int, padding: int = 2) -> Image.Image:
    """Images tiled `per_row` to a row on a black background with `padding` pixels around each (as torchvision)."""
    width, height = images[0].size
    columns = min(per_row, len(images))
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * (width + padding) + padding, rows * (height + padding) + padding))
    for k, image in enumerate(images):
        row, column = divmod(k, columns)
        grid.paste(image, (padding + column * (width + padding), padding + row * (height + padding)))
    return grid


def default_font(size: Optional[int] = None) -> Optional[ImageFont.ImageFont]:
    """Pillow's built-in font, at `size` pixels where Pillow can scale it; None when Pillow has no font."""
    try:
        return ImageFont.load_default() if size is None else ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only the small bitmap font
        return ImageFont.load_default()
    except (OSError, ValueError, ImportError):  # a Pillow built without its fonts: draw the strips without text
        logger.debug("no default font; grids are drawn without labels")
        return None


def _draw_text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, width: int,
               font: Optional[ImageFont.ImageFont]) -> None:
    """`text`, cut with "..." to fit `width` pixels; nothing when there is no font or it cannot draw the text."""
    if font is None:
        return
    try:
        while text and draw.textlength(text, font=font) > width:
            text = text[:-4] + "..." if len(text) > 4 else ""
        draw.text(xy, text, fill=TEXT_COLOUR, font=font)
    except (OSError, UnicodeEncodeError, ValueError):  # the bitmap fallback font knows Latin-1 only
        logger.debug("could not draw %r on a grid", text)


def labelled_grid(groups: Sequence[tuple[str, Sequence[Image.Image]]], per_row: int, title: str) -> Image.Image:
    """Grids of each group stacked, each with its label in a strip on the left, under a strip with `title`."""
    font = default_font()
    grids = [make_grid(images, per_row) for _, images in groups]
    strip = 14 if font is None else max(14, font.getbbox("Ag")[3] + 6)
    label_width = 8 if font is None else 8 + max(int(ImageDraw.Draw(grids[0]).textlength(label, font=font))
                                                 for label, _ in groups)
    width = label_width + max(g.width for g in grids)
    canvas = Image.new("RGB", (width, strip + sum(g.height for g in grids)), STRIP_COLOUR)
    draw = ImageDraw.Draw(canvas)
    _draw_text(draw, (4, 3), title, width - 8, font)
    top = strip
    for (label, _), grid in zip(groups, grids):
        canvas.paste(grid, (label_width, top))
        _draw_text(draw, (4, top + 4), label, label_width - 4, font)
        top += grid.height
    return canvas


def smoothed(values: Sequence[float], smoothing: float) -> list[float]:
    """An exponential moving average, debiased as TensorBoard's (the first points are not pulled to 0)."""
    result, average = [], 0.0
    for k, value in enumerate(values, start=1):
        average = smoothing * average + (1 - smoothing) * value
        result.append(average / (1 - smoothing ** k))
    return result


def line_chart(series: Mapping[str, Sequence[tuple[int, float]]], styles: Mapping[str, tuple[str, tuple]],
               title: str, steps: Optional[tuple[int, int]] = None, smoothing: float = 0.0,
               smoothed_keys: Collection[str] = (), size: tuple[int, int] = (960, 480),
               margin: tuple[int, int, int, int] = (70, 30, 20, 50), value_range: Optional[tuple[float, float]] = None,
               value_format: str = "{:.4f}") -> Image.Image:
    """Curves over steps: steps across (`steps`: first and last, default the series'), values up (linear), each
    series (`styles`: key -> legend name and colour) as its points joined; those of `smoothed_keys` as faint raw
    points under a strong smoothed line; a legend. `margin`: left, top, right, bottom; `value_range`: the value
    axis (default: the values' own)."""
    image = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(image), default_font()
    left, top, right, bottom = margin[0], margin[1], size[0] - margin[2], size[1] - margin[3]
    seen = [s for points in series.values() for s, _ in points]
    first, last = steps or (min(seen), max(seen))
    values_seen = [v for points in series.values() for _, v in points if math.isfinite(v)]
    s0, s1 = first, max(last, first + 1)
    v0, v1 = value_range or (min(values_seen), max(max(values_seen), min(values_seen) + 1e-6))

    def xy(step: float, value: float) -> tuple[float, float]:
        return (left + (step - s0) / (s1 - s0) * (right - left), bottom - (value - v0) / (v1 - v0) * (bottom - top))

    draw.rectangle((left, top, right, bottom), outline="black")
    for k in range(5):
        value, step = v0 + (v1 - v0) * k / 4, s0 + (s1 - s0) * k / 4
        y, x = xy(s0, value)[1], xy(step, v0)[0]
        draw.line((left, y, right, y), fill=(230, 230, 230))
        if font is not None:
            draw.text((4, y - 6), value_format.format(value), fill="black", font=font)
            draw.text((x - 10, bottom + 6), f"{step:.0f}", fill="black", font=font)
    legend_x = left + 10
    for key, points in series.items():
        name, colour = styles[key]
        faint = tuple(c + (255 - c) * 2 // 3 for c in colour)
        values = [v for _, v in points]
        for step, value in points:
            x, y = xy(step, value)
            draw.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=faint if key in smoothed_keys else colour)
        line = [xy(s, v) for (s, _), v in zip(points, smoothed(values, smoothing) if key in smoothed_keys else values)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        if font is not None:  # the legend: a stroke of the colour, then the name
            draw.line((legend_x, top + 13, legend_x + 16, top + 13), fill=colour, width=2)
            draw.text((legend_x + 20, top + 6), name, fill=colour, font=font)
            legend_x += 40 + int(draw.textlength(name, font=font))
    if font is not None:
        draw.text((left, 8), title, fill="black", font=font)
        draw.text(((left + right) // 2 - 15, size[1] - 20), "step", fill="black", font=font)
    return image


def _quote(value: Any) -> str:
    """An infotext value; text with a comma, colon or newline in JSON quotes, as A1111 writes it."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def infotext(metadata: Mapping[str, Any], size: tuple[int, int]) -> str:
    """A1111's `parameters` text: the prompt, a `Negative prompt:` line when there is one, then `Key: value, ...`."""
    seeds = metadata.get("seeds") or [None]
    sampler = metadata.get("sampler")
    if sampler is not None:
        sampler = SAMPLER_DISPLAY_NAMES.get(sampler, sampler) + (" Karras" if metadata.get("karras") else "")
    fields = {
        "Steps": metadata.get("steps"),
        "Sampler": sampler,
        "CFG scale": metadata.get("scale"),
        "Seed": metadata.get("seed", seeds[0]),
        "Size": f"{metadata.get('width', size[0])}x{metadata.get('height', size[1])}",
        "Model hash": (metadata.get("checkpoint_sha256") or "")[:10] or None,
        "Model": Path(metadata["checkpoint"]).stem if metadata.get("checkpoint") else None,
        "Denoising strength": metadata.get("strength"),
        "Clip skip": None if metadata.get("clip_skip", 1) == 1 else metadata["clip_skip"],  # A1111 omits 1
        "Eta": metadata.get("eta"),
        "Training step": metadata.get("step"),
        "Lora hashes": ", ".join(f"{Path(r['file']).stem}: {r['sha256'][:10]}" for r in metadata["loras"])
        if metadata.get("loras") else None,
        "TI hashes": ", ".join(f"{r['word']}: {r['sha256'][:10]}" for r in metadata["embeddings"])
        if metadata.get("embeddings") else None,
    }
    for i, net in enumerate(metadata.get("controlnets") or []):  # as A1111's ControlNet extension writes them
        model = f"{Path(net['file']).stem} [{net['sha256'][:8]}]"
        fields[f"ControlNet {i}"] = (f"Module: {net['control']}, Model: {model}, Weight: {net['strength']}, "
                                     f"Guidance Start: {net['start']}, Guidance End: {net['end']}")
    lines = [str(metadata.get("prompt", ""))]
    if metadata.get("negative_prompt"):
        lines.append(f"Negative prompt: {metadata['negative_prompt']}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items() if value is not None))
    return "\n".join(lines)


def generation_metadata(sampler: str, steps: int, scale: float, checkpoint: Optional[str | os.PathLike] = None,
                        ema: bool = False, loras: Optional[Sequence[Mapping[str, Any]]] = None,
                        **settings: Any) -> dict[str, Any]:
    """The metadata of a generated image, as every writer records it (txt2img, img2img, class images, validation
    samples, the image logger, evaluation): the sampler, steps and guidance scale; the checkpoint's name and SHA-256
    (A1111's model hash) when the weights come from a file; `ema` and the LoRA files when used; then the other
    `settings` that are not None (karras, eta, width, height, negative_prompt, prompt, seed, step, ...)."""
    metadata = {"sampler": sampler, "steps": steps, "scale": scale}
    if checkpoint is not None:
        metadata.update(checkpoint=Path(checkpoint).name, checkpoint_sha256=file_sha256(str(checkpoint)))
    if ema:
        metadata["ema"] = True
    if loras:
        metadata["loras"] = list(loras)
    return {**metadata, **{key: value for key, value in settings.items() if value is not None}}


def save_image(image: Image.Image, path: Path, metadata: dict[str, Any]) -> None:
    """Write a PNG atomically (never a partial file), with infotext when it has a prompt and the JSON metadata."""
    info = PngInfo()
    if "prompt" in metadata:
        info.add_text(INFOTEXT_KEY, infotext(metadata, image.size))
    info.add_text(METADATA_KEY, json.dumps(metadata, sort_keys=True))
    raw = image.width * image.height * len(image.getbands())  # a PNG is rarely larger than its raw pixels
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), raw + (1 << 16))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The generation parameters stored by `save_image` (or as JSON under `parameters`, by earlier versions)."""
    with Image.open(path) as image:
        return json.loads(image.text.get(METADATA_KEY) or image.text[INFOTEXT_KEY])
