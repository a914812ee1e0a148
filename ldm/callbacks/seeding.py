"""Randomness of a training run with several processes: each rank draws its own timesteps, noise and dropout (the
global RNGs seeded with seed + rank when training starts), so that a second device adds information; the optimizer
step draws from a stream that every rank shares (seeded with the seed), so that stochastic rounding keeps the
ranks' weights identical. Data shuffling keeps Lightning's shared seed (PL_GLOBAL_SEED) on every rank."""
import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback


def rng_states(device: torch.device) -> list[torch.Tensor]:
    """The states of torch's CPU generator and of `device`'s default generator (when it is not the CPU)."""
    states = [torch.get_rng_state()]
    if device.type != "cpu":
        states.append(torch.get_device_module(device).get_rng_state(device))
    return states


def set_rng_states(states: list[torch.Tensor], device: torch.device) -> None:
    """Put back what `rng_states` returned."""
    torch.set_rng_state(states[0])
    if device.type != "cpu":
        torch.get_device_module(device).set_rng_state(states[1], device)


class RankSeed(Callback):
    """Seeds each rank's training stream with `seed` + global rank at train start, and runs every optimizer step (from
    after the backward to the end of the batch) on a stream seeded with `seed` alike on all ranks."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed
        self._parked: list[torch.Tensor] = []  # the stream that is not in use: the shared one, or in a step the rank's
        self._in_step = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.manual_seed(self.seed)  # every device's generator
        self._parked = rng_states(pl_module.device)
        rank_seed = self.seed + trainer.global_rank
        random.seed(rank_seed)
        np.random.seed(rank_seed % 2 ** 32)
        torch.manual_seed(rank_seed)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if not self._in_step:
            self._swap(pl_module.device)
            self._in_step = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._in_step:
            self._swap(pl_module.device)
            self._in_step = False

    def _swap(self, device: torch.device) -> None:
        """Park the stream in use and take up the parked one."""
        current = rng_states(device)
        set_rng_states(self._parked, device)
        self._parked = current
