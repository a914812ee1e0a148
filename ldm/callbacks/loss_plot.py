"""`<run>/loss.png` at the end of a run (and after a crash or Ctrl-C): the training loss, instance and class apart,
each as its raw points and an exponentially smoothed line, and the evaluation loss when it was on (its points joined,
not smoothed: they are already stable), over every session of the run (read from its CSV logs); with validation's
`val/fidelity` (the best step's metric), its curve in a panel below, on the same steps."""
import csv
import io
import logging
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
from PIL import Image

from ldm.images import line_chart
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


def draw_losses(series: dict[str, list[tuple[int, float]]], smoothing: float, title: str,
                steps: Optional[tuple[int, int]] = None) -> Image.Image:
    """The loss plot: the training losses' raw points faint and their smoothed lines strong, the evaluation's points
    joined, in the colours of SERIES and FIDELITY."""
    return line_chart(series, {**SERIES, **FIDELITY}, title, steps, smoothing, SMOOTHED, SIZE, MARGIN)


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
