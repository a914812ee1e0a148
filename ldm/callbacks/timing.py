"""Per-step wall times, start-up time and peak memory of a training run, written as JSON for
scripts/benchmarks/train.py."""
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from ldm.optim.factory import uses_fused_backward
from ldm.optim.per_parameter import PerParameterOptimizer
from ldm.util import (START_TIME_ENV, atomic_write, backend_settings, peak_memory_stats, reset_peak_memory, span_peak,
                      synced_clock)

logger = logging.getLogger(__name__)

def process_start_time() -> Optional[float]:
    """When this process started (seconds since the epoch): the launcher's timestamp, else psutil's, else None."""
    if os.environ.get(START_TIME_ENV):
        return float(os.environ[START_TIME_ENV])
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().create_time()


def optimizer_name(optimizer: torch.optim.Optimizer, pl_module: pl.LightningModule) -> str:
    """The optimizer's class, or for one stepped per parameter the name the model's optimizer spec gives."""
    if not isinstance(optimizer, PerParameterOptimizer):
        return type(optimizer).__name__
    target = (getattr(pl_module, "optimizer_config", None) or {}).get("target") or "adamw"
    return f"{target} per parameter" + (", fused backward" if uses_fused_backward(optimizer) else "")


class StepTimer(Callback):
    """Wall time of every optimizer step, the start-up time (process start to the start of training: model loaded,
    optimizer built), the peak memory since the start of training (ldm.util.peak_memory_stats: CUDA max allocated
    and reserved on a GPU, also per step with the step's callbacks; the process's peak RSS) and the backend flags,
    written to `output` as JSON once max_steps is reached, before the final last.ckpt is saved."""

    def __init__(self, output: str):
        super().__init__()
        self.output = Path(output)
        self.steps: list[float] = []
        self.startup: Optional[float] = None
        self.step_peaks: list[tuple[int, int]] = []  # CUDA (max allocated, max reserved) of each step
        self._last = 0.0
        self._step = -1
        self._written = False
        self.backend: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        started = process_start_time()
        self.startup = None if started is None else time.time() - started
        self.backend = backend_settings()  # what main.py and the trainer set: the benchmark's reference copies it
        self._last, self._step = synced_clock(pl_module.device), trainer.global_step
        reset_peak_memory(pl_module.device)  # loading and caching are not the first step's

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._step:  # a micro-batch of gradient accumulation: the step goes on
            return
        now = synced_clock(pl_module.device)
        self.steps.append(now - self._last)
        if pl_module.device.type == "cuda":
            self.step_peaks.append(span_peak(pl_module.device))
        self._last, self._step = now, trainer.global_step
        if trainer.global_step >= trainer.max_steps:
            self.write(trainer, pl_module)

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
            "steps": self.steps, "startup_s": self.startup, **peak_memory_stats(device), "backend": self.backend,
            "cuda_step_peaks": self.step_peaks if cuda else None,
            "device": device.type, "torch_threads": torch.get_num_threads(), "precision": str(trainer.precision),
            "optimizer": optimizer_name(trainer.optimizers[0], pl_module) if trainer.optimizers else None,
            "gradient_checkpointing": any(getattr(m, "use_checkpoint", False) for m in pl_module.modules()),
            "trainable_parameters": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
        }
        text = json.dumps(result, indent=1).encode()
        atomic_write(self.output, lambda tmp: tmp.write_bytes(text), len(text))
        logger.info("step times, start-up and peak memory written to %s", self.output)
