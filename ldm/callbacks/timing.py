"""Per-step wall times, start-up time and peak memory of a training run, written as JSON for
scripts/benchmark_train.py."""
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from ldm.optim import uses_fused_backward
from ldm.per_param_optim import PerParameterOptimizer
from ldm.util import atomic_write

logger = logging.getLogger(__name__)

START_TIME_ENV = "STEP_TIMER_START"  # time.time() at which the benchmark launched this process


def process_start_time() -> Optional[float]:
    """When this process started (seconds since the epoch): the launcher's timestamp, else psutil's, else None."""
    if os.environ.get(START_TIME_ENV):
        return float(os.environ[START_TIME_ENV])
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().create_time()


def peak_rss_bytes() -> Optional[int]:
    """The process's peak resident memory so far, or None where the resource module is missing (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, kilobytes on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def optimizer_name(optimizer: torch.optim.Optimizer, pl_module: pl.LightningModule) -> str:
    """The optimizer's class, or for one stepped per parameter the name the model's optimizer spec gives."""
    if not isinstance(optimizer, PerParameterOptimizer):
        return type(optimizer).__name__
    target = (getattr(pl_module, "optimizer_config", None) or {}).get("target") or "adamw"
    return f"{target} per parameter" + (", fused backward" if uses_fused_backward(optimizer) else "")


class StepTimer(Callback):
    """Wall time of every optimizer step, the start-up time (process start to the start of training: model loaded,
    optimizer built) and the peak memory after the last step (CUDA max allocated and reserved on a GPU, also per step,
    callbacks of the step included; and the process's peak RSS), written to `output` as JSON once max_steps is
    reached, before the final last.ckpt is saved."""

    def __init__(self, output: str):
        super().__init__()
        self.output = Path(output)
        self.steps: list[float] = []
        self.startup: Optional[float] = None
        self.step_peaks: list[tuple[int, int]] = []  # CUDA (max allocated, max reserved) of each step
        self._peaks = (0, 0)  # of the steps before the current one and of what came before training
        self._last = 0.0
        self._step = -1
        self._written = False

    @staticmethod
    def _clock(pl_module: pl.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        started = process_start_time()
        self.startup = None if started is None else time.time() - started
        self._last, self._step = self._clock(pl_module), trainer.global_step
        if pl_module.device.type == "cuda":  # loading and caching are not the first step's
            self._peaks = (torch.cuda.max_memory_allocated(pl_module.device),
                           torch.cuda.max_memory_reserved(pl_module.device))
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._step:  # a micro-batch of gradient accumulation: the step goes on
            return
        now = self._clock(pl_module)
        self.steps.append(now - self._last)
        if pl_module.device.type == "cuda":
            self._record_step_peak(pl_module.device)
        self._last, self._step = now, trainer.global_step
        if trainer.global_step >= trainer.max_steps:
            self.write(trainer, pl_module)

    def _record_step_peak(self, device: torch.device) -> None:
        """The step's own CUDA peaks (those of the earlier steps are kept for the whole run's), then a fresh count."""
        peak = (torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device))
        self.step_peaks.append(peak)
        self._peaks = (max(self._peaks[0], peak[0]), max(self._peaks[1], peak[1]))
        torch.cuda.reset_peak_memory_stats(device)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._written:  # stopped before max_steps
            self.write(trainer, pl_module)

    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._written = True
        if not trainer.is_global_zero:
            return
        device = pl_module.device
        cuda = device.type == "cuda"
        result = {
            "steps": self.steps, "startup_s": self.startup, "peak_rss_bytes": peak_rss_bytes(),
            "cuda_max_allocated_bytes": max(self._peaks[0], torch.cuda.max_memory_allocated(device)) if cuda else None,
            "cuda_max_reserved_bytes": max(self._peaks[1], torch.cuda.max_memory_reserved(device)) if cuda else None,
            "cuda_step_peaks": self.step_peaks if cuda else None,
            "device": device.type, "torch_threads": torch.get_num_threads(), "precision": str(trainer.precision),
            "optimizer": optimizer_name(trainer.optimizers[0], pl_module) if trainer.optimizers else None,
            "gradient_checkpointing": any(getattr(m, "use_checkpoint", False) for m in pl_module.modules()),
            "trainable_parameters": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
        }
        text = json.dumps(result, indent=1).encode()
        atomic_write(self.output, lambda tmp: tmp.write_bytes(text), len(text))
        logger.info("step times, start-up and peak memory written to %s", self.output)
