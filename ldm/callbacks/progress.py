"""What a training run shows: progress in steps (a bar on a terminal, a line every N steps in a log file), an
end-of-run summary with the command that samples from the result, and none of Lightning's noise."""
import contextlib
import json
import logging
import re
import sys
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any, Mapping, Optional, TextIO

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ldm.callbacks.best_step import BestStep
from ldm.callbacks.commands import sample_command
from ldm.util import atomic_write, peak_memory_stats, peak_memory_text, reset_peak_memory

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"  # in the run folder, written at the end of each training session

# Lightning's lines that a DreamBooth user cannot act on: an advertisement, device lines (our start line names the
# device), the stop reason (our summary follows), the CUDA_VISIBLE_DEVICES echo, the Tensor Cores hint (main.py
# sets the float32 matmul precision itself), and under DDP each process's set-up lines and seed.
NOISE_LINES = re.compile(r"💡 Tip|GPU available|TPU available|HPU available|`Trainer.fit` stopped|LOCAL_RANK: "
                         r"|You are using a CUDA device .* that has Tensor Cores|Initializing distributed: "
                         r"|-{20,}\s*distributed_backend=|\[rank: [1-9]\d*\] Seed set to")
NOISY_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
                 "pytorch_lightning.accelerators.cuda", "lightning_fabric.utilities.distributed",
                 "lightning_fabric.utilities.seed")
NOISE_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # inside Lightning, with torch >= 2.10
    r"Found \d+ module\(s\) in eval mode",  # LatentDiffusion keeps the frozen VAE (and text encoder) in eval mode
    r"You're resuming from a checkpoint that ended before the epoch ended",  # batches are random draws anyway
    r"The '\w+_dataloader' does not have many workers",  # the tiny and toy configs load a few small images in-process
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not NOISE_LINES.match(record.getMessage())


_DROP_NOISE = _DropNoise()


def quiet_lightning() -> None:
    """Silence, in this one place, Lightning's messages the user cannot act on; warnings about the user's own
    settings still show."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).addFilter(_DROP_NOISE)
    for message in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def clock(seconds: float) -> str:
    """13:20 or 1:13:20."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes}:{secs:02}"


class StepProgress(Callback):
    """`step 123/800 · loss 0.123 · 1.2 s/step · ETA 13:20`: a bar when the output is a terminal, else a log line
    every `every_n_steps` steps (default: the trainer's log_every_n_steps); a summary of the run at its end, with the
    peak memory of training alone (the GPU's peak counters restart when training starts)."""

    def __init__(self, every_n_steps: Optional[int] = None, mean_over: int = 50, stream: Optional[TextIO] = None):
        super().__init__()
        if (every_n_steps is not None and every_n_steps < 1) or mean_over < 1:
            raise ValueError(f"need every_n_steps >= 1 and mean_over >= 1, got {every_n_steps}, {mean_over}")
        self.every_n_steps = every_n_steps
        self.losses: deque = deque(maxlen=mean_over)
        self.stream = stream
        self._bar: Optional[tqdm] = None
        self._exit = contextlib.ExitStack()
        self._start_step = self._shown_step = 0
        self._started = 0.0
        self.trained = False  # whether training started at all (a run resumed at max_steps has nothing to do)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_step = self._shown_step = trainer.global_step
        self._started = time.monotonic()
        self.trained = True
        reset_peak_memory(pl_module.device)  # class images and caching came before: the peak reported is training's
        if not trainer.is_global_zero:
            return
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in pl_module.parameters() if not p.requires_grad)
        threads = f", {torch.get_num_threads()} CPU thread(s)" if pl_module.device.type == "cpu" else ""
        logger.info("training steps %d to %d on %s (%d device(s)%s, precision %s): %.1f M trainable parameters, "
                    "%.1f M frozen", trainer.global_step, trainer.max_steps, pl_module.device.type,
                    trainer.num_devices, threads, trainer.precision, trainable / 1e6, frozen / 1e6)
        stream = self.stream or sys.stderr
        if stream.isatty():
            self._bar = self._exit.enter_context(tqdm(total=trainer.max_steps, initial=trainer.global_step,
                                                      file=stream, bar_format="{desc}  {bar}", dynamic_ncols=True))
            self._exit.enter_context(logging_redirect_tqdm())

    def line(self, step: int, total: int) -> str:
        """The progress line at `step` of `total`."""
        done = step - self._start_step
        pace = (time.monotonic() - self._started) / done if done else None
        recent = list(self.losses)[-10:]
        loss = f"{torch.stack(recent).mean().item():.3f}" if recent else "-"
        timing = f"{pace:.1f} s/step · ETA {clock(pace * (total - step))}" if pace is not None else "ETA -"
        return f"step {step}/{total} · loss {loss} · {timing}"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            self.losses.append(loss.detach().float())
        step, total = trainer.global_step, trainer.max_steps
        if not trainer.is_global_zero or step == self._shown_step:
            return
        self._shown_step = step
        if self._bar is not None:
            self._bar.set_description_str(self.line(step, total), refresh=False)
            self._bar.update(step - self._bar.n)
        elif step % (self.every_n_steps or trainer.log_every_n_steps or 1) == 0 or step == total:
            logger.info(self.line(step, total))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit.close()
        self._bar = None
        if trainer.is_global_zero:
            for text in self.summary(trainer, pl_module):
                logger.info(text)
            self.write_summary(trainer, pl_module)

    def write_summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """`<run>/summary.json`, what scripts/compare.py reads: steps, s/step, peak memory, trainable parameters."""
        done = trainer.global_step - self._start_step
        if not done:
            return
        stats = peak_memory_stats(pl_module.device)
        summary = {"steps": trainer.global_step, "seconds_per_step": (time.monotonic() - self._started) / done,
                   "peak_memory_bytes": stats["cuda_max_allocated_bytes"] or stats["peak_rss_bytes"],
                   "peak_reserved_bytes": stats["cuda_max_reserved_bytes"],
                   "peak_memory": peak_memory_text(pl_module.device),
                   "trainable_parameters": sum(p.numel() for p in pl_module.trainable_parameters())
                   if hasattr(pl_module, "trainable_parameters") else None}
        text = json.dumps(summary, indent=2) + "\n"
        atomic_write(Path(trainer.default_root_dir) / SUMMARY_FILE, lambda tmp: Path(tmp).write_text(text),
                     len(text))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._exit.close()

    def summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        """Steps, mean loss, time, peak memory, what the run wrote, and the command that samples from it."""
        seconds, done = time.monotonic() - self._started, trainer.global_step - self._start_step
        mean = f"{torch.stack(list(self.losses)).mean().item():.4f}" if self.losses else "-"
        lines = [f"summary: steps {self._start_step} to {trainer.global_step} ({done} in this session) in "
                 f"{clock(seconds)}{f', {seconds / done:.2f} s/step' if done else ''}; mean loss of the last "
                 f"{len(self.losses)} steps {mean}; peak memory {peak_memory_text(pl_module.device)}"]
        run = Path(trainer.default_root_dir)
        folder = run / "checkpoints"
        last = folder / "last.ckpt"
        lora = getattr(pl_module, "lora_names", None) is not None
        step_suffix = ".safetensors" if lora else ".ckpt"
        names = sorted((p.name for p in folder.glob("step_*" + step_suffix)), key=lambda n: (len(n), n))
        if last.is_file() or names:
            lines.append(f"checkpoints: {', '.join(([f'{last} (resumable)'] if last.is_file() else []) + names)}")
        grids = sorted((run / "images" / "train").glob("samples_*.png"), key=lambda p: (_grid_step(p), p.name))
        if grids:
            newest = [p for p in grids if _grid_step(p) == _grid_step(grids[-1])]
            lines.append(f"sample grids (step {_grid_step(grids[-1])}): {', '.join(map(str, newest))}")
        command = sample_command(trainer, pl_module, last) if last.is_file() else None
        if command:
            lines.append(f"sample from it: {command}")
        for callback in trainer.callbacks:
            if isinstance(callback, BestStep):
                lines += callback.summary(trainer, pl_module)
        return lines


def _grid_step(path: Path) -> int:
    match = re.search(r"_gs-(\d+)", path.name)
    return int(match.group(1)) if match else -1
