"""Checkpoints of a DreamBooth run: weights-only `step_<N>.ckpt` files, the resumable `last.ckpt`, atomic writes."""
import logging
import shlex
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.plugins import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ldm.checkpoint import CheckpointError, check_finite, precision_dtype, remove_stale_temp_files, save_checkpoint
from ldm.embeddings.training import EMBEDDING_SUFFIX
from ldm.optim.factory import optimizer_eval_mode
from ldm.training.runs import step_files

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
        if "state_dict" not in checkpoint:  # the weights a spawned worker (ddp_spawn) hands back: not a resume
            return checkpoint
        missing = [key for key in RESUME_KEYS if key not in checkpoint]
        if missing:
            raise CheckpointError(f"{path} holds weights only (no {', '.join(missing)}), so training cannot resume "
                                  f"from it with its optimizer; add --resume_weights_only to continue from its step "
                                  f"with a fresh optimizer, or start a new run with --actual_resume {path}")
        check_finite(checkpoint["state_dict"], str(path))
        return checkpoint


def weights_are_finite(module: torch.nn.Module) -> bool:
    """Whether every trainable parameter is free of NaN and inf (one device sync)."""
    flags = [torch.isfinite(p).all() for p in module.parameters() if p.requires_grad]
    return bool(torch.stack(flags).all()) if flags else True


def resume_command(run_dir: Path, weights_only: bool = False) -> str:
    """The command that resumes a run folder, quoted for a POSIX shell (paths with spaces)."""
    return shlex.join(["python", "main.py", "-t", "-r", str(run_dir), *(["--resume_weights_only"] if weights_only
                                                                        else [])])


class StepCheckpoint(Callback):
    """`step_<N>.ckpt` (weights only, SD v1 layout) every `every_n_train_steps` steps, and `last.ckpt` (resumable:
    weights, optimizer, step) every `save_last_every_n_steps` steps (default: with every step file; 0: only at the
    end), at the end, and at the next step boundary after Ctrl-C or SIGTERM, so a crash of any kind can resume. A
    SIGTERM that comes after this callback's look at the step (while the image logger or validation runs) is saved
    when Lightning raises it, at the step it ends.

    A press of Ctrl-C stops after the current step; a second one quits at once without saving. Weights that are not
    finite are never written, so the previous checkpoint stays the last good one. `keep_last_n` keeps only the newest
    n step files (default: all). `safetensors` also writes `.safetensors` copies of the weights, for sharing.
    `save_precision` (fp16, bf16 or fp32) is the precision of the step files and the `.safetensors` copies (default:
    step files as the model holds its weights, copies fp16); `last.ckpt` always keeps the model's own precision.
    A LoRA run writes `step_<N>.safetensors` LoRA files instead, and `last.safetensors` with every `last.ckpt`.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 500, safetensors: bool = False,
                 save_last_every_n_steps: Optional[int] = None, keep_last_n: Optional[int] = None,
                 save_precision: Optional[str] = None):
        super().__init__()
        bad_keep = keep_last_n is not None and keep_last_n < 1
        if every_n_train_steps < 0 or (save_last_every_n_steps or 0) < 0 or bad_keep:
            raise ValueError(f"need every_n_train_steps >= 0 (0: only last.ckpt), save_last_every_n_steps >= 0 "
                             f"(0: only at the end), keep_last_n >= 1 or null (keep all); got {every_n_train_steps}, "
                             f"{save_last_every_n_steps}, {keep_last_n}")
        self.dirpath = Path(dirpath)
        self.every_n_train_steps = every_n_train_steps
        self.save_last_every_n_steps = (every_n_train_steps if save_last_every_n_steps is None
                                        else save_last_every_n_steps)
        self.keep_last_n = keep_last_n
        self.safetensors = safetensors
        self.weights_dtype = precision_dtype(save_precision, "save_precision")
        self.shared_dtype = self.weights_dtype or torch.float16
        self.last_good: Optional[Path] = None
        self.stop_reason: Optional[str] = None
        self._sigint_requested = False
        self._previous_sigint: Any = None
        self._weights_step = self._last_step = self._start_step = self._last_ckpt_step = -1

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def _kept(self) -> list[str]:
        """The checkpoints a resume can start from: last.ckpt (with its step when this run knows it), the newest step
        file."""
        steps = step_files(self.dirpath) if self.dirpath.is_dir() else []
        kept = []
        if self.last_path.is_file():
            kept.append(f"{self.last_path}" + (f" (step {self._last_ckpt_step})" if self._last_ckpt_step >= 0 else ""))
        if steps:
            kept.append(str(steps[-1][1]) if not kept else steps[-1][1].name)
        return kept

    def _resume_command(self) -> str:
        return resume_command(self.dirpath.parent, weights_only=not self.last_path.is_file())

    def resume_hint(self) -> str:
        """After a full disk: which checkpoints the run keeps, and the command that resumes from them."""
        kept = self._kept()
        if not kept:
            return "no checkpoint was written yet"
        return f"kept {' and '.join(kept)}; free some space, then resume with: {self._resume_command()}"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_step = trainer.global_step
        self.last_good = self.last_path if self.last_path.is_file() else None  # a resumed run's checkpoint
        resumed = trainer.ckpt_path is not None and Path(trainer.ckpt_path) == self.last_path
        self._last_ckpt_step = self._start_step if resumed else -1
        if trainer.is_global_zero and self.dirpath.is_dir():
            remove_stale_temp_files(self.dirpath)
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
            self.prune(trainer)
        stop = self._sigint_requested or trainer.received_sigterm
        if trainer.strategy.reduce_boolean_decision(stop, all=False):
            self.stop_reason = "SIGTERM" if trainer.received_sigterm else "Ctrl-C"
            self.save_last(trainer, pl_module)
            trainer.should_stop = True
        elif self.save_last_every_n_steps and step % self.save_last_every_n_steps == 0 and step != self._start_step:
            self.save_last(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Save last.ckpt at the step a SIGTERM ended (Lightning raises it after the step's callbacks ran)."""
        if not isinstance(exception, SIGTERMException):
            return
        self.stop_reason = "SIGTERM"
        step = trainer.global_step
        if step in (self._last_step, self._start_step):
            return
        if not weights_are_finite(pl_module):
            logger.warning("SIGTERM at step %d: the weights hold NaN or inf, so last.ckpt was not written", step)
            return
        self.save_last(trainer, pl_module)

    def stop_message(self, step: int) -> str:
        """After Ctrl-C or SIGTERM at `step`: "saved" only for a last.ckpt written at that step, else what is kept."""
        if self._last_step == step and self.last_path.is_file():
            return f"saved {self.last_path}. Resume with: {self._resume_command()}"
        kept = self._kept()
        if not kept:
            return f"step {step} was not saved, and no checkpoint was written"
        return f"step {step} was not saved; kept {' and '.join(kept)}. Resume with: {self._resume_command()}"

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        nothing_new = trainer.global_step == self._start_step and self.last_path.is_file()
        if self._last_step != trainer.global_step and not nothing_new:
            self.save_last(trainer, pl_module)

    def prune(self, trainer: pl.Trainer) -> None:
        """Delete the step files (and their .safetensors copies and embedding files) older than the newest
        `keep_last_n`."""
        if self.keep_last_n is None or not trainer.is_global_zero:
            return
        for _, path in step_files(self.dirpath)[:-self.keep_last_n]:
            path.unlink(missing_ok=True)
            path.with_suffix(".safetensors").unlink(missing_ok=True)
            path.with_name(path.stem + EMBEDDING_SUFFIX).unlink(missing_ok=True)  # a pivotal run's embedding
            logger.info("removed %s (keep_last_n: %d)", path.name, self.keep_last_n)

    def _check_finite(self, pl_module: pl.LightningModule, path: Path) -> None:
        if not weights_are_finite(pl_module):
            kept = f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was written"
            raise FloatingPointError(f"the weights hold NaN or inf at step {pl_module.global_step}, so {path.name} "
                                     f"was not written; {kept}. Try a lower learning rate or full precision.")

    def save_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule, path: Path) -> None:
        """Write the model's weights only (no optimizer state) as an SD v1 `.ckpt`, and `.safetensors` if asked; a
        schedule-free optimizer's evaluation weights."""
        with optimizer_eval_mode(trainer.optimizers):
            path = path.with_suffix(pl_module.weights_suffix)
            self._check_finite(pl_module, path)
            if trainer.is_global_zero:
                pl_module.save_step_weights(path, self.weights_dtype, self.shared_dtype if self.safetensors else None)
                logger.info("step %d: saved %s", trainer.global_step, path)
        self.last_good = path

    def save_last(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the resumable `last.ckpt` (weights, optimizer state, loop progress) through the trainer; with a
        schedule-free optimizer, its evaluation weights (its train() on resume goes back to the training ones)."""
        with optimizer_eval_mode(trainer.optimizers):
            self._check_finite(pl_module, self.last_path)
            self._last_step = trainer.global_step
            trainer.save_checkpoint(self.last_path, weights_only=False)
            self._last_ckpt_step = trainer.global_step
            if trainer.is_global_zero:  # a LoRA run's LoRA file, or the shareable .safetensors when asked
                pl_module.save_step_weights(self.last_path, self.weights_dtype,
                                            self.shared_dtype if self.safetensors else None, beside_resumable=True)
                logger.info("step %d: saved %s", trainer.global_step, self.last_path)
        self.last_good = self.last_path


class StartAtStep(Callback):
    """Continue a run from weights saved at `step` with a fresh optimizer: Lightning's step counters start there."""

    def __init__(self, step: int):
        super().__init__()
        self.step = step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loop = trainer.fit_loop.epoch_loop
        progress = loop.automatic_optimization.optim_progress.optimizer.step.total
        progress.ready = progress.completed = self.step
        loop._batches_that_stepped = self.step  # the step the loggers write
