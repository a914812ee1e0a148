"""A config target for end-to-end tests: a callback that is slow at one step, as an image logger or validation
samples are, so that a test can send a signal while it runs."""
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback


class SlowStep(Callback):
    """At `step`, after the checkpoint callback looked: touch `marker`, then wait until SIGTERM (or `seconds`)."""

    def __init__(self, step: int, marker: str, seconds: float = 60.0):
        super().__init__()
        self.step, self.marker, self.seconds = step, Path(marker), seconds

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step != self.step:
            return
        self.marker.touch()
        deadline = time.monotonic() + self.seconds
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.05)
