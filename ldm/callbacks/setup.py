"""The run folder: filled when training starts, after a resumed checkpoint has loaded, so a run that fails early
leaves nothing behind."""
import logging
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback

from ldm.callbacks.progress import quiet_lightning

logger = logging.getLogger(__name__)


class SetupCallback(Callback):
    """Creates `logdir` with `checkpoints/` and `configs/`, and saves the merged project and lightning configs there."""

    def __init__(self, logdir: str, now: str, config: DictConfig, lightning_config: DictConfig):
        super().__init__()
        self.logdir = Path(logdir)
        self.now = now
        self.config = config
        self.lightning_config = lightning_config

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """In every process, spawned workers (ddp_spawn) included: main.py's log format and Lightning filters."""
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO if trainer.is_global_zero else logging.WARNING,
                                format="%(levelname)s: %(message)s")
        quiet_lightning()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        configs = self.logdir / "configs"
        for folder in (self.logdir / "checkpoints", configs):
            folder.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, configs / f"{self.now}-project.yaml")
        OmegaConf.save(OmegaConf.create({"lightning": self.lightning_config}), configs / f"{self.now}-lightning.yaml")
        logger.info("run folder: %s", self.logdir)
