"""`<run>/loss.png` at the end of a run (and after a crash or Ctrl-C): the training loss, instance and class apart,
each as its raw points and an exponentially smoothed line, and the evaluation loss when it was on (its points joined,
not smoothed: they are already stable), over every session of the run (read from its CSV logs); with validation's
`val/fidelity` (the best step's metric), its curve in a panel below, on the same steps."""
import csv
import io
import logging
import math
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
from PIL import Image, ImageDraw

from ldm.images import default_font
from ldm.util import DiskFullError, atomic_write

logger = logging.getLogger(__name__)
SERIES = {"train/loss_instance": ("instance", (31, 119, 180)), "train/loss_class": ("class", (214, 39, 40)),
          "val/loss_instance": ("evaluation, instance", (44, 160, 44)),
          "val/loss_class": ("evaluation, class", (148, 103, 189))}
SMOOTHED = ("train/loss_instance", "train/loss_class")
FIDELITY = {"val/fidelity": ("validation fidelity (best step's metric)", (255, 127, 14))}  # a panel of its own
SIZE, MARGIN = (960, 480), (70, 30, 20, 50)  # left, top, right, bottom


def read_losses(run: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of each series in the run's `csv/*/metrics.csv`; a later session's row for a step wins."""
    values: dict[str, dict[int, float]] = {key: {} for key in (*SERIES, *FIDELITY)}
    for path in sorted(run.glob("csv/*/metrics.csv")):
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                for key in values:
                    if row.get(key) not in (None, "") and row.get("step") not in (None, ""):
                        values[key][int(float(row["step"]))] = float(row[key])
    return {key: sorted(points.items()) for key, points in values.items() if points}


def smoothed(values: list[float], smoothing: float) -> list[float]:
    """An exponential moving average, debiased as TensorBoard's (the first points are not pulled to 0)."""
    result, average = [], 0.0
    for k, value in enumerate(values, start=1):
        average = smoothing * average + (1 - smoothing) * value
        result.append(average / (1 - smoothing ** k))
    return result


def draw_losses(series: dict[str, list[tuple[int, float]]], smoothing: float, title: str,
                steps: Optional[tuple[int, int]] = None) -> Image.Image:
    """The plot: steps across (`steps`: first and last, default the series'), loss up (linear), raw points faint, the
    smoothed lines strong (the evaluation's points joined), a legend."""
    image = Image.new("RGB", SIZE, "white")
    draw, font = ImageDraw.Draw(image), default_font()
    left, top, right, bottom = MARGIN[0], MARGIN[1], SIZE[0] - MARGIN[2], SIZE[1] - MARGIN[3]
    seen = [s for points in series.values() for s, _ in points]
    first, last = steps or (min(seen), max(seen))
    losses = [v for points in series.values() for _, v in points if math.isfinite(v)]
    s0, s1 = first, max(last, first + 1)
    v0, v1 = min(losses), max(max(losses), min(losses) + 1e-6)

    def xy(step: float, value: float) -> tuple[float, float]:
        return (left + (step - s0) / (s1 - s0) * (right - left), bottom - (value - v0) / (v1 - v0) * (bottom - top))

    draw.rectangle((left, top, right, bottom), outline="black")
    for k in range(5):
        value, step = v0 + (v1 - v0) * k / 4, s0 + (s1 - s0) * k / 4
        y, x = xy(s0, value)[1], xy(step, v0)[0]
        draw.line((left, y, right, y), fill=(230, 230, 230))
        if font is not None:
            draw.text((4, y - 6), f"{value:.4f}", fill="black", font=font)
            draw.text((x - 10, bottom + 6), f"{step:.0f}", fill="black", font=font)
    legend_x = left + 10
    for key, points in series.items():
        name, colour = {**SERIES, **FIDELITY}[key]
        faint = tuple(c + (255 - c) * 2 // 3 for c in colour)
        values = [v for _, v in points]
        for step, value in points:
            x, y = xy(step, value)
            draw.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=faint if key in SMOOTHED else colour)
        line = [xy(s, v) for (s, _), v in zip(points, smoothed(values, smoothing) if key in SMOOTHED else values)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        if font is not None:  # the legend: a stroke of the colour, then the name
            draw.line((legend_x, top + 13, legend_x + 16, top + 13), fill=colour, width=2)
            draw.text((legend_x + 20, top + 6), name, fill=colour, font=font)
            legend_x += 40 + int(draw.textlength(name, font=font))
    if font is not None:
        draw.text((left, 8), title, fill="black", font=font)
        draw.text(((left + right) // 2 - 15, SIZE[1] - 20), "step", fill="black", font=font)
    return image


class LossPlot(pl.Callback):
    """Writes `<run>/loss.png` when training ends, stops or fails (`lightning.loss_plot: false` turns it off)."""

    def __init__(self, smoothing: float = 0.9) -> None:
        if not 0 <= smoothing < 1:
            raise ValueError(f"loss_plot smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = smoothing

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.plot(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        try:
            self.plot(trainer)
        except (OSError, ValueError, DiskFullError) as err:  # the run's own error is the one to report
            logger.warning("could not write loss.png: %s", err)

    def plot(self, trainer: pl.Trainer) -> Optional[Path]:
        """Flush the loggers, read every session's CSV and write the picture; None when nothing was logged."""
        if not trainer.is_global_zero:
            return None
        for each in trainer.loggers:
            each.save()
        run = Path(trainer.default_root_dir)
        read = read_losses(run)
        series = {key: points for key, points in read.items() if key in SERIES}
        if not series:
            return None
        title = f"{run.name}: training loss (smoothing {self.smoothing})"
        if any(key.startswith("val/") for key in series):
            title += " and evaluation loss"
        fidelity = {key: points for key, points in read.items() if key in FIDELITY}
        seen = [s for points in read.values() for s, _ in points]
        steps = (min(seen), max(seen))
        picture = draw_losses(series, self.smoothing, title, steps)
        if fidelity:  # below the losses, on the same steps
            panel = draw_losses(fidelity, self.smoothing, f"{run.name}: validation fidelity", steps)
            stacked = Image.new("RGB", (picture.width, picture.height + panel.height), "white")
            stacked.paste(picture, (0, 0))
            stacked.paste(panel, (0, picture.height))
            picture = stacked
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        data = buffer.getvalue()
        atomic_write(run / "loss.png", lambda tmp: tmp.write_bytes(data), len(data))
        logger.info("loss plot: %s", run / "loss.png")
        return run / "loss.png"
