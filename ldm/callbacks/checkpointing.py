"""Checkpoints of a DreamBooth run: weights-only `step_<N>.ckpt` files, the resumable `last.ckpt`, atomic writes."""
import logging
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.plugins import TorchCheckpointIO

from ldm.checkpoint import CheckpointError, save_checkpoint, save_weights

logger = logging.getLogger(__name__)

RESUME_KEYS = ("optimizer_states", "loops", "global_step")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with every write going through ldm.checkpoint (temporary file, then rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        save_checkpoint(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Optional[Callable] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        missing = [key for key in RESUME_KEYS if key not in checkpoint]
        if missing:
            raise CheckpointError(f"{path} holds weights only (no {', '.join(missing)}), so training cannot resume "
                                  f"from it; resume from a run's last.ckpt, or start a new run with --actual_resume "
                                  f"{path}")
        return checkpoint


def weights_are_finite(module: torch.nn.Module) -> bool:
    """Whether every trainable parameter is free of NaN and inf (one device sync)."""
    flags = [torch.isfinite(p).all() for p in module.parameters() if p.requires_grad]
    return bool(torch.stack(flags).all()) if flags else True


class StepCheckpoint(Callback):
    """`step_<N>.ckpt` (weights only, SD v1 layout) every `every_n_train_steps` steps and `last.ckpt` (resumable:
    weights, optimizer, step) at the end, or at the next step boundary after Ctrl-C or SIGTERM.

    A press of Ctrl-C stops after the current step; a second one quits at once without saving. Weights that are not
    finite are never written, so the previous checkpoint stays the last good one. `safetensors` also writes fp16
    `.safetensors` copies of the weights, for sharing.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 500, safetensors: bool = False):
        super().__init__()
        if every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps must be >= 0 (0: only last.ckpt), got {every_n_train_steps}")
        self.dirpath = Path(dirpath)
        self.every_n_train_steps = every_n_train_steps
        self.safetensors = safetensors
        self.last_good: Optional[Path] = None
        self.stop_reason: Optional[str] = None
        self._sigint_requested = False
        self._previous_sigint: Any = None
        self._weights_step = self._last_step = self._start_step = -1

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_step = trainer.global_step
        self.last_good = self.last_path if self.last_path.is_file() else None  # a resumed run's checkpoint
        if threading.current_thread() is threading.main_thread():  # Python allows signal handlers only there
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._sigint_requested:
            raise KeyboardInterrupt
        self._sigint_requested = True
        logger.warning("Ctrl-C: stopping after this step and saving last.ckpt (press Ctrl-C again to quit without "
                       "saving)")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_train_steps and step % self.every_n_train_steps == 0 and step not in (0, self._weights_step):
            self._weights_step = step
            self.save_weights(trainer, pl_module, self.dirpath / f"step_{step}.ckpt")
        stop = self._sigint_requested or trainer.received_sigterm
        if trainer.strategy.reduce_boolean_decision(stop, all=False):
            self.stop_reason = "SIGTERM" if trainer.received_sigterm else "Ctrl-C"
            self.save_last(trainer, pl_module)
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        nothing_new = trainer.global_step == self._start_step and self.last_path.is_file()
        if self._last_step != trainer.global_step and not nothing_new:
            self.save_last(trainer, pl_module)

    def _check_finite(self, pl_module: pl.LightningModule, path: Path) -> None:
        if not weights_are_finite(pl_module):
            kept = f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was written"
            raise FloatingPointError(f"the weights hold NaN or inf at step {pl_module.global_step}, so {path.name} "
                                     f"was not written; {kept}. Try a lower learning rate or full precision.")

    def save_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule, path: Path) -> None:
        """Write the model's weights only (no optimizer state) as an SD v1 `.ckpt`, and `.safetensors` if asked."""
        self._check_finite(pl_module, path)
        if trainer.is_global_zero:
            state = pl_module.state_dict()
            save_weights(state, path)
            if self.safetensors:
                save_weights(state, path.with_suffix(".safetensors"), half=True)
            logger.info("step %d: saved %s", trainer.global_step, path)
        self.last_good = path

    def save_last(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the resumable `last.ckpt` (weights, optimizer state, loop progress) through the trainer."""
        self._check_finite(pl_module, self.last_path)
        self._last_step = trainer.global_step
        trainer.save_checkpoint(self.last_path, weights_only=False)
        if trainer.is_global_zero:
            if self.safetensors:
                save_weights(pl_module.state_dict(), self.last_path.with_suffix(".safetensors"), half=True)
            logger.info("step %d: saved %s", trainer.global_step, self.last_path)
        self.last_good = self.last_path
