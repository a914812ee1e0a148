"""The best step: `checkpoints/best.safetensors`, the weights of the monitored round (validation samples, evaluation
loss) whose metric (default `val/fidelity`) was best, weights only, or a LoRA run's LoRA file, with `best.json`
beside it (its step, the scores of its round, the rounds since); early stopping after `patience` rounds without a
better one. Its state travels in last.ckpt, so that a resumed run knows the best so far."""
import json
import logging
import math
from pathlib import Path
from typing import Any, Literal, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from ldm.callbacks.commands import sample_command
from ldm.callbacks.eval_loss import EvaluationLoss
from ldm.callbacks.validation import ValidationSamples
from ldm.checkpoint import precision_dtype
from ldm.optim.factory import optimizer_eval_mode
from ldm.util import atomic_write_text

logger = logging.getLogger(__name__)
WEIGHTS, RECORD = "best.safetensors", "best.json"


def short(name: str) -> str:
    return name[4:] if name.startswith("val/") else name


class BestStep(Callback):
    """`lightning.callbacks.best_step`: after each round of the monitors (`lightning.callbacks.validation`,
    `eval_loss`), keeps the weights of the round whose `monitor` was highest (`mode: max`) or lowest (`min`) as
    `checkpoints/best.safetensors` (in `save_precision`, default as trained); with `patience` > 0, stops the run
    after that many rounds without a better one, never before step `min_steps`. main.py runs it after the monitors,
    so that a stop ends the very step of the round that decided it."""

    def __init__(self, monitor: str = "val/fidelity", mode: Literal["max", "min"] = "max", patience: int = 0,
                 min_steps: int = 0, save_precision: Optional[str] = None):
        super().__init__()
        if mode not in ("max", "min") or patience < 0 or min_steps < 0:
            raise ValueError(f"best_step needs mode max or min, patience >= 0 (0: no early stopping) and min_steps "
                             f">= 0; got {mode!r}, {patience}, {min_steps}")
        self.monitor, self.mode, self.patience, self.min_steps = monitor, mode, patience, min_steps
        self.dtype = precision_dtype(save_precision, "best_step.params.save_precision")
        self.best: Optional[dict[str, Any]] = None  # {"step", "value", "scores"}
        self.rounds_since_best = 0
        self.last_round = -1  # the step of the latest round that gave the metric
        self.stop_reason: Optional[str] = None
        self._stop = False
        self._monitors: list[Callback] = []
        self._seen: set[str] = set()
        self._notes: list[str] = []

    def folder(self, trainer: pl.Trainer) -> Path:
        return Path(trainer.default_root_dir) / "checkpoints"

    def better(self, value: float, than: float) -> bool:
        return value > than if self.mode == "max" else value < than

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._monitors = [c for c in trainer.callbacks
                          if isinstance(c, (ValidationSamples, EvaluationLoss)) and c.every_n_steps]
        for monitor in self._monitors:
            if self.observe not in monitor.listeners:
                monitor.listeners.append(self.observe)

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "mode": self.mode, "best": self.best,
                "rounds_since_best": self.rounds_since_best, "last_round": self.last_round}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if (state_dict.get("monitor"), state_dict.get("mode")) != (self.monitor, self.mode):
            self._notes.append(f"best step: last.ckpt's best is by {state_dict.get('monitor')} "
                               f"({state_dict.get('mode')}); this session watches {self.monitor} ({self.mode}) afresh")
            return
        self.best, self.last_round = state_dict["best"], state_dict["last_round"]
        self.rounds_since_best = state_dict["rounds_since_best"]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop, self.stop_reason, self._seen = False, None, set()
        self.adopt_record(trainer)
        if self._monitors and self.monitor.startswith("val/fidelity") and self.missing_fidelity():
            self._notes.append(f"best step: nothing will log {self.monitor}: {self.missing_fidelity()}")
        for note in self._notes if trainer.is_global_zero else []:
            logger.warning(note)
        self._notes = []

    def missing_fidelity(self) -> str:
        """Why no monitor of this run gives val/fidelity (empty when one does)."""
        validations = [m for m in self._monitors if isinstance(m, ValidationSamples)]
        if not validations:
            return "validation is off (lightning.callbacks.validation.params.every_n_steps)"
        notes = [m.fidelity_note for m in validations if m.fidelity_note]
        return "" if any(m.recipe and not m.fidelity_note for m in validations) else notes[0]

    def adopt_record(self, trainer: pl.Trainer) -> None:
        """A round after last.ckpt was written (or a weights-only resume) left a newer best.json: its best is the
        one best.safetensors holds."""
        path = self.folder(trainer) / RECORD
        if not path.is_file() or not (self.folder(trainer) / WEIGHTS).is_file():
            return
        try:
            record = json.loads(path.read_text())
            same = (record["monitor"], record["mode"]) == (self.monitor, self.mode)
            best, last_round = record["best"], int(record["last_round"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            self._notes.append(f"best step: {path} is unreadable ({err}); the next round writes it afresh")
            return
        if not same or best is None or last_round < self.last_round:
            return
        if self.best is not None and best["step"] != self.best["step"]:
            self._notes.append(f"best step: {WEIGHTS} holds step {best['step']} ({self.monitor} {best['value']:.4f}), "
                               f"a round after last.ckpt was written; it stays the best until a better round")
        if last_round <= trainer.global_step:  # no round was lost: its count is the one to go on with
            self.rounds_since_best = int(record.get("rounds_since_best", 0))
        elif self.best is None or best["step"] != self.best["step"]:
            self.rounds_since_best = 0
        self.best, self.last_round = best, min(last_round, trainer.global_step)

    def observe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float]) -> None:
        """A monitor's metrics of this step (rank zero): keep the weights when the monitored one is the best yet."""
        step = trainer.global_step
        self._seen.update(metrics)
        if self.monitor not in metrics:
            return
        value, self.last_round = float(metrics[self.monitor]), step
        if math.isfinite(value) and (self.best is None or self.better(value, self.best["value"])):
            with optimizer_eval_mode(trainer.optimizers):  # the weights the monitors measured
                pl_module.save_step_weights(self.folder(trainer) / WEIGHTS, self.dtype)
            self.best, self.rounds_since_best = {"step": step, "value": value, "scores": dict(metrics)}, 0
            logger.info("step %d: the best %s so far, %.4f: %s", step, self.monitor, value,
                        self.folder(trainer) / WEIGHTS)
        else:
            self.rounds_since_best += 1
            self.check_patience(step)
        self.write_record(trainer)

    def check_patience(self, step: int) -> None:
        if not self.patience or self.rounds_since_best < self.patience or step < self.min_steps or self._stop:
            return
        self._stop = True
        since = (f"has not improved on {self.best['value']:.4f} (step {self.best['step']})" if self.best is not None
                 else "has not been finite")
        self.stop_reason = (f"stopped early at step {step}: {self.monitor} {since} in {self.rounds_since_best} "
                            f"rounds (best_step.params.patience {self.patience})")

    def write_record(self, trainer: pl.Trainer) -> None:
        if self.best is None:
            return
        record = {"weights": WEIGHTS, **self.state_dict()}
        atomic_write_text(self.folder(trainer) / RECORD, json.dumps(record, indent=1) + "\n")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Early stopping: every rank stops at the step that rank zero's round decided."""
        if not self.patience or trainer.should_stop:
            return
        if trainer.strategy.reduce_boolean_decision(self._stop, all=False):
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The validation monitors' progression.png (written at their own train end, before this one's) again, with
        the best step's row marked."""
        if self.best is None:
            return
        how = f"{short(self.monitor)} {self.best['value']:.3f}"
        for monitor in self._monitors:
            if isinstance(monitor, ValidationSamples):
                monitor.write_progression(trainer, (self.best["step"], how))

    def summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        """The end-of-run summary's lines: the best step, its scores and the command that samples from it; why the
        run stopped early; or why no best step was kept."""
        lines = []
        if self.best is not None:
            path = self.folder(trainer) / WEIGHTS
            scores = ", ".join(f"{short(name)} {value:.3f}" for name, value in self.best["scores"].items()
                               if name != self.monitor)
            lines.append(f"best step: {self.best['step']} by {self.monitor} ({self.mode}) {self.best['value']:.4f}"
                         f"{f' ({scores})' if scores else ''}: {path}")
            command = sample_command(trainer, pl_module, path)
            if command:
                lines.append(f"sample the best step: {command}")
        elif self._monitors and self.monitor in self._seen:
            lines.append(f"best step: none kept, {self.monitor} was never a finite number")
        elif self._monitors:
            why = self.missing_fidelity() if self.monitor.startswith("val/fidelity") else ""
            lines.append(f"best step: none kept, no monitor logged {self.monitor} (they logged "
                         f"{', '.join(sorted(self._seen)) or 'nothing'}){f': {why}' if why else ''}; "
                         "lightning.callbacks.best_step.params.monitor names the metric")
        if self.stop_reason:
            lines.append(self.stop_reason)
        return lines
